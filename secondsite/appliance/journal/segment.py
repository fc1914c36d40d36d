"""Segment files: naming, scanning (with torn-tail detection), per-segment index sidecars, and
reference-counted read handles.

Layout of a journal directory's ``segments/`` folder::

    0000000000000001.seg   segment 1: 64-byte segment header, then records (see record.py)
    0000000000000001.idx   index sidecar of segment 1, written once the segment is sealed
    0000000000000002.seg   the active segment (no sidecar yet)
    0000000000000007.spare written space for a later segment (spares.py)

Segment numbers increase by one and sort lexically, so the order is obvious from a listing. A
sealed segment's file ends at its last record. The active segment's file may go on after it:
zeros, or records of an earlier incarnation if the file was recycled (record.py), which the scan
does not take. At open the journal cuts that tail, telling a clean end (only such prepared space)
from a torn one (bytes this incarnation wrote but did not finish: :func:`torn_extent`). A
sidecar holds the segment's index columns, checkpoint rows and source positions so that opening a
journal reads only the active segment; a sidecar that is missing, damaged, of another version or
does not match its segment's size is ignored, and the segment is scanned instead (and its sidecar
written anew).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from .errors import CorruptJournalError
from .record import (
    HEADER,
    NO_VOLUME,
    POSITION_PAYLOAD_MAX,
    POSITION_PAYLOAD_MIN,
    RECORD_MAGIC,
    RECORD_VERSION,
    SEGMENT_HEADER,
    RecordType,
    SegmentHeader,
    crc32c,
    crc_ok,
    decode_checkpoint,
    decode_header,
    decode_position,
    decode_segment_header,
)

__all__ = [
    "CP_COLS",
    "CP_DTYPES",
    "REC_COLS",
    "REC_DTYPES",
    "SegmentScan",
    "SegmentSet",
    "fsync_dir",
    "idx_path",
    "list_segments",
    "load_sidecar",
    "note_position",
    "read_segment_header",
    "scan_headers",
    "scan_segment",
    "seg_path",
    "torn_extent",
    "write_sidecar",
]

SCAN_CHUNK = 16 << 20

REC_COLS = ("seq", "vol", "offset", "length", "pos", "kind")
CP_COLS = ("cid", "seq", "time_ns", "consistent")

_SIDECAR_MAGIC = b"SSJIDX\r\n"
_SIDECAR_VERSION = 2
"""2: source positions added (a version 1 sidecar is ignored: its segment is rescanned)."""
#: magic, version, segno, segment size, records, checkpoints, tags bytes, seq of the last
#: POSITION record, positions bytes, crc of the body
_SIDECAR = struct.Struct("<8sHIQQQIQII")


def seg_path(directory: Path, segno: int) -> Path:
    return directory / f"{segno:016d}.seg"


def idx_path(directory: Path, segno: int) -> Path:
    return directory / f"{segno:016d}.idx"


def list_segments(directory: Path) -> list[int]:
    """Segment numbers present in ``directory``, ascending."""
    out = []
    for p in directory.glob("*.seg"):
        try:
            out.append(int(p.stem))
        except ValueError:
            continue
    return sorted(out)


def read_segment_header(f: BinaryIO, path: Path) -> SegmentHeader:
    """The header of segment file ``path`` (open as ``f``); CorruptJournalError if it is bad
    or names another segment."""
    hdr = decode_segment_header(f.read(SEGMENT_HEADER.size))
    if hdr is None:
        raise CorruptJournalError(f"bad segment header in {path.name}")
    if path.stem.isdigit() and hdr.segno != int(path.stem):
        raise CorruptJournalError(f"{path.name} has the header of segment {hdr.segno}")
    return hdr


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SegmentScan:
    """What one segment holds: index columns of its records and its checkpoint rows."""

    segno: int
    first_seq: int
    created_ns: int
    valid_end: int
    file_size: int
    records: dict[str, npt.NDArray[Any]]
    checkpoints: dict[str, npt.NDArray[Any]]
    tags: dict[int, str] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    """Per replication source, the highest source seq of the segment's POSITION records."""
    position_seq: int = 0
    """Sequence number of the segment's last POSITION record (0 if it holds none)."""
    from_sidecar: bool = False
    """Loaded from a current sidecar (otherwise the journal writes one for a sealed segment)."""
    incarnation: int = 0
    """The segment header's incarnation, which each of its records carries."""
    recycled: bool = False
    """The file held an earlier segment (bytes after the records may be old records)."""

    @property
    def torn_bytes(self) -> int:
        return self.file_size - self.valid_end

    @property
    def last_seq(self) -> int:
        """Highest sequence number in the segment (first_seq - 1 if it holds no record)."""
        seqs = [self.first_seq - 1]
        if len(self.records["seq"]):
            seqs.append(int(self.records["seq"][-1]))
        if len(self.checkpoints["seq"]):
            seqs.append(int(self.checkpoints["seq"][-1]))
        seqs.append(self.position_seq)
        return max(seqs)


