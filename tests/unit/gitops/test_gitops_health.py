"""How GitOps tools read SecondSite objects: Argo CD's health checks (the Lua of
manifests/gitops/argocd/, run for real in Lua 5.1 like Argo CD's gopher-lua) and kstatus (Flux,
`kstatus`-based tools), on statuses the operator writes as secondsite.api describes them.

Every status below is validated by the API models first, so a test cannot pass on a status the
operator could not write. The kstatus rules are restated here from sigs.k8s.io/cli-utils
(pkg/kstatus/status: `Compute` with the generic checks, the only ones that apply to custom
resources), small enough to read against the original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lupa
import pytest
import yaml

from secondsite.api import (
    GROUP,
    KINDS,
    ApiModel,
    CheckpointPhase,
    CheckpointStatus,
    ConditionType,
    RecoveryPhase,
    RecoveryRequestStatus,
    ReplicationApplianceStatus,
    SiteStatus,
    VirtualProtectionGroupStatus,
)

REPO = Path(__file__).resolve().parents[3]
GITOPS = REPO / "manifests" / "gitops"
ARGOCD = GITOPS / "argocd"
SCRIPTS = {
    "VirtualProtectionGroup": ARGOCD / "conditions.lua",
    "Site": ARGOCD / "conditions.lua",
    "ReplicationAppliance": ARGOCD / "conditions.lua",
    "RecoveryRequest": ARGOCD / "recoveryrequest.lua",
    "Checkpoint": ARGOCD / "checkpoint.lua",
}
STATUS_MODELS: dict[str, type[ApiModel]] = {
    "VirtualProtectionGroup": VirtualProtectionGroupStatus,
    "Site": SiteStatus,
    "ReplicationAppliance": ReplicationApplianceStatus,
    "RecoveryRequest": RecoveryRequestStatus,
    "Checkpoint": CheckpointStatus,
}
WHEN = "2026-01-01T00:00:00Z"


# --- the two readers ----------------------------------------------------------------------------


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) of Argo CD's health check for `obj`, run as argocd-cm configures it."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=False)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPTS[obj["kind"]].read_text())
    return str(hs["status"]), str(hs["message"])


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus's verdict on a custom resource: Terminating, InProgress, Failed or Current."""
    status = obj.get("status") or {}
    if obj["metadata"].get("deletionTimestamp"):
        return "Terminating"
    generation = obj["metadata"].get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress"
    for condition in status.get("conditions", []):
        if condition["type"] == "Reconciling" and condition["status"] == "True":
            return "InProgress"
        if condition["type"] == "Stalled" and condition["status"] == "True":
            return "Failed"
    return "Current"


# --- objects ------------------------------------------------------------------------------------


def condition(
    type: ConditionType | str,
    status: str,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
) -> dict[str, Any]:
    result = {
        "type": str(type),
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": WHEN,
    }
    if observed_generation is not None:
        result["observedGeneration"] = observed_generation
    return result


def obj(
    kind: str, status: dict[str, Any] | None, generation: int = 3, **spec: Any
) -> dict[str, Any]:
    """An object of `kind` at `generation`, with `status` validated by the kind's status model."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": kind,
        "metadata": {"name": "demo", "namespace": "prod", "generation": generation},
        "spec": spec,
    }
    if status is not None:
        model = STATUS_MODELS[kind].model_validate(status)
        body["status"] = model.model_dump(mode="json", exclude_none=True)
    return body


def current(*conditions: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A status of generation 3 (the objects' generation) with `conditions`."""
    return {"observedGeneration": 3, "conditions": list(conditions), **fields}


READY = ConditionType.READY
RECONCILING = ConditionType.RECONCILING
STALLED = ConditionType.STALLED


# --- condition-based kinds: VPG, Site, ReplicationAppliance -------------------------------------

