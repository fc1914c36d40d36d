"""RecoveryRequest: one recovery operation of a VPG.

An operation recovers a VPG's volumes (and starts its workloads) from a checkpoint:

- FailoverTest: recover into the test namespace while replication goes on; `action: Stop` ends the
  test and discards what it wrote.
- Failover: recover on the recovery site, e.g. when the protected site is lost.
- Move: a planned failover; the source is shut down first, so no data is lost.
- Restore: bring the VPG's volumes back to a checkpoint in place, e.g. from before an attack.
- Clone: an independent copy of the volumes at a checkpoint; replication goes on.

Failover, Move and Restore wait for `action: Commit` or `Rollback`, or for their commit policy to
decide. Failback is a Failover or Move of the reverse VPG that `reverseProtection` creates.
"""

import enum
from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints

from secondsite.api.checkpoint import CheckpointId, CheckpointRef, CheckpointTag
from secondsite.api.common import ApiModel, Conditions, ObjectName, Rule, immutable


class RecoveryOperation(enum.StrEnum):
    """The kind of recovery."""

    FAILOVER_TEST = "FailoverTest"
    FAILOVER = "Failover"
    MOVE = "Move"
    RESTORE = "Restore"
    CLONE = "Clone"


_COMMITTED = (RecoveryOperation.FAILOVER, RecoveryOperation.MOVE, RecoveryOperation.RESTORE)
"""Operations that end with Commit or Rollback."""
_LEAVING_SOURCE = (RecoveryOperation.FAILOVER, RecoveryOperation.MOVE)
"""Operations that make the recovery site the live one."""


def _cel_list(operations: tuple[RecoveryOperation, ...]) -> str:
    return "[" + ", ".join(f"'{operation}'" for operation in operations) + "]"


class CheckpointSelector(ApiModel):
    """Which checkpoint to recover from: exactly one of latest, time, tag and id."""

    cel_rules = (
        Rule(
            cel="(has(self.latest) && self.latest ? 1 : 0) + (has(self.time) ? 1 : 0)"
            " + (has(self.tag) ? 1 : 0) + (has(self.id) ? 1 : 0) == 1",
            message="checkpoint needs exactly one of latest: true, time, tag and id",
            check=lambda selector: (
                [
                    bool(selector.latest),
                    selector.time is not None,
                    selector.tag is not None,
                    selector.id is not None,
                ].count(True)
                == 1
            ),
        ),
    )

    latest: bool | None = None
    """The newest checkpoint durable on the recovery site."""
    time: AwareDatetime | None = None
    """The newest checkpoint taken at or before this time."""
    tag: CheckpointTag | None = None
    """The newest checkpoint with this tag."""
    id: CheckpointId | None = None
    """The checkpoint with this id."""


class CommitPolicyType(enum.StrEnum):
    """What happens when nobody commits or rolls back in time."""

    COMMIT = "Commit"
    ROLLBACK = "Rollback"
    NONE = "None"


class CommitPolicy(ApiModel):
    """What to do if no action is given within a timeout."""

    policy: CommitPolicyType = CommitPolicyType.COMMIT
    """Commit or Rollback after timeoutSeconds, or None to wait for an action."""
    timeout_seconds: Annotated[int, Field(ge=300, le=86400)] = 3600
    """Seconds from the recovery being ready until the policy acts."""


class RecoveryAction(enum.StrEnum):
    """The user's decision on a recovery that is ready."""

    COMMIT = "Commit"
    ROLLBACK = "Rollback"
    STOP = "Stop"


class FailoverTestVerdict(enum.StrEnum):
    """The verdict on a failover test."""

    PASSED = "Passed"
    FAILED = "Failed"


class FailoverTestResult(ApiModel):
    """The user's verdict on a failover test, kept in the VPG's status as its last test."""

    result: FailoverTestVerdict
    """Passed or Failed."""
    notes: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """What was tested and what was found."""


