"""The :class:`Journal` facade: the recovery-side journal of one VPG.

Directory layout::

    volumes.json     volume name -> id, size, replica path (replaced atomically)
    state.json       promoted watermark and its checkpoint, next seq/checkpoint id floors,
                     source positions, promotion in progress, failover phase (replaced atomically)
    segments/        append-only segment files, their index sidecars (segment.py) and spare
                     files written ahead for later segments (spares.py)
    replicas/        <volume>.img: sparse replica files, unless a path was given
    failover.undo    only between promote_to() and commit()/rollback()

Guarantees:

* Sequence numbers are assigned synchronously when ``submit_*``/``append_*``/``mark_checkpoint``
  is called, so the caller's call order is the sequence order (also across volumes).
* ``append_*`` returns (the write is acked) only once its record is written and fdatasynced;
  concurrent appends share one write + fdatasync (group commit, see writer.py).
* A checkpoint gets the next sequence number after every record submitted before the call; its
  image holds exactly those records. ``checkpoint()`` returns once the record is durable.
* After a crash, every acked record and every checkpoint whose call returned is there; a torn tail
  is cut at open and logged with the number of bytes cut.
* Records go into file space written before (spares.py), so that a group commit's fdatasync
  flushes data without a file system journal commit. :meth:`Journal.used_bytes` counts record
  bytes only; :attr:`JournalStatus.prepared_bytes` says how much is written ahead besides.
* Source positions (``submit_position``, for the replication stream's resume) are POSITION records
  in the sequence like any other, so a position is durable together with or after every record
  submitted before it. :attr:`Journal.positions` is the highest durable one per source: folded
  from the records at open, and kept in state.json whenever segments are about to be deleted
  (promotion, failover commit), so it outlives the records that carried it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import shutil
import threading
import time
import types
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .checkpoints import Checkpoint, CheckpointTable
from .errors import (
    CorruptJournalError,
    FailoverStateError,
    ImagesOpenError,
    JournalClosedError,
    JournalIOError,
    OutOfRangeError,
    UnknownCheckpointError,
    UnknownVolumeError,
    VolumeExistsError,
)
from .failover import FailoverVolume, UndoLog
from .index import ExtentMap, VolumeIndex
from .pit import (
    GRAIN,
    PitImage,
    RecordSnapshot,
    ScratchOverlay,
    build_extents,
    extend_extents,
)
from .record import (
    HEADER,
    NO_VOLUME,
    SEGMENT_HEADER,
    CheckpointPayload,
    PositionPayload,
    RecordType,
    encode_checkpoint,
    encode_header,
    encode_position,
    new_incarnation,
)
from .replica import ReplicaFile
from .retention import (
    RetentionPolicy,
    RetentionStatus,
    SegmentUsage,
    history_status,
    plan_promotion,
)
from .segment import (
    CP_COLS,
    REC_COLS,
    REC_DTYPES,
    SegmentScan,
    SegmentSet,
    fsync_dir,
    list_segments,
    load_sidecar,
    note_position,
    read_segment_header,
    scan_segment,
    seg_path,
    torn_extent,
    write_sidecar,
)
from .spares import SparePool
from .state import read_json, write_json_atomic
from .writer import NewSegment, PendingRecord, SegmentWriter

__all__ = ["Journal", "JournalConfig", "JournalStatus", "PendingAppend", "VolumeInfo"]

log = logging.getLogger(__name__)

_LATEST_FOLD_ROWS = 65536
"""The latest view lays up to this many new records over its map per read, then rebuilds it."""
_UNDO_CHUNK_EXTENTS = 8192
_SYNCS_AHEAD = 2
"""Batches written and not yet synced, at most: one syncing, the next one written meanwhile."""
_OVERLAP_BYTES = 256 << 10
"""A batch of this many bytes or more is synced on the sync thread while the next one is
written: writing it into the page cache takes long enough to be worth overlapping (measured:
1-20 ms for 1-16 MiB, as long as the fdatasync). Smaller batches (4 KiB writes) are written and
synced in one step on the I/O thread, one thread hand-over less per batch."""


@dataclass(frozen=True)
class JournalConfig:
    vpg: str = ""
    """Name of the VPG, for log lines."""
    segment_size: int = 256 << 20
    """A segment is rolled when the next record would take it past this size."""
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    scratch_dir: Path | None = None
    """Where scratch overlays of writable images go (default: <journal>/scratch)."""
    hold_samples: int = 4096
    """How many recent ack-hold durations are kept for percentiles."""
    spare_segments: int = 2
    """Spare segment files kept written ahead of use (spares.py); 0: none, every segment is a
    new file that appends grow (fdatasync then commits metadata: about twice as slow)."""


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    id: int
    size: int
    replica_path: Path


@dataclass(frozen=True)
class JournalStatus:
    retention: RetentionStatus
    oldest_checkpoint: Checkpoint | None
    newest_checkpoint: Checkpoint | None
    checkpoint_count: int
    promoted_seq: int
    durable_seq: int
    failover_phase: str | None
    promotion_blocked_at_seq: int | None
    """Set when open images keep retention from promoting as far as it wants."""
    prepared_bytes: int
    """Segment space written ahead of the records (the active segment's unused part and the
    spare files), on disk besides ``retention.used_bytes`` and not counted against the hard
    limit: at most ``(spare_segments + 1) * segment_size``."""


@dataclass
class _Volume:
    info: VolumeInfo
    index: VolumeIndex
    replica: ReplicaFile


@dataclass(eq=False)
class PendingAppend:
    """A submitted record: its sequence number now, durability later (``await pending``)."""

    seq: int
    future: asyncio.Future[None]

    def __await__(self) -> Any:
        # What asyncio.shield does, for one future and with less work (one per write): the
        # awaiting task may be cancelled, the record's future goes on.
        inner = self.future
        if inner.done():
            return inner.result()
        outer: asyncio.Future[None] = inner.get_loop().create_future()
        inner.add_done_callback(functools.partial(_relay, outer))
        return (yield from outer)


def _relay(outer: asyncio.Future[None], inner: asyncio.Future[None]) -> None:
    """Pass a record's outcome on to one awaiter (unless it gave up waiting)."""
    if inner.cancelled():
        if not outer.done():
            outer.cancel()
        return
    exc = inner.exception()  # retrieved either way: no "never retrieved" warning
    if outer.done():
        return
    if exc is not None:
        outer.set_exception(exc)
    else:
        outer.set_result(None)


@dataclass
class _Queued:
    rec: PendingRecord
    future: asyncio.Future[None]
    holdable: bool
    checkpoint: Checkpoint | None = None
    position: PositionPayload | None = None


