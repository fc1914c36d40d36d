"""Reverse protection planned without processes: the reversed config of each side, the refusals,
a failback that restores the original configs, and per-volume replica files of stream-fed
journals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from secondsite.appliance.config import ApplianceConfig, CaptureMode, InitialSync, Priority
from secondsite.appliance.control.errors import ApplyInvalid, ReverseRefused, UnknownVpgError
from secondsite.appliance.journal import ImagesOpenError, Journal, JournalConfig
from secondsite.appliance.recovery import JournalSink
from secondsite.appliance.reverse import RecoveredVpg, ReversePlan, ReverseRole, plan_reverse
from secondsite.appliance.runtime import _discard_stale_state, plan_apply
from secondsite.appliance.stream import VolumeEntry

TLS = {"certFile": "/etc/ss/app.crt", "keyFile": "/etc/ss/app.key", "caFile": "/etc/ss/ca.crt"}
P_STREAM = "10.0.0.1:7400"
R_STREAM = "10.0.0.9:7400"


def protected_side(**kw: Any) -> ApplianceConfig:
    return ApplianceConfig.model_validate(
        {
            "name": "site-a",
            "listen": {"nbdUnix": "/run/ss/nbd.sock", "stream": P_STREAM},
            "streamTls": TLS,
            "protected": [{"vpg": "db", "recovery": R_STREAM, "directory": "/var/lib/ss/db"}],
            "volumes": [
                {"name": "data", "vpg": "db", "backing": "/dev/vg/data"},
                {"name": "logs", "vpg": "db", "backing": "/dev/vg/logs"},
                {"name": "other", "vpg": "web", "backing": "/dev/vg/web"},
            ],
            "journals": [{"vpg": "web", "directory": "/var/lib/ss/web"}],
            **kw,
        }
    )


def recovery_side(sources: tuple[str, ...] = ("site-a",)) -> ApplianceConfig:
    return ApplianceConfig.model_validate(
        {
            "name": "site-b",
            "listen": {"nbdUnix": "/run/ss/nbd.sock", "stream": R_STREAM},
            "streamTls": TLS,
            "journals": [{"vpg": "db", "directory": "/data/db", "sources": list(sources)}],
        }
    )


REPLICAS = {"data": Path("/data/db/replicas/data.img"), "logs": Path("/data/db/replicas/logs.img")}


def committed(checkpoint: int | None = 42, phase: str | None = None) -> RecoveredVpg:
    return RecoveredVpg(phase, checkpoint, dict(REPLICAS))


def reversed_recovery(settings: dict[str, Any] | None = None) -> ReversePlan:
    """The recovery side's plan after a committed failover."""
    return plan_reverse(
        recovery_side(),
        "db",
        ReverseRole.PROTECTED,
        peer="site-a",
        peer_stream=P_STREAM,
        settings=settings,
        recovered=committed(),
    )


def test_the_recovery_side_serves_its_replicas_and_streams_them_back() -> None:
    plan = reversed_recovery()
    assert plan.role is ReverseRole.PROTECTED
    config = plan.config
    assert config.journals == []
    spec = config.protected_for("db")
    assert spec.recovery == P_STREAM and spec.directory == Path("/data/db")
    assert spec.initial_sync is InitialSync.DELTA  # the peer's replicas hold most of the data
    vols = {v.name: v for v in config.volumes_of("db")}
    assert {n: (v.capture, v.backing) for n, v in vols.items()} == {
        n: (CaptureMode.IN_PATH, p) for n, p in REPLICAS.items()
    }
    # Before the protected entry starts: the journal goes, and any old sync state in its
    # directory (the journal's, by default).
    assert plan.stale_journals() == [Path("/data/db")]
    assert plan.stale_sync_states() == [(spec, list(vols.values()))]


def test_the_protected_side_journals_into_its_former_backing_files() -> None:
    plan = plan_reverse(protected_side(), "db", ReverseRole.RECOVERY, peer="site-b")
    assert plan.role is ReverseRole.RECOVERY
    config = plan.config
    assert config.protected == []
    assert [v.name for v in config.volumes] == ["other"]  # the other VPG is untouched
    journal = config.journal_for("db")
    assert journal.sources == ["site-b"]
    assert journal.directory == Path("/var/lib/ss/db")
    assert journal.replicas == {"data": Path("/dev/vg/data"), "logs": Path("/dev/vg/logs")}
    assert config.journal_for("web") == protected_side().journal_for("web")
    # Before the journal starts: the sync state it leaves, and any old journal in its directory.
    assert plan.stale_sync_states() == [
        (protected_side().protected_for("db"), protected_side().volumes_of("db"))
    ]
    assert plan.stale_journals() == [Path("/var/lib/ss/db")]
    given = plan_reverse(
        protected_side(), "db", ReverseRole.RECOVERY, peer="site-b", directory=Path("/srv/j")
    )
    assert given.config.journal_for("db").directory == Path("/srv/j")


