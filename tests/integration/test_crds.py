"""The CRDs on a real kube-apiserver: they install, the samples apply, the API server applies the
models' defaults, bad specs are rejected with a message naming the field, and `kubectl get` shows
the printer columns.

Every bad spec is also given to the pydantic models (no cluster needed), so the two sides of each
rule, CEL and Python, are held to the same cases.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml
from pydantic import ValidationError

from secondsite.api import API_VERSION, KINDS, Kind, kind_named

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
SAMPLES = REPO / "manifests" / "samples"
SAMPLE_FILES = sorted(path for path in SAMPLES.glob("*.yaml") if path.name != "kustomization.yaml")
TEST_LABEL = "secondsite.io/test=crds"
DELETE = object()
"""An edit that removes the field."""

k8s = pytest.mark.k8s


class Kubectl(Protocol):
    """The `kubectl` fixture of tests/conftest.py: kubectl bound to the dev cluster."""

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]: ...


# --- objects ------------------------------------------------------------------------------------

MINIMAL_SPECS: dict[str, dict[str, Any]] = {
    "Site": {"nodeSelector": {"secondsite.io/site": "protected"}},
    "ReplicationAppliance": {"site": "protected", "nodeName": "protected-1"},
    "VirtualProtectionGroup": {
        "protectedSite": "protected",
        "recoverySite": "recovery",
        "volumes": {"names": ["db-data"]},
    },
    "Journal": {"vpg": "demo"},
    "Checkpoint": {"vpg": "demo", "tag": "before-upgrade"},
    "RecoveryRequest": {"vpg": "demo", "operation": "FailoverTest"},
}
"""A valid spec of each kind with only the required fields."""


def edited_spec(kind: str, edits: dict[str, Any]) -> dict[str, Any]:
    """The minimal spec of `kind` with `edits` (dotted paths to values, or DELETE) applied."""
    result = copy.deepcopy(MINIMAL_SPECS[kind])
    for path, value in edits.items():
        *parents, last = path.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return result


def manifest(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "labels": {"secondsite.io/test": "crds"}},
        "spec": spec,
    }


def resource(kind: Kind) -> str:
    return f"{kind.plural}.secondsite.io"


def without_empty(value: Any) -> Any:
    """`value` without empty lists and maps: the API server adds none, the models add some."""
    if isinstance(value, dict):
        pruned = {key: without_empty(item) for key, item in value.items()}
        return {key: item for key, item in pruned.items() if item not in ({}, [])}
    if isinstance(value, list):
        return [without_empty(item) for item in value]
    return value


# --- bad inputs ---------------------------------------------------------------------------------

VPG, RR = "VirtualProtectionGroup", "RecoveryRequest"
INVALID = [
    # (case id, kind, edits of the minimal spec, the field the error must name)
    (
        "interval-not-a-number",
        VPG,
        {"checkpointIntervalSeconds": "five"},
        "checkpointIntervalSeconds",
    ),
    ("interval-zero", VPG, {"checkpointIntervalSeconds": 0}, "checkpointIntervalSeconds"),
    (
        "interval-over-an-hour",
        VPG,
        {"checkpointIntervalSeconds": 3601},
        "checkpointIntervalSeconds",
    ),
    ("rpo-alert-too-low", VPG, {"rpoAlertSeconds": 5}, "rpoAlertSeconds"),
    (
        "rpo-alert-below-interval",
        VPG,
        {"rpoAlertSeconds": 60, "checkpointIntervalSeconds": 120},
        "rpoAlertSeconds",
    ),
    ("priority-unknown", VPG, {"priority": "Urgent"}, "priority"),
    ("same-sites", VPG, {"recoverySite": "protected"}, "recoverySite"),
    ("site-not-a-name", VPG, {"protectedSite": "Protected_Site"}, "protectedSite"),
    ("history-45d", VPG, {"journal.history": "45d"}, "journal.history"),
    ("history-30m", VPG, {"journal.history": "30m"}, "journal.history"),
    ("history-compound", VPG, {"journal.history": "1d12h"}, "journal.history"),
    (
        "volumes-names-and-selector",
        VPG,
        {"volumes.selector": {"matchLabels": {"a": "b"}}},
        "volumes",
    ),
    ("volumes-neither", VPG, {"volumes.names": DELETE}, "volumes"),
    ("volumes-missing", VPG, {"volumes": DELETE}, "volumes"),
    ("volumes-duplicate-name", VPG, {"volumes.names": ["db", "db"]}, "volumes.names"),
    ("volumes-bad-pvc-name", VPG, {"volumes.names": ["DB_Data"]}, "volumes.names"),
    (
        "selector-in-without-values",
        VPG,
        {
            "volumes.names": DELETE,
            "volumes.selector": {"matchExpressions": [{"key": "app", "operator": "In"}]},
        },
        "volumes.selector.matchExpressions[0].values",
    ),
    (
        "workloads-duplicate",
        VPG,
        {
            "workloads": [
                {"kind": "StatefulSet", "name": "db"},
                {"kind": "StatefulSet", "name": "db"},
            ]
        },
        "workloads",
    ),
    (
        "test-namespace-same-as-namespace",
        VPG,
        {"recovery": {"namespace": "prod", "testNamespace": "prod"}},
        "recovery.testNamespace",
    ),
    ("unknown-field", VPG, {"bogusField": 1}, "bogusField"),
    ("hard-limit-not-a-quantity", "Journal", {"hardLimit": "lots"}, "hardLimit"),
    ("hard-limit-zero", "Journal", {"hardLimit": "0Gi"}, "hardLimit"),
    ("hard-limit-boolean", "Journal", {"hardLimit": True}, "hardLimit"),
    ("warning-percent-over-100", "Journal", {"warningPercent": 101}, "warningPercent"),
    ("rr-vpg-missing", RR, {"vpg": DELETE}, "vpg"),
    ("rr-operation-unknown", RR, {"operation": "Teleport"}, "operation"),
    ("rr-two-selectors", RR, {"checkpoint": {"latest": True, "tag": "x"}}, "checkpoint"),
    ("rr-no-selector", RR, {"checkpoint": {}}, "checkpoint"),
    ("rr-latest-false-only", RR, {"checkpoint": {"latest": False}}, "checkpoint"),
    ("rr-time-not-a-time", RR, {"checkpoint": {"time": "yesterday"}}, "checkpoint.time"),
    ("rr-commit-on-failover-test", RR, {"action": "Commit"}, "action"),
    ("rr-stop-on-failover", RR, {"operation": "Failover", "action": "Stop"}, "action"),
    ("rr-action-on-clone", RR, {"operation": "Clone", "action": "Commit"}, "action"),
    (
        "rr-commit-timeout-too-short",
        RR,
        {"operation": "Failover", "commitPolicy": {"timeoutSeconds": 60}},
        "commitPolicy.timeoutSeconds",
    ),
    ("rr-commit-policy-on-test", RR, {"commitPolicy": {"policy": "Commit"}}, "commitPolicy"),
    (
        "rr-test-result-on-failover",
        RR,
        {"operation": "Failover", "testResult": {"result": "Passed"}},
        "testResult",
    ),
    ("rr-reverse-protection-on-test", RR, {"reverseProtection": True}, "reverseProtection"),
    ("site-empty-node-selector", "Site", {"nodeSelector": {}}, "nodeSelector"),
    ("vra-node-name-missing", "ReplicationAppliance", {"nodeName": DELETE}, "nodeName"),
    ("checkpoint-tag-too-long", "Checkpoint", {"tag": "x" * 129}, "tag"),
]

IMMUTABLE = [
    # (case id, kind, edits for the created object, merge patch of its spec, the field)
    ("rr-operation", RR, {}, {"operation": "Failover"}, "operation"),
    ("rr-vpg", RR, {}, {"vpg": "other"}, "vpg"),
    (
        "rr-checkpoint",
        RR,
        {},
        {"checkpoint": {"latest": None, "tag": "before-upgrade"}},
        "checkpoint",
    ),
    (
        "rr-action-once-given",
        RR,
        {"operation": "Failover", "action": "Commit"},
        {"action": "Rollback"},
        "action",
    ),
    ("rr-action-removed", RR, {"action": "Stop"}, {"action": None}, "action"),
    ("vpg-protected-site", VPG, {}, {"protectedSite": "elsewhere"}, "protectedSite"),
    ("vpg-recovery-site", VPG, {}, {"recoverySite": "elsewhere"}, "recoverySite"),
    ("journal-vpg", "Journal", {}, {"vpg": "other"}, "vpg"),
    ("checkpoint-tag", "Checkpoint", {}, {"tag": "after-upgrade"}, "tag"),
    ("vra-node-name", "ReplicationAppliance", {}, {"nodeName": "protected-2"}, "nodeName"),
]

ALLOWED_UPDATES = [
    # (case id, kind, edits for the created object, merge patch of its spec)
    (
        "stop-a-test-with-result",
        RR,
        {},
        {"action": "Stop", "testResult": {"result": "Passed", "notes": "app up"}},
    ),
    (
        "extend-commit-timeout",
        RR,
        {"operation": "Failover"},
        {"commitPolicy": {"timeoutSeconds": 7200}},
    ),
    ("commit-a-failover", RR, {"operation": "Move", "sourceShutdown": True}, {"action": "Commit"}),
    (
        "tune-a-vpg",
        VPG,
        {},
        {"paused": True, "checkpointIntervalSeconds": 10, "journal": {"history": "7d"}},
    ),
    ("move-a-site", "Site", {}, {"nodeSelector": {"secondsite.io/site": "elsewhere"}}),
]


def _ids(cases: list[tuple[Any, ...]]) -> list[str]:
    return [case[0] for case in cases]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds(kubectl: Kubectl) -> None:
    """The CRDs, installed and Established."""
    kubectl("apply", "-f", str(CRDS))
    names = [f"crd/{kind.crd_name}" for kind in KINDS]
    kubectl("wait", "--for", "condition=Established", "--timeout=60s", *names)


@pytest.fixture(scope="module")
def namespace(kubectl: Kubectl, crds: None) -> Iterator[str]:
    """A namespace of this module's own: a deleted one lingers while it terminates."""
    name = f"crd-tests-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    yield name
    for path in SAMPLE_FILES:
        kubectl("delete", "-n", name, "-f", str(path), "--ignore-not-found", "--wait=false")
    cluster_scoped = ",".join(resource(kind) for kind in KINDS if kind.scope == "Cluster")
    kubectl("delete", cluster_scoped, "-l", TEST_LABEL, "--ignore-not-found", "--wait=false")
    kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def samples(kubectl: Kubectl, namespace: str) -> dict[str, dict[str, Any]]:
    """Every sample applied, by kind."""
    applied: dict[str, dict[str, Any]] = {}
    for path in SAMPLE_FILES:
        kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
        document = yaml.safe_load(path.read_text())
        applied.setdefault(document["kind"], document)
    return applied