class RecoveryRequestSpec(ApiModel):
    """What to recover, from which checkpoint, and how to finish."""

    cel_rules = (
        immutable("vpg"),
        immutable("operation"),
        immutable("checkpoint"),
        immutable("source_shutdown"),
        immutable("reverse_protection"),
        Rule(
            cel="!has(self.action) || (self.operation == 'FailoverTest' ? self.action == 'Stop'"
            " : (self.operation != 'Clone' && self.action != 'Stop'))",
            message="action must be Stop for a FailoverTest, Commit or Rollback for a Failover,"
            " Move or Restore, and is not allowed for a Clone",
            check=lambda spec: (
                spec.action is None
                or (
                    spec.action == RecoveryAction.STOP
                    if spec.operation == RecoveryOperation.FAILOVER_TEST
                    else spec.operation in _COMMITTED and spec.action != RecoveryAction.STOP
                )
            ),
            field_path=".action",
        ),
        Rule(
            cel="!has(oldSelf.action) || (has(self.action) && self.action == oldSelf.action)",
            message="action cannot be changed or removed once given",
            field_path=".action",
        ),
        Rule(
            cel=f"!has(self.commitPolicy) || self.operation in {_cel_list(_COMMITTED)}",
            message="commitPolicy applies to Failover, Move and Restore only",
            check=lambda spec: spec.commit_policy is None or spec.operation in _COMMITTED,
            field_path=".commitPolicy",
        ),
        Rule(
            cel="!has(self.sourceShutdown) || !self.sourceShutdown"
            f" || self.operation in {_cel_list(_LEAVING_SOURCE)}",
            message="sourceShutdown applies to Failover and Move only",
            check=lambda spec: not spec.source_shutdown or spec.operation in _LEAVING_SOURCE,
            field_path=".sourceShutdown",
        ),
        Rule(
            cel="!has(self.reverseProtection) || !self.reverseProtection"
            f" || self.operation in {_cel_list(_LEAVING_SOURCE)}",
            message="reverseProtection applies to Failover and Move only",
            check=lambda spec: not spec.reverse_protection or spec.operation in _LEAVING_SOURCE,
            field_path=".reverseProtection",
        ),
        Rule(
            cel="!has(self.testResult) || self.operation == 'FailoverTest'",
            message="testResult applies to a FailoverTest only",
            check=lambda spec: (
                spec.test_result is None or spec.operation == RecoveryOperation.FAILOVER_TEST
            ),
            field_path=".testResult",
        ),
    )

    vpg: ObjectName
    """The VirtualProtectionGroup to recover, in this namespace. Immutable."""
    operation: RecoveryOperation
    """FailoverTest, Failover, Move, Restore or Clone. Immutable."""
    checkpoint: CheckpointSelector = CheckpointSelector(latest=True)
    """The checkpoint to recover from; the latest by default. Immutable."""
    commit_policy: CommitPolicy | None = None
    """Failover, Move and Restore: what happens without an action. Unset: Commit after 3600s."""
    source_shutdown: bool = False
    """Failover and Move: shut the protected workloads down before recovering. Immutable."""
    reverse_protection: bool = False
    """Failover and Move: on commit, protect the recovered volumes back to the protected site
    with a reverse VPG. Immutable."""
    action: RecoveryAction | None = None
    """Ends a ready recovery: Stop for a FailoverTest; Commit or Rollback for Failover, Move and
    Restore. Cannot be changed once given."""
    test_result: FailoverTestResult | None = None
    """FailoverTest: the user's verdict, recorded as the VPG's last test."""


class RecoveryPhase(enum.StrEnum):
    """Where a recovery is."""

    PENDING = "Pending"
    PREPARING = "Preparing"
    READY = "Ready"
    COMMITTING = "Committing"
    ROLLING_BACK = "RollingBack"
    STOPPING = "Stopping"
    COMPLETED = "Completed"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


class RecoveredVolume(ApiModel):
    """A volume as recovered."""

    source: str
    """The protected PVC."""
    namespace: str
    """The namespace of the recovered PVC."""
    pvc: str
    """The recovered PVC."""


class RecoveryRequestStatus(ApiModel):
    """How the recovery went."""

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Ready: the recovered volumes are usable and the workloads started; Reconciling while the
    phase is Pending, Preparing, Committing, RollingBack or Stopping; Stalled when Failed."""
    phase: RecoveryPhase | None = None
    """Pending, Preparing, Ready (waiting for an action), Committing, RollingBack, Stopping,
    Completed, RolledBack or Failed."""
    checkpoint: CheckpointRef | None = None
    """The checkpoint recovered from."""
    recovered_volumes: list[RecoveredVolume] = Field(default_factory=list)
    """The volumes as recovered."""
    start_time: AwareDatetime | None = None
    """When the operator started the recovery."""
    ready_time: AwareDatetime | None = None
    """When the recovered volumes became usable and the workloads started."""
    finish_time: AwareDatetime | None = None
    """When the recovery was committed, rolled back, stopped, completed or failed."""
    commit_deadline: AwareDatetime | None = None
    """When the commit policy will act if no action is given."""
    rto_seconds: int | None = None
    """Seconds from the request's creation to readyTime."""
    data_loss_window_seconds: int | None = None
    """Seconds of writes not in the recovered image: from the checkpoint's time to the newest
    write the recovery site had received."""
