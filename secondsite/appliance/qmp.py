"""A small asyncio client of QEMU's machine protocol (QMP), enough to follow a mirror job.

A mirror-target volume is in initial sync until QEMU's mirror job writing to it is *ready*
(actively synced: from then on every guest write is mirrored before it completes). The appliance
learns that by asking QEMU: `query-block-jobs` reports `ready: true`. Events (`BLOCK_JOB_READY`,
...) arrive on the same socket between replies; they are kept for callers that want them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["QmpClient", "QmpError", "mirror_job_ready"]

log = logging.getLogger(__name__)


class QmpError(Exception):
    """QEMU answered a command with an error, or the connection failed."""


class QmpClient:
    """One QMP connection. Use `await QmpClient.connect(path)`; commands run one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str | Path, timeout: float = 5.0) -> QmpClient:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=1 << 22), timeout
            )
        except (OSError, TimeoutError) as e:
            raise QmpError(f"cannot connect to QMP socket {path}: {e}") from e
        client = cls(reader, writer)
        try:
            greeting = await asyncio.wait_for(client._read(), timeout)
            if "QMP" not in greeting:
                raise QmpError(f"{path} did not greet as QMP: {greeting}")
            await client.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QmpError("QMP connection closed")
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise QmpError(f"malformed QMP message: {line[:200]!r}") from e
        return msg

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        """Run one command; returns its `return` value or raises QmpError with QEMU's words."""
        async with self._lock:
            self._next_id += 1
            ident = f"ss-{self._next_id}"
            msg: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                msg["arguments"] = arguments
            try:
                self._writer.write(json.dumps(msg).encode() + b"\n")
                await self._writer.drain()
                async with asyncio.timeout(timeout):
                    while True:
                        reply = await self._read()
                        if "event" in reply:
                            self.events.append(reply)
                            del self.events[:-256]
                            continue
                        if reply.get("id") != ident:
                            continue
                        if "error" in reply:
                            err = reply["error"]
                            raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
                        return reply.get("return")
            except TimeoutError as e:
                raise QmpError(f"{command}: no reply in {timeout}s") from e
            except OSError as e:  # QEMU went away: reset, broken pipe
                raise QmpError(f"{command}: QMP connection lost: {e!r}") from e

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()


async def mirror_job_ready(client: QmpClient, job: str) -> bool | None:
    """Whether mirror job `job` is ready (True), still copying (False), or gone (None)."""
    jobs = await client.execute("query-block-jobs")
    for info in jobs or []:
        if info.get("device") == job:
            return bool(info.get("ready"))
    return None
