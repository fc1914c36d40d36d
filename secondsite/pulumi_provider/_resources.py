"""One Pulumi resource class per SecondSite kind, on pulumi-kubernetes' CustomResource.

Each class is a `CustomResource` with the kind's apiVersion and kind (type token
`kubernetes:secondsite.io/v1alpha1:<Kind>`), so the kubernetes provider creates, diffs and deletes
it like any object of a CRD. What it adds is the spec's type: the class is generic in the kind's
spec model from `secondsite.api`, checked before anything is sent (see `_validation`).

An object's name is the Pulumi resource name unless `metadata` gives one: SecondSite objects refer
to each other by name (a Checkpoint's `spec.vpg`), so a program must know the names it creates,
which Pulumi's auto-naming (a random suffix) would hide.

The kubernetes provider cannot know which fields a CRD's rules make immutable, and would try an
update that the API server refuses (`tag is immutable`). So each resource asks Pulumi to replace
the object when one of those fields changes, deleting the old object first since the new one has
the same name. The fields are read from the model's `immutable` rules, like the CRD's CEL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar, cast

import pulumi
import pydantic
from pulumi_kubernetes.apiextensions import CustomResource

from secondsite.api import (
    API_VERSION,
    CHECKPOINT,
    JOURNAL,
    RECOVERY_REQUEST,
    REPLICATION_APPLIANCE,
    SITE,
    VIRTUAL_PROTECTION_GROUP,
    ApiModel,
    CheckpointSpec,
    JournalSpec,
    Kind,
    RecoveryRequestSpec,
    ReplicationApplianceSpec,
    SiteSpec,
    VirtualProtectionGroupSpec,
)
from secondsite.api.common import ObjectName, immutable
from secondsite.pulumi_provider._validation import InvalidSpecError, manifest_spec, validated_spec

SpecT = TypeVar("SpecT", bound=ApiModel)

Metadata = Mapping[str, Any]
"""ObjectMeta as the Kubernetes API spells it (`name`, `namespace`, `labels`, `annotations`);
values may be Pulumi inputs, except `name`, which must be known when the program runs."""

_OBJECT_NAME: pydantic.TypeAdapter[str] = pydantic.TypeAdapter(ObjectName)


def object_metadata(kind: Kind, resource_name: str, metadata: Metadata | None) -> dict[str, Any]:
    """`metadata` with the name defaulted to `resource_name`, checked against the kind's scope."""
    meta = dict(metadata or {})
    name = meta.setdefault("name", resource_name)
    if not isinstance(name, str):
        raise InvalidSpecError(kind.kind, resource_name, ["metadata.name: must be a plain string"])
    try:
        _OBJECT_NAME.validate_python(name)
    except pydantic.ValidationError:
        raise InvalidSpecError(
            kind.kind,
            resource_name,
            [f"metadata.name: {name!r} is not a lowercase DNS-1123 subdomain"],
        ) from None
    if kind.scope == "Cluster" and meta.get("namespace") is not None:
        raise InvalidSpecError(
            kind.kind, resource_name, [f"metadata.namespace: a {kind.kind} is cluster-scoped"]
        )
    return meta


def immutable_properties(model: type[ApiModel]) -> list[str]:
    """The spec's fields that the model's rules make immutable, as Pulumi property paths."""
    rules = set(model.cel_rules)
    return [
        f"spec.{field.alias or name}"
        for name, field in model.model_fields.items()
        if immutable(name) in rules or immutable(name, required=False) in rules
    ]


class SecondSiteResource(CustomResource, Generic[SpecT]):
    """A SecondSite object managed by Pulumi; subclasses fix the kind and its spec model."""

    secondsite_kind: ClassVar[Kind]
    """The kind this class creates (from `secondsite.api.registry`)."""

    object_name: str
    """The object's `metadata.name`."""
    object_namespace: pulumi.Input[str] | None
    """`metadata.namespace` as given (None: the provider's default, or cluster-scoped)."""
    validated: SpecT
    """The spec as validated, with the fields the program set (defaults are the API server's)."""

    def __init__(
        self,
        resource_name: str,
        spec: SpecT | Mapping[str, Any],
        metadata: Metadata | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        kind = self.secondsite_kind
        meta = object_metadata(kind, resource_name, metadata)
        model = cast(type[SpecT], kind.spec)
        self.validated = validated_spec(model, spec, kind=kind.kind, name=meta["name"])
        self.object_name = meta["name"]
        self.object_namespace = meta.get("namespace")
        replace = immutable_properties(model)
        if replace:
            # The program's own options come last, so it can still say otherwise.
            opts = pulumi.ResourceOptions.merge(
                pulumi.ResourceOptions(replace_on_changes=replace, delete_before_replace=True),
                opts,
            )
        super().__init__(
            resource_name,
            api_version=API_VERSION,
            kind=kind.kind,
            spec=manifest_spec(self.validated),
            metadata=meta,
            opts=opts,
        )


class Site(SecondSiteResource[SiteSpec]):
    """A site: the nodes (by label) where volumes live and appliances keep data. Cluster-scoped."""

    secondsite_kind = SITE


class ReplicationAppliance(SecondSiteResource[ReplicationApplianceSpec]):
    """The appliance of one node. The operator creates these; declare one only to pin settings."""

    secondsite_kind = REPLICATION_APPLIANCE


class VirtualProtectionGroup(SecondSiteResource[VirtualProtectionGroupSpec]):
    """Volumes and workloads protected, and recovered, together."""

    secondsite_kind = VIRTUAL_PROTECTION_GROUP


class Journal(SecondSiteResource[JournalSpec]):
    """A VPG's journal. The operator creates it from the VPG's `journal` template."""

    secondsite_kind = JOURNAL


class Checkpoint(SecondSiteResource[CheckpointSpec]):
    """A tagged checkpoint of a VPG, which a recovery can select by its tag."""

    secondsite_kind = CHECKPOINT


class RecoveryRequest(SecondSiteResource[RecoveryRequestSpec]):
    """One recovery operation of a VPG (FailoverTest, Failover, Move, Restore or Clone)."""

    secondsite_kind = RECOVERY_REQUEST


RESOURCE_CLASSES: tuple[type[SecondSiteResource[Any]], ...] = (
    Site,
    ReplicationAppliance,
    VirtualProtectionGroup,
    Journal,
    Checkpoint,
    RecoveryRequest,
)
"""One class per kind of `secondsite.api.KINDS`, in the same order."""
