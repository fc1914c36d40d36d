"""ProtectedApplication: its children, their dependencies, and the wait for Ready."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pulumi_mocks import Runner

import secondsite.pulumi_provider as ss
from secondsite.pulumi_provider import _component, _readiness


def app_spec() -> ss.VirtualProtectionGroupSpec:
    return ss.VirtualProtectionGroupSpec(
        protected_site="east",
        recovery_site="west",
        volumes=ss.VpgVolumes(names=["shop-db", "shop-media"]),
        workloads=[ss.Workload(kind=ss.WorkloadKind.DEPLOYMENT, name="shop")],
        journal=ss.JournalPolicy(history="48h"),
    )


def test_children_and_dependencies(pulumi_run: Runner) -> None:
    regs = pulumi_run(
        lambda: ss.ProtectedApplication(
            "shop",
            app_spec(),
            namespace="shop",
            checkpoint_tags=["before-upgrade", "Release 2.0"],
        )
    )
    component = pulumi_run.one(regs, "ProtectedApplication")
    assert component.type == "secondsite:index:ProtectedApplication"
    vpg = pulumi_run.one(regs, ":VirtualProtectionGroup")
    assert vpg.parent == component.urn
    assert vpg.inputs["metadata"] == {"name": "shop", "namespace": "shop"}
    assert vpg.inputs["spec"] == {
        "protectedSite": "east",
        "recoverySite": "west",
        "volumes": {"names": ["shop-db", "shop-media"]},
        "workloads": [{"kind": "Deployment", "name": "shop"}],
        "journal": {"history": "48h"},
    }
    checkpoints = {r.inputs["spec"]["tag"]: r for r in regs if r.type.endswith(":Checkpoint")}
    assert set(checkpoints) == {"before-upgrade", "Release 2.0"}
    for tag, name in [
        ("before-upgrade", "shop-before-upgrade"),
        ("Release 2.0", "shop-release-2.0"),
    ]:
        checkpoint = checkpoints[tag]
        assert checkpoint.parent == component.urn
        # Created after the VPG and deleted before it: the spec's `vpg` is only a string.
        assert checkpoint.dependencies == [vpg.urn]
        assert checkpoint.inputs["metadata"] == {"name": name, "namespace": "shop"}
        assert checkpoint.inputs["spec"] == {"vpg": "shop", "tag": tag}
    assert component.outputs == {
        "vpgName": "shop",
        "checkpointNames": ["shop-before-upgrade", "shop-release-2.0"],
    }


def test_no_checkpoints_and_an_explicit_vpg_name(pulumi_run: Runner) -> None:
    regs = pulumi_run(lambda: ss.ProtectedApplication("shop", app_spec(), vpg_name="shop-vpg"))
    assert [r.type.rsplit(":", 1)[1] for r in regs] == [
        "ProtectedApplication",
        "VirtualProtectionGroup",
    ]
    assert pulumi_run.one(regs, ":VirtualProtectionGroup").inputs["metadata"] == {
        "name": "shop-vpg"
    }


def test_invalid_spec_registers_no_vpg(pulumi_run: Runner) -> None:
    def program() -> None:
        with pytest.raises(ss.InvalidSpecError, match=r"spec\.recoverySite"):
            ss.ProtectedApplication(
                "shop",
                {"protectedSite": "east", "recoverySite": "east", "volumes": {"names": ["a"]}},
                checkpoint_tags=["x"],
            )

    regs = pulumi_run(program)
    assert [r for r in regs if r.type.startswith("kubernetes:")] == []


@pytest.mark.parametrize("tags", [["a", "a"], ["Before Upgrade", "before-upgrade"]])
def test_tags_that_make_the_same_checkpoint_are_refused(tags: list[str]) -> None:
    with pytest.raises(ss.InvalidSpecError, match=r"make the same name"):
        ss.ProtectedApplication("shop", app_spec(), checkpoint_tags=tags)


@pytest.mark.parametrize(
    ("tag", "name"),
    [("before-upgrade", "shop-before-upgrade"), ("Nightly_Backup!", "shop-nightly-backup")],
)
def test_checkpoint_object_name(tag: str, name: str) -> None:
    assert ss.checkpoint_object_name("shop", tag) == name


# --- waiting for Ready ----------------------------------------------------------------------------


def vpg_object(generation: int, conditions: list[dict[str, Any]] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "shop", "generation": generation}}
    if conditions is not None:
        obj["status"] = {"conditions": conditions}
    return obj


def ready(status: str, observed: int, reason: str = "Protecting") -> dict[str, Any]:
    return {"type": "Ready", "status": status, "observedGeneration": observed, "reason": reason}


@pytest.mark.parametrize(
    ("obj", "expected", "why"),
    [
        (None, False, "does not exist"),
        (vpg_object(1, None), False, "operator running"),
        (vpg_object(1, [{"type": "Syncing", "status": "True"}]), False, "no Ready condition"),
        (vpg_object(1, [ready("False", 1, "InitialSync")]), False, "reason=InitialSync"),
        (vpg_object(2, [ready("True", 1)]), False, "for generation 1, not 2"),
        (vpg_object(2, [ready("True", 2)]), True, "Ready=True"),
    ],
)
def test_readiness(obj: Mapping[str, Any] | None, expected: bool, why: str) -> None:
    is_ready, said = ss.readiness(obj)
    assert is_ready is expected
    assert why in said


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def reads(*objects: Mapping[str, Any] | None) -> Any:
    remaining = list(objects)

    async def read() -> Mapping[str, Any] | None:
        return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    return read


def test_wait_returns_once_ready() -> None:
    fake = FakeTime()
    read = reads(None, vpg_object(1, None), vpg_object(1, [ready("True", 1)]))
    wait = ss.ReadyWait(timeout_seconds=60, poll_seconds=5)
    asyncio.run(_readiness.wait_until_ready(read, "vpg", wait, clock=fake.clock, sleep=fake.sleep))
    assert fake.now == 10  # two polls


def test_wait_times_out_with_what_the_status_said() -> None:
    fake = FakeTime()
    read = reads(vpg_object(1, [ready("False", 1, "InitialSync")]))
    wait = ss.ReadyWait(timeout_seconds=30, poll_seconds=2)
    with pytest.raises(ss.NotReadyError) as info:
        asyncio.run(
            _readiness.wait_until_ready(
                read, "VirtualProtectionGroup shop/shop", wait, clock=fake.clock, sleep=fake.sleep
            )
        )
    message = str(info.value)
    assert "VirtualProtectionGroup shop/shop is not Ready after 30 s" in message
    assert "reason=InitialSync" in message
    assert "SecondSite operator" in message
    assert 30 <= fake.now <= 32


def test_component_waits_during_up(pulumi_run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    def reader(namespace: str, name: str, wait: ss.ReadyWait) -> Any:
        seen.append((namespace, name))
        return reads(vpg_object(1, [ready("True", 1)]))

    monkeypatch.setattr(_component, "vpg_reader", reader)
    regs = pulumi_run(
        lambda: ss.ProtectedApplication(
            "shop", app_spec(), namespace="shop", wait_for_ready=ss.ReadyWait(poll_seconds=0)
        )
    )
    assert seen == [("shop", "shop")]
    assert pulumi_run.one(regs, "ProtectedApplication").outputs["ready"] is True


def test_component_never_waits_in_preview(
    pulumi_run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reader(namespace: str, name: str, wait: ss.ReadyWait) -> Any:
        raise AssertionError("a preview must not read the cluster")

    monkeypatch.setattr(_component, "vpg_reader", reader)
    regs = pulumi_run(
        lambda: ss.ProtectedApplication("shop", app_spec(), wait_for_ready=ss.ReadyWait()),
        preview=True,
    )
    assert "ready" not in pulumi_run.one(regs, "ProtectedApplication").outputs


def test_component_fails_the_update_when_not_ready(
    pulumi_run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        _component, "vpg_reader", lambda namespace, name, wait: reads(vpg_object(1, None))
    )
    with pytest.raises(ss.NotReadyError, match=r"shop/shop is not Ready after 0\.2 s"):
        pulumi_run(
            lambda: ss.ProtectedApplication(
                "shop",
                app_spec(),
                namespace="shop",
                wait_for_ready=ss.ReadyWait(timeout_seconds=0.2, poll_seconds=0.05),
            )
        )


def test_waiting_without_a_kubeconfig_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ss.NotReadyError, match=r"shop/shop: no usable kubeconfig .*\$KUBECONFIG"):
        _readiness.vpg_reader("shop", "shop", ss.ReadyWait())
