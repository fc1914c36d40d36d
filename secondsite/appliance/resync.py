"""Resync of an in-path volume: make the journal's latest view equal to the source.

One mechanism serves the initial sync (a new volume: the view is all zeroes) and the delta sync
after an unclean stop (the source may hold writes that reached the backing store but were never
journaled, hence never acked). The source is walked in chunks; each chunk is compared with the
journal's latest view and, where they differ, the source's bytes are journaled. The copier holds a
:class:`~secondsite.appliance.capture.RegionGuard` window over the chunk while it reads and
journals, so a concurrent write to the chunk is either entirely before the copy (and part of what
it read) or entirely after (and journaled after it). Checkpoints taken meanwhile are marked not
consistent by the VPG.

Holes of a new volume's source (SEEK_DATA/SEEK_HOLE through block status) are skipped without
reading.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from secondsite.appliance.capture import InPathExport
from secondsite.appliance.journal import Journal

__all__ = ["ResyncProgress", "resync_in_path"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclasses.dataclass
class ResyncProgress:
    """Where a resync stands; read by status reporting while it runs."""

    reason: str
    total_bytes: int
    done_bytes: int = 0
    changed_bytes: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def percent(self) -> float:
        return 100.0 if not self.total_bytes else 100.0 * self.done_bytes / self.total_bytes

    @property
    def eta_seconds(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if self.finished is not None:
            return 0.0
        if not self.done_bytes or elapsed <= 0:
            return None
        return (self.total_bytes - self.done_bytes) / (self.done_bytes / elapsed)


async def resync_in_path(
    export: InPathExport, journal: Journal, progress: ResyncProgress, *, fresh: bool, vpg: str = ""
) -> ResyncProgress:
    """Journal every chunk where the source differs from the journal's latest view."""
    view = await journal.open_latest(export.name)
    try:
        offset = 0
        while offset < export.size:
            length = min(CHUNK, export.size - offset)
            if fresh:
                extents = await export.backing.block_status(offset, length)
                first_len, flags = extents[0]
                if flags & 2:  # reads as zeroes, like the new view: nothing to copy
                    step = min(first_len, length)
                    offset += step
                    progress.done_bytes += step
                    continue
            await export.guard.claim(offset, offset + length)
            try:
                source = await export.backing.read(offset, length)
                current = await view.read(offset, length)
                if source != current:
                    await journal.append_write(export.name, offset, bytes(source))
                    progress.changed_bytes += length
            finally:
                export.guard.release()
            offset += length
            progress.done_bytes += length
    finally:
        view.close()
    progress.finished = time.monotonic()
    log.info(
        "vpg=%s volume=%s event=resync-done reason=%s bytes=%d changed=%d seconds=%.1f",
        vpg,
        export.name,
        progress.reason,
        progress.total_bytes,
        progress.changed_bytes,
        progress.finished - progress.started,
    )
    return progress
