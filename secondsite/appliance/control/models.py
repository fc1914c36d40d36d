"""Bodies of the control API's requests and responses: one home for the server and the client.

Field names are camelCase on the wire and snake_case in Python, as in
:class:`~secondsite.appliance.config.ApplianceConfig`, which `PUT /v1/config` takes as it is.
Request bodies refuse fields they do not know; response bodies keep them (``extra="allow"``), so
a client still parses the answers of a newer appliance, whose status carries more figures.

A *checkpoint reference* (``CheckpointRef``) names one checkpoint of a VPG the way export names do:
``"latest"`` (the newest consistent checkpoint), an id (``42`` or ``"42"``), ``"tag:<tag>"`` (the
newest checkpoint with that tag), or ``"time:<RFC3339 or epoch seconds>"`` (the newest checkpoint
taken at or before that time).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from secondsite.appliance.journal import Checkpoint

__all__ = [
    "MAX_PAGE",
    "ApplianceStatus",
    "ApplyResult",
    "Change",
    "ChangeAction",
    "CheckpointInfo",
    "CheckpointPage",
    "CheckpointRef",
    "CheckpointRequest",
    "DeltaSyncStatus",
    "ErrorBody",
    "FailoverState",
    "ImageInfo",
    "ImageList",
    "ImageRequest",
    "JournalUsage",
    "MirrorReadyRequest",
    "PromoteRequest",
    "ProtectedBuffer",
    "ProtectedVpgStatus",
    "ReplicationSource",
    "ReplicationStatus",
    "ReverseRequest",
    "ReverseResult",
    "StreamCounters",
    "Throughput",
    "VolumeStatus",
    "VpgStatus",
    "check_checkpoint_ref",
]

MAX_PAGE = 1000
"""Most checkpoints one `GET .../checkpoints` answers; the default page is 100."""


class _Request(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
    )


class _Reply(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="allow",
    )


def check_checkpoint_ref(ref: int | str) -> str:
    """Normalize a checkpoint reference to its string form; ValueError when it names nothing."""
    if isinstance(ref, int):
        if ref < 0:
            raise ValueError("a checkpoint id is not negative")
        return str(ref)
    if ref == "latest" or ref.isdigit():
        return ref
    kind, colon, rest = ref.partition(":")
    if colon and rest and kind in ("tag", "time"):
        return ref
    raise ValueError(
        f"{ref!r} names no checkpoint: give latest, an id, tag:<tag> or time:<RFC3339|epoch>"
    )


CheckpointRef = Annotated[int | str, AfterValidator(check_checkpoint_ref)]


# -- errors --------------------------------------------------------------------------------------


class ErrorBody(_Reply):
    """What every error response carries."""

    error: str
    """A stable code, e.g. `unknown-vpg`, `config-conflict`, `failover-state`."""
    message: str
    """What went wrong and, where it helps, what to do about it."""
    details: list[dict[str, Any]] = []
    """For `invalid-request`: pydantic's errors (`loc`, `msg`, `type`); for `config-conflict`:
    one `{path, message}` per change that cannot be applied live."""


# -- config --------------------------------------------------------------------------------------


class ChangeAction(enum.StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


class Change(_Reply):
    """One thing a `PUT /v1/config` changed."""

    kind: Literal["appliance", "vpg", "protected", "volume"]
    """`vpg`: a VPG journaled here (local capture, or fed by replication streams); `protected`: a
    VPG captured here and replicated to a recovery appliance; `appliance`: a setting of the
    appliance itself (`name` is the field)."""
    name: str
    action: ChangeAction
    fields: list[str] = []
    """For `changed`: the fields (camelCase) whose values changed."""


class ApplyResult(_Reply):
    """The answer to `PUT /v1/config`: an empty list when the config was already in force."""

    changes: list[Change] = []

    @property
    def changed(self) -> bool:
        return bool(self.changes)


# -- checkpoints ---------------------------------------------------------------------------------


class CheckpointInfo(_Reply):
    id: int
    seq: int
    """Every journaled write with a smaller sequence number is in the checkpoint's image."""
    time: datetime
    tag: str | None = None
    consistent: bool = True
    """False for checkpoints taken while a volume was not in sync (their image may be torn)."""

    @classmethod
    def of(cls, cp: Checkpoint) -> CheckpointInfo:
        return cls(
            id=cp.id,
            seq=cp.seq,
            time=datetime.fromtimestamp(cp.time_ns / 1e9, UTC),
            tag=cp.tag,
            consistent=cp.consistent,
        )


class CheckpointRequest(_Request):
    tag: Annotated[str, Field(min_length=1, max_length=253)] | None = None


