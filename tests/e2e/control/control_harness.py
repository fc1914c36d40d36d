"""Helpers of the control API's e2e tests: a test PKI, the appliance process, polling, raw HTTP.

The appliance is a real `python -m secondsite appliance` process started with listen addresses
only (an empty config), so every test configures it through the API with the typed client. TLS
material comes from a throwaway CA of the tests' PKI (tests/pki.py); a second, unrelated CA signs
the "rogue" client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from secondsite.appliance.config import ApplianceConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pki import CLIENT, SERVER, Pki

TOKEN = "e2e-token-5f1d7c0b9a"
MiB = 1 << 20
QEMU_TOOLS = ("qemu-img", "qemu-io", "nbdinfo")

_T = TypeVar("_T")
# -- PKI -----------------------------------------------------------------------------------------


def make_pki(directory: Path) -> Pki:
    """`ca`, `server` (127.0.0.1, localhost), `client` (signed by ca), `rogue` (another CA)."""
    pki = Pki(directory)
    pki.ca("ca")
    pki.cert("server", "ca", cn="appliance", usages=SERVER)
    pki.cert("client", "ca", cn="operator", sans=(), usages=CLIENT)
    pki.ca("rogue-ca")
    pki.cert("rogue", "rogue-ca", cn="operator", sans=(), usages=CLIENT)
    return pki


# -- the appliance process -----------------------------------------------------------------------


class ApplianceProcess:
    """`secondsite appliance` in a subprocess, configured with listen addresses only."""

    def __init__(self, workdir: Path, listen: dict[str, Any]) -> None:
        self.workdir = workdir
        self.listen = listen
        self.config_file = workdir / "appliance.yaml"
        self.ready_file = workdir / "appliance.ready"
        self.log_file = workdir / "appliance.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.nbd_socket = Path(listen["nbdUnix"])

    def start(self, timeout: float = 30) -> None:
        self.config_file.write_text(yaml.safe_dump({"listen": self.listen}))
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "secondsite",
                    "appliance",
                    "--config",
                    str(self.config_file),
                    "--ready-file",
                    str(self.ready_file),
                    "--log-level",
                    "DEBUG",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"appliance did not start:\n{self.log()}")
            time.sleep(0.05)
        lines = self.ready_file.read_text().split()
        self.url = next(
            line.removeprefix("control:") for line in lines if line.startswith("control:")
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"appliance ignored SIGTERM:\n{self.log()}") from None
        return self.proc.returncode

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def nbd_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def config(
        self, journals: list[dict[str, Any]], volumes: list[dict[str, Any]]
    ) -> ApplianceConfig:
        """A full config: this appliance's listen section plus ``journals`` and ``volumes``."""
        return ApplianceConfig.model_validate(
            {"listen": self.listen, "journals": journals, "volumes": volumes}
        )


def make_disk(path: Path, size: int = 16 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def eventually(
    probe: Callable[[], Awaitable[_T]], ok: Callable[[_T], bool], timeout: float = 30
) -> _T:
    """Poll ``probe`` until ``ok`` holds for its result (returned), or fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if ok(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out; last value: {value!r}")
        await asyncio.sleep(0.1)


def journal(workdir: Path, vpg: str, **kw: object) -> dict[str, object]:
    """A small journal spec with checkpoints every 0.5 s."""
    return {
        "vpg": vpg,
        "directory": str(workdir / f"journal-{vpg}"),
        "history": "1h",
        "hardLimit": "256Mi",
        "checkpointIntervalSeconds": 0.5,
        "segmentBytes": 4 * MiB,
        **kw,
    }


def tls_context(pki: Pki, client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.crt("ca")))
    if client is not None:
        ctx.load_cert_chain(*pki.pair(client))
    return ctx


async def raw_request(
    url: str,
    method: str,
    path: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    json: Any = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request without the typed client (to send what it never would)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
        session.request(
            method, url + path, headers=headers, json=json, ssl=ssl_context or False
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a QEMU / libnbd tool; fail with its output when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def qemu_io(uri: str, *commands: str, check: bool = True) -> str:
    """Run qemu-io commands on a raw NBD URI; with ``check``, fail on a failed command or a
    pattern mismatch. Returns stdout and stderr."""
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    proc = run(*args, uri, check=check)
    out = proc.stdout + proc.stderr
    if check:
        assert "failed" not in out.lower() and "mismatch" not in out.lower(), out
    return out


class HeldConnection:
    """An interactive qemu-io holding one NBD connection open until closed."""

    def __init__(self, uri: str, *, read_only: bool = False) -> None:
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", *(["-r"] if read_only else []), uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def close(self) -> None:
        try:
            self.proc.communicate(b"quit\n", timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)


async def exchange(
    host: str, port: int, payload: bytes, ctx: ssl.SSLContext | None, read: int = 64 * 1024
) -> bytes:
    """Send ``payload`` on a new connection and read one answer of up to ``read`` bytes: b"" if
    the peer closes, resets or refuses the TLS handshake."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host if ctx else None),
            10,
        )
    except (ConnectionError, ssl.SSLError):
        return b""
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(read), 10)
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
