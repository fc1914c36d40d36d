"""Fixtures for the replication stream over real loopback sockets.

Every async test here runs on asyncio's event loop and on uvloop (the appliance's), and fails if
the loop saw an exception nobody handled. Senders, receivers and proxies made through the
fixtures are closed at teardown whatever the test did.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from stream_certs import Pki, make_pki
from stream_harness import FaultProxy, Source

from secondsite.appliance.stream import MemorySink, ReceiverSettings, StreamReceiver


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pki() -> Iterator[Pki]:
    path = Path(tempfile.mkdtemp(prefix="ssrs-pki"))
    try:
        yield make_pki(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []
    yield errors
    assert not errors, f"unhandled exceptions in the event loop: {errors}"


class Rig:
    """Builds receivers, proxies and sources for one test, and closes them all afterwards."""

    def __init__(self) -> None:
        self.receivers: list[StreamReceiver] = []
        self.proxies: list[FaultProxy] = []
        self.sources: list[Source] = []

    async def receiver(
        self,
        sinks: dict[str, MemorySink],
        settings: ReceiverSettings | None = None,
        port: int = 0,
        **kw: Any,
    ) -> tuple[StreamReceiver, int]:
        rx = StreamReceiver(
            sinks.get,
            settings or ReceiverSettings(idle_timeout=2.0, heartbeat_interval=0.2),
            **kw,
        )
        self.receivers.append(rx)
        _, bound = await rx.listen("127.0.0.1", port)
        return rx, bound

    async def proxy(self, port: int) -> tuple[FaultProxy, int]:
        p = FaultProxy(("127.0.0.1", port))
        self.proxies.append(p)
        _, bound = await p.start()
        return p, bound

    def source(self, *args: Any, start: bool = True, **kw: Any) -> Source:
        src = Source(*args, **kw)
        self.sources.append(src)
        if start:
            src.sender.start()
        return src

    async def close(self) -> None:
        for s in self.sources:
            await s.sender.close()
        for p in self.proxies:
            await p.close()
        for r in self.receivers:
            await r.close()


@pytest.fixture
async def rig(loop_errors: list[dict[str, Any]]) -> AsyncIterator[Rig]:
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
    r = Rig()
    try:
        yield r
    finally:
        await asyncio.wait_for(r.close(), 30)