class CheckpointPage(_Reply):
    """Checkpoints, newest first."""

    checkpoints: list[CheckpointInfo]
    next_before: int | None = None
    """When more match: pass it as `before` to get the next (older) page."""


# -- images --------------------------------------------------------------------------------------


class ImageRequest(_Request):
    volume: str
    checkpoint: CheckpointRef = "latest"
    writable: bool = False
    """Writable images keep their writes in a scratch overlay, discarded on delete."""


class ImageInfo(_Reply):
    """A PIT image created through the API; served over NBD until deleted."""

    id: str
    vpg: str
    volume: str
    checkpoint: CheckpointInfo
    writable: bool
    size: int
    export: str
    """The NBD export name: `image/<id>`."""
    nbd: list[str]
    """NBD URIs of the export, one per NBD listener of the appliance."""
    connections: int = 0
    created: datetime


class ImageList(_Reply):
    images: list[ImageInfo]


# -- failover ------------------------------------------------------------------------------------


class PromoteRequest(_Request):
    checkpoint: CheckpointRef


class FailoverState(_Reply):
    vpg: str
    phase: str | None
    """None, or `promoted` between promote and commit/rollback."""
    checkpoint: CheckpointInfo | None = None
    """The checkpoint promoted to (while promoted), or the oldest checkpoint after a commit."""


class MirrorReadyRequest(_Request):
    ready: bool


class ReverseRequest(_Request):
    """`POST /v1/vpgs/{vpg}/reverse`: the role the appliance takes, and what it needs to know of
    the other end."""

    role: Literal["protected", "recovery"]
    """The role this appliance takes for the VPG: `protected` on the appliance where the VPG
    failed over to, `recovery` on the one it came from. Asking for the role the VPG has already
    (a retried request) changes nothing."""
    peer: Annotated[str, Field(min_length=1, max_length=63)]
    """The other appliance's name (its identity in replication streams)."""
    peer_stream: str | None = None
    """The other appliance's stream listener, `host:port`: needed on the appliance that becomes
    the protected side (the former recovery appliance)."""
    directory: Path | None = None
    """Where the VPG's new role keeps its files (journal or sync state); default: where its
    former role kept them."""
    settings: dict[str, Any] = {}
    """More settings of the new role, by their config names: of its `protected` entry (role
    `protected`: priority, bufferBytes, compression, initialSync; default `initialSync: delta`)
    or of its journal (role `recovery`: history, hardLimit, warningPercent,
    checkpointIntervalSeconds, segmentBytes, scratchDirectory). Unset ones take the defaults."""


class ReverseResult(_Reply):
    """The answer to a reverse: the role the appliance took and what its config changed."""

    vpg: str
    role: Literal["protected", "recovery"]
    """`protected`: this appliance now serves the volumes and streams them; `recovery`: it now
    journals them from the peer."""
    changes: list[Change] = []


# -- status --------------------------------------------------------------------------------------


class JournalUsage(_Reply):
    used_bytes: int
    hard_limit_bytes: int | None = None
    used_percent: float | None = None
    history_seconds_configured: float
    history_seconds_actual: float
    history_met: bool
    level: str
    messages: list[str] = []
    prepared_bytes: int = 0
    """Segment space written ahead of the records (spare files, the active segment's unused
    part): on disk besides ``used_bytes``, not counted against the hard limit."""
    promotion_blocked_at_seq: int | None = None
    """Set while open PIT images pin a checkpoint and keep retention from promoting as far as
    history or the hard limit wants: the lowest seq they pin (close them to let it go on)."""


class DeltaSyncStatus(_Reply):
    """A delta sync by block checksums of one volume (force sync, unclean restart, initial sync
    with `initialSync: delta`)."""

    running: bool
    reason: str
    total_bytes: int
    """Bytes of the volume to compare."""
    compared_bytes: int
    shipped_bytes: int
    """Bytes of blocks that differed, shipped as write records."""
    block_bytes: int
    eta_seconds: float | None = None


class VolumeStatus(_Reply):
    capture: str
    state: str
    """InitialSync, DeltaSync, BitmapSync (replicated in-path volume whose changes are tracked as
    dirty regions), Protected or NotSynced."""
    reason: str = ""
    size: int
    writes: int
    bytes_written: int
    sync_percent: float | None = None
    sync_eta_seconds: float | None = None
    dirty_bytes: int | None = None
    """Replicated in-path volume: bytes in regions still to ship to the recovery side."""
    delta_sync: DeltaSyncStatus | None = None
    """Replicated in-path volume: its newest delta sync, running or done."""


