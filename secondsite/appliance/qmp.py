"""A small asyncio client of QEMU's machine protocol (QMP), enough to follow a mirror job.

A mirror-target volume is in initial sync until QEMU's mirror job writing to it is *ready*
(actively synced: from then on every guest write is mirrored before it completes). The appliance
learns that by asking QEMU (`query-block-jobs` reports `ready: true`) and from the events QEMU
sends as jobs change (`BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED`, `JOB_STATUS_CHANGE`, ...).

One reader task per connection takes every message in the order QEMU sent it: a reply resolves
the command that waits for it, an event goes to the listeners at once (and to a short history).
QEMU writes an event to every monitor when it happens, before it handles a command that arrives
later on that monitor: so once a command's reply is here, every event QEMU sent before handling
it has been passed to the listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["QmpClient", "QmpError", "mirror_event_state", "mirror_job_ready"]

log = logging.getLogger(__name__)

EventListener = Callable[[dict[str, Any]], None]
_HISTORY = 256


class QmpError(Exception):
    """QEMU answered a command with an error, or the connection failed."""


class QmpClient:
    """One QMP connection. Use `await QmpClient.connect(path)`; commands may run concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[EventListener] = []
        self._lost: QmpError | None = None
        self._reading: asyncio.Task[None] | None = None
        self.events: list[dict[str, Any]] = []
        """The most recent events, oldest first."""

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
            client._reading = asyncio.get_running_loop().create_task(
                client._read_loop(), name=f"qmp reader {path}"
            )
            await client.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            await client.close()
            raise
        return client

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every event from now on, in the order QEMU sent them."""
        self._listeners.append(listener)

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except (OSError, ValueError) as e:  # reset, or a line beyond the limit
            raise QmpError(f"QMP connection lost: {e!r}") from e
        if not line:
            raise QmpError("QMP connection closed")
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise QmpError(f"malformed QMP message: {line[:200]!r}") from e
        return msg

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._read()
                if "event" in msg:
                    self.events.append(msg)
                    del self.events[:-_HISTORY]
                    for listener in list(self._listeners):
                        listener(msg)
                    continue
                waiter = self._waiting.pop(str(msg.get("id")), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        except QmpError as e:
            self._lost = e
        except asyncio.CancelledError:
            self._lost = QmpError("QMP connection closed")
            raise
        finally:
            lost = self._lost or QmpError("QMP connection closed")
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(lost)
            self._waiting.clear()

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        """Run one command; returns its `return` value or raises QmpError with QEMU's words."""
        if self._lost is not None:
            raise QmpError(f"{command}: {self._lost}")
        self._next_id += 1
        ident = f"ss-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
            async with asyncio.timeout(timeout):
                reply = await waiter
        except TimeoutError as e:
            raise QmpError(f"{command}: no reply in {timeout}s") from e
        except OSError as e:  # QEMU went away: reset, broken pipe
            raise QmpError(f"{command}: QMP connection lost: {e!r}") from e
        finally:
            self._waiting.pop(ident, None)
        if "error" in reply:
            err = reply["error"]
            raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, QmpError):
                await self._reading
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()


async def mirror_job_ready(client: QmpClient, job: str, timeout: float = 10.0) -> bool | None:
    """Whether mirror job `job` is ready (True), still copying (False), or gone (None)."""
    jobs = await client.execute("query-block-jobs", timeout=timeout)
    for info in jobs or []:
        if info.get("device") == job:
            return bool(info.get("ready"))
    return None


_GONE_EVENTS = {"BLOCK_JOB_COMPLETED": "completed", "BLOCK_JOB_CANCELLED": "cancelled"}
_STATUS_READY = {"ready": True, "standby": True, "created": False, "running": False}
"""JOB_STATUS_CHANGE statuses of a job that still mirrors (standby: a ready job paused, which
query-block-jobs also reports as ready); "paused" before ready and every status of a finishing
job (waiting, pending, aborting, concluded, null) mean it cannot be vouched for."""


def mirror_event_state(event: dict[str, Any], job: str) -> tuple[bool | None, str] | None:
    """What a QMP event says of mirror job `job`: (ready, why) as for :func:`mirror_job_ready`,
    or None when the event is not about that job."""
    name = event.get("event")
    data = event.get("data") or {}
    if name == "JOB_STATUS_CHANGE":
        if data.get("id") != job:
            return None
        status = str(data.get("status"))
        ready = _STATUS_READY.get(status, False if status == "paused" else None)
        return ready, f"mirror job {job} is {status}"
    if data.get("device") != job:
        return None
    if name in _GONE_EVENTS:
        return None, f"mirror job {job} {_GONE_EVENTS[name]}"
    if name == "BLOCK_JOB_READY":
        return True, f"mirror job {job} is ready"
    if name == "BLOCK_JOB_ERROR":
        action = data.get("action")
        return False, f"mirror job {job} had an I/O error ({data.get('operation')}, {action})"
    return None
