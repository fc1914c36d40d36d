"""Retention: when to promote, and how the kept history compares with the configured one.

Pure functions over plain numbers and numpy columns; the journal does the I/O. Promotion always
ends at a checkpoint, which then becomes the journal's oldest checkpoint (its image is the replica
alone), so promoting to the newest checkpoint older than ``now - history`` still keeps at least
``history`` of checkpoints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "HistoryLevel",
    "RetentionPolicy",
    "RetentionStatus",
    "SegmentUsage",
    "history_status",
    "plan_promotion",
]

HISTORY_WARN_RATIO = 0.85
"""Zerto warns when the kept history is below 85 % of the configured history..."""
HISTORY_ERROR_RATIO = 0.75
"""...and reports an error below 75 %."""


@dataclass(frozen=True)
class RetentionPolicy:
    history_seconds: float = 24 * 3600.0
    """How far back checkpoints must reach (Journal spec ``history``; default 24 h, up to 30 d)."""
    hard_limit_bytes: int | None = None
    """Upper bound on the journal's segment bytes up to their last record (``hardLimit``); None
    means unbounded. Space written ahead for later records (at most ``spare_segments + 1``
    segments, see JournalStatus.prepared_bytes) is on disk besides and not counted."""
    warning_percent: float | None = None
    """Warn when this percentage of ``hard_limit_bytes`` is used (``warningPercent``)."""
    size_low_water: float = 0.9
    """A size-driven promotion frees segments until use is at most this fraction of the limit,
    so that promotion runs in batches instead of once per segment."""


@dataclass(frozen=True)
class SegmentUsage:
    """Columns describing the segments, oldest first: highest seq in each and bytes on disk."""

    last_seq: npt.NDArray[np.int64]
    nbytes: npt.NDArray[np.int64]


class HistoryLevel(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class RetentionStatus:
    used_bytes: int
    hard_limit_bytes: int | None
    used_percent: float | None
    history_seconds_configured: float
    history_seconds_actual: float
    history_seconds_expected: float
    """min(configured, journal age): what the journal could hold by now."""
    history_met: bool
    level: HistoryLevel
    messages: tuple[str, ...]


def plan_promotion(
    *,
    now_ns: int,
    policy: RetentionPolicy,
    cp_seq: npt.NDArray[np.int64],
    cp_time_ns: npt.NDArray[np.int64],
    segments: SegmentUsage,
    used_bytes: int,
    promoted_seq: int,
    max_seq: int | None = None,
) -> int | None:
    """Index into the checkpoint columns of the checkpoint to promote to, or None.

    ``max_seq`` caps the target (open PIT images pin the checkpoints they show).
    """
    if len(cp_seq) == 0:
        return None
    cutoff = now_ns - int(policy.history_seconds * 1e9)
    target = int(np.searchsorted(cp_time_ns, cutoff, side="left")) - 1
    if policy.hard_limit_bytes is not None and used_bytes > policy.hard_limit_bytes:
        goal = int(policy.hard_limit_bytes * policy.size_low_water)
        freed = np.cumsum(segments.nbytes)
        # Fewest oldest segments whose deletion reaches the goal (all of them if none does).
        remaining = used_bytes - freed
        enough = np.flatnonzero(remaining <= goal)
        k = int(enough[0]) if len(enough) else len(freed) - 1
        need_seq = int(segments.last_seq[k]) if len(freed) else promoted_seq
        j = int(np.searchsorted(cp_seq, need_seq, side="left"))
        target = max(target, min(j, len(cp_seq) - 1))
    if max_seq is not None:
        capped = int(np.searchsorted(cp_seq, max_seq, side="right")) - 1
        target = min(target, capped)
    if target < 0 or int(cp_seq[target]) <= promoted_seq:
        return None
    return target


def history_status(
    *,
    now_ns: int,
    created_ns: int,
    policy: RetentionPolicy,
    oldest_cp_time_ns: int | None,
    used_bytes: int,
) -> RetentionStatus:
    """Compare the kept history with the configured one, Zerto style.

    A young journal is judged against its age, not the full configured history: it has not lost
    anything, it just has not been running that long.
    """
    configured = policy.history_seconds
    age = max(0.0, (now_ns - created_ns) / 1e9)
    expected = min(configured, age)
    actual = 0.0 if oldest_cp_time_ns is None else max(0.0, (now_ns - oldest_cp_time_ns) / 1e9)
    messages: list[str] = []
    level = HistoryLevel.OK
    if expected > 0 and actual < expected * HISTORY_WARN_RATIO:
        ratio = actual / expected
        level = HistoryLevel.ERROR if ratio < HISTORY_ERROR_RATIO else HistoryLevel.WARNING
        messages.append(
            f"history {actual:.0f}s is {ratio:.0%} of the {expected:.0f}s expected"
            f" (configured {configured:.0f}s)"
        )
    used_percent = None
    if policy.hard_limit_bytes:
        used_percent = 100.0 * used_bytes / policy.hard_limit_bytes
        if policy.warning_percent is not None and used_percent >= policy.warning_percent:
            if level is HistoryLevel.OK:
                level = HistoryLevel.WARNING
            messages.append(
                f"journal uses {used_percent:.0f}% of its hard limit"
                f" (warning at {policy.warning_percent:.0f}%)"
            )
    return RetentionStatus(
        used_bytes=used_bytes,
        hard_limit_bytes=policy.hard_limit_bytes,
        used_percent=used_percent,
        history_seconds_configured=configured,
        history_seconds_actual=actual,
        history_seconds_expected=expected,
        history_met=not (expected > 0 and actual < expected * HISTORY_WARN_RATIO),
        level=level,
        messages=tuple(messages),
    )
