"""Child process of test_crash.py: appends random writes and checkpoints to a journal until it is
killed. Segments are small and retention promotes often, so segments roll into spares (zero-filled
in synced steps of 32 KiB here, to widen the window a kill can hit) and promoted segments are
recycled into spares all the time. Right after submitting a record (before the event loop can
hand it to the I/O thread) it prints the record's intent, and an ack line once the append
returned. Now and then a writer submits, right behind its write, a position of one of two
replication sources (as the stream receiver does after a batch), going on from the durable
positions found at open. Lines:

    READY <durable seq at open>
    I <seq> W|Z|T <volume> <offset> <length>     intent (a record that may become durable)
    C <seq> <checkpoint id>                       checkpoint intent
    P <seq> <source> <source seq>                 position intent
    A <seq>                                       acked (append, checkpoint or position durable)
"""

from __future__ import annotations

import asyncio
import random
import struct
import sys
from pathlib import Path

from secondsite.appliance.journal import Journal, JournalConfig, RetentionPolicy, spares

VOLUMES = {"v0": 1 << 20, "v1": 600_000}
SOURCES = ("node-a", "node-b")


SEGMENT_SIZE = 128 << 10


def config() -> JournalConfig:
    return JournalConfig(
        vpg="crash",
        segment_size=SEGMENT_SIZE,
        retention=RetentionPolicy(history_seconds=3600, hard_limit_bytes=4 << 20),
        spare_segments=2,
    )


def payload(seq: int, n: int) -> bytes:
    """Deterministic content of write ``seq``: the test rebuilds it from the intent line."""
    return (struct.pack("<Q", seq) * (n // 8 + 1))[:n]


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def writer(j: Journal, rng: random.Random, sent: dict[str, int]) -> None:
    while True:
        vol = rng.choice(list(VOLUMES))
        size = VOLUMES[vol]
        off = rng.randrange(0, size)
        n = rng.randrange(1, min(size - off, 16384) + 1)
        if rng.random() < 0.5:
            off -= off % 4096
            n = min(max(4096, n - n % 4096), size - off)
        k = rng.random()
        if k < 0.8:
            p = j.submit_write(vol, off, payload(j.next_seq, n))
            kind = "W"
        elif k < 0.9:
            p = j.submit_zero(vol, off, n)
            kind = "Z"
        else:
            p = j.submit_trim(vol, off, n)
            kind = "T"
        out(f"I {p.seq} {kind} {vol} {off} {n}")
        pending = [p]
        if rng.random() < 0.25:
            source = rng.choice(SOURCES)
            sent[source] += rng.randrange(1, 4)  # gaps, as the stream has them
            pos = j.submit_position(source, sent[source])
            out(f"P {pos.seq} {source} {sent[source]}")
            pending.append(pos)
        for q in pending:
            await q
            out(f"A {q.seq}")


async def checkpointer(j: Journal) -> None:
    while True:
        await asyncio.sleep(0.01)
        async with j.hold_acks():
            cp, pending = j.mark_checkpoint()
        out(f"C {cp.seq} {cp.id}")
        await pending
        out(f"A {cp.seq}")
        await j.enforce_retention()


async def main(directory: Path, seed: int) -> None:
    j = await Journal.open(directory, config())
    for v, n in VOLUMES.items():
        await j.add_volume(v, n)
    out(f"READY {j.durable_seq}")
    rng = random.Random(seed)
    sent = {s: j.positions.get(s, 0) for s in SOURCES}
    tasks = [asyncio.ensure_future(writer(j, random.Random(rng.random()), sent)) for _ in range(8)]
    tasks.append(asyncio.ensure_future(checkpointer(j)))
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    spares.ZERO_CHUNK, spares.SYNC_EVERY = 16 << 10, 32 << 10
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