class Journal:
    """Recovery-side journal of one VPG. Create with ``await Journal.open(directory)``."""

    def __init__(self, directory: Path, config: JournalConfig) -> None:
        self.directory = directory
        self.config = config
        self._segdir = directory / "segments"
        self._scratch = config.scratch_dir or directory / "scratch"
        self._volumes: dict[str, _Volume] = {}
        self._by_id: dict[int, _Volume] = {}
        self.checkpoints = CheckpointTable()
        self._segments = SegmentSet()
        self._seg_info: dict[int, list[int]] = {}
        """segno -> [first_seq, last_seq, bytes], ascending segno."""
        self._state: dict[str, Any] = {}
        self._next_seq = 1
        self._next_cid = 1
        self._last_mark_ns = 0
        """Time of the newest checkpoint marked (its record may not be durable yet)."""
        self._durable_seq = 0
        self._promoted_seq = 0
        self._active_segno = 0
        self._active_pos = 0
        self._writer = SegmentWriter(self._segdir)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-io")
        self._sync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-sync")
        """fdatasyncs of written batches, in order, while the I/O thread writes the next."""
        self._syncing: collections.deque[asyncio.Future[None]] = collections.deque()
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-bg")
        """Work off the append path: spare files and sidecars."""
        self._spares = SparePool(
            self._segdir, config.segment_size, config.spare_segments, self._bg, config.vpg
        )
        self._tail_segno = 0
        """Newest segment that holds durable records (or the active one when it holds none)."""
        self._active_incarnation = 0
        self._active_prepared = 0
        """Size of the written space the active segment was made from (0: a new file)."""
        self._queue: list[_Queued] = []
        self._queued_bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._failed: BaseException | None = None
        self._closed = False
        self._holds = 0
        self._held: list[asyncio.Future[None]] = []
        self._hold_times: collections.deque[float] = collections.deque(maxlen=config.hold_samples)
        self._pins: collections.Counter[int] = collections.Counter()
        self._pin_lock = threading.Lock()
        self._images: set[PitImage] = set()
        self._promote_lock = asyncio.Lock()
        self._volume_lock = asyncio.Lock()
        """Serializes add_volume(): an id is chosen, then persisted in a thread."""
        self._promoting_to: int | None = None
        self._failover_phase: str | None = None
        self._failover_volumes: dict[str, FailoverVolume] = {}
        self._failover_undo: UndoLog | None = None
        self._active_rows: list[npt.NDArray[np.int64]] = []
        """Index rows (REC_COLS) of the active segment's data records, a chunk per batch."""
        self._active_cps: dict[str, list[int]] = {}
        self._active_tags: dict[int, str] = {}
        self._active_positions: dict[str, int] = {}
        self._active_position_seq = 0
        self._positions: dict[str, int] = {}
        """Highest durable source seq per replication source."""
        self._submitted_positions: dict[str, int] = {}
        """Highest submitted source seq per source (>= the durable one)."""
        self.batches = 0
        """Number of group commits (write + fdatasync rounds) so far."""

    # ------------------------------------------------------------------ open / close

    @classmethod
    async def open(
        cls, directory: str | os.PathLike[str], config: JournalConfig | None = None
    ) -> Journal:
        """Open (or create) the journal in ``directory``: scan, cut a torn tail, finish or undo
        an interrupted promotion or failover, and rebuild the index and checkpoint table."""
        j = cls(Path(directory), config or JournalConfig())
        try:
            await asyncio.get_running_loop().run_in_executor(j._io, j._open_sync)
        except BaseException:
            j._spares.close()
            j._io.shutdown(wait=False)
            j._sync.shutdown(wait=False)
            j._bg.shutdown(wait=False)
            raise
        return j

    def _log(self, msg: str, **kv: object) -> str:
        items = " ".join(f"{k}={v}" for k, v in {"vpg": self.config.vpg, **kv}.items())
        return f"{msg} {items}"

    def _open_sync(self) -> None:
        self._segdir.mkdir(parents=True, exist_ok=True)
        (self.directory / "replicas").mkdir(exist_ok=True)
        self._spares.load()
        state = read_json(self.directory / "state.json")
        if state is None:
            state = {
                "version": 1,
                "created_ns": time.time_ns(),
                "promoted_seq": 0,
                "floor": None,
                "next_seq": 1,
                "next_cid": 1,
                "positions": {},
                "promoting": None,
                "failover": None,
            }
            write_json_atomic(self.directory / "state.json", state)
        self._state = state
        self._promoted_seq = int(state["promoted_seq"])
        self._next_seq = int(state["next_seq"])
        self._next_cid = int(state["next_cid"])
        if state["floor"] is not None:
            self.checkpoints.floor = Checkpoint.from_json(state["floor"])
        # Positions whose records were deleted with their segments (older states have none).
        for source, source_seq in (state.get("positions") or {}).items():
            note_position(self._positions, source, int(source_seq))
        vols = read_json(self.directory / "volumes.json") or {"volumes": []}
        for v in vols["volumes"]:
            info = VolumeInfo(
                v["name"], int(v["id"]), int(v["size"]), self.directory / Path(v["replica"])
            )
            self._install_volume(info)
        scans = self._scan_segments()
        self._load_scans(scans)
        self._durable_seq = self._next_seq - 1
        self._submitted_positions = dict(self._positions)
        if state["promoting"] is not None:
            cp = Checkpoint.from_json(state["promoting"])
            log.warning(self._log("journal: finishing interrupted promotion", seq=cp.seq))
            self._retention_promote_sync(cp, self._snapshots(), dict(self._positions))
            self._delete_segments(self._after_promotion(cp))
        fo = state["failover"]
        if fo is not None:
            phase = fo["phase"]
            if phase in ("promoting", "rolling_back"):
                log.warning(self._log("journal: rolling back interrupted failover", phase=phase))
                self._rollback_sync()
            elif phase == "committing":
                log.warning(self._log("journal: finishing interrupted failover commit"))
                self._commit_sync(Checkpoint.from_json(fo["checkpoint"]))
            else:
                self._failover_phase = phase

    def _scan_segments(self) -> list[SegmentScan]:
        segnos = list_segments(self._segdir)
        for idx in self._segdir.glob("*.idx"):
            if not idx.with_suffix(".seg").exists():
                idx.unlink()  # a sidecar written just after its segment was promoted away
        for tmp in self._segdir.glob("*.idx.tmp"):
            tmp.unlink()  # a sidecar that a crash interrupted
        scans: list[SegmentScan] = []
        prev_last = -1
        for k, segno in enumerate(segnos):
            path = seg_path(self._segdir, segno)
            is_last = k == len(segnos) - 1
            try:
                scan = None
                if not is_last:
                    scan = self._load_sidecar(path, segno)
                if scan is None:
                    scan = scan_segment(path, verify_crc=is_last)
            except CorruptJournalError:
                if is_last and path.stat().st_size <= SEGMENT_HEADER.size:
                    # Crash while creating the segment: it never held a record.
                    log.warning(self._log("journal: removing half-created segment", segment=segno))
                    path.unlink()
                    break
                raise
            if scan.torn_bytes:
                if not is_last:
                    raise CorruptJournalError(
                        f"segment {segno} is damaged at byte {scan.valid_end} and is not the last"
                    )
                self._log_tail(path, scan)
                with open(path, "r+b") as f:
                    f.truncate(scan.valid_end)
                    os.fsync(f.fileno())
                scan.file_size = scan.valid_end
            if scan.first_seq <= prev_last:
                raise CorruptJournalError(
                    f"segment {segno} starts at seq {scan.first_seq}, not after {prev_last}"
                )
            prev_last = scan.last_seq
            scans.append(scan)
        # Segments fully promoted before a crash could delete them.
        while len(scans) > 1 and scans[0].last_seq <= self._promoted_seq:
            gone = seg_path(self._segdir, scans.pop(0).segno)
            gone.with_suffix(".idx").unlink(missing_ok=True)
            if not self._spares.adopt(gone):
                gone.unlink(missing_ok=True)
        return scans

    def _log_tail(self, path: Path, scan: SegmentScan) -> None:
        """Say what the open cuts after the active segment's last record: a torn tail (a
        warning, with the bytes this incarnation wrote there) or only prepared space."""
        torn = torn_extent(path, scan)
        where = {"segment": scan.segno, "offset": scan.valid_end}
        prepared = scan.torn_bytes - torn
        if torn:
            what = self._log(
                "journal: torn tail cut", **where, bytes_cut=torn, prepared_bytes=prepared
            )
            log.warning(what)
        else:
            log.info(
                self._log(
                    "journal: end of records in prepared space", **where, prepared_bytes=prepared
                )
            )

    def _load_sidecar(self, path: Path, segno: int) -> SegmentScan | None:
        with open(path, "rb") as f:
            hdr = read_segment_header(f, path)
        scan = load_sidecar(self._segdir, segno, hdr.first_seq, hdr.created_ns)
        if scan is not None:
            scan.incarnation, scan.recycled = hdr.incarnation, hdr.recycled
        return scan

    def _load_scans(self, scans: list[SegmentScan]) -> None:
        for scan in scans:
            self._segments.add(scan.segno, seg_path(self._segdir, scan.segno))
            self._seg_info[scan.segno] = [scan.first_seq, scan.last_seq, scan.file_size]
            self._next_seq = max(self._next_seq, scan.last_seq + 1)
            for source, source_seq in scan.positions.items():
                note_position(self._positions, source, source_seq)
        for k, scan in enumerate(scans):
            if k < len(scans) - 1 and not scan.from_sidecar:
                write_sidecar(self._segdir, scan)
        if scans:
            self._add_rows(
                {k: np.concatenate([s.records[k] for s in scans]) for k in scans[0].records},
                np.concatenate([np.full(len(s.records["seq"]), s.segno) for s in scans]),
            )
            cps = {
                k: np.concatenate([s.checkpoints[k] for s in scans]) for k in scans[0].checkpoints
            }
            segs = np.concatenate([np.full(len(s.checkpoints["seq"]), s.segno) for s in scans])
            keep = cps["seq"] > self._promoted_seq
            tags: dict[int, str] = {}
            for s in scans:
                tags.update(s.tags)
            kept_ids = set(cps["cid"][keep].tolist())
            self.checkpoints.append(
                cps["cid"][keep],
                cps["seq"][keep],
                cps["time_ns"][keep],
                cps["consistent"][keep],
                segs[keep],
                {c: t for c, t in tags.items() if c in kept_ids},
            )
            if len(cps["cid"]):
                self._next_cid = max(self._next_cid, int(cps["cid"].max()) + 1)
            last = scans[-1]
            self._active_segno = self._tail_segno = last.segno
            self._active_pos = last.file_size
            self._active_incarnation = last.incarnation
            self._active_prepared = 0
            self._active_rows = [np.stack([last.records[k] for k in REC_COLS], axis=1)]
            self._active_cps = {k: v.tolist() for k, v in last.checkpoints.items()}
            self._active_tags = dict(last.tags)
            self._active_positions = dict(last.positions)
            self._active_position_seq = last.position_seq
            self._writer.resume(last.segno, last.file_size)
        else:
            self._new_first_segment(1)

    def _new_first_segment(self, segno: int) -> None:
        new = self._new_segment(segno, self._next_seq)
        self._writer.start(new)
        self._segments.add(segno, seg_path(self._segdir, segno))
        self._seg_info[segno] = [self._next_seq, self._next_seq - 1, SEGMENT_HEADER.size]
        self._tail_segno = segno
        self._active_pos = SEGMENT_HEADER.size
        self._reset_active_rows()

    def _new_segment(self, segno: int, first_seq: int) -> NewSegment:
        """Make ``segno`` the segment that submitted records go to (from a spare if one is
        ready); the writer creates it before writing its first record."""
        spare = self._spares.take()
        self._active_segno = segno
        self._active_pos = SEGMENT_HEADER.size
        self._active_incarnation = new_incarnation()
        self._active_prepared = 0 if spare is None else spare.size
        return NewSegment(segno, first_seq, self._active_incarnation, spare)

    def _reset_active_rows(self) -> None:
        self._active_rows = []
        self._active_cps = {k: [] for k in CP_COLS}
        self._active_tags = {}
        self._active_positions = {}
        self._active_position_seq = 0

    def _add_rows(self, rows: dict[str, npt.NDArray[Any]], segs: npt.NDArray[Any]) -> None:
        keep = rows["seq"] > self._promoted_seq
        vol = rows["vol"]
        unknown = set(np.unique(vol[keep]).tolist()) - set(self._by_id)
        if unknown:
            raise CorruptJournalError(f"records of unknown volume ids {sorted(unknown)}")
        for vid, v in self._by_id.items():
            m = keep & (vol == vid)
            if m.any():
                v.index.append_many(
                    seq=rows["seq"][m],
                    offset=rows["offset"][m],
                    length=rows["length"][m],
                    seg=segs[m],
                    pos=rows["pos"][m],
                    kind=rows["kind"][m],
                )

    async def close(self) -> None:
        """Wait for queued appends, then close files. Open images are closed too."""
        if self._closed:
            return
        await self._drain()
        async with self._promote_lock:  # let a running promotion finish
            self._closed = True
        for img in list(self._images):
            img.close()
        loop = asyncio.get_running_loop()
        self._spares.close()
        await loop.run_in_executor(self._io, self._close_sync)
        self._io.shutdown(wait=True)
        self._sync.shutdown(wait=True)
        await loop.run_in_executor(None, self._bg.shutdown)

    def _close_sync(self) -> None:
        self._close_failover_volumes()
        try:
            self._writer.close(trim=True)
        except OSError as exc:  # the next open cuts the prepared tail instead
            log.warning(self._log("journal: could not trim the active segment", error=exc))
        self._segments.close()
        for v in self._volumes.values():
            v.replica.close()

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ volumes

    def _install_volume(self, info: VolumeInfo) -> None:
        v = _Volume(info, VolumeIndex(), ReplicaFile(info.replica_path, info.size))
        self._volumes[info.name] = v
        self._by_id[info.id] = v

    async def add_volume(
        self, name: str, size: int, replica_path: str | os.PathLike[str] | None = None
    ) -> VolumeInfo:
        """Add a volume (idempotent for the same name and size). Creates its sparse replica.

        Concurrent calls are taken one at a time, so each new volume gets its own id."""
        if size <= 0:
            raise OutOfRangeError(f"volume {name}: size must be positive")
        async with self._volume_lock:
            return await self._add_volume(name, size, replica_path)

    async def _add_volume(
        self, name: str, size: int, replica_path: str | os.PathLike[str] | None
    ) -> VolumeInfo:
        existing = self._volumes.get(name)
        if existing is not None:
            if existing.info.size != size:
                raise VolumeExistsError(
                    f"volume {name} exists with size {existing.info.size}, not {size}"
                )
            return existing.info
        vid = max(self._by_id, default=-1) + 1
        path = Path(replica_path) if replica_path else self.directory / "replicas" / f"{name}.img"
        info = VolumeInfo(name, vid, size, path)

        def persist() -> None:
            self._install_volume(info)
            write_json_atomic(
                self.directory / "volumes.json",
                {
                    "version": 1,
                    "volumes": [
                        {
                            "name": v.info.name,
                            "id": v.info.id,
                            "size": v.info.size,
                            "replica": _relative(v.info.replica_path, self.directory),
                        }
                        for v in self._volumes.values()
                    ],
                },
            )

        await asyncio.get_running_loop().run_in_executor(self._io, persist)
        return info

    def volumes(self) -> list[VolumeInfo]:
        return [v.info for v in self._volumes.values()]

    def _volume(self, name: str) -> _Volume:
        try:
            return self._volumes[name]
        except KeyError:
            raise UnknownVolumeError(f"no volume {name!r} in journal {self.config.vpg}") from None

    # ------------------------------------------------------------------ appends

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def durable_seq(self) -> int:
        """Every record with seq <= durable_seq is on disk (and in the index)."""
        return self._durable_seq

    @property
    def promoted_seq(self) -> int:
        return self._promoted_seq

    @property
    def positions(self) -> Mapping[str, int]:
        """Replication source -> highest source seq whose POSITION record is durable (read-only,
        live). Survives reopen, crashes, promotion, failover rollback and commit."""
        return types.MappingProxyType(self._positions)

    @property
    def fsyncs(self) -> int:
        return self._writer.fsyncs

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosedError("journal is closed")
        if self._failed is not None:
            raise JournalIOError(f"journal stopped after an I/O error: {self._failed}")
        if self._failover_phase is not None:
            raise FailoverStateError(
                f"journal is in failover phase {self._failover_phase}: no appends"
            )

    def _submit(
        self,
        rtype: RecordType,
        volume: int,
        offset: int,
        length: int,
        payload: bytes | memoryview,
        checkpoint: Checkpoint | None = None,
        position: PositionPayload | None = None,
    ) -> _Queued:
        seq = self._next_seq
        self._next_seq += 1
        now = time.time_ns() if checkpoint is None else checkpoint.time_ns
        size = HEADER.size + len(payload)
        opens = None
        if (
            self._active_pos + size > self.config.segment_size
            and self._active_pos > SEGMENT_HEADER.size
        ) or (not self._active_prepared and self._spares.has_ready()):
            # Full, or a new file that appends grow while a spare is ready: roll.
            opens = self._new_segment(self._active_segno + 1, seq)
        header = encode_header(
            rtype, volume, seq, offset, length, now, payload, incarnation=self._active_incarnation
        )
        rec = PendingRecord(
            seq,
            self._active_segno,
            self._active_pos,
            header,
            payload,
            volume,
            offset,
            length,
            int(rtype),
            opens,
        )
        self._active_pos += size
        self._queued_bytes += size
        # Only checkpoint acks skip a hold (see hold_acks); a position's ack is held like a write's.
        future = asyncio.get_running_loop().create_future()
        q = _Queued(rec, future, checkpoint is None, checkpoint, position)
        self._queue.append(q)
        if self._flusher is None:
            self._idle.clear()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return q

    def _extent(self, volume: str, offset: int, length: int) -> _Volume:
        self._check_open()
        v = self._volume(volume)
        if offset < 0 or length < 0 or offset + length > v.info.size:
            raise OutOfRangeError(
                f"volume {volume}: [{offset}, {offset + length}) outside size {v.info.size}"
            )
        return v

    def submit_write(self, volume: str, offset: int, data: bytes | memoryview) -> PendingAppend:
        """Queue a write; the sequence number is fixed now, ``await`` the result for durability.

        ``data`` must not be modified until the append is durable.
        """
        v = self._extent(volume, offset, len(data))
        q = self._submit(RecordType.WRITE, v.info.id, offset, len(data), data)
        return PendingAppend(q.rec.seq, q.future)

    def submit_zero(self, volume: str, offset: int, length: int) -> PendingAppend:
        v = self._extent(volume, offset, length)
        q = self._submit(RecordType.ZERO, v.info.id, offset, length, b"")
        return PendingAppend(q.rec.seq, q.future)

    def submit_trim(self, volume: str, offset: int, length: int) -> PendingAppend:
        """Trimmed bytes read back as zeros from every later image."""
        v = self._extent(volume, offset, length)
        q = self._submit(RecordType.TRIM, v.info.id, offset, length, b"")
        return PendingAppend(q.rec.seq, q.future)

    def submit_position(self, source: str, source_seq: int) -> PendingAppend:
        """Record that ``source`` has been journaled up to ``source_seq``.

        The sequence number is fixed now, so the position becomes durable together with or
        after every record submitted before this call (submit a batch of the source's records,
        then its position: one group commit). Once durable, :attr:`positions` says so. It is
        no write to any volume. ValueError for a source name that is not 1..255 utf-8 bytes, a
        seq outside u64, or a seq lower than one already submitted for the source.
        """
        self._check_open()
        position = PositionPayload(source, source_seq)
        payload = encode_position(position)
        known = self._submitted_positions.get(source, 0)
        if source_seq < known:
            raise ValueError(f"source {source}: position {source_seq} is below {known}")
        self._submitted_positions[source] = source_seq
        q = self._submit(RecordType.POSITION, NO_VOLUME, 0, 0, payload, position=position)
        return PendingAppend(q.rec.seq, q.future)

    async def append_write(self, volume: str, offset: int, data: bytes | memoryview) -> int:
        p = self.submit_write(volume, offset, data)
        await p
        return p.seq

    async def append_zero(self, volume: str, offset: int, length: int) -> int:
        p = self.submit_zero(volume, offset, length)
        await p
        return p.seq

    async def append_trim(self, volume: str, offset: int, length: int) -> int:
        p = self.submit_trim(volume, offset, length)
        await p
        return p.seq

    async def _flush_loop(self) -> None:
        """Write and sync each batch on the I/O thread, then ack it. A large batch (from
        ``_OVERLAP_BYTES``) is synced on the sync thread instead, while the I/O thread writes
        the next large one (at most ``_SYNCS_AHEAD`` batches between write and ack). Acks go
        out in batch order."""
        loop = asyncio.get_running_loop()
        try:
            while (self._queue or self._syncing) and self._failed is None:
                large = self._queued_bytes >= _OVERLAP_BYTES
                if self._syncing and (not large or len(self._syncing) >= _SYNCS_AHEAD):
                    # Let appends gather into the next batch while the oldest sync runs.
                    await asyncio.wait([self._syncing[0]])
                    continue
                batch, self._queue = self._queue, []
                self._queued_bytes = 0
                records = [q.rec for q in batch]
                try:
                    if not large:
                        await loop.run_in_executor(self._io, self._writer.write_batch, records)
                        self.batches += 1
                        self._complete(batch)
                        continue
                    fd = await loop.run_in_executor(self._io, self._writer.write_unsynced, records)
                except Exception as exc:  # OSError, or a bug: never leave appenders hanging
                    self._fail(exc, batch)
                    break
                synced = loop.run_in_executor(self._sync, self._writer.sync, fd)
                self._syncing.append(synced)
                synced.add_done_callback(functools.partial(self._synced, batch))
            if self._syncing:  # a failure: let the syncs under way end before closing
                await asyncio.wait(list(self._syncing))
        finally:
            self._flusher = None
            self._idle.set()

    def _synced(self, batch: list[_Queued], fut: asyncio.Future[None]) -> None:
        """A batch's sync ended (callbacks run in sync order, which is batch order)."""
        self._syncing.popleft()
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None or self._failed is not None:
            self._fail(exc or self._failed or JournalIOError("sync cancelled"), batch)
            return
        self.batches += 1
        self._complete(batch)

    def _fail(self, exc: BaseException, batch: list[_Queued]) -> None:
        """Stop appending after an I/O error: fail ``batch`` and everything queued."""
        if self._failed is None:
            self._failed = exc
            log.error(self._log("journal: write failed, stopping", error=exc))
        err = JournalIOError(f"journal write failed: {self._failed}")
        for q in batch + self._queue:
            if not q.future.done():
                q.future.set_exception(err)
        self._queue = []
        self._queued_bytes = 0

    def _complete(self, batch: list[_Queued]) -> None:
        """A batch is durable: index it, then ack (unless acks are held).

        Runs on the event loop for every group commit, so the per-record work is one tuple;
        the index takes the batch's rows as one array.
        """
        rows: list[tuple[int, int, int, int, int, int, int]] = []
        cut = 0  # rows before it went into a segment sealed during this batch
        prev: PendingRecord | None = None
        for q in batch:
            r = q.rec
            if r.segno != self._tail_segno:
                self._end_run(prev, _row_array(rows[cut:]))
                cut = len(rows)
                self._seal(r.segno, r.seq)
            if q.checkpoint is not None:
                self._add_checkpoint(q.checkpoint, r.segno)
            elif q.position is not None:
                pp = q.position
                note_position(self._positions, pp.source, pp.source_seq)
                note_position(self._active_positions, pp.source, pp.source_seq)
                self._active_position_seq = r.seq
            else:
                pos = r.file_pos + HEADER.size
                rows.append((r.seq, r.volume, r.offset, r.length, pos, r.kind, r.segno))
            prev = r
        arr = _row_array(rows)
        self._end_run(prev, arr[cut:])
        if len(arr):
            self._index_rows(arr)
        self._durable_seq = batch[-1].rec.seq
        held = self._holds > 0
        for q in batch:
            if q.future.done():
                continue
            if held and q.holdable:
                self._held.append(q.future)
            else:
                q.future.set_result(None)

    def _end_run(self, last: PendingRecord | None, run: npt.NDArray[np.int64]) -> None:
        """The records of a batch that went into the tail segment, ``last`` the last of them
        (None if there were none): the segment's extent and rows."""
        if last is None:
            return
        info = self._seg_info[last.segno]
        info[1] = last.seq
        info[2] = last.file_pos + HEADER.size + len(last.payload)
        if len(run):
            self._active_rows.append(run[:, : len(REC_COLS)])

    def _add_checkpoint(self, cp: Checkpoint, segno: int) -> None:
        tags = {cp.id: cp.tag} if cp.tag is not None else {}
        self.checkpoints.append([cp.id], [cp.seq], [cp.time_ns], [cp.consistent], [segno], tags)
        for k, val in zip(CP_COLS, (cp.id, cp.seq, cp.time_ns, int(cp.consistent)), strict=True):
            self._active_cps[k].append(val)
        self._active_tags.update(tags)

    def _index_rows(self, arr: npt.NDArray[np.int64]) -> None:
        """Append durable data records (rows of _ROW columns) to their volumes' indexes."""
        vols = arr[:, 1]
        if (vols == vols[0]).all():
            groups = [(int(vols[0]), arr)]
        else:
            groups = [(int(v), arr[vols == v]) for v in np.unique(vols)]
        for vid, sub in groups:
            self._by_id[vid].index.append_many(
                seq=sub[:, 0],
                offset=sub[:, 2],
                length=sub[:, 3],
                seg=sub[:, 6],
                pos=sub[:, 4],
                kind=sub[:, 5],
            )

    def _seal(self, new_segno: int, first_seq: int) -> None:
        """The active segment is full: write its sidecar in the background, start the next."""
        old = self._tail_segno
        first, _last, size = self._seg_info[old]
        scan = SegmentScan(
            segno=old,
            first_seq=first,
            created_ns=0,
            valid_end=size,
            file_size=size,
            records=_columns(self._active_rows),
            checkpoints={
                k: np.asarray(v, dtype=bool if k == "consistent" else np.int64)
                for k, v in self._active_cps.items()
            },
            tags=dict(self._active_tags),
            positions=dict(self._active_positions),
            position_seq=self._active_position_seq,
        )
        self._seg_info[new_segno] = [first_seq, first_seq - 1, SEGMENT_HEADER.size]
        self._tail_segno = new_segno
        self._segments.add(new_segno, seg_path(self._segdir, new_segno))
        self._reset_active_rows()
        fut = asyncio.get_running_loop().run_in_executor(self._bg, self._write_sidecar, scan)
        fut.add_done_callback(self._sidecar_done)

    def _write_sidecar(self, scan: SegmentScan) -> None:
        if seg_path(self._segdir, scan.segno).exists():  # not promoted away meanwhile
            write_sidecar(self._segdir, scan)

    def _sidecar_done(self, fut: asyncio.Future[None]) -> None:
        exc = fut.exception()
        if exc is not None:
            # Only a cache: the segment is scanned at open instead.
            log.warning(self._log("journal: sidecar write failed", error=exc))

    async def _drain(self) -> None:
        while self._flusher is not None:
            await self._idle.wait()

    # ------------------------------------------------------------------ checkpoints

    @contextlib.asynccontextmanager
    async def hold_acks(self) -> AsyncIterator[None]:
        """Hold acks of new appends (they still become durable) until the block exits.

        The capture layer wraps the marking of a cut in this so that no write is acked between
        "every acked write is before the cut" and the mark. The hold time is recorded.
        """
        self._holds += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._holds -= 1
            self._hold_times.append(time.perf_counter() - start)
            if not self._holds:
                held, self._held = self._held, []
                for f in held:
                    if not f.done():
                        f.set_result(None)

    def hold_times(self) -> list[float]:
        """Recent ack-hold durations in seconds, oldest first."""
        return list(self._hold_times)

    def hold_percentiles(self) -> dict[str, float]:
        t = np.asarray(self._hold_times, dtype=np.float64)
        if not len(t):
            return {}
        return {
            "count": float(len(t)),
            "p50_ms": float(np.percentile(t, 50) * 1e3),
            "p99_ms": float(np.percentile(t, 99) * 1e3),
            "max_ms": float(t.max() * 1e3),
        }

    def mark_checkpoint(
        self, tag: str | None = None, consistent: bool = True, *, time_ns: int | None = None
    ) -> tuple[Checkpoint, PendingAppend]:
        """Synchronously mark a checkpoint after every record submitted so far, dated
        ``time_ns`` (default: now), e.g. when the hold of a cut across appliances started, which
        is earlier than the moment the cut reaches the journal. The date is kept between the
        newest checkpoint's and now, so checkpoint times never go backwards."""
        self._check_open()
        if tag == "":
            raise ValueError("a checkpoint tag must not be empty")
        now = time.time_ns()
        newest = self.checkpoints.newest()
        when = max(
            now if time_ns is None else min(time_ns, now),
            self._last_mark_ns,
            0 if newest is None else newest.time_ns,
        )
        self._last_mark_ns = when
        cp = Checkpoint(self._next_cid, self._next_seq, when, tag, consistent)
        payload = encode_checkpoint(CheckpointPayload(cp.id, consistent, tag))
        self._next_cid += 1
        q = self._submit(RecordType.CHECKPOINT, NO_VOLUME, 0, 0, payload, checkpoint=cp)
        return cp, PendingAppend(cp.seq, q.future)

    async def checkpoint(self, tag: str | None = None, consistent: bool = True) -> Checkpoint:
        """Take a checkpoint; returns once it is durable (with every record before it)."""
        async with self.hold_acks():
            cp, pending = self.mark_checkpoint(tag, consistent)
        await pending
        return cp

    def _resolve_checkpoint(self, checkpoint: Checkpoint | int) -> Checkpoint:
        cid = checkpoint if isinstance(checkpoint, int) else checkpoint.id
        cp = self.checkpoints.by_id(cid)
        if cp is None or cp.seq < self._promoted_seq or cp.seq > self._durable_seq + 1:
            raise UnknownCheckpointError(f"checkpoint {cid} is not in the journal's window")
        if cp.seq > self._durable_seq:
            raise UnknownCheckpointError(f"checkpoint {cid} is not durable yet")
        return cp

    # ------------------------------------------------------------------ images

    def _pin(self, seq: int) -> None:
        with self._pin_lock:
            self._pins[seq] += 1

    def _unpin(self, seq: int) -> None:
        with self._pin_lock:
            self._pins[seq] -= 1
            if self._pins[seq] <= 0:
                del self._pins[seq]

    def _min_pin(self) -> int | None:
        with self._pin_lock:
            return min(self._pins) if self._pins else None

    def _image_closed(self, img: PitImage) -> None:
        if img in self._images:
            self._images.discard(img)
            self._unpin(img.pin_seq)

    async def open_image(
        self, volume: str, checkpoint: Checkpoint | int, writable: bool = False
    ) -> PitImage:
        """The volume as it was at ``checkpoint``; with ``writable``, over a scratch overlay."""
        if self._closed:
            raise JournalClosedError("journal is closed")
        if self._failover_phase is not None:
            raise FailoverStateError("images cannot be opened during a failover")
        v = self._volume(volume)
        cp = self._resolve_checkpoint(checkpoint)
        if self._promoting_to is not None and cp.seq < self._promoting_to:
            raise UnknownCheckpointError(f"checkpoint {cp.id} is being promoted")
        self._pin(cp.seq)
        try:
            recs = RecordSnapshot.of(v.index)
            lo, hi = recs.rows_between(self._promoted_seq, cp.seq)
            extents = await asyncio.to_thread(build_extents, recs, lo, hi)
            overlay = ScratchOverlay(v.info.size, self._scratch) if writable else None
        except BaseException:
            self._unpin(cp.seq)
            raise
        img = PitImage(
            volume=volume,
            size=v.info.size,
            seq=cp.seq - 1,
            extents=extents,
            recs=recs,
            replica=v.replica,
            segments=self._segments,
            promoted_seq=lambda: self._promoted_seq,
            on_close=self._image_closed,
            overlay=overlay,
        )
        img.pin_seq = cp.seq
        self._images.add(img)
        return img

    async def open_latest(self, volume: str) -> PitImage:
        """A read-only view that follows the journal: each read sees every durable record.

        Up to ``_LATEST_FOLD_ROWS`` new records are laid over the view's map per read; beyond
        that the map is rebuilt, so a read costs little however fast the journal grows.
        """
        if self._closed:
            raise JournalClosedError("journal is closed")
        if self._failover_phase is not None:
            raise FailoverStateError("images cannot be opened during a failover")
        v = self._volume(volume)
        seq = self._durable_seq
        self._pin(seq)
        recs = RecordSnapshot.of(v.index)
        lo, hi = recs.rows_between(self._promoted_seq, seq)
        try:
            extents = await asyncio.to_thread(build_extents, recs, lo, hi)
        except BaseException:
            self._unpin(seq)
            raise
        base_rows = hi

        def refresh(img: PitImage) -> None:
            # Runs in a worker thread, under the image's lock; the event loop appends to
            # v.index meanwhile, so work on one consistent snapshot of it.
            nonlocal base_rows
            now = self._durable_seq
            if now == img.seq:
                return
            self._pin(now)
            self._unpin(img.pin_seq)
            img.pin_seq = now
            new = RecordSnapshot.of(v.index)
            top = len(new.seq)
            if new.generation != img.recs.generation:
                # Rows were dropped by a promotion: row numbers changed, rebuild the map.
                a, b = new.rows_between(self._promoted_seq, now)
                base_rows = b
                img._rebase(now, build_extents(new, a, b), new, (b, b))
            elif top - base_rows > _LATEST_FOLD_ROWS:
                img._rebase(now, extend_extents(img._extents, new, base_rows, top), new, (top, top))
                base_rows = top
            else:
                img._rebase(now, img._extents, new, (base_rows, top))

        img = PitImage(
            volume=volume,
            size=v.info.size,
            seq=seq,
            extents=extents,
            recs=recs,
            replica=v.replica,
            segments=self._segments,
            promoted_seq=lambda: self._promoted_seq,
            on_close=self._image_closed,
            refresh=refresh,
        )
        img.pin_seq = seq
        self._images.add(img)
        return img

    # ------------------------------------------------------------------ promotion

    def _write_state(self, **changes: Any) -> None:
        self._state.update(changes)
        write_json_atomic(self.directory / "state.json", self._state)

    def _snapshots(self) -> dict[int, RecordSnapshot]:
        return {vid: RecordSnapshot.of(v.index) for vid, v in self._by_id.items()}

    def _promote_sync(
        self, cp: Checkpoint, snaps: dict[int, RecordSnapshot], undo: UndoLog | None = None
    ) -> int:
        """Write the image at ``cp`` into the replicas (from the promoted watermark on) and
        fdatasync them. Idempotent: redoing it after a crash writes the same bytes."""
        total = 0
        for vid, v in self._by_id.items():
            recs = snaps[vid]
            lo, hi = recs.rows_between(self._promoted_seq, cp.seq)
            ext = build_extents(recs, lo, hi)
            total += self._apply(v.replica, vid, ext, recs, undo)
        for v in self._by_id.values():
            v.replica.sync()
        return total

    def _apply(
        self,
        replica: ReplicaFile,
        vid: int,
        ext: ExtentMap,
        recs: RecordSnapshot,
        undo: UndoLog | None,
    ) -> int:
        """Apply an extent map to a replica: zeroes as holes, writes read from the segments in
        large sequential windows. With ``undo``, the old bytes are saved (and synced) first."""
        starts, ends, vals = ext.starts, ext.ends, ext.values
        total = int((ends - starts).sum()) if len(starts) else 0
        # Work in journal order (segment, position): each segment is then read once, front to
        # back, however scattered the writes are in the volume.
        kinds = recs.kind[vals]
        seg = np.where(kinds == int(RecordType.WRITE), recs.seg[vals], -1)
        src = recs.pos[vals] + (starts - recs.offset[vals])
        order = np.lexsort((src, seg))
        starts, ends, vals, kinds = starts[order], ends[order], vals[order], kinds[order]
        # Undo entries are synced once per chunk, before the chunk touches the replica.
        chunk = len(starts) if undo is None else _UNDO_CHUNK_EXTENTS
        for a in range(0, len(starts), max(1, chunk)):
            b = a + chunk
            s, e, v = starts[a:b], ends[a:b], vals[a:b]
            if undo is not None:
                for x, y in zip(s.tolist(), e.tolist(), strict=True):
                    old = bytearray(y - x)
                    replica.pread_into(memoryview(old), x)
                    undo.save(vid, x, old)
                undo.sync()
            w = kinds[a:b] == int(RecordType.WRITE)
            for x, y in zip(s[~w].tolist(), e[~w].tolist(), strict=True):
                replica.zero(x, y - x)
            self._apply_writes(replica, s[w], e[w], v[w], recs)
        return total

    def _apply_writes(
        self,
        replica: ReplicaFile,
        s: npt.NDArray[np.int64],
        e: npt.NDArray[np.int64],
        v: npt.NDArray[np.int64],
        recs: RecordSnapshot,
    ) -> None:
        if not len(s):
            return
        seg = recs.seg[v]
        src = recs.pos[v] + (s - recs.offset[v])
        order = np.lexsort((src, seg))
        seg_l = seg[order].tolist()
        src_l = src[order].tolist()
        dst_l = s[order].tolist()
        len_l = (e - s)[order].tolist()
        n = len(order)
        # One reused buffer: fresh 32 MiB allocations per window cost more in page faults
        # than the copy from the page cache itself.
        window = bytearray(0)
        i = 0
        while i < n:
            segno, w0 = seg_l[i], src_l[i]
            w1 = w0 + len_l[i]
            j = i + 1
            while (
                j < n
                and seg_l[j] == segno
                and src_l[j] - w1 <= (1 << 20)
                and src_l[j] + len_l[j] - w0 <= (32 << 20)
            ):
                w1 = max(w1, src_l[j] + len_l[j])
                j += 1
            fd = self._segments.acquire(segno)
            if fd is None:
                raise CorruptJournalError(f"segment {segno} missing during promotion")
            if len(window) < w1 - w0:
                window = bytearray(w1 - w0)
            mv = memoryview(window)[: w1 - w0]
            try:
                got = 0
                while got < len(mv):
                    n_read = os.preadv(fd, [mv[got:]], w0 + got)
                    if n_read <= 0:
                        raise CorruptJournalError(f"segment {segno} shorter than its index says")
                    got += n_read
            finally:
                self._segments.release(segno)
            for k in range(i, j):
                at = src_l[k] - w0
                replica.pwrite(mv[at : at + len_l[k]], dst_l[k])
            replica.start_writeback()  # the final fdatasync then waits for less
            i = j

    def _retention_promote_sync(
        self, cp: Checkpoint, snaps: dict[int, RecordSnapshot], positions: dict[str, int]
    ) -> int:
        """``positions``: durable when ``cp`` was chosen, so they cover every POSITION record of
        the segments that go (all before ``cp``); saved with the watermark that lets them go."""
        self._write_state(promoting=cp.to_json())
        total = self._promote_sync(cp, snaps)
        self._write_state(
            promoting=None,
            promoted_seq=cp.seq,
            floor=cp.to_json(),
            positions=positions,
            next_seq=max(int(self._state["next_seq"]), cp.seq + 1),
            next_cid=max(int(self._state["next_cid"]), cp.id + 1),
        )
        return total

    def _after_promotion(self, cp: Checkpoint) -> list[int]:
        """Forget what the replica now holds: index rows, checkpoints, whole segments. Returns
        the segments to delete (see _delete_segments: slow, so not on the event loop)."""
        self._promoted_seq = cp.seq
        for v in self._volumes.values():
            n = int(np.searchsorted(v.index.view("seq"), cp.seq, side="right"))
            v.index.drop_prefix(n)
        self.checkpoints.drop_through(cp.seq, cp)
        gone = []
        for segno in sorted(self._seg_info):
            if segno >= self._active_segno or self._seg_info[segno][1] > cp.seq:
                break
            gone.append(segno)
            del self._seg_info[segno]
        return gone

    def _delete_segments(self, segnos: list[int]) -> None:
        for segno in segnos:
            self._segments.delete(segno, self._spares.adopt)

    async def promote(self, checkpoint: Checkpoint | int) -> int:
        """Promote every record before ``checkpoint`` into the replicas; it becomes the oldest
        checkpoint. Returns the bytes applied. Appends go on meanwhile."""
        async with self._promote_lock:
            if self._failover_phase is not None:
                raise FailoverStateError("no retention promotion during a failover")
            cp = self._resolve_checkpoint(checkpoint)
            if cp.seq <= self._promoted_seq:
                return 0
            pin = self._min_pin()
            if pin is not None and cp.seq > pin:
                raise ImagesOpenError(
                    f"an open image shows seq {pin}; cannot promote to seq {cp.seq}"
                )
            self._promoting_to = cp.seq
            try:
                total = await asyncio.to_thread(
                    self._retention_promote_sync, cp, self._snapshots(), dict(self._positions)
                )
            finally:
                self._promoting_to = None
            await asyncio.to_thread(self._delete_segments, self._after_promotion(cp))
            log.info(self._log("journal: promoted", checkpoint=cp.id, seq=cp.seq, bytes=total))
            return total

    def _sealed_usage(self) -> SegmentUsage:
        sealed = [k for k in sorted(self._seg_info) if k < self._active_segno]
        return SegmentUsage(
            np.asarray([self._seg_info[k][1] for k in sealed], dtype=np.int64),
            np.asarray([self._seg_info[k][2] for k in sealed], dtype=np.int64),
        )

    def used_bytes(self) -> int:
        """Bytes of the segments up to their last durable record (the journal's use against
        its hard limit); space written ahead is :meth:`prepared_bytes`."""
        return sum(info[2] for info in self._seg_info.values())

    def prepared_bytes(self) -> int:
        """Bytes written ahead of the records: spare files and the active segment's unused part."""
        unused = max(0, self._active_prepared - self._active_pos)
        return self._spares.spare_bytes() + unused

    def _plan(self, now_ns: int, capped: bool) -> Checkpoint | None:
        cols = self.checkpoints.columns()
        i = plan_promotion(
            now_ns=now_ns,
            policy=self.config.retention,
            cp_seq=cols["seq"],
            cp_time_ns=cols["time_ns"],
            segments=self._sealed_usage(),
            used_bytes=self.used_bytes(),
            promoted_seq=self._promoted_seq,
            max_seq=self._min_pin() if capped else None,
        )
        return None if i is None else self.checkpoints.by_id(int(cols["cid"][i]))

    async def enforce_retention(self, now_ns: int | None = None) -> Checkpoint | None:
        """Promote if history or the hard limit is exceeded; returns the new oldest checkpoint."""
        if self._failover_phase is not None or self._promote_lock.locked():
            return None
        cp = self._plan(now_ns or time.time_ns(), capped=True)
        if cp is None:
            return None
        await self.promote(cp)
        return cp

    def status(self, now_ns: int | None = None) -> JournalStatus:
        now = now_ns or time.time_ns()
        oldest = self.checkpoints.oldest()
        wanted = self._plan(now, capped=False)
        allowed = self._plan(now, capped=True)
        blocked = None
        if wanted is not None and (allowed is None or allowed.seq < wanted.seq):
            blocked = self._min_pin()
        return JournalStatus(
            retention=history_status(
                now_ns=now,
                created_ns=int(self._state["created_ns"]),
                policy=self.config.retention,
                oldest_cp_time_ns=None if oldest is None else oldest.time_ns,
                used_bytes=self.used_bytes(),
            ),
            oldest_checkpoint=oldest,
            newest_checkpoint=self.checkpoints.newest(),
            checkpoint_count=len(self.checkpoints),
            promoted_seq=self._promoted_seq,
            durable_seq=self._durable_seq,
            failover_phase=self._failover_phase,
            promotion_blocked_at_seq=blocked,
            prepared_bytes=self.prepared_bytes(),
        )

    # ------------------------------------------------------------------ failover

    @property
    def failover_phase(self) -> str | None:
        """None, or "promoted" between promote_to() and commit()/rollback()."""
        return self._failover_phase

    @property
    def committed_failover(self) -> Checkpoint | None:
        """The checkpoint of the newest failover committed in this journal (survives reopen):
        what reverse protection asks for before the replicas become the volumes."""
        raw = self._state.get("committed_failover")
        return None if raw is None else Checkpoint.from_json(raw)

    async def promote_to(self, checkpoint: Checkpoint | int) -> Checkpoint:
        """Make every replica equal to its image at ``checkpoint`` (live failover).

        Appends are refused until commit() or rollback(); no image may be open. See failover.py.
        """
        async with self._promote_lock:
            if self._failover_phase is not None:
                raise FailoverStateError(f"already in failover phase {self._failover_phase}")
            self._check_open()
            if self._images:
                raise ImagesOpenError(f"{len(self._images)} images are open")
            cp = self._resolve_checkpoint(checkpoint)
            self._failover_phase = "promoting"
            await self._drain()
            try:
                await asyncio.to_thread(self._promote_to_sync, cp, self._snapshots())
            except BaseException:
                await asyncio.to_thread(self._rollback_sync)
                self._failover_phase = None
                raise
            self._failover_phase = "promoted"
            log.info(self._log("journal: promoted to checkpoint for failover", checkpoint=cp.id))
            return cp

    def _promote_to_sync(self, cp: Checkpoint, snaps: dict[int, RecordSnapshot]) -> None:
        self._write_state(failover={"phase": "promoting", "checkpoint": cp.to_json()})
        undo = UndoLog(self.directory / "failover.undo")
        try:
            self._promote_sync(cp, snaps, undo)
            mark = undo.size()
        finally:
            undo.close()
        self._write_state(
            failover={"phase": "promoted", "checkpoint": cp.to_json(), "workload_undo_from": mark}
        )

    def failover_volume(self, volume: str) -> FailoverVolume:
        """The recovered volume (the replica, written in place) while promoted to a checkpoint;
        its writes are undone by rollback()."""
        if self._failover_phase != "promoted":
            raise FailoverStateError("failover_volume() needs a promote_to() first")
        v = self._volume(volume)
        fv = self._failover_volumes.get(volume)
        if fv is None:
            if self._failover_undo is None:
                self._failover_undo = UndoLog(self.directory / "failover.undo")
            start = int(self._state["failover"].get("workload_undo_from", 0))
            saved = {
                g
                for vid, off, _at, length in self._failover_undo.entries(start)
                if vid == v.info.id
                for g in range(off // GRAIN, (off + length + GRAIN - 1) // GRAIN)
            }
            fv = FailoverVolume(volume, v.info.id, v.replica, self._failover_undo, saved)
            self._failover_volumes[volume] = fv
        return fv

    def _close_failover_volumes(self) -> None:
        for fv in self._failover_volumes.values():
            fv.close()
        self._failover_volumes.clear()
        if self._failover_undo is not None:
            self._failover_undo.close()
            self._failover_undo = None

    async def commit(self) -> None:
        """Keep the failover: the checkpoint becomes the promoted watermark; all records after
        it are dropped (as are those before it, now in the replica)."""
        async with self._promote_lock:
            if self._failover_phase != "promoted":
                raise FailoverStateError("commit() needs a promote_to() first")
            cp = Checkpoint.from_json(self._state["failover"]["checkpoint"])
            self._close_failover_volumes()
            await asyncio.to_thread(self._commit_sync, cp)
            self._failover_phase = None

    def _commit_sync(self, cp: Checkpoint) -> None:
        # Positions say what was received, not what is applied: kept although the records after
        # ``cp`` go. No append runs during a failover, so they cannot change meanwhile.
        self._write_state(
            failover={"phase": "committing", "checkpoint": cp.to_json()},
            promoted_seq=cp.seq,
            floor=cp.to_json(),
            positions=dict(self._positions),
            next_seq=max(int(self._state["next_seq"]), self._next_seq),
            next_cid=max(int(self._state["next_cid"]), self._next_cid),
        )
        self._writer.close(trim=False)
        last = max([*self._seg_info, *list_segments(self._segdir), 0])
        for segno in list_segments(self._segdir):
            self._segments.delete(segno, self._spares.adopt)
            seg_path(self._segdir, segno).unlink(missing_ok=True)
            seg_path(self._segdir, segno).with_suffix(".idx").unlink(missing_ok=True)
        self._seg_info.clear()
        fsync_dir(self._segdir)
        self._promoted_seq = cp.seq
        self._next_seq = int(self._state["next_seq"])
        self._next_cid = int(self._state["next_cid"])
        for v in self._volumes.values():
            v.index.drop_prefix(v.index.n)
        self.checkpoints.drop_after(cp.seq)
        self.checkpoints.drop_through(cp.seq, cp)
        self._new_first_segment(last + 1)
        UndoLog(self.directory / "failover.undo").remove()
        self._write_state(failover=None, committed_failover=cp.to_json())
        log.info(self._log("journal: failover committed", checkpoint=cp.id, seq=cp.seq))

    async def rollback(self) -> None:
        """Undo promote_to(): the replicas and the journal are as before it; appends resume."""
        async with self._promote_lock:
            if self._failover_phase != "promoted":
                raise FailoverStateError("rollback() needs a promote_to() first")
            self._close_failover_volumes()
            await asyncio.to_thread(self._rollback_sync)
            self._failover_phase = None

    def _rollback_sync(self) -> None:
        fo = self._state.get("failover") or {}
        self._write_state(failover={**fo, "phase": "rolling_back"})
        undo = UndoLog(self.directory / "failover.undo")
        n = undo.rollback({vid: v.replica for vid, v in self._by_id.items()})
        undo.remove()
        self._write_state(failover=None)
        log.info(self._log("journal: failover rolled back", undo_entries=n))


def discard_journal(directory: Path) -> None:
    """Delete the files of a closed journal in ``directory`` except its replicas: reverse
    protection keeps the replicas as the volumes themselves, and a journal opened there later
    must start empty (no stale positions, checkpoints or volume table). No directory, nothing
    to do."""
    if not directory.is_dir():
        return
    for name in ("state.json", "volumes.json", "failover.undo"):
        (directory / name).unlink(missing_ok=True)
    for sub in ("segments", "scratch"):
        shutil.rmtree(directory / sub, ignore_errors=True)
    fsync_dir(directory)


_ROW = (*REC_COLS, "seg")
"""Columns of the rows _complete collects: the index columns of a record, then its segment."""


def _row_array(rows: list[tuple[int, int, int, int, int, int, int]]) -> npt.NDArray[np.int64]:
    return np.array(rows, dtype=np.int64).reshape(-1, len(_ROW))


def _columns(chunks: list[npt.NDArray[np.int64]]) -> dict[str, npt.NDArray[Any]]:
    """Index columns from row chunks (REC_COLS)."""
    rows = np.concatenate(chunks) if chunks else np.zeros((0, len(REC_COLS)), dtype=np.int64)
    return {k: rows[:, i].astype(REC_DTYPES[k]) for i, k in enumerate(REC_COLS)}


def _relative(path: Path, directory: Path) -> str:
    """Replica paths inside the journal directory are stored relative, so it can be moved."""
    try:
        return str(path.relative_to(directory))
    except ValueError:
        return str(path)
