"""The receiver's sender identity check: the source a HELLO claims must be named by the sender's
certificate (as `ssl` decodes a peer certificate)."""

from __future__ import annotations

from typing import Any

import pytest

from secondsite.appliance.stream.tls import certificate_names, identity_refusal


def cert(cn: str | None, *sans: tuple[str, str]) -> dict[str, Any]:
    subject = ((("organizationName", "site"),), *(((("commonName", cn),),) if cn else ()))
    return {"subject": subject, "subjectAltName": sans}


def test_names_are_the_dns_sans_then_the_common_name() -> None:
    c = cert("prot-a", ("DNS", "prot-a.site"), ("IP Address", "10.0.0.1"), ("DNS", "localhost"))
    assert certificate_names(c) == ["prot-a.site", "localhost", "prot-a"]
    assert certificate_names({}) == []


@pytest.mark.parametrize(
    "c",
    [
        cert("prot-a"),
        cert("prot-a", ("DNS", "localhost")),
        cert("node-7", ("DNS", "prot-a")),
        cert(None, ("DNS", "PROT-A")),
    ],
    ids=["cn", "cn-besides-sans", "dns-san", "dns-san-case"],
)
def test_a_certificate_naming_the_source_passes(c: dict[str, Any]) -> None:
    assert identity_refusal("prot-a", c) is None


@pytest.mark.parametrize(
    ("c", "names"),
    [
        (cert("prot-b", ("DNS", "localhost")), "['localhost', 'prot-b']"),
        (cert("prot-a-x"), "['prot-a-x']"),
        (cert(None, ("DNS", "*"), ("DNS", "prot-*")), "['*', 'prot-*']"),
        (cert(None, ("IP Address", "prot-a")), "nothing"),
        (None, "nothing"),
    ],
    ids=["other-appliance", "prefix", "wildcards", "ip-san-only", "no-certificate"],
)
def test_anything_else_is_refused_with_what_it_names(c: dict[str, Any] | None, names: str) -> None:
    assert identity_refusal("prot-a", c) == (
        f"the sender's certificate names {names}, not source 'prot-a'"
    )
