"""Helpers for NBD tests against real peers (QEMU, libnbd, nbdkit from Debian).

The server runs on uvloop in a background thread of the test process, listening on a unix socket
and on a free TCP port; the peers are subprocesses, each bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from secondsite.appliance.nbd import (
    DictExportProvider,
    Export,
    NBDServer,
    new_event_loop,
    serve_unix,
)

MiB = 1024 * 1024
EXPORT_SIZE = 64 * MiB
PEERS = ["qemu-io", "qemu-img", "qemu-storage-daemon", "nbdinfo", "nbdcopy"]

_T = TypeVar("_T")


_missing = [tool for tool in PEERS if shutil.which(tool) is None]
requires_peers = pytest.mark.skipif(
    bool(_missing), reason=f"missing peers: {', '.join(_missing)} (run make debs)"
)


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a peer; fail with its output when it fails (or would run past ``timeout``)."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def qemu_io(uri: str, *commands: str, timeout: float = 60) -> str:
    """Run qemu-io commands on an NBD URI; fail on any failed command or pattern mismatch."""
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    out = run(*args, uri, timeout=timeout).stdout
    assert "failed" not in out.lower(), out
    return out


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class ServerThread:
    """An NBD server on its own event loop thread."""

    socket_path: str
    exports: dict[str, Export]
    workdir: Path
    loop: asyncio.AbstractEventLoop = field(default_factory=new_event_loop)
    server: NBDServer | None = None
    tcp_port: int = 0
    errors: _ErrorRecords = field(default_factory=_ErrorRecords)
    _thread: threading.Thread | None = None

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop.run_forever, name="nbd-server")
        self._thread.start()
        provider = DictExportProvider(self.exports, default="mem")
        self.server = self.call(serve_unix(self.socket_path, provider))
        _, self.tcp_port = self.call(self.server.listen_tcp("127.0.0.1", 0))
        logging.getLogger("secondsite.appliance.nbd").addHandler(self.errors)

    def stop(self) -> None:
        logging.getLogger("secondsite.appliance.nbd").removeHandler(self.errors)
        if self.server is not None:
            self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(30)
        self.loop.close()

    def uri(self, name: str, *, tcp: bool = False) -> str:
        if tcp:
            return f"nbd://127.0.0.1:{self.tcp_port}/{name}"
        return f"nbd+unix:///{name}?socket={self.socket_path}"
