"""VirtualProtectionGroup: the unit of protection and of consistency.

A VPG protects a set of volumes, and the workloads that use them, from a protected site to a
recovery site with write-order fidelity across all of them: every checkpoint is a consistent cut
of the whole group, so the group recovers together.
"""

import enum
from typing import Annotated

from pydantic import AwareDatetime, Field

from secondsite.api.checkpoint import CheckpointRef
from secondsite.api.common import (
    ApiModel,
    Conditions,
    LabelSelector,
    LabelValueName,
    ObjectName,
    Quantity,
    Rule,
    immutable,
)
from secondsite.api.journal import JournalPolicy
from secondsite.api.recovery import FailoverTestVerdict


class VpgVolumes(ApiModel):
    """The PersistentVolumeClaims of the VPG's namespace it protects: by name or by selector."""

    cel_rules = (
        Rule(
            cel="has(self.names) != has(self.selector)",
            message="volumes needs exactly one of names and selector",
            check=lambda volumes: (volumes.names is None) != (volumes.selector is None),
        ),
    )

    names: Annotated[
        list[ObjectName] | None,
        Field(min_length=1, max_length=128, json_schema_extra={"x-kubernetes-list-type": "set"}),
    ] = None
    """Names of the PersistentVolumeClaims."""
    selector: LabelSelector | None = None
    """A label selector of the PersistentVolumeClaims."""


class WorkloadKind(enum.StrEnum):
    """Kinds of workload a VPG stops and starts with its volumes."""

    DEPLOYMENT = "Deployment"
    STATEFUL_SET = "StatefulSet"
    VIRTUAL_MACHINE = "VirtualMachine"


class Workload(ApiModel):
    """A workload that uses the VPG's volumes."""

    kind: WorkloadKind
    """Deployment, StatefulSet or (KubeVirt) VirtualMachine."""
    name: ObjectName
    """The workload's name, in the VPG's namespace."""
    boot_order: Annotated[int, Field(ge=0, le=100)] = 0
    """Start order on recovery: lower first; workloads with equal values start together."""


class RecoverySettings(ApiModel):
    """Where the VPG's volumes and workloads are recovered to."""

    cel_rules = (
        Rule(
            cel="!has(self.namespace) || !has(self.testNamespace)"
            " || self.namespace != self.testNamespace",
            message="testNamespace must differ from namespace",
            check=lambda recovery: (
                recovery.namespace is None or recovery.namespace != recovery.test_namespace
            ),
            field_path=".testNamespace",
        ),
    )

    namespace: LabelValueName | None = None
    """Namespace that Failover, Move and Restore recover into. Unset: the VPG's namespace."""
    test_namespace: LabelValueName | None = None
    """Namespace that FailoverTest recovers into. Unset: the VPG's namespace with `-test`
    appended."""
    storage_class_name: ObjectName | None = None
    """Storage class of the recovered volumes. Unset: the recovery site's default."""


class Priority(enum.StrEnum):
    """Which VPGs get replication bandwidth first when there is not enough."""

    HIGH = "High"
    MEDIUM = "Medium"
    LOW = "Low"


class VirtualProtectionGroupSpec(ApiModel):
    """What is protected, where to, and how."""

    cel_rules = (
        Rule(
            cel="self.protectedSite != self.recoverySite",
            message="recoverySite must differ from protectedSite",
            check=lambda spec: spec.protected_site != spec.recovery_site,
            field_path=".recoverySite",
        ),
        Rule(
            cel="self.rpoAlertSeconds > self.checkpointIntervalSeconds",
            message="rpoAlertSeconds must be greater than checkpointIntervalSeconds",
            check=lambda spec: spec.rpo_alert_seconds > spec.checkpoint_interval_seconds,
            field_path=".rpoAlertSeconds",
        ),
        # Changing a site means a new full sync: that is a new VPG.
        immutable("protected_site"),
        immutable("recovery_site"),
    )

    protected_site: LabelValueName
    """The Site whose volumes are protected. Immutable."""
    recovery_site: LabelValueName
    """The Site that keeps the journal and replicas, and where recovery happens. Immutable."""
    volumes: VpgVolumes
    """The volumes to protect."""
    workloads: Annotated[
        list[Workload],
        Field(
            max_length=64,
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["kind", "name"],
            },
        ),
    ] = Field(default_factory=list)
    """Workloads using the volumes, stopped and started with them on recovery."""
    priority: Priority = Priority.MEDIUM
    """High, Medium or Low: who gets bandwidth first when there is not enough."""
    rpo_alert_seconds: Annotated[int, Field(ge=10, le=86400)] = 300
    """RPO above which the VPG is not meeting its SLA (condition RPOMet False)."""
    checkpoint_interval_seconds: Annotated[int, Field(ge=1, le=3600)] = 5
    """Seconds between automatic checkpoints."""
    journal: JournalPolicy = JournalPolicy()
    """The template of the VPG's Journal."""
    recovery: RecoverySettings = RecoverySettings()
    """Where recovery puts volumes and workloads."""
    paused: bool = False
    """Stop replicating; writes are tracked and synced on resume (bitmap sync)."""


