"""Pure parts of the node simulator: node specs and kubelet's variable expansion."""

from __future__ import annotations

import pytest

from secondsite.devcluster.nodesim import NodeSpec, expand_vars, parse_node_spec


def test_parse_node_spec_with_labels() -> None:
    spec = parse_node_spec("protected-1:secondsite.io/site=protected,zone=a")
    assert spec == NodeSpec("protected-1", {"secondsite.io/site": "protected", "zone": "a"})
    assert parse_node_spec(spec.to_arg()) == spec


def test_parse_node_spec_without_labels() -> None:
    assert parse_node_spec("n1") == NodeSpec("n1", {})


@pytest.mark.parametrize("bad", ["Upper", "-lead", "n1:novalue", "n1:=x", ""])
def test_parse_node_spec_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_node_spec(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)-$(B)", "1-2"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("plain $HOME", "plain $HOME"),
        ("$(A)$(A)", "11"),
    ],
)
def test_expand_vars_like_kubelet(text: str, expected: str) -> None:
    assert expand_vars(text, {"A": "1", "B": "2"}) == expected