CONDITION_CASES = [
    # (id, object, Argo CD (status, message), kstatus)
    (
        "new-without-status",
        obj("VirtualProtectionGroup", None),
        ("Progressing", "Waiting for the operator to report status"),
        # kstatus cannot tell a new object from a reconciled one: see docs/gitops.md (Flux).
        "Current",
    ),
    (
        "status-without-observed-generation",
        obj("VirtualProtectionGroup", {"state": "Initializing"}),
        ("Progressing", "Waiting for the operator to report status"),
        "Current",
    ),
    (
        "ready-and-current",
        obj(
            "VirtualProtectionGroup",
            current(condition(READY, "True", "Protecting", "2 volumes protected", 3)),
        ),
        ("Healthy", "Protecting: 2 volumes protected"),
        "Current",
    ),
    (
        "ready-of-an-older-generation",
        obj(
            "VirtualProtectionGroup",
            {
                "observedGeneration": 2,
                "conditions": [condition(READY, "True", "Protecting", "2 volumes protected", 2)],
            },
        ),
        (
            "Progressing",
            "Waiting for the operator to observe generation 3 (status is of generation 2)",
        ),
        "InProgress",
    ),
    (
        # The status is current but its Ready condition is not: `kubectl wait` ignores such a
        # condition, and so does the health check.
        "ready-condition-of-an-older-generation",
        obj(
            "VirtualProtectionGroup",
            current(condition(READY, "True", "Protecting", "2 volumes protected", 2)),
        ),
        ("Progressing", "Waiting for the Ready condition"),
        "Current",
    ),
    (
        "not-ready",
        obj(
            "VirtualProtectionGroup",
            current(
                condition(READY, "False", "ApplianceUnavailable", "recovery-1 does not answer", 3)
            ),
        ),
        ("Degraded", "ApplianceUnavailable: recovery-1 does not answer"),
        "Current",
    ),
    (
        "ready-unknown",
        obj("VirtualProtectionGroup", current(condition(READY, "Unknown", "Checking"))),
        ("Progressing", "Checking"),
        "Current",
    ),
    (
        "initial-sync",
        obj(
            "VirtualProtectionGroup",
            current(
                condition(READY, "False", "InitialSync", "db-data 42 %", 3),
                condition(RECONCILING, "True", "InitialSync", "db-data 42 %", 3),
            ),
        ),
        ("Progressing", "InitialSync: db-data 42 %"),
        "InProgress",
    ),
    (
        "stalled-on-a-bad-spec",
        obj(
            "VirtualProtectionGroup",
            current(
                condition(READY, "False", "SiteNotFound", 'no Site "recovery"', 3),
                condition(STALLED, "True", "SiteNotFound", 'no Site "recovery"', 3),
            ),
        ),
        ("Degraded", 'SiteNotFound: no Site "recovery"'),
        "Failed",
    ),
    (
        # The operator marked the new generation Stalled before it rewrote Ready.
        "stalled-before-ready-is-rewritten",
        obj(
            "VirtualProtectionGroup",
            current(
                condition(READY, "True", "Protecting", "", 2),
                condition(STALLED, "True", "SiteNotFound", 'no Site "elsewhere"', 3),
            ),
        ),
        ("Degraded", 'SiteNotFound: no Site "elsewhere"'),
        "Failed",
    ),
    (
        "paused",
        obj(
            "VirtualProtectionGroup",
            current(condition(READY, "False", "Paused", "replication is paused", 3)),
            paused=True,
        ),
        ("Suspended", "Paused (spec.paused)"),
        "Current",
    ),
    (
        "paused-not-yet-observed",
        obj(
            "VirtualProtectionGroup",
            {
                "observedGeneration": 2,
                "conditions": [condition(READY, "True", "Protecting", "", 2)],
            },
            paused=True,
        ),
        ("Progressing", "Waiting for the operator to observe generation 3"),
        "InProgress",
    ),
    (
        "site-ready",
        obj(
            "Site",
            current(condition(READY, "True", "AppliancesReady", "2 of 2 ready"), appliances=2),
        ),
        ("Healthy", "AppliancesReady: 2 of 2 ready"),
        "Current",
    ),
    (
        "appliance-starting",
        obj(
            "ReplicationAppliance",
            current(
                condition(READY, "False", "PodPending", "pod secondsite-appliance-x is Pending"),
                condition(
                    RECONCILING, "True", "PodPending", "pod secondsite-appliance-x is Pending"
                ),
            ),
        ),
        ("Progressing", "PodPending: pod secondsite-appliance-x is Pending"),
        "InProgress",
    ),
]