class VpgState(enum.StrEnum):
    """A VPG's state at a glance."""

    INITIALIZING = "Initializing"
    SYNCING = "Syncing"
    MEETING_SLA = "MeetingSLA"
    RPO_NOT_MET = "RPONotMet"
    HISTORY_NOT_MET = "HistoryNotMet"
    NOT_MEETING_SLA = "NotMeetingSLA"
    PAUSED = "Paused"
    TESTING = "Testing"
    FAILING_OVER = "FailingOver"
    MOVING = "Moving"
    FAILED_OVER = "FailedOver"
    ERROR = "Error"


class VolumeState(enum.StrEnum):
    """Replication state of one volume."""

    PENDING = "Pending"
    INITIAL_SYNC = "InitialSync"
    BITMAP_SYNC = "BitmapSync"
    DELTA_SYNC = "DeltaSync"
    PROTECTING = "Protecting"
    PAUSED = "Paused"
    ERROR = "Error"


class VolumeStatus(ApiModel):
    """Replication of one volume of the VPG."""

    pvc: str
    """The protected PersistentVolumeClaim."""
    state: VolumeState | None = None
    """Pending, InitialSync, BitmapSync, DeltaSync, Protecting, Paused or Error."""
    size: Quantity | None = None
    """The volume's size."""
    sync_percent: int | None = None
    """Progress of the current initial, bitmap or delta sync."""
    protected_node: str | None = None
    """The node whose appliance captures the volume's writes."""
    recovery_node: str | None = None
    """The node whose appliance keeps the replica."""
    message: str | None = None
    """What is wrong, in Error."""


class JournalUsage(ApiModel):
    """The VPG's journal at a glance."""

    name: str | None = None
    """The Journal object."""
    used: Quantity | None = None
    """Space in use."""
    used_percent: int | None = None
    """Space in use, percent of the journal's hardLimit."""


class LastTest(ApiModel):
    """The VPG's most recent failover test."""

    request: str
    """The FailoverTest RecoveryRequest."""
    result: FailoverTestVerdict | None = None
    """The user's verdict, if given."""
    time: AwareDatetime | None = None
    """When the test finished."""


class VirtualProtectionGroupStatus(ApiModel):
    """How well the VPG is protected."""

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Ready, Reconciling and Stalled (kstatus conventions), RPOMet, HistoryMet and Syncing."""
    state: VpgState | None = None
    """The state at a glance: Initializing, Syncing, MeetingSLA, RPONotMet, HistoryNotMet,
    NotMeetingSLA, Paused, Testing, FailingOver, Moving, FailedOver or Error."""
    rpo_seconds: int | None = None
    """Now minus the time of the newest checkpoint durable on the recovery site."""
    newest_checkpoint: CheckpointRef | None = None
    """The newest checkpoint durable on the recovery site."""
    oldest_checkpoint: CheckpointRef | None = None
    """The oldest checkpoint recovery can go back to."""
    history: str | None = None
    """The history the journal covers now, e.g. 23h41m."""
    journal: JournalUsage | None = None
    """The journal's use."""
    volumes: Annotated[
        list[VolumeStatus],
        Field(
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["pvc"],
            }
        ),
    ] = Field(default_factory=list)
    """Replication of each volume."""
    last_test: LastTest | None = None
    """The most recent failover test."""