def _empty_cols(names: tuple[str, ...], kinds: dict[str, Any]) -> dict[str, npt.NDArray[Any]]:
    return {k: np.zeros(0, dtype=kinds[k]) for k in names}


REC_DTYPES: dict[str, Any] = {
    "seq": np.int64,
    "vol": np.int64,
    "offset": np.int64,
    "length": np.int64,
    "pos": np.int64,
    "kind": np.uint8,
}
CP_DTYPES: dict[str, Any] = {
    "cid": np.int64,
    "seq": np.int64,
    "time_ns": np.int64,
    "consistent": np.bool_,
}


def note_position(positions: dict[str, int], source: str, source_seq: int) -> None:
    """Fold one POSITION record into ``positions`` (highest source seq per source)."""
    if source_seq > positions.get(source, -1):
        positions[source] = source_seq


def _decode_position(payload: bytes | memoryview, path: Path) -> tuple[str, int]:
    try:
        p = decode_position(payload)
    except ValueError as exc:  # the CRC was good, or the segment is sealed: not a torn tail
        raise CorruptJournalError(f"bad POSITION record in {path.name}: {exc}") from None
    return p.source, p.source_seq


def scan_segment(path: Path, *, verify_crc: bool) -> SegmentScan:
    """Read a segment's records front to back until the first invalid one.

    With ``verify_crc`` every record's CRC is checked (payloads are read); without it, payloads of
    large records are skipped by seeking and only headers are checked for plausibility. The scan
    stops at the first record that is truncated, implausible, out of sequence or fails its CRC:
    ``valid_end`` is where it stopped. Raises CorruptJournalError if the segment header is bad.
    """
    if not verify_crc:
        return scan_headers(path)
    cols: dict[str, list[int]] = {k: [] for k in REC_COLS}
    cps: dict[str, list[int]] = {k: [] for k in CP_COLS}
    tags: dict[int, str] = {}
    positions: dict[str, int] = {}
    position_seq = 0
    with open(path, "rb", buffering=0) as f:
        file_size = os.fstat(f.fileno()).st_size
        hdr = read_segment_header(f, path)
        segno, first_seq, created_ns, incarnation, _ = hdr
        pos = SEGMENT_HEADER.size
        last_seq = first_seq - 1
        chunk = b""
        chunk_at = pos
        fd = f.fileno()
        while pos + HEADER.size <= file_size:
            rel = pos - chunk_at
            if rel < 0 or rel + HEADER.size > len(chunk):
                chunk = os.pread(fd, SCAN_CHUNK, pos)
                chunk_at, rel = pos, 0
            h = decode_header(chunk, rel)
            if h is None or h.incarnation != incarnation or h.seq <= last_seq or not _plausible(h):
                break
            end = pos + HEADER.size + h.payload_len
            if end > file_size:
                break
            if verify_crc:
                if rel + HEADER.size + h.payload_len <= len(chunk):
                    hb = memoryview(chunk)[rel : rel + HEADER.size]
                    payload: bytes | memoryview = memoryview(chunk)[
                        rel + HEADER.size : rel + HEADER.size + h.payload_len
                    ]
                else:
                    whole = os.pread(fd, HEADER.size + h.payload_len, pos)
                    hb, payload = memoryview(whole)[: HEADER.size], memoryview(whole)[HEADER.size :]
                if not crc_ok(hb, payload, h.crc):
                    break
            if h.type == RecordType.CHECKPOINT:
                if verify_crc:
                    cpp = decode_checkpoint(payload)
                else:
                    cpp = decode_checkpoint(os.pread(fd, h.payload_len, pos + HEADER.size))
                cps["cid"].append(cpp.checkpoint_id)
                cps["seq"].append(h.seq)
                cps["time_ns"].append(h.time_ns)
                cps["consistent"].append(int(cpp.consistent))
                if cpp.tag is not None:
                    tags[cpp.checkpoint_id] = cpp.tag
            elif h.type == RecordType.POSITION:
                note_position(positions, *_decode_position(payload, path))
                position_seq = h.seq
            else:
                cols["seq"].append(h.seq)
                cols["vol"].append(h.volume)
                cols["offset"].append(h.offset)
                cols["length"].append(h.length)
                cols["pos"].append(pos + HEADER.size)
                cols["kind"].append(int(h.type))
            last_seq = h.seq
            pos = end
    return SegmentScan(
        segno=segno,
        first_seq=first_seq,
        created_ns=created_ns,
        valid_end=pos,
        file_size=file_size,
        records={k: np.asarray(v, dtype=REC_DTYPES[k]) for k, v in cols.items()},
        checkpoints={k: np.asarray(v, dtype=CP_DTYPES[k]) for k, v in cps.items()},
        tags=tags,
        positions=positions,
        position_seq=position_seq,
        incarnation=incarnation,
        recycled=hdr.recycled,
    )


