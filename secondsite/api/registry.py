"""The kinds of the SecondSite API and how each is presented: names, scope, printer columns.

Together with the spec and status models this is everything a kind's CRD says.
"""

import dataclasses
from typing import Literal

from secondsite.api.appliance import ReplicationApplianceSpec, ReplicationApplianceStatus
from secondsite.api.checkpoint import CheckpointSpec, CheckpointStatus
from secondsite.api.common import GROUP, ApiModel
from secondsite.api.journal import JournalSpec, JournalStatus
from secondsite.api.recovery import RecoveryRequestSpec, RecoveryRequestStatus
from secondsite.api.site import SiteSpec, SiteStatus
from secondsite.api.vpg import VirtualProtectionGroupSpec, VirtualProtectionGroupStatus


@dataclasses.dataclass(frozen=True)
class PrinterColumn:
    """A column of `kubectl get`."""

    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    description: str


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of the API."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: Literal["Cluster", "Namespaced"]
    description: str
    spec: type[ApiModel]
    status: type[ApiModel]
    printer_columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = ("secondsite",)

    @property
    def crd_name(self) -> str:
        """The name of the kind's CustomResourceDefinition."""
        return f"{self.plural}.{GROUP}"


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date", "Time since creation.")
_READY = PrinterColumn(
    "Ready", '.status.conditions[?(@.type=="Ready")].status', "string", "The Ready condition."
)
_VPG = PrinterColumn("VPG", ".spec.vpg", "string", "The VirtualProtectionGroup.")

SITE = Kind(
    kind="Site",
    plural="sites",
    singular="site",
    short_names=(),
    scope="Cluster",
    description="A site: the nodes where volumes live and where appliances keep journals and"
    " replicas.",
    spec=SiteSpec,
    status=SiteStatus,
    printer_columns=(
        PrinterColumn("Appliances", ".status.appliances", "integer", "Appliances of the site."),
        PrinterColumn("Ready", ".status.readyAppliances", "integer", "Ready appliances."),
        _AGE,
    ),
)

REPLICATION_APPLIANCE = Kind(
    kind="ReplicationAppliance",
    plural="replicationappliances",
    singular="replicationappliance",
    short_names=("vra",),
    scope="Cluster",
    description="The data-plane process on one node of a site, created by the operator.",
    spec=ReplicationApplianceSpec,
    status=ReplicationApplianceStatus,
    printer_columns=(
        PrinterColumn("Site", ".spec.site", "string", "The appliance's site."),
        PrinterColumn("Node", ".spec.nodeName", "string", "The appliance's node."),
        _READY,
        PrinterColumn("Endpoint", ".status.endpoint", "string", "The control API's address."),
    ),
)

VIRTUAL_PROTECTION_GROUP = Kind(
    kind="VirtualProtectionGroup",
    plural="virtualprotectiongroups",
    singular="virtualprotectiongroup",
    short_names=("vpg",),
    scope="Namespaced",
    description="Volumes, and the workloads using them, protected and recovered together.",
    spec=VirtualProtectionGroupSpec,
    status=VirtualProtectionGroupStatus,
    printer_columns=(
        PrinterColumn("State", ".status.state", "string", "The VPG's state."),
        PrinterColumn("RPO", ".status.rpoSeconds", "integer", "Current RPO, seconds."),
        PrinterColumn("History", ".status.history", "string", "History the journal covers."),
        PrinterColumn(
            "Journal", ".status.journal.usedPercent", "integer", "Journal use, % of hardLimit."
        ),
        _AGE,
    ),
)

JOURNAL = Kind(
    kind="Journal",
    plural="journals",
    singular="journal",
    short_names=(),
    scope="Namespaced",
    description="The recovery-side journal of one VPG, created and owned by the VPG.",
    spec=JournalSpec,
    status=JournalStatus,
    printer_columns=(
        _VPG,
        PrinterColumn("Used", ".status.used", "string", "Space in use."),
        PrinterColumn("History", ".status.history", "string", "History the journal covers."),
        PrinterColumn("Checkpoints", ".status.checkpoints", "integer", "Checkpoints kept."),
    ),
)

CHECKPOINT = Kind(
    kind="Checkpoint",
    plural="checkpoints",
    singular="checkpoint",
    short_names=("ckpt",),
    scope="Namespaced",
    description="A tagged checkpoint of a VPG.",
    spec=CheckpointSpec,
    status=CheckpointStatus,
    printer_columns=(
        _VPG,
        PrinterColumn("Tag", ".spec.tag", "string", "The checkpoint's tag."),
        PrinterColumn("Phase", ".status.phase", "string", "The checkpoint's phase."),
        PrinterColumn("Time", ".status.time", "string", "When the checkpoint was taken."),
        _AGE,
    ),
)

RECOVERY_REQUEST = Kind(
    kind="RecoveryRequest",
    plural="recoveryrequests",
    singular="recoveryrequest",
    short_names=("rr",),
    scope="Namespaced",
    description="One recovery operation of a VPG: FailoverTest, Failover, Move, Restore or Clone.",
    spec=RecoveryRequestSpec,
    status=RecoveryRequestStatus,
    printer_columns=(
        _VPG,
        PrinterColumn("Operation", ".spec.operation", "string", "The operation."),
        PrinterColumn("Phase", ".status.phase", "string", "The recovery's phase."),
        PrinterColumn("Checkpoint", ".status.checkpoint.time", "string", "Recovered from."),
        PrinterColumn("RTO", ".status.rtoSeconds", "integer", "RTO achieved, seconds."),
        _AGE,
    ),
)

KINDS: tuple[Kind, ...] = (
    SITE,
    REPLICATION_APPLIANCE,
    VIRTUAL_PROTECTION_GROUP,
    JOURNAL,
    CHECKPOINT,
    RECOVERY_REQUEST,
)
"""Every kind of the API."""


def kind_named(name: str) -> Kind:
    """The kind called `name` (e.g. `VirtualProtectionGroup`)."""
    for kind in KINDS:
        if kind.kind == name:
            return kind
    raise KeyError(f"no SecondSite kind {name!r}")
