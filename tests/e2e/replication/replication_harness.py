"""What the replication e2e tests share: a test PKI for the appliances' mutual TLS (on
tests/pki.py), appliance processes in the protected and recovery roles, a write workload over NBD,
and convergence checks.

Appliances are real `python -m secondsite appliance` processes (`appliance_harness.ApplianceProcess`
of the single-appliance e2e tests), on loopback, with the control API over plain HTTP and a token.
A recovery appliance's stream port is chosen up front, so that it comes back on the same address
after a restart.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "appliance"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from appliance_harness import ApplianceProcess, NBDClient, requires_peers
from pki import CertFiles
from pki import Pki as BasePki

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.control import ControlClient
from secondsite.appliance.control.models import ProtectedVpgStatus, VpgStatus

__all__ = [
    "TOKEN",
    "KiB",
    "MiB",
    "Node",
    "Pki",
    "Writer",
    "eventually",
    "free_port",
    "identical",
    "journal_spec",
    "make_pki",
    "protected_node",
    "qemu_io",
    "recovery_node",
    "requires_peers",
    "wait_identical",
]

KiB = 1024
MiB = 1024 * KiB
TOKEN = "replication-e2e-token"


# -- PKI -----------------------------------------------------------------------------------------


class Pki(BasePki):
    def tls(self, name: str) -> dict[str, str]:
        """The `streamTls` section of appliance ``name`` (its certificate names it; `intruder`'s
        is signed by another CA)."""
        files = self.cert_files(name)
        return {"certFile": str(files.cert), "keyFile": str(files.key), "caFile": str(files.ca)}

    def cert_files(self, name: str) -> CertFiles:
        ca = "other-ca" if name == "intruder" else "site-ca"
        return CertFiles(self.crt(name), self.key(name), self.crt(ca))


def make_pki(directory: Path, names: Sequence[str] = ("recovery", "prot-a", "prot-b")) -> Pki:
    """A site CA and a certificate per appliance name; `intruder` gets one from another CA."""
    made = Pki(directory)
    made.ca("site-ca")
    made.ca("other-ca")
    for name in names:
        made.cert(name, "site-ca")
    made.cert("intruder", "other-ca")
    return made


# -- appliances ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node(ApplianceProcess):
    """One appliance process with its own directory, NBD socket and control API."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        token = self.dir / "token"
        token.write_text(TOKEN + "\n")
        os.chmod(token, 0o600)
        self.nbd_socket = self.dir / "nbd.sock"
        listen = {
            "nbdUnix": str(self.nbd_socket),
            "control": "127.0.0.1:0",
            "tokenFile": str(token),
            "controlPlainHttp": True,
            **config.pop("listen", {}),
        }
        self.raw = {"name": name, "listen": listen, **config}
        super().__init__(ApplianceConfig.model_validate(self.raw), self.dir)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    @property
    def control_url(self) -> str:
        lines = self.ready_file.read_text().split()
        return next(x.removeprefix("control:") for x in lines if x.startswith("control:"))

    def client(self) -> ControlClient:
        return ControlClient(self.control_url, token=TOKEN, timeout=10, retries=1)

    async def vpg_status(self, vpg: str) -> VpgStatus:
        async with self.client() as c:
            return await c.vpg_status(vpg)

    async def protected_status(self, vpg: str) -> ProtectedVpgStatus:
        async with self.client() as c:
            return await c.protected_status(vpg)


def journal_spec(directory: Path, vpg: str, sources: Sequence[str], **kw: Any) -> dict[str, Any]:
    """A recovery journal fed by ``sources``, checkpoints every 0.5 s."""
    return {
        "vpg": vpg,
        "directory": str(directory),
        "sources": list(sources),
        "history": "1h",
        "hardLimit": "2Gi",
        "checkpointIntervalSeconds": 0.5,
        "segmentBytes": 16 * MiB,
        **kw,
    }


def stream_security(pki: Pki | None, name: str) -> dict[str, Any]:
    """Mutual TLS with appliance ``name``'s certificate; plain TCP without a ``pki``."""
    return {"streamPlainTcp": True} if pki is None else {"streamTls": pki.tls(name)}


def recovery_node(
    workdir: Path,
    pki: Pki | None,
    port: int,
    vpg: str,
    sources: Sequence[str],
    *,
    host: str = "127.0.0.1",
    listen: dict[str, Any] | None = None,
    **journal: Any,
) -> Node:
    """The recovery appliance of ``vpg``, its stream on ``host``:``port`` (plain TCP without a
    ``pki``); ``listen``: more listen settings, ``journal``: more settings of the journal."""
    return Node(
        workdir,
        "recovery",
        {
            "listen": {"stream": f"{host}:{port}", **(listen or {})},
            **stream_security(pki, "recovery"),
            "journals": [journal_spec(workdir / "recovery" / "journal", vpg, sources, **journal)],
        },
    )