class ReplicationSource(_Reply):
    """One protected appliance feeding a recovery-side journal, as the recovery side sees it."""

    connected: bool
    peer: str | None = None
    position: int
    """The source's newest seq durable in the journal: its stream resumes after it."""
    received_seq: int | None = None
    durable_seq: int | None = None
    records: int = 0
    """Records journaled from it since this appliance started."""
    payload_bytes: int = 0
    bytes_per_second: float = 0.0
    """Data journaled from it per second, lately."""
    skipped_records: int | None = None
    """Records resent after a reconnect and skipped (already durable) on this connection."""
    wire_bytes: int | None = None
    last_record_time: float | None = None
    consistent: bool | None = None
    """Whether its newest checkpoint mark said it was consistent (None: no mark yet)."""
    state: str = ""
    """Its VPG state as its newest mark said (Protected, InitialSync, BitmapSync, ...)."""
    volumes: list[str] = []


class ReplicationStatus(_Reply):
    role: Literal["recovery"]
    sources: dict[str, ReplicationSource] = {}


class VpgStatus(_Reply):
    """A VPG journaled on this appliance: locally captured, or fed by replication streams."""

    vpg: str
    state: str = ""
    """Local capture: Protected (every volume in sync), Syncing (some volume in initial, delta or
    no sync), or FailingOver (promoted to a checkpoint, before commit or rollback). Fed by
    replication: Disconnected (a source is not connected: no checkpoints), a source's sync state
    (InitialSync, DeltaSync, BitmapSync, NotSynced: checkpoints not consistent), Protected, or
    FailingOver."""
    reason: str = ""
    """Why the VPG is not Protected (replication), in words."""
    consistent: bool
    rpo_seconds: float | None = None
    newest_checkpoint: CheckpointInfo | None = None
    oldest_checkpoint: CheckpointInfo | None = None
    checkpoint_count: int
    durable_seq: int
    promoted_seq: int
    journal: JournalUsage
    hold_ms: dict[str, float] = {}
    checkpoint_problem: str = ""
    """Why the last automatic checkpoint was not taken ("" when it was)."""
    volumes: dict[str, VolumeStatus] = {}
    """Volumes captured on this appliance (none on a recovery appliance: see `replication`)."""
    replication: ReplicationStatus | None = None
    """Fed by replication: its sources."""
    failover_phase: str | None = None
    images: int = 0
    """PIT images created through the API and not yet deleted."""


class ProtectedBuffer(_Reply):
    used_bytes: int
    capacity_bytes: int
    used_percent: float
    records: int
    spills: int = 0
    """Times the buffer overflowed and its records became dirty regions (bitmap sync)."""


class Throughput(_Reply):
    written_bytes_per_second: float
    """What the workload wrote (last second)."""
    wire_bytes_per_second: float
    """What went on the wire (last second, after compression)."""


class StreamCounters(_Reply):
    sessions: int
    connect_failures: int
    last_error: str = ""
    durable_seq: int
    sent_seq: int
    appended_bytes: int
    payload_bytes_sent: int
    wire_bytes_sent: int
    wire_ratio: float
    """Wire bytes per byte of data frames: below 1 when compression pays."""
    holds: int
    holds_expired: int


class ProtectedVpgStatus(_Reply):
    """A VPG captured here and replicated to its recovery appliance."""

    vpg: str
    source: str
    """This appliance's name in the stream."""
    recovery: str
    priority: str
    state: str
    """Disconnected, InitialSync, DeltaSync, BitmapSync, NotSynced or Protected."""
    reason: str = ""
    consistent: bool
    """Every volume is Protected: checkpoints cut now are consistent."""
    connected: bool
    rpo_seconds: float
    """How far the recovery side may be behind: the age of the oldest change it has not
    acknowledged durable (or of the oldest sync still running)."""
    buffer: ProtectedBuffer
    throughput: Throughput
    stream: StreamCounters
    hold_ms: dict[str, float] = {}
    """How long checkpoint cuts held this VPG's acks."""
    ack_latency_ms: dict[str, float] = {}
    """Of the newest changes (up to 16384): from capture to acknowledged durable by the recovery
    side, count / p50_ms / p99_ms / max_ms: the RPO each write had."""
    volumes: dict[str, VolumeStatus] = {}


class ApplianceStatus(_Reply):
    node: str | None = None
    name: str | None = None
    """The appliance's name in replication streams."""
    nbd: list[str]
    """Where the NBD server listens (`tcp:HOST:PORT`, `unix:PATH`)."""
    stream: str | None = None
    """Where the replication stream listener is bound (`host:port`)."""
    control: str | None = None
    """The control API's URL."""
    connections: int
    """NBD client connections open right now."""
    stream_connections: int = 0
    """Replication streams connected to this appliance right now."""
    stream_rejected: int = 0
    """Stream connections refused (TLS, protocol, unknown VPG or source) since start."""
    vpgs: dict[str, VpgStatus] = {}
    protected: dict[str, ProtectedVpgStatus] = {}
