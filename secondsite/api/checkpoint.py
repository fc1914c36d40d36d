"""Checkpoint: a tagged, consistent point of a VPG that a recovery can name.

The journal takes an automatic checkpoint of every VPG every `checkpointIntervalSeconds`; those are
counted in the Journal's status, not kept as objects. A Checkpoint object asks for one more, with a
tag (say, before an upgrade), which a RecoveryRequest can then select by tag.
"""

import enum
from typing import Annotated

from pydantic import AwareDatetime, StringConstraints

from secondsite.api.common import ApiModel, ObjectName, immutable

CheckpointTag = Annotated[str, StringConstraints(min_length=1, max_length=128)]
CheckpointId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class CheckpointRef(ApiModel):
    """A checkpoint in a journal."""

    id: str
    """The checkpoint's id in its journal."""
    time: AwareDatetime
    """When the checkpoint was taken."""
    tag: str | None = None
    """The user's tag, for a tagged checkpoint."""


class CheckpointSpec(ApiModel):
    """Which VPG to take a tagged checkpoint of."""

    cel_rules = (immutable("vpg"), immutable("tag"))

    vpg: ObjectName
    """The VirtualProtectionGroup, in this namespace. Immutable."""
    tag: CheckpointTag
    """A name for the checkpoint, e.g. `before-upgrade`. Immutable."""


class CheckpointPhase(enum.StrEnum):
    """Where a tagged checkpoint is in its life."""

    PENDING = "Pending"
    READY = "Ready"
    FAILED = "Failed"
    EXPIRED = "Expired"


class CheckpointStatus(ApiModel):
    """What the journal recorded."""

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    phase: CheckpointPhase | None = None
    """Pending (asked for), Ready (in the journal), Failed, or Expired (older than the history)."""
    id: str | None = None
    """The checkpoint's id in the journal."""
    time: AwareDatetime | None = None
    """When the checkpoint was taken."""
    consistent: bool | None = None
    """False if it was taken during a bitmap sync: the image may not be write-order consistent."""
    message: str | None = None
    """Why it failed, if it did."""