def test_failback_returns_both_appliances_to_their_original_configs() -> None:
    p0 = protected_side()
    p1 = plan_reverse(p0, "db", ReverseRole.RECOVERY, peer="site-b").config
    r1 = reversed_recovery().config
    # Failback: a failover committed on P (its replicas are the former backing files).
    backings = dict(p1.journal_for("db").replicas)
    p2 = plan_reverse(
        p1,
        "db",
        ReverseRole.PROTECTED,
        peer="site-b",
        peer_stream=R_STREAM,
        recovered=RecoveredVpg(None, 7, backings),
    ).config
    r2 = plan_reverse(r1, "db", ReverseRole.RECOVERY, peer="site-a").config
    (spec,) = p2.protected
    assert spec.initial_sync is InitialSync.DELTA
    assert spec.model_copy(update={"initial_sync": InitialSync.FULL}) == p0.protected[0]
    assert sorted(p2.volumes, key=lambda v: v.name) == sorted(p0.volumes, key=lambda v: v.name)
    assert p2.journals == p0.journals
    (journal,) = r2.journals
    assert (journal.vpg, journal.directory, journal.sources) == ("db", Path("/data/db"), ["site-a"])
    assert {v: journal.replica_of(v) for v in REPLICAS} == REPLICAS
    assert r2.volumes == [] and r2.protected == []


def test_the_reversed_config_applies_as_a_role_switch() -> None:
    r0 = recovery_side()
    r1 = reversed_recovery().config
    changes = [(c.kind, c.name, c.action) for c in plan_apply(r0, r1, {"db": None})]
    assert changes == [
        ("protected", "db", "added"),
        ("volume", "data", "added"),
        ("volume", "logs", "added"),
        ("vpg", "db", "removed"),
    ]


def test_settings_of_the_new_role() -> None:
    r1 = reversed_recovery({"priority": "High", "bufferBytes": "1Gi"}).config
    spec = r1.protected_for("db")
    assert (spec.priority, spec.buffer_size()) == (Priority.HIGH, 1 << 30)
    assert spec.initial_sync is InitialSync.DELTA
    full = reversed_recovery({"initialSync": "full"}).config
    assert full.protected_for("db").initial_sync is InitialSync.FULL
    p1 = plan_reverse(
        protected_side(),
        "db",
        ReverseRole.RECOVERY,
        peer="site-b",
        settings={"history": "2h", "checkpointIntervalSeconds": 0.5},
    ).config
    journal = p1.journal_for("db")
    assert (journal.history_seconds(), journal.checkpoint_interval_seconds) == (7200, 0.5)
    assert journal.sources == ["site-b"]


@pytest.mark.parametrize(
    ("role", "settings", "error"),
    [
        (ReverseRole.RECOVERY, {"sources": ["x"]}, "sources is decided by the reverse"),
        (ReverseRole.RECOVERY, {"directory": "/x"}, "directory is decided by the reverse"),
        (ReverseRole.PROTECTED, {"recovery": "h:1"}, "recovery is decided by the reverse"),
        (ReverseRole.RECOVERY, {"history": "forever"}, "history"),
        (ReverseRole.PROTECTED, {"bogus": 1}, "bogus"),
    ],
)
def test_settings_the_reverse_does_not_take(
    role: ReverseRole, settings: dict[str, Any], error: str
) -> None:
    config = protected_side() if role is ReverseRole.RECOVERY else recovery_side()
    with pytest.raises((ApplyInvalid, ValidationError), match=error):
        plan_reverse(
            config,
            "db",
            role,
            peer="site-b" if role is ReverseRole.RECOVERY else "site-a",
            peer_stream=P_STREAM,
            settings=settings,
            recovered=committed(),
        )


