"""The oracle of write-order fidelity: a dependent-write workload and the check of every checkpoint.

The workload issues one 4 KiB write at a time, each only after the previous one was acked (the
dependent writes of a database: log record, then data page, then commit), alternating across the
volumes of one VPG, at random block offsets of a small region so that blocks are overwritten. Every
block written is filled with a stamp of (workload sequence number, volume, offset), so an image
tells which write put each block there.

For a checkpoint, the newest stamp visible in any volume's image names the prefix P of the workload
the image claims to hold. The check: every volume's image equals the replay of writes 1..P exactly
(no block older or newer than the replay, nothing outside the written blocks), and P contains every
write acked before the checkpoint was marked. A write whose ack never arrived (the appliance was
killed while it was in flight) is *uncertain*: it may be there or not, and a later write may be
there without it only if a later write to the same block replaced it.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

BLOCK = 4096
_STAMP = struct.Struct("<8sQQQ")
_MAGIC = b"SSORACLE"
_ZERO = bytes(BLOCK)


def stamp(seq: int, volume: int, offset: int) -> bytes:
    """The content of a block written by workload write ``seq``."""
    return _STAMP.pack(_MAGIC, seq, volume, offset) * (BLOCK // _STAMP.size)


@dataclass
class Write:
    seq: int
    """Workload sequence number, from 1."""
    volume: int
    """Index into the workload's volume names."""
    offset: int
    ack_ns: int = 0
    """Wall-clock time the ack arrived (0: not acked)."""
    uncertain: bool = False
    """Sent, but the connection died before its ack: it may or may not have been captured."""


@dataclass
class Workload:
    """The writes of a dependent-write workload, in issue order."""

    volumes: Sequence[str]
    region_blocks: int = 64
    region_offset: int = 0
    seed: int = 0
    writes: list[Write] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def next(self) -> Write:
        """The next write to issue (alternating volumes, random block of the region)."""
        seq = len(self.writes) + 1
        w = Write(
            seq,
            (seq - 1) % len(self.volumes),
            self.region_offset + self._rng.randrange(self.region_blocks) * BLOCK,
        )
        self.writes.append(w)
        return w

    def data(self, w: Write) -> bytes:
        return stamp(w.seq, w.volume, w.offset)

    def acked(self, w: Write) -> None:
        w.ack_ns = time.time_ns()

    @property
    def acked_count(self) -> int:
        return sum(1 for w in self.writes if w.ack_ns)

    def oracle(self) -> Oracle:
        return Oracle(self.volumes, self.writes)


@dataclass(frozen=True)
class Verdict:
    prefix: int
    """P: the image holds writes 1..P."""
    acked_before: int
    """The newest write acked before the checkpoint's time (all of them must be in P)."""


