"""The dev cluster behaves like a small real cluster: upstream API server, scheduler and
controllers, with the node simulator running pods as local processes."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.k8s


@pytest.fixture
def namespace(kubectl: Any) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def _json(kubectl: Any, *args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_nodes_are_ready_with_site_labels(kubectl: Any) -> None:
    nodes = _json(kubectl, "get", "nodes")["items"]
    sites = {
        n["metadata"]["name"]: n["metadata"]["labels"].get("secondsite.io/site") for n in nodes
    }
    assert sites == {
        "protected-1": "protected",
        "protected-2": "protected",
        "recovery-1": "recovery",
        "recovery-2": "recovery",
    }
    for n in nodes:
        ready = [c for c in n["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", n["metadata"]["name"]
    leases = _json(kubectl, "get", "leases", "-n", "kube-node-lease")["items"]
    assert {lease["metadata"]["name"] for lease in leases} >= set(sites)


def test_deployment_is_scheduled_and_run_then_stopped(
    kubectl: Any, namespace: str, tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "writer", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "writer"}},
            "template": {
                "metadata": {"labels": {"app": "writer"}},
                "spec": {
                    "nodeSelector": {"secondsite.io/site": "recovery"},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "main",
                            "image": "example/writer:1",
                            "command": ["/bin/sh", "-c"],
                            "args": [
                                f"echo $(POD_NAME) $(NODE_NAME) $(POD_NAMESPACE) $POD_IP $GREETING"
                                f" > {tmp_path}/$(POD_NAME).out; exec sleep 600"
                            ],
                            "env": [
                                {"name": "GREETING", "value": "hello"},
                                {
                                    "name": "MY_UID",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
                                },
                            ],
                        }
                    ],
                },
            },
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def running_pods() -> list[Any]:
        pods = _json(kubectl, "get", "pods", "-n", namespace, "-l", "app=writer")["items"]
        ok = [p for p in pods if p["status"].get("phase") == "Running"]
        return ok if len(ok) == 2 else []

    pods = wait_for(running_pods, timeout=60, what="2 running pods")
    pids = []
    for pod in pods:
        name, node = pod["metadata"]["name"], pod["spec"]["nodeName"]
        assert node in ("recovery-1", "recovery-2")  # the real scheduler honoured nodeSelector
        out = wait_for(lambda n=name: (tmp_path / f"{n}.out").exists(), what="output file")
        assert out
        ip = pod["status"]["podIP"]
        assert (tmp_path / f"{name}.out").read_text().split() == [
            name,
            node,
            namespace,
            ip,
            "hello",
        ]
        cid = pod["status"]["containerStatuses"][0]["containerID"]
        pids.append(int(cid.removeprefix("sim://")))
    assert all(_pid_alive(p) for p in pids)

    kubectl("delete", "deployment", "writer", "-n", namespace, "--wait=true")
    wait_for(
        lambda: not _json(kubectl, "get", "pods", "-n", namespace)["items"],
        timeout=60,
        what="pods gone",
    )
    wait_for(lambda: not any(_pid_alive(p) for p in pids), timeout=10, what="processes gone")


def _pod(namespace: str, name: str, script: str, restart: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "restartPolicy": restart,
                "containers": [{"name": "c", "image": "x", "command": ["/bin/sh", "-c", script]}],
            },
        }
    )


@pytest.mark.parametrize(
    ("code", "phase", "reason"), [(0, "Succeeded", "Completed"), (3, "Failed", "Error")]
)
def test_exit_code_sets_phase(
    kubectl: Any, namespace: str, wait_for: Callable[..., Any], code: int, phase: str, reason: str
) -> None:
    kubectl("apply", "-f", "-", input=_pod(namespace, "once", f"exit {code}", "Never"))

    def finished() -> Any:
        pod = _json(kubectl, "get", "pod", "once", "-n", namespace)
        return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

    pod = wait_for(finished, timeout=60, what="pod to finish")
    assert pod["status"]["phase"] == phase
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (code, reason)


def test_restart_policy_always_restarts(
    kubectl: Any, namespace: str, wait_for: Callable[..., Any]
) -> None:
    kubectl("apply", "-f", "-", input=_pod(namespace, "crasher", "sleep 0.2; exit 1", "Always"))

    def restarted() -> Any:
        pod = _json(kubectl, "get", "pod", "crasher", "-n", namespace)
        statuses = pod["status"].get("containerStatuses") or [{}]
        return pod if statuses[0].get("restartCount", 0) >= 2 else None

    pod = wait_for(restarted, timeout=60, what="two restarts")
    assert pod["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 1


def test_unschedulable_pod_stays_pending(
    kubectl: Any, namespace: str, wait_for: Callable[..., Any]
) -> None:
    pod = json.loads(_pod(namespace, "nowhere", "sleep 60", "Never"))
    pod["spec"]["nodeSelector"] = {"secondsite.io/site": "nowhere"}
    kubectl("apply", "-f", "-", input=json.dumps(pod))

    def unschedulable() -> Any:
        got = _json(kubectl, "get", "pod", "nowhere", "-n", namespace)
        conds = got["status"].get("conditions", [])
        return [c for c in conds if c["type"] == "PodScheduled" and c["status"] == "False"]

    conds = wait_for(unschedulable, timeout=30, what="scheduler to report Unschedulable")
    assert conds[0]["reason"] == "Unschedulable"
    assert "nodeName" not in _json(kubectl, "get", "pod", "nowhere", "-n", namespace)["spec"]