def protected_node(
    workdir: Path,
    pki: Pki | None,
    name: str,
    port: int,
    vpg: str,
    volumes: dict[str, int],
    *,
    tls_name: str | None = None,
    recovery: str | None = None,
    appliance: dict[str, Any] | None = None,
    **protected: Any,
) -> Node:
    """A protected appliance with in-path volumes (sparse backing files of the given sizes),
    replicating with mutual TLS (with ``tls_name``'s certificate) or plain TCP (no ``pki``);
    ``appliance``: more top-level settings (e.g. `bandwidthLimit`), ``protected``: more
    settings of the protected VPG."""
    specs = []
    for volume, size in volumes.items():
        backing = workdir / f"{volume}.img"
        with open(backing, "ab") as f:
            f.truncate(size)
        specs.append({"name": volume, "vpg": vpg, "backing": str(backing)})
    return Node(
        workdir,
        name,
        {
            **stream_security(pki, tls_name or name),
            "protected": [
                {
                    "vpg": vpg,
                    "recovery": recovery or f"127.0.0.1:{port}",
                    "directory": str(workdir / name / "state"),
                    **protected,
                }
            ],
            "volumes": specs,
            **(appliance or {}),
        },
    )


# -- checks --------------------------------------------------------------------------------------


def qemu_io(uri: str, *commands: str) -> None:
    """Run qemu-io ``commands`` on ``uri`` (a file or an NBD URI); every one must succeed."""
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "failed" not in out.lower(), out


def identical(source: Path, recovery: Node, volume: str, which: str = "latest") -> tuple[bool, str]:
    """`qemu-img compare` of a protected backing file with the recovery side's PIT image."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source),
         recovery.uri(f"pit/{volume}@{which}")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


async def wait_identical(
    sources: dict[str, Path], recovery: Node, timeout: float, which: str = "latest"
) -> float:
    """Wait until every volume's image on the recovery side equals its source; returns the
    seconds it took."""
    started = time.monotonic()
    pending = dict(sources)
    last = ""
    while pending:
        for volume, path in list(pending.items()):
            same, last = await asyncio.to_thread(identical, path, recovery, volume, which)
            if same:
                del pending[volume]
        if not pending:
            break
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"{sorted(pending)} not converged after {timeout}s: {last}\n"
                f"--- recovery log:\n{recovery.log(40)}"
            )
        await asyncio.sleep(0.3)
    return time.monotonic() - started


async def eventually(check: Any, timeout: float, what: str) -> Any:
    """Poll the async ``check`` until it returns something truthy (returned)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except Exception as e:  # the appliance may be restarting
            last = e
        else:
            if last:
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# -- a write workload over NBD -------------------------------------------------------------------


@dataclass
class Writer:
    """Random writes (4 KiB to 256 KiB, random content, some zeroes) to protected volumes over
    NBD, ``depth`` at a time per volume, until stopped. A write whose connection dies is retried
    on a new connection (the appliance may be restarting), so every write issued is eventually
    acknowledged."""

    node: Node
    volumes: dict[str, int]
    seed: int = 1
    depth: int = 4
    pause: float = 0.0
    region: int | None = None
    """Write only within the first ``region`` bytes of each volume (default: all of it)."""
    acked: int = 0
    acked_bytes: int = 0
    reconnects: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        for i, volume in enumerate(self.volumes):
            for lane in range(self.depth):
                rng = random.Random(self.seed * 1000 + i * 10 + lane)
                self._tasks.append(asyncio.create_task(self._lane(volume, lane, rng)))

    async def _connect(self, volume: str) -> NBDClient:
        deadline = time.monotonic() + 60
        while True:
            client: NBDClient | None = None
            try:
                client = await NBDClient.connect_unix(str(self.node.nbd_socket))
                await client.handshake()
                await client.negotiate_structured()
                await client.go(volume)
                return client
            except (OSError, AssertionError, asyncio.IncompleteReadError, TimeoutError):
                if client is not None:
                    await client.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def _lane(self, volume: str, lane: int, rng: random.Random) -> None:
        size = self.region or self.volumes[volume]
        lanes = self.depth
        # Lanes write disjoint stripes: concurrent writes never overlap, so the final content
        # does not depend on the order in which in-flight writes land.
        stripe = size // lanes
        base = lane * stripe
        client = await self._connect(volume)
        try:
            while not self._stop.is_set():
                length = rng.choice([4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB])
                offset = base + rng.randrange(0, (stripe - length) // 4096) * 4096
                zero = rng.random() < 0.05
                data = bytes(length) if zero else rng.randbytes(length)
                while True:
                    try:
                        if zero:
                            await client.write_zeroes(offset, length)
                        else:
                            await client.write(offset, data)
                        break
                    except (OSError, EOFError, AssertionError, asyncio.IncompleteReadError,
                            TimeoutError):  # fmt: skip
                        await client.close()
                        self.reconnects += 1
                        client = await self._connect(volume)
                self.acked += 1
                self.acked_bytes += length
                if self.pause:
                    await asyncio.sleep(self.pause)
        finally:
            await client.close()

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), 90)