def test_a_repeated_reverse_changes_nothing() -> None:
    """A retried request (its answer lost) must not swap the direction back."""
    r1 = reversed_recovery().config
    p1 = plan_reverse(protected_side(), "db", ReverseRole.RECOVERY, peer="site-b").config
    again = [
        plan_reverse(r1, "db", ReverseRole.PROTECTED, peer="site-a", peer_stream=P_STREAM),
        plan_reverse(p1, "db", ReverseRole.RECOVERY, peer="site-b"),
    ]
    for plan, before in zip(again, [r1, p1], strict=True):
        assert plan.config == before
        assert plan.stale_journals() == [] and plan.stale_sync_states() == []
    with pytest.raises(ReverseRefused, match=r"streaming to 10\.0\.0\.1:7400, not 10\.9\.9\.9:1"):
        plan_reverse(r1, "db", ReverseRole.PROTECTED, peer="site-a", peer_stream="10.9.9.9:1")
    with pytest.raises(ReverseRefused, match="journaled here already, from site-b, not from x"):
        plan_reverse(p1, "db", ReverseRole.RECOVERY, peer="x")


@pytest.mark.parametrize(
    ("recovered", "words"),
    [
        (committed(phase="promoted"), "not committed"),
        (committed(None), "promote to a checkpoint and commit first"),
        (RecoveredVpg(None, 42, {}), "no volumes yet"),
        (RecoveredVpg(None, 42, dict(REPLICAS), ["a1b2"]), "images a1b2 of VPG db are open"),
    ],
)
def test_the_recovery_side_wants_a_committed_failover(recovered: RecoveredVpg, words: str) -> None:
    with pytest.raises(ReverseRefused, match=words):
        plan_reverse(
            recovery_side(),
            "db",
            ReverseRole.PROTECTED,
            peer="site-a",
            peer_stream=P_STREAM,
            recovered=recovered,
        )


@pytest.mark.parametrize(
    ("config", "kw", "words"),
    [
        (recovery_side(("site-a", "site-c")), {"peer": "site-a"}, "several appliances"),
        (recovery_side(), {"peer": "site-c"}, "site-c is not the appliance"),
        (recovery_side(), {"peer": "site-a", "peer_stream": None}, "give the stream address"),
        (protected_side(), {"vpg": "web", "peer": "site-b"}, "local capture"),
    ],
)
def test_what_the_recovery_side_cannot_reverse(
    config: ApplianceConfig, kw: dict[str, Any], words: str
) -> None:
    args: dict[str, Any] = {"vpg": "db", "peer_stream": P_STREAM, "recovered": committed(), **kw}
    with pytest.raises(ReverseRefused, match=words):
        plan_reverse(config, role=ReverseRole.PROTECTED, **args)


def test_a_replica_name_taken_by_a_served_volume_is_refused() -> None:
    replicas = {"other": Path("/data/db/replicas/other.img")}
    config = recovery_side().model_copy(update={"volumes": protected_side().volumes[2:]})
    config = config.model_copy(
        update={"journals": [*config.journals, protected_side().journals[0]]}
    )
    with pytest.raises(ReverseRefused, match="clash"):
        plan_reverse(
            config,
            "db",
            ReverseRole.PROTECTED,
            peer="site-a",
            peer_stream=P_STREAM,
            recovered=RecoveredVpg(None, 1, replicas),
        )


def test_what_the_protected_side_cannot_reverse() -> None:
    mirrored = protected_side(
        volumes=[{"name": "vm", "vpg": "db", "capture": "mirrorTarget", "size": "1Gi"}],
        journals=[],
    )
    with pytest.raises(ReverseRefused, match="vm of VPG db are mirror targets"):
        plan_reverse(mirrored, "db", ReverseRole.RECOVERY, peer="site-b")
    no_listener = protected_side(listen={"nbdUnix": "/run/ss/nbd.sock"})
    with pytest.raises(ReverseRefused, match="no stream listener"):
        plan_reverse(no_listener, "db", ReverseRole.RECOVERY, peer="site-b")
    with pytest.raises(ReverseRefused, match="own name"):
        plan_reverse(protected_side(), "db", ReverseRole.RECOVERY, peer="site-a")
    with pytest.raises(UnknownVpgError):
        plan_reverse(protected_side(), "nope", ReverseRole.RECOVERY, peer="site-b")


# -- replicas of stream-fed journals ----------------------------------------------------------


