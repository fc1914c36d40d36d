"""The shared bandwidth limit: its rate holds, and contended flows share it by priority.

Real time, short runs (about a second each): the limiter is what the senders await before each
frame, so these drive it the same way, with 64 KiB frames.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from secondsite.appliance.stream import BandwidthLimiter, Flow, Priority

FRAME = 64 * 1024
RATE = 40 * 1024 * 1024


async def _saturate(flow: Flow, stop_at: float, sent: dict[str, int]) -> None:
    while time.monotonic() < stop_at:
        await flow.acquire(FRAME)
        sent[flow.name] = sent.get(flow.name, 0) + FRAME


async def _measure(flows: list[Flow], warmup: float, window: float) -> dict[str, float]:
    """Bytes/s each flow got in ``window`` seconds, after ``warmup`` (the initial burst)."""
    sent: dict[str, int] = {}
    start = time.monotonic()
    end = start + warmup + window
    running = asyncio.gather(*(_saturate(f, end, sent) for f in flows))
    await asyncio.sleep(warmup)
    before = dict(sent)
    await running
    return {f.name: (sent[f.name] - before.get(f.name, 0)) / window for f in flows}


async def test_single_flow_stays_within_ten_percent_of_the_limit() -> None:
    limiter = BandwidthLimiter(RATE)
    rates = await _measure([limiter.flow("a", Priority.LOW)], 0.2, 1.0)
    assert rates["a"] == pytest.approx(RATE, rel=0.10)


async def test_contended_flows_share_four_two_one() -> None:
    limiter = BandwidthLimiter(RATE)
    rates = await _measure([limiter.flow(p.value, p) for p in Priority], 0.2, 1.5)
    total = sum(rates.values())
    assert total == pytest.approx(RATE, rel=0.10)
    for p in Priority:
        assert rates[p.value] / total == pytest.approx(p.weight / 7, rel=0.15), rates


async def test_an_idle_flow_leaves_its_share_to_the_others() -> None:
    limiter = BandwidthLimiter(RATE)
    high, low = limiter.flow("high", Priority.HIGH), limiter.flow("low", Priority.LOW)
    sent: dict[str, int] = {}
    start = time.monotonic()
    # High stops after 0.5 s; low goes on alone for 0.5 s and must get the whole rate.
    await asyncio.gather(_saturate(high, start + 0.5, sent), _saturate(low, start + 0.5, sent))
    during = dict(sent)
    await _saturate(low, start + 1.0, sent)
    alone = sent["low"] - during["low"]
    assert during["high"] > 3 * during["low"]
    assert alone / 0.5 == pytest.approx(RATE, rel=0.15)


async def test_no_limit_never_waits_and_rate_can_change() -> None:
    limiter = BandwidthLimiter(None)
    flow = limiter.flow("a")
    start = time.monotonic()
    for _ in range(10_000):
        await flow.acquire(FRAME)
    assert time.monotonic() - start < 0.5
    limiter.rate = FRAME / 0.05  # a frame per 50 ms
    start = time.monotonic()
    for _ in range(8):
        await flow.acquire(FRAME)
    # The first frame goes at once (the bucket may go into debt by one), then one per 50 ms.
    assert time.monotonic() - start == pytest.approx(0.35, abs=0.08)