def create(
    kubectl: Kubectl, namespace: str, kind: str, name: str, spec: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return kubectl(
        "create",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(manifest(kind, name, spec)),
        check=False,
    )


def recreate(kubectl: Kubectl, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    kubectl("delete", "-n", namespace, resource(kind_named(kind)), name, "--ignore-not-found")
    proc = create(kubectl, namespace, kind, name, spec)
    assert proc.returncode == 0, proc.stderr


def patch_spec(
    kubectl: Kubectl, namespace: str, kind: str, name: str, patch: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return kubectl(
        "patch",
        "-n",
        namespace,
        resource(kind_named(kind)),
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": patch}),
        check=False,
    )


# --- tests --------------------------------------------------------------------------------------


@k8s
def test_crds_are_established(kubectl: Kubectl, crds: None) -> None:
    listed = kubectl("get", "crd", "-o", "name").stdout.split()
    for kind in KINDS:
        assert f"customresourcedefinition.apiextensions.k8s.io/{kind.crd_name}" in listed


@k8s
@pytest.mark.parametrize("path", SAMPLE_FILES, ids=[path.name for path in SAMPLE_FILES])
def test_sample_applies(kubectl: Kubectl, namespace: str, path: Path) -> None:
    kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    stored = json.loads(kubectl("get", "-n", namespace, "-f", str(path), "-o", "json").stdout)
    sample = yaml.safe_load(path.read_text())
    # The sample's spec is stored as written (defaults may add to it, nothing is pruned).
    assert {key: stored["spec"][key] for key in sample["spec"]} == sample["spec"]


@k8s
def test_samples_cover_every_kind(kubectl: Kubectl) -> None:
    rendered = kubectl("kustomize", str(SAMPLES)).stdout
    kinds = {document["kind"] for document in yaml.safe_load_all(rendered)}
    assert kinds == {kind.kind for kind in KINDS}


@k8s
@pytest.mark.parametrize("kind", KINDS, ids=[kind.kind for kind in KINDS])
def test_api_server_applies_the_model_defaults(
    kubectl: Kubectl, namespace: str, kind: Kind
) -> None:
    name = f"defaults-{kind.singular}"
    recreate(kubectl, namespace, kind.kind, name, MINIMAL_SPECS[kind.kind])
    stored = json.loads(kubectl("get", "-n", namespace, resource(kind), name, "-o", "json").stdout)
    expected = kind.spec.model_validate(MINIMAL_SPECS[kind.kind]).model_dump(
        mode="json", exclude_none=True
    )
    assert without_empty(stored["spec"]) == without_empty(expected)


@k8s
@pytest.mark.parametrize(("case", "kind", "edits", "field"), INVALID, ids=_ids(INVALID))
def test_api_server_rejects(
    kubectl: Kubectl, namespace: str, case: str, kind: str, edits: dict[str, Any], field: str
) -> None:
    proc = create(kubectl, namespace, kind, f"bad-{case}", edited_spec(kind, edits))
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    assert f"spec.{field}" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("case", "kind", "edits", "field"), INVALID, ids=_ids(INVALID))
def test_models_reject(case: str, kind: str, edits: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        kind_named(kind).spec.model_validate(edited_spec(kind, edits))
    assert field.rsplit(".", 1)[-1] in str(error.value)


@k8s
@pytest.mark.parametrize(
    ("case", "kind", "edits", "patch", "field"), IMMUTABLE, ids=_ids(IMMUTABLE)
)
def test_api_server_rejects_changing(
    kubectl: Kubectl,
    namespace: str,
    case: str,
    kind: str,
    edits: dict[str, Any],
    patch: dict[str, Any],
    field: str,
) -> None:
    name = f"immutable-{case}"
    recreate(kubectl, namespace, kind, name, edited_spec(kind, edits))
    proc = patch_spec(kubectl, namespace, kind, name, patch)
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    assert f"spec.{field}" in proc.stderr, proc.stderr


@k8s
@pytest.mark.parametrize(
    ("case", "kind", "edits", "patch"), ALLOWED_UPDATES, ids=_ids(ALLOWED_UPDATES)
)
def test_api_server_allows_updating(
    kubectl: Kubectl,
    namespace: str,
    case: str,
    kind: str,
    edits: dict[str, Any],
    patch: dict[str, Any],
) -> None:
    name = f"update-{case}"
    recreate(kubectl, namespace, kind, name, edited_spec(kind, edits))
    proc = patch_spec(kubectl, namespace, kind, name, patch)
    assert proc.returncode == 0, proc.stderr


# What the operator would report for each sample, and how `kubectl get` must show it.
STATUSES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "Site": ({"appliances": 2, "readyAppliances": 1}, {"APPLIANCES": "2", "READY": "1"}),
    "ReplicationAppliance": (
        {
            "endpoint": "127.0.0.1:7070",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Running",
                    "message": "the control API answers",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        },
        {"SITE": "recovery", "NODE": "recovery-1", "READY": "True", "ENDPOINT": "127.0.0.1:7070"},
    ),
    "VirtualProtectionGroup": (
        {
            "state": "MeetingSLA",
            "rpoSeconds": 4,
            "history": "23h59m",
            "journal": {"usedPercent": 37},
        },
        {"STATE": "MeetingSLA", "RPO": "4", "HISTORY": "23h59m", "JOURNAL": "37"},
    ),
    "Journal": (
        {"used": "37.5Gi", "history": "23h59m", "checkpoints": 17280},
        {"VPG": "demo", "USED": "37.5Gi", "HISTORY": "23h59m", "CHECKPOINTS": "17280"},
    ),
    "Checkpoint": (
        {"phase": "Ready", "id": "42", "time": "2026-01-01T00:00:00Z"},
        {"VPG": "demo", "TAG": "before-upgrade", "PHASE": "Ready", "TIME": "2026-01-01T00:00:00Z"},
    ),
    "RecoveryRequest": (
        {
            "phase": "Ready",
            "checkpoint": {"id": "42", "time": "2026-01-01T00:00:00Z"},
            "rtoSeconds": 38,
        },
        {
            "VPG": "demo",
            "OPERATION": "FailoverTest",
            "PHASE": "Ready",
            "CHECKPOINT": "2026-01-01T00:00:00Z",
            "RTO": "38",
        },
    ),
}


@k8s
@pytest.mark.parametrize("kind", KINDS, ids=[kind.kind for kind in KINDS])
def test_kubectl_get_shows_the_printer_columns(
    kubectl: Kubectl, namespace: str, samples: dict[str, dict[str, Any]], kind: Kind
) -> None:
    status, shown = STATUSES[kind.kind]
    kind.status.model_validate(status)  # what the test reports is a valid status
    name = samples[kind.kind]["metadata"]["name"]
    patch = json.dumps({"status": status})
    kubectl("patch", "-n", namespace, resource(kind), name, "--subresource=status", "--type=merge",
            "-p", patch)  # fmt: skip
    # Short names are what people type: `kubectl get vpg`, `rr`, `vra`.
    listed = kind.short_names[0] if kind.short_names else kind.plural
    header, row = kubectl("get", "-n", namespace, listed, name).stdout.splitlines()
    assert header.split() == ["NAME", *(column.name.upper() for column in kind.printer_columns)]
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert {column: cells[column] for column in shown} == shown


@k8s
def test_category_lists_every_kind(
    kubectl: Kubectl, namespace: str, samples: dict[str, dict[str, Any]]
) -> None:
    listed = kubectl("get", "secondsite", "-n", namespace, "-o", "name").stdout.split()
    for kind in KINDS:
        name = samples[kind.kind]["metadata"]["name"]
        assert f"{kind.singular}.secondsite.io/{name}" in listed


@k8s
def test_explain_shows_the_docstrings(kubectl: Kubectl, crds: None) -> None:
    explained = kubectl("explain", "virtualprotectiongroup.spec.checkpointIntervalSeconds").stdout
    assert "Seconds between automatic checkpoints." in explained
