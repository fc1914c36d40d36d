"""GitOps against a real kube-apiserver: `kubectl wait --for=condition=Ready vpg/<name>` waits for
a Ready condition of the current generation, the status schema keeps every field the health checks
read (docs/gitops.md), and manifests/gitops/argocd-health.yaml patches an argocd-cm ConfigMap
without disturbing the rest of it.

No operator runs here: the tests write the status the operator will write, through the status
subresource, as the operator's ServiceAccount would.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import kubernetes
import pytest
import yaml

from secondsite.api import (
    GROUP,
    KINDS,
    VERSION,
    ConditionType,
    RecoveryRequestStatus,
    VirtualProtectionGroupStatus,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "manifests" / "samples"
ARGOCD_PATCH = REPO / "manifests" / "gitops" / "argocd-health.yaml"
OPERATOR_SA = "system:serviceaccount:secondsite-system:secondsite-operator"
WHEN = "2026-01-01T00:00:00Z"

pytestmark = pytest.mark.k8s


class Kubectl(Protocol):
    """The `kubectl` fixture of tests/conftest.py: kubectl bound to the dev cluster."""

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="module")
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A namespace of this module's own, with the CRDs and the operator's RBAC installed."""
    kubectl("apply", "-k", str(REPO / "manifests"), timeout=120)
    names = [f"crd/{kind.crd_name}" for kind in KINDS]
    kubectl("wait", "--for", "condition=Established", "--timeout=60s", *names)
    kubectl("delete", "deployment", "-n", "secondsite-system", "secondsite-operator")
    name = f"gitops-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def create_sample(kubectl: Kubectl, namespace: str, file: str, name: str) -> None:
    sample = yaml.safe_load((SAMPLES / file).read_text())
    sample["metadata"]["name"] = name
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(sample))


def get(kubectl: Kubectl, namespace: str, resource: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        kubectl("get", "-n", namespace, resource, "-o", "json").stdout
    )
    return body


@pytest.fixture(scope="module")
def operator_api(kubeconfig: Path, namespace: str) -> Iterator[kubernetes.client.CustomObjectsApi]:
    """The API as the operator's ServiceAccount sees it (impersonated)."""
    api_client = kubernetes.config.new_client_from_config(str(kubeconfig))
    api_client.set_default_header("Impersonate-User", OPERATOR_SA)
    yield kubernetes.client.CustomObjectsApi(api_client)
    api_client.close()


def write_status(
    api: kubernetes.client.CustomObjectsApi,
    namespace: str,
    plural: str,
    name: str,
    status: dict[str, Any],
) -> None:
    """Merge-patch `status` through the status subresource as the operator, the way kopf does:
    one PATCH (`kubectl patch` would GET the status first, which the operator may not)."""
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, plural, name, {"status": status}
    )


def ready(status: str, generation: int) -> dict[str, Any]:
    return {
        "type": str(ConditionType.READY),
        "status": status,
        "reason": "Protecting" if status == "True" else "InitialSync",
        "message": "2 volumes protected" if status == "True" else "db-data 42 %",
        "observedGeneration": generation,
        "lastTransitionTime": WHEN,
    }


def wait_ready(kubectl: Kubectl, namespace: str, name: str, timeout: str) -> bool:
    proc = kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", f"vpg/{name}", f"--timeout={timeout}",
        check=False, timeout=30,
    )  # fmt: skip
    if proc.returncode != 0:
        assert "timed out" in proc.stderr, proc.stderr
    return proc.returncode == 0