@pytest.mark.parametrize(
    ("body", "health"),
    [pytest.param(case[1], case[2], id=case[0]) for case in CONDITION_CASES],
)
def test_argocd_health_of_condition_kinds(body: dict[str, Any], health: tuple[str, str]) -> None:
    status, message = argocd_health(body)
    assert status == health[0]
    assert message.startswith(health[1]), message


@pytest.mark.parametrize(
    ("body", "verdict"),
    [pytest.param(case[1], case[3], id=case[0]) for case in CONDITION_CASES],
)
def test_kstatus_of_condition_kinds(body: dict[str, Any], verdict: str) -> None:
    assert kstatus(body) == verdict


# --- RecoveryRequest ----------------------------------------------------------------------------

_IN_PROGRESS = {"Pending", "Preparing", "Committing", "RollingBack", "Stopping"}


def recovery_status(phase: RecoveryPhase, **fields: Any) -> dict[str, Any]:
    """A RecoveryRequest's status as RecoveryRequestStatus.conditions says the operator writes it:
    Reconciling while the phase moves on, Stalled (and Ready False) when Failed."""
    conditions = []
    if phase in _IN_PROGRESS:
        conditions.append(condition(RECONCILING, "True", phase, f"recovery is {phase}", 3))
        conditions.append(condition(READY, "False", phase, f"recovery is {phase}", 3))
    elif phase == RecoveryPhase.FAILED:
        message = "checkpoint 42 is gone from the journal"
        conditions.append(condition(STALLED, "True", "CheckpointExpired", message, 3))
        conditions.append(condition(READY, "False", "CheckpointExpired", message, 3))
    else:
        conditions.append(condition(READY, "True", phase, "recovered volumes usable", 3))
    return current(*conditions, phase=phase, **fields)


RECOVERY_HEALTH = {
    RecoveryPhase.PENDING: ("Progressing", "Pending: recovery is Pending"),
    RecoveryPhase.PREPARING: ("Progressing", "Preparing: recovery is Preparing"),
    RecoveryPhase.READY: ("Healthy", "Recovered volumes are usable"),
    RecoveryPhase.COMMITTING: ("Progressing", "Committing: recovery is Committing"),
    RecoveryPhase.ROLLING_BACK: ("Progressing", "RollingBack: recovery is RollingBack"),
    RecoveryPhase.STOPPING: ("Progressing", "Stopping: recovery is Stopping"),
    RecoveryPhase.COMPLETED: ("Healthy", "Completed"),
    RecoveryPhase.ROLLED_BACK: ("Healthy", "Rolled back"),
    RecoveryPhase.FAILED: ("Degraded", "CheckpointExpired: checkpoint 42 is gone from the journal"),
}
"""Argo CD's health of each phase: every phase of the API, or the test below fails."""

KSTATUS_OF_HEALTH = {"Progressing": "InProgress", "Healthy": "Current", "Degraded": "Failed"}
"""What kstatus must say where Argo CD says this, for a status that follows the contract."""


def test_every_recovery_phase_has_a_health() -> None:
    assert set(RECOVERY_HEALTH) == set(RecoveryPhase)


@pytest.mark.parametrize("phase", list(RecoveryPhase), ids=str)
def test_recovery_request_health_follows_the_phase(phase: RecoveryPhase) -> None:
    body = obj("RecoveryRequest", recovery_status(phase), vpg="demo", operation="Failover")
    assert argocd_health(body) == RECOVERY_HEALTH[phase]
    assert kstatus(body) == KSTATUS_OF_HEALTH[RECOVERY_HEALTH[phase][0]]


