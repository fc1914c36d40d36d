"""The recovery-side journal of one VPG: every write, checkpoints, retention, PIT images.

Kube-agnostic and asyncio-friendly; blocking I/O runs in threads. Start with :class:`Journal`.
"""

from .checkpoints import Checkpoint
from .errors import (
    CorruptJournalError,
    FailoverStateError,
    ImagesOpenError,
    JournalClosedError,
    JournalError,
    JournalIOError,
    OutOfRangeError,
    UnknownCheckpointError,
    UnknownVolumeError,
    VolumeExistsError,
)
from .failover import FailoverVolume
from .journal import (
    Journal,
    JournalConfig,
    JournalStatus,
    PendingAppend,
    VolumeInfo,
    discard_journal,
)
from .pit import PitImage
from .retention import HistoryLevel, RetentionPolicy, RetentionStatus

__all__ = [
    "Checkpoint",
    "CorruptJournalError",
    "FailoverStateError",
    "FailoverVolume",
    "HistoryLevel",
    "ImagesOpenError",
    "Journal",
    "JournalClosedError",
    "JournalConfig",
    "JournalError",
    "JournalIOError",
    "JournalStatus",
    "OutOfRangeError",
    "PendingAppend",
    "PitImage",
    "RetentionPolicy",
    "RetentionStatus",
    "UnknownCheckpointError",
    "UnknownVolumeError",
    "VolumeExistsError",
    "VolumeInfo",
    "discard_journal",
]
