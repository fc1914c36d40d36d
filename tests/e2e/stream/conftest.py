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
from stream_harness import Rig


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


@pytest.fixture
async def rig(loop_errors: list[dict[str, Any]]) -> AsyncIterator[Rig]:
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
    r = Rig()
    try:
        yield r
    finally:
        await asyncio.wait_for(r.close(), 30)