class Oracle:
    """Checks images against replays of prefixes of a workload's writes."""

    def __init__(self, volumes: Sequence[str], writes: Sequence[Write]) -> None:
        self.volumes = list(volumes)
        self.writes = list(writes)
        # Per (volume, offset): the seqs of writes to it, ascending.
        self._history: dict[tuple[int, int], list[int]] = {}
        for w in self.writes:
            self._history.setdefault((w.volume, w.offset), []).append(w.seq)
        acked = [(w.ack_ns, w.seq) for w in self.writes if w.ack_ns]
        # Dependent writes are acked in issue order: ack times ascend with seq.
        assert acked == sorted(acked), "acks out of issue order: the workload is not dependent"
        self._ack_ns = [a for a, _ in acked]
        self._ack_seq = [s for _, s in acked]

    def decode(self, volume: int, image: bytes, base: int = 0) -> dict[int, int]:
        """Block offset -> seq of the stamp there, for every non-zero block of ``image`` (the
        volume's bytes from offset ``base``). A block that is neither zeroes nor a whole,
        well-placed stamp is corruption."""
        found: dict[int, int] = {}
        view = memoryview(image)
        for at in range(0, len(image), BLOCK):
            block = view[at : at + BLOCK]
            off = base + at
            if block == _ZERO:
                continue
            magic, seq, vol, at = _STAMP.unpack_from(block)
            assert magic == _MAGIC and 1 <= seq <= len(self.writes), (
                f"{self.volumes[volume]}: garbage at offset {off}: {bytes(block[:32])!r}"
            )
            assert (vol, at) == (volume, off), (
                f"{self.volumes[volume]}: block at {off} holds write {seq} meant for "
                f"{self.volumes[vol]} offset {at}"
            )
            assert block == stamp(seq, vol, at), f"{self.volumes[volume]}: torn block at {off}"
            found[off] = seq
        return found

    def allowed(self, volume: int, offset: int, prefix: int) -> set[int]:
        """Seqs (0: never written) the block may show in the replay of writes 1..prefix."""
        seqs = self._history.get((volume, offset), [])
        i = bisect.bisect_right(seqs, prefix) - 1
        out: set[int] = set()
        while i >= 0 and self.writes[seqs[i] - 1].uncertain:
            out.add(seqs[i])
            i -= 1
        out.add(seqs[i] if i >= 0 else 0)
        return out

    def acked_before(self, time_ns: int) -> int:
        i = bisect.bisect_left(self._ack_ns, time_ns) - 1
        return self._ack_seq[i] if i >= 0 else 0

    def check(self, images: Mapping[str, bytes], time_ns: int, what: str, base: int = 0) -> Verdict:
        """Assert the images (one per volume, each the volume's bytes from offset ``base`` on,
        covering every block the workload writes) are the replay of a prefix of the workload
        that holds every write acked before ``time_ns``; returns that prefix."""
        decoded = {v: self.decode(v, images[name], base) for v, name in enumerate(self.volumes)}
        prefix = max((s for d in decoded.values() for s in d.values()), default=0)
        for v, name in enumerate(self.volumes):
            seen = decoded[v]
            offsets = set(seen) | {off for (vol, off) in self._history if vol == v}
            for off in sorted(offsets):
                got = seen.get(off, 0)
                allowed = self.allowed(v, off, prefix)
                assert got in allowed, (
                    f"{what}: {name} offset {off} holds write {got}, but the replay of writes "
                    f"1..{prefix} has {sorted(allowed)} there: not a prefix of the workload"
                )
        must = self.acked_before(time_ns)
        assert prefix >= must, (
            f"{what}: holds writes 1..{prefix}, but write {must} was acked before the checkpoint "
            f"({(time_ns - self.writes[must - 1].ack_ns) / 1e6:.3f} ms earlier)"
        )
        return Verdict(prefix, must)

    def certain_floor(self, prefix: int) -> int:
        """The newest certain write at or before ``prefix``."""
        while prefix > 0 and self.writes[prefix - 1].uncertain:
            prefix -= 1
        return prefix


def check_monotonic(oracle: Oracle, verdicts: Iterable[tuple[int, Verdict]]) -> None:
    """Later checkpoints (by id) hold longer prefixes; only an uncertain write may vanish."""
    best = 0
    for cid, verdict in verdicts:
        assert verdict.prefix >= best, (
            f"checkpoint {cid} holds writes 1..{verdict.prefix}, an earlier one held 1..{best}"
        )
        best = max(best, oracle.certain_floor(verdict.prefix))


class BlockWriter(Protocol):
    async def write(self, offset: int, data: bytes, *, flags: int = 0) -> None: ...


async def drive(
    workload: Workload,
    clients: Sequence[BlockWriter],
    *,
    seconds: float,
    max_writes: int,
    pause: float = 0.0,
) -> int:
    """Issue dependent writes (``clients[i]`` writes volume i) until ``seconds`` pass or
    ``max_writes`` are acked; returns how many were acked. If a write raises (a dead connection),
    it is marked uncertain and the exception propagates."""
    deadline = time.monotonic() + seconds
    done = 0
    while done < max_writes and time.monotonic() < deadline:
        w = workload.next()
        try:
            await clients[w.volume].write(w.offset, workload.data(w))
        except BaseException:
            w.uncertain = True
            raise
        workload.acked(w)
        done += 1
        if pause:
            await asyncio.sleep(pause)
    return done
