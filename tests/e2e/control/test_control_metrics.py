"""`/metrics` of a real appliance: parses as Prometheus text, moves with writes and checkpoints,
and its labels stay bounded (VPG and volume names, route templates; never ids)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from control_harness import (
    QEMU_TOOLS,
    ApplianceProcess,
    HeldConnection,
    MiB,
    eventually,
    journal,
    make_disk,
    qemu_io,
)
from prometheus_client.parser import text_string_to_metric_families

from secondsite.appliance.control import ControlClient

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in QEMU_TOOLS),
        reason=f"needs {', '.join(QEMU_TOOLS)} (make debs)",
    ),
]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: ControlClient) -> Samples:
    text = await client.metrics()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_move_with_writes_and_checkpoints(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    disk = make_disk(workdir / "disk0.img", 8 * MiB)
    await client.put_config(
        appliance.config(
            [journal(workdir, "app")], [{"name": "disk0", "vpg": "app", "backing": str(disk)}]
        )
    )
    await eventually(
        lambda: client.vpg_status("app"), lambda s: s.volumes["disk0"].state == "Protected"
    )
    vol = {"vpg": "app", "volume": "disk0"}
    before = await scrape(client)
    assert value(before, "secondsite_volume_in_sync", **vol) == 1
    assert value(before, "secondsite_journal_history_configured_seconds", vpg="app") == 3600
    assert value(before, "secondsite_journal_limit_bytes", vpg="app") == 256 * MiB

    qemu_io(
        appliance.nbd_uri("disk0"),
        "write -P 0x11 0 64k",
        "write -P 0x22 1M 64k",
        "write -P 0x33 2M 128k",
    )
    taken = await client.take_checkpoint("app", tag="metrics")
    after = await scrape(client)
    writes = "secondsite_volume_captured_writes_total"
    written = "secondsite_volume_captured_bytes_total"
    assert value(after, writes, **vol) - value(before, writes, **vol) == 3
    assert value(after, written, **vol) - value(before, written, **vol) == 256 * 1024
    assert value(after, "secondsite_checkpoints_total", vpg="app") > value(
        before, "secondsite_checkpoints_total", vpg="app"
    )
    holds = value(after, "secondsite_checkpoint_hold_seconds_count", vpg="app")
    assert holds >= taken.id - 1  # every checkpoint held acks once; ids start at 1
    assert value(after, "secondsite_checkpoint_hold_seconds_bucket", vpg="app", le="+Inf") == holds
    assert value(after, "secondsite_journal_used_bytes", vpg="app") >= 256 * 1024
    assert 0 <= value(after, "secondsite_vpg_rpo_seconds", vpg="app") < 10
    assert value(after, "secondsite_vpg_failover_promoted", vpg="app") == 0
    assert value(after, "secondsite_nbd_connections") == 0

    image = await client.create_image("app", "disk0", "tag:metrics")
    held = HeldConnection(image.nbd[0], read_only=True)
    try:
        await eventually(lambda: client.get_image("app", image.id), lambda i: i.connections == 1)
        during = await scrape(client)
        assert value(during, "secondsite_nbd_connections") == 1
        assert value(during, "secondsite_images_pinned") == 1
    finally:
        held.close()
    await eventually(lambda: client.get_image("app", image.id), lambda i: i.connections == 0)
    await client.delete_image("app", image.id)

    final = await scrape(client)
    assert value(final, "secondsite_images_pinned") == 0
    requests = {
        dict(labels)["route"]
        for (name, labels) in final
        if name == "secondsite_control_requests_total"
    }
    assert "/v1/vpgs/{vpg}/images/{image}" in requests and "/v1/config" in requests
    for _name, labels in final:
        for key, label in labels:
            assert key in {"vpg", "volume", "method", "route", "code", "le"}, key
            assert key not in {"vpg", "volume"} or label in {"app", "disk0"}, label
            assert image.id not in label


async def test_removed_vpg_leaves_no_series(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    await client.put_config(appliance.config([journal(workdir, "gone")], []))
    await eventually(lambda: client.vpg_status("gone"), lambda s: s.checkpoint_count > 0)
    assert any(dict(labels).get("vpg") == "gone" for _, labels in await scrape(client))
    await client.put_config(appliance.config([], []))
    assert not any(dict(labels).get("vpg") == "gone" for _, labels in await scrape(client))
