"""plan_apply: what a PUT /v1/config changes, and which changes it refuses to apply live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.control.errors import ApplyConflict
from secondsite.appliance.control.models import ChangeAction
from secondsite.appliance.runtime import plan_apply

LISTEN = {"nbdUnix": "/run/ss/nbd.sock"}


def config(
    journals: Sequence[dict[str, Any]] = (),
    volumes: Sequence[dict[str, Any]] = (),
    listen: dict[str, Any] = LISTEN,
    node: str | None = None,
) -> ApplianceConfig:
    return ApplianceConfig.model_validate(
        {"listen": listen, "journals": list(journals), "volumes": list(volumes), "node": node}
    )


def journal(vpg: str, **kw: Any) -> dict[str, Any]:
    return {"vpg": vpg, "directory": f"/data/{vpg}", **kw}


def disk(name: str, vpg: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "vpg": vpg, "backing": f"/dev/{name}", **kw}


def mirror(name: str, vpg: str, size: str = "1Gi", **kw: Any) -> dict[str, Any]:
    return {"name": name, "vpg": vpg, "capture": "mirrorTarget", "size": size, **kw}


def summary(changes: list[Any]) -> list[tuple[str, str, str, list[str]]]:
    return [(c.kind, c.name, str(c.action), c.fields) for c in changes]


def conflicts(current: ApplianceConfig, desired: ApplianceConfig, **phases: str) -> dict[str, str]:
    with pytest.raises(ApplyConflict) as info:
        plan_apply(current, desired, phases)
    return {c.path: c.message for c in info.value.conflicts}


def test_from_empty_adds_vpgs_with_their_volumes() -> None:
    desired = config([journal("a"), journal("b")], [disk("d1", "a"), mirror("m1", "b")])
    assert summary(plan_apply(config(), desired, {})) == [
        ("vpg", "a", "added", []),
        ("volume", "d1", "added", []),
        ("vpg", "b", "added", []),
        ("volume", "m1", "added", []),
    ]


def test_same_config_changes_nothing() -> None:
    c = config([journal("a")], [disk("d1", "a")])
    assert plan_apply(c, c, {}) == []


def test_quantities_and_durations_compare_by_value() -> None:
    old = config([journal("a", hardLimit="1Gi", history="24h")], [mirror("m1", "a", size="1Gi")])
    new = config(
        [journal("a", hardLimit="1073741824", history="1d")],
        [mirror("m1", "a", size="1073741824")],
    )
    assert plan_apply(old, new, {}) == []


def test_retention_changes_live_and_lists_the_fields() -> None:
    old = config([journal("a")], [disk("d1", "a")])
    new = config(
        [journal("a", history="48h", warningPercent=80, checkpointIntervalSeconds=2)],
        [disk("d1", "a")],
    )
    assert summary(plan_apply(old, new, {})) == [
        ("vpg", "a", "changed", ["checkpointIntervalSeconds", "history", "warningPercent"])
    ]


def test_adding_a_volume_to_a_running_vpg() -> None:
    old = config([journal("a")], [disk("d1", "a")])
    new = config([journal("a")], [disk("d1", "a"), disk("d2", "a")])
    assert summary(plan_apply(old, new, {})) == [("volume", "d2", "added", [])]


def test_removing_a_vpg_removes_its_volumes() -> None:
    old = config([journal("a"), journal("b")], [disk("d1", "a"), disk("d2", "b")])
    new = config([journal("b")], [disk("d2", "b")])
    assert summary(plan_apply(old, new, {})) == [
        ("vpg", "a", "removed", []),
        ("volume", "d1", "removed", []),
    ]


def test_node_name_changes_live() -> None:
    changes = plan_apply(config(node="n1"), config(node="n2"), {})
    assert summary(changes) == [("appliance", "node", "changed", ["node"])]
    assert changes[0].action is ChangeAction.CHANGED


@pytest.mark.parametrize(
    ("old", "new", "path", "words"),
    [
        (disk("d1", "a"), mirror("d1", "a"), "volumes.d1.capture", "capture mode"),
        (mirror("d1", "a"), mirror("d1", "a", size="2Gi"), "volumes.d1.size", "resized"),
        (disk("d1", "a"), disk("d1", "a", backing="/dev/other"), "volumes.d1.backing", "backing"),
        (disk("d1", "a"), disk("d1", "a", replica="/r/d1"), "volumes.d1.replica", "replica"),
    ],
)
def test_volume_changes_that_cannot_be_applied_live(
    old: dict[str, Any], new: dict[str, Any], path: str, words: str
) -> None:
    found = conflicts(config([journal("a")], [old]), config([journal("a")], [new]))
    assert path in found
    assert words in found[path]


def test_journal_changes_that_cannot_be_applied_live() -> None:
    old = config([journal("a")])
    new = config([journal("a", directory="/elsewhere", checkpointIntervalSeconds=1)])
    found = conflicts(old, new)
    # The checkpoint interval is retuned live; the journal's directory is not.
    assert set(found) == {"vpgs.a.directory"}


def test_every_conflict_is_reported_at_once_and_nothing_is_planned() -> None:
    old = config([journal("a"), journal("b")], [disk("d1", "a"), disk("d2", "a")])
    new = config(
        [journal("a"), journal("b"), journal("c")],
        [disk("d1", "b"), mirror("d3", "c")],
        listen={"nbdTcp": "127.0.0.1:10809"},
    )
    found = conflicts(old, new)
    assert set(found) == {"listen", "volumes.d1.vpg", "volumes.d2"}
    assert "remove the whole VPG" in found["volumes.d2"]


def test_new_vpg_cannot_take_a_running_journal_directory() -> None:
    old = config([journal("a")])
    new = config([journal("a"), {"vpg": "b", "directory": "/data/a"}])
    assert list(conflicts(old, new)) == ["vpgs.b.directory"]


def test_vpg_in_failover_refuses_removal_and_changes() -> None:
    old = config([journal("a"), journal("b")], [disk("d1", "a")])
    unchanged_b = config([journal("a"), journal("b")], [disk("d1", "a")])
    assert plan_apply(old, unchanged_b, {"a": "promoted", "b": None}) == []
    new = config([journal("a", history="2h")], [disk("d1", "a")])
    found = conflicts(old, new, a="promoted", b="promoted")
    assert set(found) == {"vpgs.a", "vpgs.b"}
    assert "commit or roll back" in found["vpgs.b"]
