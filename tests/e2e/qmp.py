"""A small asyncio QMP client for driving qemu-storage-daemon (or QEMU) in tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any


class QMPError(Exception):
    """A QMP command returned an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class QMPClient:
    """One QMP session over a unix socket: commands in order, events kept until waited for."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str, timeout: float = 30.0) -> QMPClient:
        """Connect (retrying while the socket appears) and negotiate capabilities."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)
            client = cls(reader, writer)
            greeting = await client._receive()
            if "QMP" not in greeting:
                raise ConnectionError(f"not a QMP greeting: {greeting}")
            await client.execute("qmp_capabilities")
            return client

    async def _receive(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run ``command``; return its result or raise QMPError. Events are queued meanwhile."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                message = await self._receive()
                if "event" in message:
                    self.events.append(message)
                elif "error" in message:
                    raise QMPError(command, message["error"])
                elif "return" in message:
                    return message["return"]

    async def wait_event(
        self,
        name: str,
        match: Callable[[dict[str, Any]], bool] = lambda _event: True,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Return (and consume) the first event ``name`` for which ``match(data)`` holds."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if event["event"] == name and match(event.get("data", {})):
                        self.events.remove(event)
                        return event
                message = await self._receive()
                if "event" in message:
                    self.events.append(message)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
