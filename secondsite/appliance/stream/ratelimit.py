"""A per-appliance bandwidth limit shared by all of its senders, weighted by VPG priority.

:class:`BandwidthLimiter` is a token bucket refilled at ``rate`` bytes per second. Each sender
draws from it through its own :class:`Flow`. When several flows wait at once, tokens go to them in
proportion to their priority's weight (High 4 : Medium 2 : Low 1) by start-time fair queuing: a
request of ``n`` bytes from a flow of weight ``w`` is tagged with a virtual start time
``max(now_virtual, the flow's previous finish)`` and finish ``start + n / w``, and the waiting
request with the smallest start tag is served first. A flow that is idle earns no credit, so an
idle VPG's share goes to the others at once, and it gets its share back as soon as it sends again.

The bucket holds ``burst_seconds`` of tokens (so a late event-loop wakeup loses nothing) and may go
into debt by one request, so requests larger than the burst still pass, and the long-run rate is
exact. Without a rate (``None``) ``acquire`` returns at once.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BandwidthLimiter", "Flow", "Priority"]


class Priority(enum.StrEnum):
    """A VPG's priority (the VPG spec's ``priority``); its weight is its share when contended."""

    HIGH = "High"
    MEDIUM = "Medium"
    LOW = "Low"

    @property
    def weight(self) -> int:
        return {"High": 4, "Medium": 2, "Low": 1}[self.value]


@dataclass(order=True)
class _Waiter:
    start: float
    order: int
    nbytes: int = field(compare=False)
    finish: float = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class Flow:
    """One sender's share of a :class:`BandwidthLimiter`."""

    def __init__(self, limiter: BandwidthLimiter, name: str, priority: Priority) -> None:
        self.limiter = limiter
        self.name = name
        self.priority = priority
        self.last_finish = 0.0
        self.bytes_granted = 0

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent."""
        await self.limiter._acquire(self, nbytes)


class BandwidthLimiter:
    """See the module doc. ``rate`` in bytes per second, or None for no limit."""

    def __init__(
        self,
        rate: float | None,
        *,
        burst_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self.burst_seconds = burst_seconds
        self._clock = clock
        self._tokens = self._burst()
        self._stamp = clock()
        self._virtual = 0.0
        self._heap: list[_Waiter] = []
        self._order = itertools.count()
        self._timer: asyncio.Handle | None = None

    def flow(self, name: str, priority: Priority = Priority.MEDIUM) -> Flow:
        return Flow(self, name, priority)

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, rate: float | None) -> None:
        self._refill()
        self._rate = rate
        self._tokens = min(self._tokens, self._burst())
        self._dispatch()

    def _burst(self) -> float:
        return 0.0 if self._rate is None else self._rate * self.burst_seconds

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self._burst(), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def _acquire(self, flow: Flow, nbytes: int) -> None:
        flow.bytes_granted += nbytes
        if self._rate is None and not self._heap:
            return
        start = max(self._virtual, flow.last_finish)
        finish = start + nbytes / flow.priority.weight
        flow.last_finish = finish
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, _Waiter(start, next(self._order), nbytes, finish, fut))
        self._dispatch()
        await fut  # a waiter cancelled in the queue is skipped by _dispatch

    def _dispatch(self) -> None:
        """Grant the waiter with the smallest start tag, if tokens allow; then come back.

        One grant per event-loop turn, even with tokens to spare (after an idle spell or a late
        wakeup): the flow just served gets to queue its next request, with its next tag, before
        the next grant. Granting every waiter at once would share a burst equally, not by weight.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._refill()
        while self._heap and self._heap[0].future.done():  # cancelled while waiting
            heapq.heappop(self._heap)
        if not self._heap:
            return
        loop = asyncio.get_running_loop()
        if self._rate is not None and self._tokens < 0:
            self._timer = loop.call_later(-self._tokens / self._rate, self._dispatch)
            return
        w = heapq.heappop(self._heap)
        self._virtual = w.start
        if self._rate is not None:
            self._tokens -= w.nbytes
        w.future.set_result(None)
        if self._heap:
            self._timer = loop.call_soon(self._dispatch)