def test_journal_replicas_default_and_validation() -> None:
    config = recovery_side()
    journal = config.journal_for("db")
    assert journal.replica_of("data") == Path("/data/db/replicas/data.img")
    data = config.model_dump(by_alias=True)
    data["journals"][0]["replicas"] = {"data": "/x/a.img", "logs": "/x/a.img"}
    with pytest.raises(ValidationError, match="share a replica file"):
        ApplianceConfig.model_validate(data)
    local = protected_side().model_dump(by_alias=True)
    local["journals"][0]["replicas"] = {"other": "/x/o.img"}
    with pytest.raises(ValidationError, match="for journals fed by `sources`"):
        ApplianceConfig.model_validate(local)
    served = protected_side().model_dump(by_alias=True)
    served["journals"].append(
        {"vpg": "mail", "directory": "/m", "sources": ["x"], "replicas": {"m": "/dev/vg/web"}}
    )
    with pytest.raises(ValidationError, match="backing store of volume other"):
        ApplianceConfig.model_validate(served)


async def test_the_sink_journals_into_the_named_replica_file_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    replica = tmp_path / "former-backing.img"
    content = bytes(range(256)) * 256  # 64 KiB
    replica.write_bytes(content)
    journal = await Journal.open(tmp_path / "journal", JournalConfig(vpg="db"))
    try:
        sink = JournalSink("db", journal, ["site-b"], {"data": replica})
        sink.attach("site-b", [VolumeEntry("data", len(content)), VolumeEntry("logs", 4096)])
        for _ in range(100):
            if len(journal.volumes()) == 2:
                break
            await asyncio.sleep(0.01)
        paths = {v.name: v.replica_path for v in journal.volumes()}
        assert paths == {"data": replica, "logs": tmp_path / "journal" / "replicas" / "logs.img"}
        assert replica.read_bytes() == content
    finally:
        await journal.close()


async def test_a_committed_failover_is_remembered_across_reopen(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, JournalConfig(vpg="db"))
    await journal.add_volume("data", 64 * 1024)
    await journal.append_write("data", 0, b"x" * 4096)
    first = await journal.checkpoint("first")
    await journal.promote_to(first)
    await journal.rollback()
    assert journal.committed_failover is None  # a rolled back promotion is no failover
    await journal.promote_to(first)
    await journal.commit()
    assert journal.committed_failover == first
    await journal.close()
    reopened = await Journal.open(tmp_path, JournalConfig(vpg="db"))
    try:
        assert reopened.committed_failover == first
    finally:
        await reopened.close()


async def test_stale_state_in_the_new_journals_directory_is_discarded(tmp_path: Path) -> None:
    """A journal left in the directory the reverse puts the new journal in (an earlier role's)
    would resume from its positions and skip the new sender's records: it goes, the replica
    files stay."""
    old_dir, backing = tmp_path / "db", tmp_path / "data.img"
    backing.write_bytes(b"\x5a" * 65536)
    old = await Journal.open(old_dir, JournalConfig(vpg="db"))
    await old.add_volume("data", 65536)
    await old.submit_position("site-b", 1000)
    await old.close()
    config = protected_side(
        volumes=[{"name": "data", "vpg": "db", "backing": str(backing)}], journals=[]
    )
    plan = plan_reverse(config, "db", ReverseRole.RECOVERY, peer="site-b", directory=old_dir)
    _discard_stale_state(plan)
    fresh = await Journal.open(old_dir, JournalConfig(vpg="db"))
    try:
        assert dict(fresh.positions) == {} and fresh.volumes() == []
    finally:
        await fresh.close()
    assert (old_dir / "replicas" / "data.img").exists()
    assert backing.read_bytes() == b"\x5a" * 65536


async def test_views_kept_for_checksums_do_not_block_a_failover(tmp_path: Path) -> None:
    """A delta sync keeps each volume's latest view open for a while; failing over right after
    it (promote) closes the idle views instead of refusing for open images."""
    journal = await Journal.open(tmp_path, JournalConfig(vpg="db"))
    try:
        sink = JournalSink("db", journal, ["site-b"], view_idle=60)
        sink.attach("site-b", [VolumeEntry("data", 65536)])
        for _ in range(100):
            if journal.volumes():
                break
            await asyncio.sleep(0.01)
        await sink.checksums("site-b", 0, 0, 65536, 4096)
        cp = await journal.checkpoint("now")
        with pytest.raises(ImagesOpenError):
            await journal.promote_to(cp)
        sink.close_idle_views()
        await journal.promote_to(cp)
        await journal.rollback()
    finally:
        sink.close()
        await journal.close()
