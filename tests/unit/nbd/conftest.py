"""Fixtures for the NBD server tests: a server on a unix socket with a few exports.

Every async test here runs twice, on asyncio's event loop and on uvloop (the appliance's), and
fails if the loop reports an unhandled exception (a callback or task that raised).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
import uvloop
from nbd_helpers import Harness, MiB, RecordingProvider

from secondsite.appliance.nbd import Export, MemoryExport, ServerSettings, serve_unix


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Short path: unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings() -> ServerSettings:
    return ServerSettings(handshake_timeout=10.0, drain_timeout=5.0)


@pytest.fixture
def exports() -> dict[str, Export]:
    return {
        "mem": MemoryExport(16 * MiB, description="scratch memory"),
        "ro": MemoryExport(1 * MiB, read_only=True),
        "tiny": MemoryExport(4096),
    }


@pytest.fixture(autouse=True)
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Exceptions the event loop saw that nobody handled (the server fixture collects them);
    the test fails if there are any."""
    errors: list[dict[str, Any]] = []
    yield errors
    assert not errors, f"unhandled exceptions in the event loop: {errors}"


@pytest.fixture
async def nbd(
    socket_dir: str,
    settings: ServerSettings,
    exports: dict[str, Export],
    loop_errors: list[dict[str, Any]],
) -> AsyncIterator[Harness]:
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: loop_errors.append(context)
    )
    provider = RecordingProvider(exports, default="mem")
    path = f"{socket_dir}/nbd.sock"
    server = await serve_unix(path, provider, settings=settings)
    try:
        yield Harness(server, path, provider, exports)
    finally:
        await server.close()
