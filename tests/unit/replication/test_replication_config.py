"""The replication part of the appliance config, and what `PUT /v1/config` does with it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from secondsite.appliance.config import ApplianceConfig, Compression, InitialSync, Priority
from secondsite.appliance.control.errors import ApplyConflict
from secondsite.appliance.runtime import plan_apply

LISTEN: dict[str, Any] = {"nbdUnix": "/run/ss/nbd.sock"}
TLS = {"certFile": "/etc/ss/app.crt", "keyFile": "/etc/ss/app.key", "caFile": "/etc/ss/ca.crt"}


def protected_side(**kw: Any) -> dict[str, Any]:
    return {
        "name": "node-a",
        "listen": LISTEN,
        "streamTls": TLS,
        "protected": [
            {"vpg": "db", "recovery": "10.0.0.9:7400", "directory": "/var/lib/ss/db"},
        ],
        "volumes": [{"name": "data", "vpg": "db", "backing": "/dev/data"}],
        **kw,
    }


def recovery_side(**kw: Any) -> dict[str, Any]:
    return {
        "name": "node-r",
        "listen": {**LISTEN, "stream": "0.0.0.0:7400"},
        "streamTls": TLS,
        "journals": [{"vpg": "db", "directory": "/data/db", "sources": ["node-a", "node-b"]}],
        **kw,
    }


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        ApplianceConfig.model_validate(data)
    return str(info.value)


def test_defaults_of_a_protected_vpg() -> None:
    config = ApplianceConfig.model_validate(protected_side())
    spec = config.protected_for("db")
    assert spec.priority is Priority.MEDIUM
    assert spec.compression is Compression.ADAPTIVE
    assert spec.initial_sync is InitialSync.FULL
    assert spec.buffer_size() == 256 << 20
    assert spec.recovery_address() == ("10.0.0.9", 7400)
    assert config.source_name == "node-a"
    assert config.bandwidth_bytes() is None


def test_initial_sync_by_checksums_is_asked_for_by_name() -> None:
    data = protected_side()
    data["protected"][0]["initialSync"] = "delta"
    spec = ApplianceConfig.model_validate(data).protected_for("db")
    assert spec.initial_sync is InitialSync.DELTA
    assert spec.model_dump()["initialSync"] == "delta"


def test_name_defaults_to_node() -> None:
    data = protected_side(node="worker-3")
    del data["name"]
    assert ApplianceConfig.model_validate(data).source_name == "worker-3"
    del data["node"]
    assert "need the appliance's `name`" in error_of(data)


def test_recovery_side_is_valid_and_needs_a_stream_listener() -> None:
    config = ApplianceConfig.model_validate(recovery_side())
    assert config.journal_for("db").sources == ["node-a", "node-b"]
    assert config.listen.stream_address() == ("0.0.0.0", 7400)
    assert "need `listen.stream`" in error_of(recovery_side(listen=LISTEN))


def test_tls_is_required_unless_plain_tcp_is_asked_for() -> None:
    assert "streamPlainTcp" in error_of(protected_side(streamTls=None))
    assert "streamPlainTcp" in error_of(recovery_side(streamTls=None))
    ApplianceConfig.model_validate(protected_side(streamTls=None, streamPlainTcp=True))
    assert "not both" in error_of(protected_side(streamPlainTcp=True))


def test_a_vpg_is_journaled_here_or_replicated_not_both() -> None:
    both = protected_side(journals=[{"vpg": "db", "directory": "/data/db"}])
    assert "both journaled here and replicated" in error_of(both)


def test_a_volume_needs_a_journal_or_a_protected_entry() -> None:
    data = protected_side()
    data["volumes"].append({"name": "logs", "vpg": "web", "backing": "/dev/logs"})
    assert "no journal and no `protected` entry for VPG web" in error_of(data)


def test_a_stream_fed_journal_takes_no_local_volumes() -> None:
    data = recovery_side(volumes=[{"name": "x", "vpg": "db", "backing": "/dev/x"}])
    assert "captured on those appliances, not here" in error_of(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"recovery": "nohost"}, "must be host:port"),
        ({"bufferBytes": "64Ki"}, "at least 1Mi"),
        ({"priority": "Urgent"}, "Input should be"),
        ({"compression": "lz4"}, "Input should be"),
        ({"initialSync": "bitmap"}, "Input should be 'full' or 'delta'"),
    ],
)
def test_protected_vpg_fields_are_checked(change: dict[str, Any], message: str) -> None:
    data = protected_side()
    data["protected"][0].update(change)
    assert message in error_of(data)


def test_duplicates_are_refused() -> None:
    data = protected_side()
    data["protected"].append(dict(data["protected"][0]))
    assert "listed twice in `protected`" in error_of(data)
    rec = recovery_side()
    rec["journals"][0]["sources"] = ["node-a", "node-a"]
    assert "sources listed twice" in error_of(rec)


# -- plan_apply ----------------------------------------------------------------------------------


def cfg(data: dict[str, Any]) -> ApplianceConfig:
    return ApplianceConfig.model_validate(data)


def summary(current: dict[str, Any], desired: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c.kind, c.name, str(c.action)) for c in plan_apply(cfg(current), cfg(desired), {})]


def conflicts(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ApplyConflict) as info:
        plan_apply(cfg(current), cfg(desired), {})
    return {c.path: c.message for c in info.value.conflicts}


def test_protected_vpgs_are_added_and_removed_live() -> None:
    empty = protected_side(protected=[], volumes=[])
    assert summary(empty, protected_side()) == [
        ("protected", "db", "added"),
        ("volume", "data", "added"),
    ]
    assert summary(protected_side(), empty) == [
        ("protected", "db", "removed"),
        ("volume", "data", "removed"),
    ]
    assert summary(protected_side(), protected_side()) == []


def test_protected_vpg_settings_and_volume_table_are_fixed_while_it_runs() -> None:
    changed = protected_side()
    changed["protected"][0]["bufferBytes"] = "1Gi"
    found = conflicts(protected_side(), changed)
    assert "remove it and add it again" in found["protected.db.bufferBytes"]
    more = protected_side()
    more["volumes"].append({"name": "logs", "vpg": "db", "backing": "/dev/logs"})
    assert "restart the appliance" in conflicts(protected_side(), more)["volumes.logs"]


def test_journals_with_sources_are_added_live_but_their_sources_are_fixed() -> None:
    empty = recovery_side(journals=[])
    assert summary(empty, recovery_side()) == [("vpg", "db", "added")]
    fewer = recovery_side()
    fewer["journals"][0]["sources"] = ["node-a"]
    assert "restart the appliance" in conflicts(recovery_side(), fewer)["vpgs.db.sources"]


def test_bandwidth_changes_live_identity_and_tls_need_a_restart() -> None:
    assert summary(protected_side(), protected_side(bandwidthLimit="100M")) == [
        ("appliance", "bandwidthLimit", "changed")
    ]
    found = conflicts(protected_side(), protected_side(name="node-z"))
    assert "identity in replication streams" in found["name"]
    other_tls = {**TLS, "caFile": "/etc/ss/other-ca.crt"}
    found = conflicts(protected_side(), protected_side(streamTls=other_tls))
    assert "restart" in found["streamTls"]
