"""SecondSite for Pulumi programs: typed resources for every kind, and `ProtectedApplication`.

Types come from the API models, not from a second schema: a resource's spec *is* the kind's
pydantic spec model from `secondsite.api` (re-exported here), so a type checker sees every field,
its type and its enum, and the model checks bounds and rules (the same ones the API server runs
as CEL) when the program runs. Classes generated at import time from the models would have given
no static types at all; hand-written input classes would have been a second schema.

    import secondsite.pulumi_provider as ss

    vpg = ss.VirtualProtectionGroup(
        "shop",
        spec=ss.VirtualProtectionGroupSpec(
            protected_site="east",
            recovery_site="west",
            volumes=ss.VpgVolumes(names=["shop-db"]),
            journal=ss.JournalPolicy(history="48h"),
        ),
        metadata={"namespace": "shop"},
    )

A spec may also be a mapping with the API's camelCase (or the models' snake_case) names. Either
way it is validated before anything is sent: a bad one raises `InvalidSpecError` (a
`pulumi.RunError` and a `ValueError`) naming the field, e.g. `spec.recoverySite: recoverySite must
differ from protectedSite`. The manifest carries the fields the program set; the API server fills
in the CRD's defaults, as it would for `kubectl apply`.

Each class is a `pulumi_kubernetes.apiextensions.CustomResource` (type token
`kubernetes:secondsite.io/v1alpha1:<Kind>`) and is handled by the kubernetes provider, whose
configuration (kubeconfig, namespace, server-side apply) applies unchanged. The CRDs (`crds/`)
must be installed in the cluster first.

Exceptions: `InvalidSpecError` (bad spec or metadata, at construction) and `NotReadyError` (the
VPG of a `ProtectedApplication` with `wait_for_ready` did not become Ready in time); both derive
from `pulumi.RunError`.
"""

from secondsite.api import (
    CheckpointSpec,
    JournalPolicy,
    JournalSpec,
    LabelSelector,
    LabelSelectorRequirement,
    Priority,
    RecoveryRequestSpec,
    RecoverySettings,
    ReplicationApplianceSpec,
    SiteSpec,
    SiteStorage,
    VirtualProtectionGroupSpec,
    VpgVolumes,
    Workload,
    WorkloadKind,
)
from secondsite.pulumi_provider._component import ProtectedApplication, checkpoint_object_name
from secondsite.pulumi_provider._readiness import NotReadyError, ReadyWait, readiness
from secondsite.pulumi_provider._resources import (
    RESOURCE_CLASSES,
    Checkpoint,
    Journal,
    RecoveryRequest,
    ReplicationAppliance,
    SecondSiteResource,
    Site,
    VirtualProtectionGroup,
)
from secondsite.pulumi_provider._validation import InvalidSpecError

__all__ = [
    "RESOURCE_CLASSES",
    "Checkpoint",
    "CheckpointSpec",
    "InvalidSpecError",
    "Journal",
    "JournalPolicy",
    "JournalSpec",
    "LabelSelector",
    "LabelSelectorRequirement",
    "NotReadyError",
    "Priority",
    "ProtectedApplication",
    "ReadyWait",
    "RecoveryRequest",
    "RecoveryRequestSpec",
    "RecoverySettings",
    "ReplicationAppliance",
    "ReplicationApplianceSpec",
    "SecondSiteResource",
    "Site",
    "SiteSpec",
    "SiteStorage",
    "VirtualProtectionGroup",
    "VirtualProtectionGroupSpec",
    "VpgVolumes",
    "Workload",
    "WorkloadKind",
    "checkpoint_object_name",
    "readiness",
]
