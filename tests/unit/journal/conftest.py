"""Shared helpers for journal tests: a plain-bytearray model of every volume."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from secondsite.appliance.journal import Checkpoint, Journal, JournalConfig


@dataclass
class Model:
    """Replays the same operations on bytearrays; remembers the state at each checkpoint."""

    sizes: dict[str, int]
    data: dict[str, bytearray] = field(default_factory=dict)
    at_checkpoint: dict[int, dict[str, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = {v: bytearray(n) for v, n in self.sizes.items()}

    def write(self, vol: str, off: int, payload: bytes) -> None:
        self.data[vol][off : off + len(payload)] = payload

    def zero(self, vol: str, off: int, n: int) -> None:
        self.data[vol][off : off + n] = bytes(n)

    def checkpoint(self, cp: Checkpoint) -> None:
        self.at_checkpoint[cp.id] = {v: bytes(d) for v, d in self.data.items()}


async def random_ops(
    j: Journal, model: Model, rng: random.Random, count: int, cp_every: int = 10
) -> list[Checkpoint]:
    """Apply ``count`` random operations (any alignment) to journal and model."""
    cps = []
    vols = list(model.sizes)
    for i in range(count):
        vol = rng.choice(vols)
        size = model.sizes[vol]
        kind = rng.random()
        off = rng.randrange(0, size)
        n = rng.randrange(1, min(size - off, 20000) + 1)
        if rng.random() < 0.5:  # the 4 KiB-aligned fast path
            off -= off % 4096
            n = max(4096, n - n % 4096)
            n = min(n, size - off)
        if kind < 0.7:
            payload = rng.randbytes(n)
            await j.append_write(vol, off, payload)
            model.write(vol, off, payload)
        elif kind < 0.85:
            await j.append_zero(vol, off, n)
            model.zero(vol, off, n)
        else:
            await j.append_trim(vol, off, n)
            model.zero(vol, off, n)
        if i % cp_every == cp_every - 1:
            cp = await j.checkpoint()
            model.checkpoint(cp)
            cps.append(cp)
    return cps


async def assert_images(j: Journal, model: Model, cps: list[Checkpoint]) -> None:
    for cp in cps:
        for vol in model.sizes:
            img = await j.open_image(vol, cp)
            try:
                got = await img.read(0, img.size)
            finally:
                img.close()
            assert got == model.at_checkpoint[cp.id][vol], f"checkpoint {cp.id} volume {vol}"


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "j", JournalConfig(vpg="test", segment_size=256 << 10))
    await j.add_volume("a", 1 << 20)
    await j.add_volume("b", 300_000)
    yield j
    await j.close()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


__all__ = ["Model", "assert_images", "os", "random_ops", "run"]
