"""The spec and status models: defaults, bounds, names, and the Python side of the CEL rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from secondsite.api import (
    KINDS,
    CheckpointSelector,
    CommitPolicy,
    CommitPolicyType,
    JournalSpec,
    Priority,
    RecoveryAction,
    RecoveryOperation,
    RecoveryRequestSpec,
    VirtualProtectionGroupSpec,
    VirtualProtectionGroupStatus,
    VpgVolumes,
    kind_named,
)

VPG = {"protectedSite": "protected", "recoverySite": "recovery", "volumes": {"names": ["db-data"]}}


def vpg(**changes: Any) -> VirtualProtectionGroupSpec:
    return VirtualProtectionGroupSpec.model_validate({**VPG, **changes})


def journal(**changes: Any) -> JournalSpec:
    return JournalSpec.model_validate({"vpg": "demo", **changes})


def rr(**changes: Any) -> RecoveryRequestSpec:
    return RecoveryRequestSpec.model_validate({"vpg": "demo", "operation": "Failover", **changes})


def test_vpg_defaults() -> None:
    spec = vpg()
    assert spec.checkpoint_interval_seconds == 5
    assert spec.rpo_alert_seconds == 300
    assert spec.priority is Priority.MEDIUM
    assert spec.paused is False
    assert spec.journal.history == "24h"
    assert spec.journal.hard_limit == "150Gi"
    assert spec.journal.warning_percent == 75
    assert spec.workloads == []


def test_recovery_request_defaults() -> None:
    spec = rr()
    assert spec.checkpoint == CheckpointSelector(latest=True)
    assert spec.source_shutdown is False
    assert spec.reverse_protection is False
    assert spec.action is None
    policy = CommitPolicy()
    assert (policy.policy, policy.timeout_seconds) == (CommitPolicyType.COMMIT, 3600)


def test_defaults_are_not_shared_between_objects() -> None:
    first, second = vpg(), vpg()
    first.journal.history = "1h"
    assert second.journal.history == "24h"


def test_json_names_are_camel_case_and_python_names_snake_case() -> None:
    spec = VirtualProtectionGroupSpec(
        protected_site="protected", recovery_site="recovery", volumes=VpgVolumes(names=["a"])
    )
    dumped = spec.model_dump(mode="json", exclude_none=True)
    assert {"protectedSite", "rpoAlertSeconds", "checkpointIntervalSeconds"} <= dumped.keys()
    assert dumped["journal"] == {"history": "24h", "hardLimit": "150Gi", "warningPercent": 75}
    assert VirtualProtectionGroupSpec.model_validate(dumped) == spec


@pytest.mark.parametrize(
    ("field", "lowest", "highest"),
    [
        ("checkpointIntervalSeconds", 1, 3600),
        ("rpoAlertSeconds", 10, 86400),
    ],
)
def test_vpg_bounds(field: str, lowest: int, highest: int) -> None:
    # rpoAlertSeconds must also exceed checkpointIntervalSeconds: keep the other one out of the way.
    other = {"checkpointIntervalSeconds": 1} if field == "rpoAlertSeconds" else {}
    other |= {"rpoAlertSeconds": 86400} if field == "checkpointIntervalSeconds" else {}
    for value in (lowest, highest):
        assert getattr(vpg(**other, **{field: value}), _snake(field)) == value
    for value in (lowest - 1, highest + 1):
        with pytest.raises(ValidationError, match=field):
            vpg(**other, **{field: value})


def _snake(name: str) -> str:
    return "".join(f"_{char.lower()}" if char.isupper() else char for char in name)


@pytest.mark.parametrize("history", ["1h", "60m", "3600s", "24h", "30d", "720h"])
def test_history_accepted(history: str) -> None:
    assert journal(history=history).history == history


@pytest.mark.parametrize("history", ["59m", "3599s", "31d", "721h", "0h", "45d"])
def test_history_out_of_range(history: str) -> None:
    with pytest.raises(ValidationError, match="history must be between 1h and 30d"):
        journal(history=history)


@pytest.mark.parametrize("history", ["", "24", "h", "1d12h", "24 h", "-1h", "1.5h", "1w"])
def test_history_malformed(history: str) -> None:
    with pytest.raises(ValidationError, match="history"):
        journal(history=history)


@pytest.mark.parametrize("hard_limit", ["150Gi", "500M", "1.5Ti", "1e12", 10**9])
def test_hard_limit_accepted(hard_limit: int | str) -> None:
    assert journal(hardLimit=hard_limit).hard_limit == hard_limit


@pytest.mark.parametrize("hard_limit", ["lots", "150GB", "-1Gi", "0", 0, "0Gi", True, 1.5])
def test_hard_limit_rejected(hard_limit: Any) -> None:
    with pytest.raises(ValidationError, match="hardLimit"):
        journal(hardLimit=hard_limit)


@pytest.mark.parametrize(("value", "valid"), [(0, False), (1, True), (100, True), (101, False)])
def test_warning_percent_bounds(value: int, valid: bool) -> None:
    if valid:
        assert journal(warningPercent=value).warning_percent == value
    else:
        with pytest.raises(ValidationError, match="warningPercent"):
            journal(warningPercent=value)


@pytest.mark.parametrize(
    ("value", "valid"), [(299, False), (300, True), (86400, True), (86401, False)]
)
def test_commit_timeout_bounds(value: int, valid: bool) -> None:
    if valid:
        assert CommitPolicy.model_validate({"timeoutSeconds": value}).timeout_seconds == value
    else:
        with pytest.raises(ValidationError, match="timeoutSeconds"):
            CommitPolicy.model_validate({"timeoutSeconds": value})


def test_priority_is_an_enum() -> None:
    assert vpg(priority="High").priority is Priority.HIGH
    with pytest.raises(ValidationError, match="priority"):
        vpg(priority="Urgent")


def test_protected_and_recovery_site_differ() -> None:
    with pytest.raises(ValidationError, match="recoverySite must differ from protectedSite"):
        vpg(recoverySite="protected")


def test_volumes_are_names_or_a_selector() -> None:
    assert vpg(volumes={"selector": {"matchLabels": {"app": "db"}}}).volumes.names is None
    for volumes in ({}, {"names": ["a"], "selector": {}}):
        with pytest.raises(ValidationError, match="exactly one of names and selector"):
            vpg(volumes=volumes)


TIME = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "selector",
    [
        {"latest": True},
        {"time": TIME},
        {"tag": "before-upgrade"},
        {"id": "42"},
        {"latest": False, "tag": "t"},
    ],
)
def test_one_checkpoint_selector(selector: dict[str, Any]) -> None:
    CheckpointSelector.model_validate(selector)


@pytest.mark.parametrize(
    "selector", [{}, {"latest": False}, {"latest": True, "id": "42"}, {"time": TIME, "tag": "t"}]
)
def test_not_one_checkpoint_selector(selector: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of latest: true, time, tag and id"):
        CheckpointSelector.model_validate(selector)


def test_checkpoint_time_must_have_a_zone() -> None:
    with pytest.raises(ValidationError, match="time"):
        CheckpointSelector.model_validate({"time": "2026-01-01T00:00:00"})


ACTIONS = {
    RecoveryOperation.FAILOVER_TEST: {RecoveryAction.STOP},
    RecoveryOperation.FAILOVER: {RecoveryAction.COMMIT, RecoveryAction.ROLLBACK},
    RecoveryOperation.MOVE: {RecoveryAction.COMMIT, RecoveryAction.ROLLBACK},
    RecoveryOperation.RESTORE: {RecoveryAction.COMMIT, RecoveryAction.ROLLBACK},
    RecoveryOperation.CLONE: set(),
}


@pytest.mark.parametrize("operation", list(RecoveryOperation))
@pytest.mark.parametrize("action", list(RecoveryAction))
def test_actions_allowed_per_operation(
    operation: RecoveryOperation, action: RecoveryAction
) -> None:
    if action in ACTIONS[operation]:
        assert rr(operation=operation, action=action).action is action
    else:
        with pytest.raises(ValidationError, match="action must be Stop for a FailoverTest"):
            rr(operation=operation, action=action)


@pytest.mark.parametrize("operation", list(RecoveryOperation))
def test_options_that_apply_to_some_operations_only(operation: RecoveryOperation) -> None:
    options = {
        "commitPolicy": ({"policy": "None"}, ("Failover", "Move", "Restore")),
        "sourceShutdown": (True, ("Failover", "Move")),
        "reverseProtection": (True, ("Failover", "Move")),
        "testResult": ({"result": "Passed"}, ("FailoverTest",)),
    }
    for option, (value, operations) in options.items():
        if operation in operations:
            rr(operation=operation, **{option: value})
        else:
            with pytest.raises(ValidationError, match=f"{option} applies to"):
                rr(operation=operation, **{option: value})


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="checkpointInterval"):
        vpg(checkpointInterval=5)  # a typo of checkpointIntervalSeconds


def test_list_map_entries_are_unique() -> None:
    workload = {"kind": "StatefulSet", "name": "db"}
    vpg(workloads=[workload, {**workload, "kind": "Deployment"}])
    with pytest.raises(ValidationError, match="workloads has a duplicate entry"):
        vpg(workloads=[workload, {**workload, "bootOrder": 1}])
    condition = {
        "type": "Ready",
        "status": "True",
        "reason": "Synced",
        "message": "",
        "lastTransitionTime": TIME,
    }
    with pytest.raises(ValidationError, match="conditions has a duplicate entry"):
        VirtualProtectionGroupStatus.model_validate({"conditions": [condition, condition]})


def test_list_set_entries_are_unique() -> None:
    with pytest.raises(ValidationError, match="names has a duplicate entry"):
        vpg(volumes={"names": ["a", "b", "a"]})


def test_condition_follows_the_api_conventions() -> None:
    condition = {"type": "Ready", "reason": "Synced", "message": "", "lastTransitionTime": TIME}
    status = VirtualProtectionGroupStatus.model_validate(
        {"conditions": [{**condition, "status": "Unknown", "observedGeneration": 3}]}
    )
    assert status.conditions[0].observed_generation == 3
    for bad in ({"status": "Yes"}, {"status": "True", "reason": "not a reason"}):
        with pytest.raises(ValidationError):
            VirtualProtectionGroupStatus.model_validate({"conditions": [{**condition, **bad}]})


@pytest.mark.parametrize("kind", KINDS, ids=[kind.kind for kind in KINDS])
def test_status_is_optional_throughout(kind: Any) -> None:
    """The operator fills in status piece by piece: an empty status is valid."""
    assert kind.status.model_validate({}).model_dump(exclude_none=True, exclude_defaults=True) == {}


@pytest.mark.parametrize("kind", KINDS, ids=[kind.kind for kind in KINDS])
def test_transition_rules_have_no_python_check_and_others_do(kind: Any) -> None:
    models = [kind.spec, *_nested_models(kind.spec)]
    rules = [rule for model in models for rule in model.cel_rules]
    for rule in rules:
        assert (rule.check is None) == rule.is_transition, rule.cel


def _nested_models(model: Any) -> list[Any]:
    found = []
    for field in model.model_fields.values():
        for candidate in _types_in(field.annotation):
            if isinstance(candidate, type) and hasattr(candidate, "cel_rules"):
                found += [candidate, *_nested_models(candidate)]
    return found


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", ())
    return [annotation, *(inner for arg in args for inner in _types_in(arg))]


def test_kind_named() -> None:
    assert kind_named("VirtualProtectionGroup").short_names == ("vpg",)
    with pytest.raises(KeyError):
        kind_named("Vpg")
