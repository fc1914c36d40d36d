"""ReplicationAppliance: the data-plane process on one node of a site.

The operator creates one per node a Site selects and runs its pod there. On the protected side the
appliance receives every write of the node's protected volumes and streams it; on the recovery side
it journals the stream and keeps the replica volumes. Users read these objects; they rarely write
them.
"""

import enum
from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints

from secondsite.api.common import (
    ApiModel,
    Conditions,
    LabelValueName,
    ObjectName,
    Quantity,
    immutable,
)


class ResourceRequirements(ApiModel):
    """Compute resources of the appliance's container, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Resources the scheduler reserves, e.g. `cpu: 500m`, `memory: 1Gi`."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Resources the container may not exceed."""


class ReplicationApplianceSpec(ApiModel):
    """Which node of which site the appliance serves, and how its pod runs."""

    cel_rules = (immutable("site"), immutable("node_name"))

    site: LabelValueName
    """The Site this appliance belongs to. Immutable."""
    node_name: ObjectName
    """The Node the appliance's pod runs on. Immutable."""
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None
    """Container image of the appliance. Unset: the operator's default image."""
    resources: ResourceRequirements | None = None
    """Compute resources of the appliance's container. Unset: the operator's defaults."""


class VolumeRole(enum.StrEnum):
    """What an appliance does for a volume."""

    SOURCE = "Source"
    """Protected side: captures the volume's writes and streams them."""
    REPLICA = "Replica"
    """Recovery side: journals the stream and keeps the replica volume."""


class ApplianceVolume(ApiModel):
    """A volume an appliance serves."""

    name: str
    """The volume's name within its VPG (the PVC's name)."""
    vpg: str
    """The VPG the volume belongs to, as namespace/name."""
    role: VolumeRole
    """Source or Replica."""
    state: str | None = None
    """The volume's replication state on this appliance (see the VPG's volume states)."""


class BufferUsage(ApiModel):
    """Use of the protected-side buffer that holds writes until the recovery side acks them."""

    used: Quantity | None = None
    """Bytes held."""
    used_percent: int | None = None
    """Bytes held, percent of the buffer's size. Full means bitmap sync."""


class ReplicationApplianceStatus(ApiModel):
    """What the operator observes of an appliance."""

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Ready: the pod runs and its control API answers; Reconciling and Stalled
    (kstatus conventions)."""
    endpoint: str | None = None
    """Address (host:port) of the appliance's control API and replication stream."""
    pod_name: str | None = None
    """The pod that runs the appliance, in the operator's namespace."""
    volumes: list[ApplianceVolume] = Field(default_factory=list)
    """Volumes this appliance serves."""
    buffer: BufferUsage | None = None
    """Protected-side buffer use."""
    throughput_bytes_per_second: int | None = None
    """Replication throughput over the last heartbeat interval."""
    last_heartbeat_time: AwareDatetime | None = None
    """When the operator last heard from the appliance."""
