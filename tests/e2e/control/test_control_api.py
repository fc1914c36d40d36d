"""The control API of a real appliance process, driven through the typed client.

Configuration from empty, idempotent re-apply, refused live changes, status, checkpoints,
failover, mirror readiness, and the errors an operator relies on. Tests that read or write data
through NBD are in test_control_images.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from control_harness import (
    TOKEN,
    ApplianceProcess,
    MiB,
    Pki,
    eventually,
    journal,
    make_disk,
    raw_request,
    tls_context,
)

from secondsite.appliance.control import (
    ConflictError,
    ControlClient,
    InvalidRequestError,
    NotFoundError,
    ServerError,
)
from secondsite.appliance.control.models import ErrorBody, VpgStatus

pytestmark = pytest.mark.timeout(120)


async def protected(client: ControlClient, vpg: str) -> VpgStatus:
    return await eventually(
        lambda: client.vpg_status(vpg),
        lambda s: (
            bool(s.volumes)
            and all(v.state == "Protected" for v in s.volumes.values())
            and s.newest_checkpoint is not None
        ),
    )


async def test_configure_from_empty_then_idempotent_then_conflict(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    assert (await client.status()).vpgs == {}
    disk = make_disk(workdir / "disk0.img")
    config = appliance.config(
        [journal(workdir, "app")], [{"name": "disk0", "vpg": "app", "backing": str(disk)}]
    )

    result = await client.put_config(config)
    assert [(c.kind, c.name, c.action) for c in result.changes] == [
        ("vpg", "app", "added"),
        ("volume", "disk0", "added"),
    ]
    status = await protected(client, "app")
    assert status.volumes["disk0"].capture == "inPath"
    assert status.volumes["disk0"].size == 16 * MiB
    assert status.journal.history_seconds_configured == 3600
    assert (await client.get_config()) == config

    again = await client.put_config(config)
    assert again.changes == [] and not again.changed

    # A new VPG and a resize in one PUT: the resize cannot be applied live, so neither is.
    resized = appliance.config(
        [journal(workdir, "app"), journal(workdir, "other")],
        [{"name": "disk0", "vpg": "app", "backing": str(disk), "size": "32Mi"}],
    )
    with pytest.raises(ConflictError) as info:
        await client.put_config(resized)
    assert info.value.code == "config-conflict"
    assert [d["path"] for d in info.value.details] == ["volumes.disk0.size"]
    assert "resized" in info.value.details[0]["message"]
    assert set((await client.status()).vpgs) == {"app"}
    assert (await client.get_config()) == config

    # A live change: retention.
    longer = appliance.config(
        [journal(workdir, "app", history="2h")],
        [{"name": "disk0", "vpg": "app", "backing": str(disk)}],
    )
    result = await client.put_config(longer)
    assert [(c.kind, c.name, c.action, c.fields) for c in result.changes] == [
        ("vpg", "app", "changed", ["history"])
    ]
    status = await client.vpg_status("app")
    assert status.journal.history_seconds_configured == 7200


async def test_invalid_configs_are_422_with_locations(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path, pki: Pki
) -> None:
    missing = appliance.config(
        [journal(workdir, "app")],
        [{"name": "disk0", "vpg": "app", "backing": str(workdir / "nope.img")}],
    )
    with pytest.raises(InvalidRequestError) as info:
        await client.put_config(missing)
    assert info.value.status == 422 and info.value.code == "invalid-config"
    assert info.value.details[0]["loc"] == ["volumes", 0, "backing"]
    assert (await client.status()).vpgs == {}

    # What the model itself refuses is answered with pydantic's locations.
    raw = missing.model_dump(mode="json", by_alias=True)
    raw["journals"][0]["history"] = "forever"
    raw["volumes"][0]["capture"] = "sideways"
    status, _, body = await raw_request(
        appliance.url,
        "PUT",
        "/v1/config",
        ssl_context=tls_context(pki),
        headers={"Authorization": f"Bearer {TOKEN}"},
        json=raw,
    )
    error = ErrorBody.model_validate_json(body)
    assert status == 422 and error.error == "invalid-request"
    assert {tuple(d["loc"]) for d in error.details} == {
        ("journals", 0, "history"),
        ("volumes", 0, "capture"),
    }
    status, _, body = await raw_request(
        appliance.url,
        "PUT",
        "/v1/config",
        ssl_context=tls_context(pki),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        json=None,
    )
    assert status == 422  # an empty body is an empty config: `listen` is missing
    assert ErrorBody.model_validate_json(body).details[0]["loc"] == ["listen"]


async def test_remove_and_add_back_a_vpg_keeps_its_journal(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    disk = make_disk(workdir / "disk0.img")
    volumes = [{"name": "disk0", "vpg": "app", "backing": str(disk)}]
    config = appliance.config([journal(workdir, "app")], volumes)
    await client.put_config(config)
    await protected(client, "app")
    tagged = await client.take_checkpoint("app", tag="keep-me")

    result = await client.put_config(appliance.config([], []))
    assert [(c.kind, c.name, c.action) for c in result.changes] == [
        ("vpg", "app", "removed"),
        ("volume", "disk0", "removed"),
    ]
    assert (await client.status()).vpgs == {}
    with pytest.raises(NotFoundError):
        await client.vpg_status("app")
    assert (workdir / "journal-app" / "state.json").exists()

    await client.put_config(config)
    found = await client.get_checkpoint("app", "tag:keep-me")
    assert found.id == tagged.id and found.tag == "keep-me"


async def test_status_and_checkpoints_by_tag_and_time(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    disk = make_disk(workdir / "disk0.img")
    await client.put_config(
        appliance.config(
            [journal(workdir, "app")], [{"name": "disk0", "vpg": "app", "backing": str(disk)}]
        )
    )
    await protected(client, "app")
    before = datetime.now(UTC)
    first = await client.take_checkpoint("app", tag="before-upgrade")
    second = await client.take_checkpoint("app", tag="before-upgrade")
    after = datetime.now(UTC)
    assert second.id > first.id and second.consistent

    by_tag = await client.list_checkpoints("app", tag="before-upgrade")
    assert [c.id for c in by_tag.checkpoints] == [second.id, first.id]
    assert (await client.get_checkpoint("app", "tag:before-upgrade")).id == second.id
    assert (await client.get_checkpoint("app", first.id)).time == first.time

    # Automatic checkpoints go on (every 0.5 s): a time window around the tagged ones.
    window = await client.list_checkpoints(
        "app", since=before - timedelta(milliseconds=1), until=after
    )
    assert {first.id, second.id} <= {c.id for c in window.checkpoints}
    assert all(before - timedelta(milliseconds=1) <= c.time <= after for c in window.checkpoints)
    epoch = await client.list_checkpoints(
        "app", since=before.timestamp() - 0.001, until=after.timestamp()
    )
    assert [c.id for c in epoch.checkpoints] == [c.id for c in window.checkpoints]

    # Pages: newest first, each checkpoint once.
    await eventually(lambda: client.vpg_status("app"), lambda s: s.checkpoint_count >= 7)
    ids: list[int] = []
    cursor: int | None = None
    while True:
        page = await client.list_checkpoints("app", limit=3, before=cursor)
        assert len(page.checkpoints) <= 3
        ids += [c.id for c in page.checkpoints]
        cursor = page.next_before
        if cursor is None:
            break
    assert ids == sorted(ids, reverse=True) and len(ids) == len(set(ids)) >= 7

    status = await client.vpg_status("app")
    assert status.rpo_seconds is not None and status.rpo_seconds < 10
    assert status.newest_checkpoint is not None and status.oldest_checkpoint is not None
    assert status.journal.used_bytes > 0 and status.durable_seq > 0
    assert status.failover_phase is None
    volume = await client.volume_status("app", "disk0")
    assert volume.state == "Protected" and volume.size == 16 * MiB

    with pytest.raises(InvalidRequestError) as info:
        await client.list_checkpoints("app", limit=5000)
    assert info.value.details[0]["loc"] == ["query", "limit"]
    with pytest.raises(NotFoundError) as nf:
        await client.get_checkpoint("app", "tag:never")
    assert nf.value.code == "unknown-checkpoint"
    with pytest.raises(NotFoundError) as nf:
        await client.take_checkpoint("nope")
    assert nf.value.code == "unknown-vpg"
    with pytest.raises(NotFoundError) as nf:
        await client.volume_status("app", "nope")
    assert nf.value.code == "unknown-volume"


async def test_mirror_ready(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    disk = make_disk(workdir / "disk0.img")
    await client.put_config(
        appliance.config(
            [journal(workdir, "vm")],
            [
                {"name": "root", "vpg": "vm", "capture": "mirrorTarget", "size": "8Mi"},
                {"name": "data", "vpg": "vm", "backing": str(disk)},
            ],
        )
    )
    status = await client.volume_status("vm", "root")
    assert status.state == "InitialSync" and status.capture == "mirrorTarget"
    assert (await client.vpg_status("vm")).state == "Syncing"
    assert (await client.set_mirror_ready("vm", "root", True)).state == "Protected"
    vpg = await eventually(lambda: client.vpg_status("vm"), lambda s: s.consistent)
    assert vpg.state == "Protected"
    assert (await client.set_mirror_ready("vm", "root", False)).state == "InitialSync"
    assert not (await client.vpg_status("vm")).consistent
    with pytest.raises(ConflictError) as info:
        await client.set_mirror_ready("vm", "data", True)
    assert info.value.code == "not-mirror-target"
    with pytest.raises(NotFoundError):
        await client.set_mirror_ready("vm", "nope", True)


async def test_adding_a_volume_to_a_running_vpg(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    d0, d1 = make_disk(workdir / "d0.img"), make_disk(workdir / "d1.img", 8 * MiB)
    v0 = {"name": "d0", "vpg": "app", "backing": str(d0)}
    await client.put_config(appliance.config([journal(workdir, "app")], [v0]))
    await protected(client, "app")
    v1 = {"name": "d1", "vpg": "app", "backing": str(d1)}
    result = await client.put_config(appliance.config([journal(workdir, "app")], [v0, v1]))
    assert [(c.kind, c.name, c.action) for c in result.changes] == [("volume", "d1", "added")]
    status = await protected(client, "app")
    assert set(status.volumes) == {"d0", "d1"} and status.volumes["d1"].size == 8 * MiB
    # Removing it again is refused: checkpoints cover every volume of the VPG.
    with pytest.raises(ConflictError) as info:
        await client.put_config(appliance.config([journal(workdir, "app")], [v0]))
    assert [d["path"] for d in info.value.details] == ["volumes.d1"]


async def test_reverse_refuses_a_locally_captured_vpg(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    await client.put_config(appliance.config([journal(workdir, "app")], []))
    with pytest.raises(ConflictError) as info:
        await client.reverse("app", "protected", peer="elsewhere", peer_stream="127.0.0.1:9")
    assert info.value.code == "cannot-reverse" and "local capture" in info.value.message
    assert [j.vpg for j in (await client.get_config()).journals] == ["app"]
    with pytest.raises(NotFoundError):
        await client.reverse("nope", "recovery", peer="elsewhere")


async def test_a_vpg_that_fails_to_start_undoes_the_whole_apply(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    blocker = workdir / "not-a-directory"
    blocker.write_text("")
    config = appliance.config(
        [journal(workdir, "good"), {"vpg": "bad", "directory": str(blocker / "journal")}], []
    )
    with pytest.raises(ServerError) as info:
        await client.put_config(config)
    assert info.value.code == "apply-failed" and "stopped again" in info.value.message
    assert (await client.status()).vpgs == {}
    assert (await client.get_config()).journals == []
    # The same appliance takes a good config afterwards.
    result = await client.put_config(appliance.config([journal(workdir, "good")], []))
    assert [(c.name, c.action) for c in result.changes] == [("good", "added")]


async def test_an_appliance_without_a_usable_token_file_does_not_start(workdir: Path) -> None:
    process = ApplianceProcess(
        workdir,
        {
            "nbdUnix": str(workdir / "nbd.sock"),
            "control": "127.0.0.1:0",
            "tokenFile": str(workdir / "missing-token"),
            "controlPlainHttp": True,
        },
    )
    with pytest.raises(AssertionError, match="did not start"):
        process.start(timeout=20)
    assert process.proc is not None and process.proc.wait(10) == 1
    assert "cannot read token file" in process.log() and "Traceback" not in process.log()
