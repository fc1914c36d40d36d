"""`pulumi preview`, `up`, a changed `up` and `destroy` of examples/pulumi against the dev cluster,
checking the objects in the cluster with kubectl after each step."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from pulumi import automation as auto
from pulumi_engine_env import PulumiEnv

pytestmark = [pytest.mark.k8s, pytest.mark.pulumi_engine, pytest.mark.slow]


def get(kubectl: Any, *args: str) -> dict[str, Any] | None:
    """An object as JSON, or None if it does not exist."""
    proc = kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def names(kubectl: Any, kind: str, namespace: str) -> set[str]:
    proc = kubectl("get", kind, "-n", namespace, "-o", "json")
    return {item["metadata"]["name"] for item in json.loads(proc.stdout)["items"]}


@pytest.mark.timeout(1200)
def test_example_preview_up_change_destroy(pulumi_env: PulumiEnv, kubectl: Any) -> None:
    ns = "e2e-shop"
    stack = pulumi_env.stack(
        "lifecycle",
        {
            "namespace": ns,
            "app": "shop",
            "protectedSite": "e2e-east",
            "recoverySite": "e2e-west",
        },
    )

    # preview: everything to create, nothing created.
    preview = stack.preview()
    # the stack, the namespace, two Sites, the component, its VPG and its Checkpoint
    assert preview.change_summary == {"create": 7}, preview.stdout
    for created in (
        "kubernetes:secondsite.io/v1alpha1:Site e2e-east create",
        "kubernetes:secondsite.io/v1alpha1:VirtualProtectionGroup shop create",
        "kubernetes:secondsite.io/v1alpha1:Checkpoint shop-before-upgrade create",
        "secondsite:index:ProtectedApplication shop create",
    ):
        assert created in preview.stdout, preview.stdout
    assert get(kubectl, "site", "e2e-east") is None
    assert get(kubectl, "namespace", ns) is None

    # up: the objects exist as the program says, with the CRD's defaults filled in by the server.
    up = stack.up()
    assert up.summary.result == "succeeded"
    assert up.summary.resource_changes == {"create": 7}
    for site in ("e2e-east", "e2e-west"):
        obj = get(kubectl, "site", site)
        assert obj is not None
        assert obj["spec"] == {
            "nodeSelector": {"secondsite.io/site": site},
            "storage": {"path": "/var/lib/secondsite"},  # the CRD's default
        }
    vpg = get(kubectl, "vpg", "shop", "-n", ns)
    assert vpg is not None
    spec = vpg["spec"]
    assert spec["protectedSite"] == "e2e-east"
    assert spec["recoverySite"] == "e2e-west"
    assert spec["volumes"] == {"names": ["shop-db", "shop-media"]}
    assert spec["workloads"] == [
        {"kind": "StatefulSet", "name": "shop-db", "bootOrder": 0},
        {"kind": "Deployment", "name": "shop-web", "bootOrder": 1},
    ]
    assert spec["priority"] == "High"
    assert spec["rpoAlertSeconds"] == 300
    # Not sent by the program: defaulted by the API server from the CRD.
    assert spec["journal"] == {"history": "48h", "hardLimit": "200Gi", "warningPercent": 75}
    assert spec["checkpointIntervalSeconds"] == 5
    assert spec["paused"] is False
    assert names(kubectl, "checkpoints", ns) == {"shop-before-upgrade"}
    checkpoint = get(kubectl, "checkpoint", "shop-before-upgrade", "-n", ns)
    assert checkpoint is not None
    assert checkpoint["spec"] == {"vpg": "shop", "tag": "before-upgrade"}
    assert up.outputs["vpg"].value == f"{ns}/shop"
    uid = vpg["metadata"]["uid"]

    # A changed up: a new RPO alert and one more tagged checkpoint; the VPG is updated in place.
    stack.set_config("rpoAlertSeconds", auto.ConfigValue("120"))
    # "Before-Upgrade" makes the same object as "before-upgrade": a changed tag, which the CRD
    # makes immutable, so the Checkpoint is replaced (deleted, then created), not updated.
    stack.set_config("checkpointTags", auto.ConfigValue("Before-Upgrade,after-upgrade"))
    checkpoint_uid = checkpoint["metadata"]["uid"]
    changed = stack.up()
    assert changed.summary.resource_changes == {
        "same": 5,
        "update": 1,
        "create": 1,
        "replace": 1,
    }, changed.stdout
    vpg = get(kubectl, "vpg", "shop", "-n", ns)
    assert vpg is not None
    assert vpg["metadata"]["uid"] == uid
    assert vpg["spec"]["rpoAlertSeconds"] == 120
    assert vpg["metadata"]["generation"] == 2
    assert names(kubectl, "checkpoints", ns) == {"shop-before-upgrade", "shop-after-upgrade"}
    checkpoint = get(kubectl, "checkpoint", "shop-before-upgrade", "-n", ns)
    assert checkpoint is not None
    assert checkpoint["spec"] == {"vpg": "shop", "tag": "Before-Upgrade"}
    assert checkpoint["metadata"]["uid"] != checkpoint_uid

    # Specs the API server would refuse fail the update before anything is sent: a model built
    # by the program fails at construction (pydantic's own error, Python names) ...
    stack.set_config("rpoAlertSeconds", auto.ConfigValue("3"))
    with pytest.raises(auto.CommandError) as failed:
        stack.up()
    message = str(failed.value)
    assert "1 validation error for VirtualProtectionGroupSpec" in message
    assert "rpo_alert_seconds\n      Input should be greater than or equal to 10" in message
    stack.set_config("rpoAlertSeconds", auto.ConfigValue("120"))
    # ... and a spec given as values fails in the resource, naming the API's field.
    stack.set_config("checkpointTags", auto.ConfigValue("x" * 129))
    with pytest.raises(auto.CommandError) as failed:
        stack.up()
    message = str(failed.value)
    assert f"invalid Checkpoint 'shop-{'x' * 129}': spec.tag: String should have at most" in message
    assert "Traceback" not in message  # a pulumi.RunError: the message alone
    vpg = get(kubectl, "vpg", "shop", "-n", ns)
    assert vpg is not None
    assert vpg["spec"]["rpoAlertSeconds"] == 120
    assert vpg["metadata"]["generation"] == 2
    assert names(kubectl, "checkpoints", ns) == {"shop-before-upgrade", "shop-after-upgrade"}

    # destroy: everything the program made is gone.
    destroyed = stack.destroy()
    assert destroyed.summary.resource_changes == {"delete": 8}
    assert get(kubectl, "vpg", "shop", "-n", ns) is None
    assert get(kubectl, "checkpoint", "shop-before-upgrade", "-n", ns) is None
    assert get(kubectl, "site", "e2e-east") is None
    assert get(kubectl, "site", "e2e-west") is None
    ns_obj = get(kubectl, "namespace", ns)
    assert ns_obj is None or ns_obj["status"]["phase"] == "Terminating"
    stack.workspace.remove_stack("lifecycle")


def mark_ready(kubectl: Any, namespace: str, name: str, stop: threading.Event) -> None:
    """Stand in for the operator: once the VPG exists, set Ready for its current generation."""
    while not stop.is_set():
        vpg = get(kubectl, "vpg", name, "-n", namespace)
        if vpg is not None:
            generation = vpg["metadata"]["generation"]
            condition = {
                "type": "Ready",
                "status": "True",
                "reason": "Protecting",
                "message": "set by the test in place of the operator",
                "observedGeneration": generation,
                "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            status = {"observedGeneration": generation, "conditions": [condition]}
            kubectl(
                "patch", "vpg", name, "-n", namespace, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": status}),
            )  # fmt: skip
            return
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_up_waits_for_ready(
    pulumi_env: PulumiEnv, kubectl: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The program runs in this process (see pulumi_engine_env): give it the environment that
    # `pulumi up` gives a program, where the wait finds the cluster.
    monkeypatch.setenv("KUBECONFIG", pulumi_env.env["KUBECONFIG"])
    ns = "e2e-ready"
    stack = pulumi_env.stack(
        "ready",
        {
            "namespace": ns,
            "app": "ready",
            "protectedSite": "e2e-ready-east",
            "recoverySite": "e2e-ready-west",
            "checkpointTags": "",
            "waitForReady": True,
            "readyTimeoutSeconds": 120,
        },
    )
    try:
        stop = threading.Event()
        operator = threading.Thread(target=mark_ready, args=(kubectl, ns, "ready", stop))
        operator.start()
        try:
            up = stack.up()
        finally:
            stop.set()
            operator.join(timeout=30)
        assert up.outputs["ready"].value is True
        assert "waiting up to 120 s for VirtualProtectionGroup e2e-ready/ready" in up.stdout

        # A change makes generation 2; Ready still speaks of generation 1, so the wait fails.
        stack.set_config("rpoAlertSeconds", auto.ConfigValue("600"))
        stack.set_config("readyTimeoutSeconds", auto.ConfigValue("5"))
        started = time.monotonic()
        with pytest.raises(auto.CommandError) as failed:
            stack.up()
        assert time.monotonic() - started < 120
        message = str(failed.value)
        assert "VirtualProtectionGroup e2e-ready/ready is not Ready after 5 s" in message
        assert "for generation 1, not 2" in message
        assert "SecondSite operator" in message
    finally:
        stack.destroy()
        stack.workspace.remove_stack("ready")
    assert get(kubectl, "vpg", "ready", "-n", ns) is None