def test_recovery_request_without_status_is_progressing() -> None:
    status, message = argocd_health(obj("RecoveryRequest", None))
    assert (status, message) == ("Progressing", "Waiting for the operator to start the recovery")


def test_recovery_request_with_an_unobserved_action_is_progressing() -> None:
    """Setting spec.action (a new generation) on a Ready recovery is not Healthy until seen."""
    stale = recovery_status(RecoveryPhase.READY) | {"observedGeneration": 2}
    body = obj("RecoveryRequest", stale, generation=3, action="Commit")
    assert argocd_health(body)[0] == "Progressing"
    assert kstatus(body) == "InProgress"


def test_ready_recovery_names_the_commit_deadline() -> None:
    status = recovery_status(RecoveryPhase.READY, commitDeadline="2026-01-01T02:00:00Z")
    health, message = argocd_health(obj("RecoveryRequest", status))
    assert health == "Healthy"
    assert "the commit policy acts at 2026-01-01T02:00:00Z" in message


def test_unknown_recovery_phase_is_unknown() -> None:
    """A phase the script does not know (a newer API) is not guessed at."""
    body = obj("RecoveryRequest", recovery_status(RecoveryPhase.READY))
    body["status"]["phase"] = "Teleporting"
    assert argocd_health(body) == ("Unknown", "Unknown phase Teleporting")


# --- Checkpoint ---------------------------------------------------------------------------------

CHECKPOINT_HEALTH = {
    CheckpointPhase.PENDING: ("Progressing", "Pending"),
    CheckpointPhase.READY: ("Healthy", "In the journal, taken at 2026-01-01T00:00:00Z"),
    CheckpointPhase.EXPIRED: (
        "Healthy",
        "Expired: older than the journal's history, no longer recoverable",
    ),
    CheckpointPhase.FAILED: ("Degraded", "the VPG is paused"),
}


def test_every_checkpoint_phase_has_a_health() -> None:
    assert set(CHECKPOINT_HEALTH) == set(CheckpointPhase)


@pytest.mark.parametrize("phase", list(CheckpointPhase), ids=str)
def test_checkpoint_health_follows_the_phase(phase: CheckpointPhase) -> None:
    status: dict[str, Any] = {"observedGeneration": 3, "phase": phase}
    if phase == CheckpointPhase.READY:
        status |= {"id": "42", "time": WHEN, "consistent": True}
    if phase == CheckpointPhase.FAILED:
        status["message"] = "the VPG is paused"
    assert argocd_health(obj("Checkpoint", status)) == CHECKPOINT_HEALTH[phase]


def test_checkpoint_taken_during_bitmap_sync_says_so() -> None:
    status = {"observedGeneration": 3, "phase": "Ready", "time": WHEN, "consistent": False}
    health, message = argocd_health(obj("Checkpoint", status))
    assert health == "Healthy"
    assert "not write-order consistent" in message


def test_checkpoint_without_status_is_progressing() -> None:
    assert argocd_health(obj("Checkpoint", None))[0] == "Progressing"


# --- the argocd-cm patch ------------------------------------------------------------------------


def test_argocd_cm_patch_carries_each_script_verbatim() -> None:
    patch = yaml.safe_load((GITOPS / "argocd-health.yaml").read_text())
    assert (patch["kind"], patch["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    expected = {
        f"resource.customizations.health.{GROUP}_{kind}": script.read_text()
        for kind, script in SCRIPTS.items()
    }
    assert patch["data"].keys() == expected.keys()
    for key, text in expected.items():
        assert patch["data"][key] == text, (
            f"{key} differs from its Lua file: copy the file into argocd-health.yaml"
        )


def test_health_checks_name_real_kinds() -> None:
    assert set(SCRIPTS) <= {kind.kind for kind in KINDS}