def test_kubectl_wait_for_ready_vpg(
    kubectl: Kubectl, namespace: str, operator_api: kubernetes.client.CustomObjectsApi
) -> None:
    """`kubectl wait --for=condition=Ready vpg/<name>` returns once the operator reports Ready for
    the VPG's current spec, and not on a Ready left from an earlier spec."""
    create_sample(kubectl, namespace, "virtualprotectiongroup.yaml", "wait-demo")
    assert not wait_ready(kubectl, namespace, "wait-demo", "1s")  # no status yet

    vpg = "vpg/wait-demo"
    plural = "virtualprotectiongroups"
    status = {"observedGeneration": 1, "conditions": [ready("False", 1)]}
    write_status(operator_api, namespace, plural, "wait-demo", status)
    assert not wait_ready(kubectl, namespace, "wait-demo", "1s")

    write_status(operator_api, namespace, plural, "wait-demo", {"conditions": [ready("True", 1)]})
    assert wait_ready(kubectl, namespace, "wait-demo", "10s")

    # A spec change (generation 2): the Ready of generation 1 no longer counts...
    spec_change = '{"spec": {"checkpointIntervalSeconds": 10}}'
    kubectl("patch", "-n", namespace, vpg, "--type=merge", "-p", spec_change)
    assert get(kubectl, namespace, vpg)["metadata"]["generation"] == 2
    assert not wait_ready(kubectl, namespace, "wait-demo", "1s")
    # ...until the operator reports on generation 2.
    status = {"observedGeneration": 2, "conditions": [ready("True", 2)]}
    write_status(operator_api, namespace, plural, "wait-demo", status)
    assert wait_ready(kubectl, namespace, "wait-demo", "10s")


def test_status_keeps_what_the_health_checks_read(
    kubectl: Kubectl, namespace: str, operator_api: kubernetes.client.CustomObjectsApi
) -> None:
    """Nothing the Argo CD scripts or kstatus read is pruned by the status schema."""
    create_sample(kubectl, namespace, "virtualprotectiongroup.yaml", "health-demo")
    vpg_status = {
        "observedGeneration": 1,
        "state": "Syncing",
        "conditions": [
            ready("False", 1),
            {**ready("False", 1), "type": str(ConditionType.RECONCILING), "status": "True"},
            {**ready("False", 1), "type": str(ConditionType.STALLED), "status": "False"},
        ],
    }
    VirtualProtectionGroupStatus.model_validate(vpg_status)
    write_status(operator_api, namespace, "virtualprotectiongroups", "health-demo", vpg_status)
    assert get(kubectl, namespace, "vpg/health-demo")["status"] == vpg_status

    create_sample(kubectl, namespace, "recoveryrequest-failovertest.yaml", "health-demo")
    rr_status = {
        "observedGeneration": 1,
        "phase": "Ready",
        "commitDeadline": "2026-01-01T02:00:00Z",
        "conditions": [{**ready("True", 1), "reason": "Ready"}],
    }
    RecoveryRequestStatus.model_validate(rr_status)
    write_status(operator_api, namespace, "recoveryrequests", "health-demo", rr_status)
    assert get(kubectl, namespace, "rr/health-demo")["status"] == rr_status


@pytest.fixture
def argocd_cm(kubectl: Kubectl) -> Iterator[str]:
    """An argocd-cm ConfigMap as Argo CD installs it, with a setting of its own."""
    patch = yaml.safe_load(ARGOCD_PATCH.read_text())
    namespace = patch["metadata"]["namespace"]
    kubectl("create", "namespace", namespace)
    url = "--from-literal=url=https://argocd.example"
    kubectl("create", "configmap", "-n", namespace, "argocd-cm", url)
    yield namespace
    kubectl("delete", "namespace", namespace, "--wait=false")


def test_argocd_health_patch_merges_into_argocd_cm(kubectl: Kubectl, argocd_cm: str) -> None:
    kubectl("patch", "-n", argocd_cm, "configmap", "argocd-cm", "--patch-file", str(ARGOCD_PATCH))
    data = get(kubectl, argocd_cm, "configmap/argocd-cm")["data"]
    assert data.pop("url") == "https://argocd.example"
    assert data == yaml.safe_load(ARGOCD_PATCH.read_text())["data"]
    assert {key.rsplit("_", 1)[1] for key in data} == {
        "VirtualProtectionGroup", "Site", "ReplicationAppliance", "RecoveryRequest", "Checkpoint",
    }  # fmt: skip
