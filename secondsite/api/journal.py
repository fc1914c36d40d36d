"""Journal: the recovery-side record of every write of one VPG, and its checkpoints.

The journal defines the point-in-time window of a VPG: it keeps `history` worth of writes within
`hardLimit` bytes, promoting older entries into the replica volumes. The operator creates one
Journal per VPG from the VPG's `journal` template and owns it.
"""

from typing import Annotated, ClassVar

from pydantic import Field

from secondsite.api.checkpoint import CheckpointRef
from secondsite.api.common import (
    ApiModel,
    Duration,
    ObjectName,
    Quantity,
    Rule,
    duration_range,
    immutable,
    parse_quantity,
)


class JournalPolicy(ApiModel):
    """How much history a journal keeps, and in how much space."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        duration_range("history", "1h", "30d"),
        Rule(
            # An int-or-string is an int or a string in CEL; the schema's pattern reports a
            # malformed string, so only well-formed ones are compared here.
            cel="type(self.hardLimit) == string ? (!isQuantity(self.hardLimit)"
            " || quantity(self.hardLimit).isGreaterThan(quantity('0'))) : self.hardLimit > 0",
            message="hardLimit must be greater than zero",
            check=lambda policy: parse_quantity(policy.hard_limit) > 0,
            field_path=".hardLimit",
        ),
    )

    history: Duration = "24h"
    """How far back recovery can go: a count and a unit (m, h or d), from 1h to 30d."""
    hard_limit: Quantity = "150Gi"
    """Most space the journal may use; the oldest entries are promoted when it is reached."""
    warning_percent: Annotated[int, Field(ge=1, le=100)] = 75
    """Journal use, percent of hardLimit, above which the VPG warns."""


class JournalSpec(JournalPolicy):
    """The journal of one VPG."""

    cel_rules = (*JournalPolicy.cel_rules, immutable("vpg"))

    vpg: ObjectName
    """The VirtualProtectionGroup this journal belongs to, in this namespace. Immutable."""


class JournalStatus(ApiModel):
    """What the recovery appliance reports of the journal."""

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    used: Quantity | None = None
    """Space in use."""
    used_percent: int | None = None
    """Space in use, percent of hardLimit."""
    checkpoints: int | None = None
    """Checkpoints in the journal, automatic and tagged."""
    oldest_checkpoint: CheckpointRef | None = None
    """The oldest checkpoint recovery can go back to."""
    newest_checkpoint: CheckpointRef | None = None
    """The newest checkpoint durable on the recovery site."""
    history: str | None = None
    """The history the journal covers now, from the oldest checkpoint to now, e.g. 23h41m."""
    history_met: bool | None = None
    """Whether the journal covers the configured history."""