_HDR_DTYPE = np.dtype(
    [
        ("magic", "S4"),
        ("version", "u1"),
        ("type", "u1"),
        ("flags", "<u2"),
        ("volume", "<u4"),
        ("plen", "<u4"),
        ("seq", "<i8"),
        ("offset", "<i8"),
        ("length", "<i8"),
        ("time_ns", "<i8"),
        ("crc", "<u4"),
        ("reserved", "<u4"),  # the incarnation
    ]
)
assert _HDR_DTYPE.itemsize == HEADER.size
_SPECULATE_MAX = 1 << 16


def scan_headers(path: Path) -> SegmentScan:
    """Index a sealed segment from its record headers alone (no CRC check), vectorised.

    Record positions depend on the lengths before them, so they cannot be computed all at once;
    but a workload writes runs of records of one size. From each header, the scan guesses that
    the next K records have the same size, gathers those K headers from a memory map with one
    numpy fancy-index (touching only the pages that hold headers, so large payloads are skipped)
    and keeps the prefix that is valid. K doubles while guesses hold. The records accepted are
    the same as scan_segment(verify_crc=False) would accept record by record.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        hdr = read_segment_header(f, path)
        segno, first_seq, created_ns, incarnation, _ = hdr
        parts: list[npt.NDArray[Any]] = []
        offsets: list[npt.NDArray[np.int64]] = []
        pos = SEGMENT_HEADER.size
        if file_size >= pos + HEADER.size:
            mm = np.memmap(f, dtype=np.uint8, mode="r")
            last_seq = first_seq - 1
            k = 16
            span = np.arange(HEADER.size, dtype=np.int64)
            while pos + HEADER.size <= file_size:
                first = mm[pos : pos + HEADER.size].copy().view(_HDR_DTYPE)
                size = HEADER.size + int(first["plen"][0])
                count = max(1, min(k, (file_size - pos) // size))
                at = pos + size * np.arange(count, dtype=np.int64)
                heads = mm[(at[:, None] + span).ravel()].reshape(count, HEADER.size)
                h = heads.view(_HDR_DTYPE).ravel()
                ok = _valid_headers(h, size, last_seq, incarnation, at + size <= file_size)
                bad = np.flatnonzero(~ok)
                good = int(bad[0]) if len(bad) else count
                if good == 0:
                    break
                parts.append(h[:good].copy())
                offsets.append(at[:good])
                last_seq = int(h["seq"][good - 1])
                pos += good * size
                k = min(k * 2, _SPECULATE_MAX) if good == count else 16
            del mm
        recs = np.concatenate(parts) if parts else np.zeros(0, dtype=_HDR_DTYPE)
        at_all = np.concatenate(offsets) if offsets else np.zeros(0, dtype=np.int64)
        is_cp = recs["type"] == int(RecordType.CHECKPOINT)
        is_pos = recs["type"] == int(RecordType.POSITION)
        is_data = ~(is_cp | is_pos)
        data = recs[is_data]
        cps: dict[str, list[int]] = {k: [] for k in CP_COLS}
        tags: dict[int, str] = {}
        positions: dict[str, int] = {}
        position_seq = 0
        for i in np.flatnonzero(is_pos).tolist():
            payload = os.pread(f.fileno(), int(recs["plen"][i]), int(at_all[i]) + HEADER.size)
            note_position(positions, *_decode_position(payload, path))
            position_seq = int(recs["seq"][i])
        for i in np.flatnonzero(is_cp).tolist():
            payload = os.pread(f.fileno(), int(recs["plen"][i]), int(at_all[i]) + HEADER.size)
            cpp = decode_checkpoint(payload)
            cps["cid"].append(cpp.checkpoint_id)
            cps["seq"].append(int(recs["seq"][i]))
            cps["time_ns"].append(int(recs["time_ns"][i]))
            cps["consistent"].append(int(cpp.consistent))
            if cpp.tag is not None:
                tags[cpp.checkpoint_id] = cpp.tag
    return SegmentScan(
        segno=segno,
        first_seq=first_seq,
        created_ns=created_ns,
        valid_end=pos,
        file_size=file_size,
        records={
            "seq": data["seq"].astype(np.int64),
            "vol": data["volume"].astype(np.int64),
            "offset": data["offset"].astype(np.int64),
            "length": data["length"].astype(np.int64),
            "pos": at_all[is_data] + HEADER.size,
            "kind": data["type"].astype(np.uint8),
        },
        checkpoints={k: np.asarray(v, dtype=CP_DTYPES[k]) for k, v in cps.items()},
        tags=tags,
        positions=positions,
        position_seq=position_seq,
        incarnation=incarnation,
        recycled=hdr.recycled,
    )


def _valid_headers(
    h: npt.NDArray[Any], size: int, last_seq: int, incarnation: int, fits: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_]:
    """Per header: plausible, of the segment's incarnation, of record size ``size``, and in
    increasing sequence order."""
    t = h["type"]
    plen = h["plen"].astype(np.int64)
    no_vol = h["volume"] == NO_VOLUME
    write = (t == int(RecordType.WRITE)) & (plen == h["length"]) & ~no_vol
    zero = ((t == int(RecordType.ZERO)) | (t == int(RecordType.TRIM))) & (plen == 0) & ~no_vol
    cp = (t == int(RecordType.CHECKPOINT)) & no_vol & (h["length"] == 0)
    position = (
        (t == int(RecordType.POSITION))
        & no_vol
        & (h["length"] == 0)
        & (plen >= POSITION_PAYLOAD_MIN)
        & (plen <= POSITION_PAYLOAD_MAX)
    )
    seq = h["seq"]
    prev = np.empty_like(seq)
    prev[0] = last_seq
    prev[1:] = seq[:-1]
    ok: npt.NDArray[np.bool_] = (
        (h["magic"] == RECORD_MAGIC)
        & (h["version"] == RECORD_VERSION)
        & (h["reserved"] == incarnation)
        & (write | zero | cp | position)
        & (plen + HEADER.size == size)
        & (seq > prev)
        & fits
    )
    # A record after an invalid one is not valid, whatever it looks like.
    return np.logical_and.accumulate(ok)


def _plausible(h: Any) -> bool:
    if h.type == RecordType.WRITE:
        return bool(h.payload_len == h.length and h.volume != NO_VOLUME)
    if h.type in (RecordType.ZERO, RecordType.TRIM):
        return bool(h.payload_len == 0 and h.volume != NO_VOLUME)
    if h.type == RecordType.POSITION:
        return bool(
            h.volume == NO_VOLUME
            and h.length == 0
            and POSITION_PAYLOAD_MIN <= h.payload_len <= POSITION_PAYLOAD_MAX
        )
    return bool(h.type == RecordType.CHECKPOINT and h.volume == NO_VOLUME and h.length == 0)


def torn_extent(path: Path, scan: SegmentScan) -> int:
    """Bytes after the last record of ``scan`` that its own incarnation wrote: a torn tail, as
    opposed to space prepared ahead of the records. 0 for a clean end.

    In a file that held no earlier segment, prepared space is zeros, so the torn extent reaches
    to the last non-zero byte. In a recycled one, old records and their payloads are expected
    after the end; the torn extent reaches to the end of the last record header of this
    incarnation found there. Reads the whole tail (at most a segment: like the scan itself).
    """
    torn_end = scan.valid_end
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        at = scan.valid_end
        while at < scan.file_size:
            # A little more than a chunk, so that a header straddling chunks is seen whole.
            chunk = os.pread(fd, SCAN_CHUNK + HEADER.size, at)
            body = len(chunk) if len(chunk) <= SCAN_CHUNK else SCAN_CHUNK
            if not scan.recycled:
                nonzero = len(chunk[:body].rstrip(b"\0"))
                if nonzero:
                    torn_end = at + nonzero
            else:
                k = chunk.find(RECORD_MAGIC, 0, body + len(RECORD_MAGIC) - 1)
                while 0 <= k < body:
                    h = decode_header(chunk, k)
                    if h is not None and h.incarnation == scan.incarnation:
                        torn_end = max(torn_end, at + k + HEADER.size + h.payload_len)
                    k = chunk.find(RECORD_MAGIC, k + 1, body + len(RECORD_MAGIC) - 1)
            if not chunk:
                break
            at += body
    return min(torn_end, scan.file_size) - scan.valid_end


def write_sidecar(directory: Path, scan: SegmentScan) -> None:
    """Persist a sealed segment's index (tmp file + fsync + rename; the dir is fsynced later)."""
    parts = [np.ascontiguousarray(scan.records[k], dtype=REC_DTYPES[k]).tobytes() for k in REC_COLS]
    parts += [
        np.ascontiguousarray(scan.checkpoints[k], dtype=CP_DTYPES[k]).tobytes() for k in CP_COLS
    ]
    tags = json.dumps({str(k): v for k, v in scan.tags.items()}).encode()
    positions = json.dumps(scan.positions).encode()
    parts += [tags, positions]
    body = b"".join(parts)
    crc = crc32c(body)
    head = _SIDECAR.pack(
        _SIDECAR_MAGIC,
        _SIDECAR_VERSION,
        scan.segno,
        scan.valid_end,
        len(scan.records["seq"]),
        len(scan.checkpoints["seq"]),
        len(tags),
        scan.position_seq,
        len(positions),
        crc,
    )
    final = idx_path(directory, scan.segno)
    tmp = final.with_suffix(".idx.tmp")
    with open(tmp, "wb") as f:
        f.write(head + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def load_sidecar(
    directory: Path, segno: int, first_seq: int, created_ns: int
) -> SegmentScan | None:
    """Load a sidecar if it is intact and matches its segment file; None otherwise."""
    try:
        raw = idx_path(directory, segno).read_bytes()
        seg_size = seg_path(directory, segno).stat().st_size
    except FileNotFoundError:
        return None
    if len(raw) < _SIDECAR.size:
        return None
    magic, version, sno, size, nrec, ncp, tlen, pseq, plen, crc = _SIDECAR.unpack_from(raw)
    body = memoryview(raw)[_SIDECAR.size :]
    if (
        magic != _SIDECAR_MAGIC
        or version != _SIDECAR_VERSION
        or sno != segno
        or size != seg_size
        or crc32c(body) != crc
    ):
        return None
    at = 0
    recs: dict[str, npt.NDArray[Any]] = {}
    for k in REC_COLS:
        dt = np.dtype(REC_DTYPES[k])
        recs[k] = np.frombuffer(body, dtype=dt, count=nrec, offset=at).copy()
        at += dt.itemsize * nrec
    cps: dict[str, npt.NDArray[Any]] = {}
    for k in CP_COLS:
        dt = np.dtype(CP_DTYPES[k])
        cps[k] = np.frombuffer(body, dtype=dt, count=ncp, offset=at).copy()
        at += dt.itemsize * ncp
    if at + tlen + plen != len(body):
        return None
    tags = {int(k): str(v) for k, v in json.loads(bytes(body[at : at + tlen]).decode()).items()}
    raw_positions = json.loads(bytes(body[at + tlen :]).decode())
    positions = {str(k): int(v) for k, v in raw_positions.items()}
    return SegmentScan(
        segno, first_seq, created_ns, size, size, recs, cps, tags, positions, pseq, True
    )


class _Handle:
    __slots__ = ("deleted", "fd", "path", "refs")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.refs = 0
        self.deleted = False


class SegmentSet:
    """Read handles of the journal's segments, reference counted so that a segment can be deleted
    (after promotion) while a reader is in the middle of a pread: the fd is closed by whichever of
    delete() and the last release() comes second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, _Handle] = {}

    def add(self, segno: int, path: Path) -> None:
        with self._lock:
            self._handles[segno] = _Handle(path)

    def acquire(self, segno: int) -> int | None:
        with self._lock:
            h = self._handles.get(segno)
            if h is None:
                return None
            h.refs += 1
            return h.fd

    def release(self, segno: int) -> None:
        fd = -1
        with self._lock:
            h = self._handles[segno]
            h.refs -= 1
            if h.deleted and h.refs == 0:
                fd = h.fd
                del self._handles[segno]
        if fd >= 0:
            os.close(fd)

    def delete(self, segno: int, recycle: Callable[[Path], bool] | None = None) -> None:
        """Forget a segment for new readers and remove its files: ``recycle(path)`` may take the
        segment file (True: it renamed it) if no reader is in it; otherwise it is unlinked and
        closed when the last reader leaves.

        The last close of an unlinked file frees its blocks, which takes a while for a big
        segment: it happens outside the lock (and callers call this from a worker thread).
        """
        fd = -1
        with self._lock:
            h = self._handles.get(segno)
            if h is None:
                return
            h.deleted = True
            if h.refs == 0:
                fd = h.fd
                del self._handles[segno]
        h.path.with_suffix(".idx").unlink(missing_ok=True)
        # A reader still in the file must see the old bytes: recycled files are overwritten.
        if not (fd >= 0 and recycle is not None and recycle(h.path)):
            h.path.unlink(missing_ok=True)
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for h in self._handles.values():
                os.close(h.fd)
            self._handles.clear()
