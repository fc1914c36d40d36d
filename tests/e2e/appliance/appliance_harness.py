"""How the appliance e2e tests run things: the appliance (in a thread or as a process),
qemu-storage-daemon, the QEMU command line tools, and NBD clients.

Every process started here is bounded by a timeout and killed by its owner's `close()`, which the
fixtures call even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.nbd import _wire
from secondsite.appliance.nbd.server import new_event_loop
from secondsite.appliance.qmp import QmpClient, QmpError, mirror_job_ready
from secondsite.appliance.runtime import Appliance
from secondsite.appliance.vpg import VpgRuntime

# The strict asyncio NBD client of the NBD unit tests drives the workloads.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "nbd"))
from nbd_client import NBDClient, connect_and_go

__all__ = [
    "ApplianceProcess",
    "ApplianceThread",
    "KiB",
    "MiB",
    "NBDClient",
    "StorageDaemon",
    "connect_and_go",
    "nbd_uri",
    "peer",
    "requires_peers",
]

KiB = 1024
MiB = 1024 * KiB
PEERS = ["qemu-io", "qemu-img", "qemu-storage-daemon", "qemu-nbd"]
_missing = [tool for tool in PEERS if shutil.which(tool) is None]
requires_peers = pytest.mark.skipif(
    bool(_missing), reason=f"missing QEMU peers: {', '.join(_missing)} (run make debs)"
)
REPO = Path(__file__).resolve().parents[3]

_T = TypeVar("_T")


def peer(*args: str | Path, timeout: float = 60) -> str:
    """Run a QEMU/libnbd tool; fail the test with its output when it fails. Returns stdout."""
    argv = [str(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc.stdout


def nbd_uri(socket: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket}"


class _ErrorLog(logging.Handler):
    """Collects ERROR records of the product's loggers: a failed task or loop is a test failure."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


class ApplianceThread:
    """An :class:`Appliance` on its own (uvloop) event loop thread, as `secondsite appliance`
    runs it, so a test can read its journal and status while clients load it."""

    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="appliance")
        self.appliance: Appliance | None = None
        self.errors = _ErrorLog()

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 60) -> _T:
        """Run ``coro`` on the appliance's loop; block until it returns."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def acall(self, coro: Coroutine[Any, Any, _T], timeout: float = 60) -> _T:
        """Run ``coro`` on the appliance's loop; await it from another loop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def sync(self, fn: Callable[[], _T], timeout: float = 30) -> _T:
        """Run ``fn`` on the appliance's loop thread (journal state is only safe to read there)."""

        async def wrapped() -> _T:
            return fn()

        return self.call(wrapped(), timeout)

    async def async_sync(self, fn: Callable[[], _T], timeout: float = 30) -> _T:
        async def wrapped() -> _T:
            return fn()

        return await self.acall(wrapped(), timeout)

    def start(self) -> None:
        logging.getLogger("secondsite").addHandler(self.errors)
        self._thread.start()

        async def start() -> Appliance:
            appliance = Appliance(self.config)
            await appliance.start()
            return appliance

        self.appliance = self.call(start())

    def vpg(self, name: str) -> VpgRuntime:
        assert self.appliance is not None
        return self.appliance.vpgs[name]

    def status(self, vpg: str) -> dict[str, Any]:
        return self.sync(lambda: self.vpg(vpg).status())

    def wait_consistent(self, vpg: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.sync(lambda: self.vpg(vpg).consistent):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"VPG {vpg} not consistent after {timeout}s: {self.status(vpg)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the appliance cleanly (SIGTERM's path); then the loop and its thread."""
        try:
            if self.appliance is not None:
                appliance, self.appliance = self.appliance, None
                self.call(appliance.stop())
        finally:
            if self._thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(30)
            if not self.loop.is_closed() and not self._thread.is_alive():
                self.loop.close()
            logging.getLogger("secondsite").removeHandler(self.errors)


class ApplianceProcess:
    """`secondsite appliance --config FILE` as a child process: start, kill -9, SIGTERM."""

    def __init__(self, config: ApplianceConfig, workdir: Path) -> None:
        self.config = config
        self.config_file = workdir / "appliance.yaml"
        self.config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        self.ready_file = workdir / "appliance.ready"
        self.log_file = workdir / "appliance.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.prefix: list[str] = []
        """Runs the appliance through this command, e.g. `ip netns exec NS` (which execs it)."""

    def start(self, timeout: float = 30) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.ready_file.unlink(missing_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "secondsite", "appliance", "--config",
                 self.config_file, "--ready-file", self.ready_file],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO,
            )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"appliance exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"appliance not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM and wait: the clean stop must succeed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"appliance ignored SIGTERM for {timeout}s:\n{self.log()}"
            ) from None
        assert rc == 0, f"appliance exited {rc} after SIGTERM:\n{self.log()}"

    def wait_log(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Wait until the log of the current run holds ``text`` ``count`` times."""
        deadline = time.monotonic() + timeout
        marker = f"--- start {self.starts - 1}\n"
        while True:
            run = self.log_file.read_text(errors="replace").rpartition(marker)[2]
            if run.count(text) >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {text!r} in {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self, tail: int = 60) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class StorageDaemon:
    """qemu-storage-daemon with raw source disks, each exported over NBD (the workload's view of
    the disk) and given an NBD target node on the appliance, plus one QMP monitor per name in
    ``monitors`` (QMP serves one client per socket at a time)."""

    def __init__(
        self,
        workdir: Path,
        sources: dict[str, Path],
        appliance_socket: Path,
        monitors: Sequence[str] = ("test",),
        discard: bool = False,
    ) -> None:
        self.workdir = workdir
        self.sources = sources
        self.nbd_socket = workdir / "qsd.sock"
        self.log_file = workdir / "qsd.log"
        self.qmp_sockets = {name: workdir / f"qmp-{name}.sock" for name in monitors}
        args: list[str] = ["qemu-storage-daemon"]
        for volume, path in sources.items():
            file_opts = f"driver=file,node-name={volume}-file,filename={path}"
            if discard:
                file_opts += ",discard=unmap"
            args += ["--blockdev", file_opts]
            raw_opts = f"driver=raw,node-name={volume}-src,file={volume}-file"
            if discard:
                raw_opts += ",discard=unmap"
            args += ["--blockdev", raw_opts]
            args += [
                "--blockdev",
                f"driver=nbd,node-name={volume}-tgt,server.type=unix,"
                f"server.path={appliance_socket},export={volume}",
            ]
        args += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
        for volume in sources:
            args += [
                "--export",
                f"type=nbd,id={volume}-exp,node-name={volume}-src,name={volume},writable=on",
            ]
        for name, path in self.qmp_sockets.items():
            args += ["--chardev", f"socket,id=qmp-{name},path={path},server=on,wait=off"]
            args += ["--monitor", f"chardev=qmp-{name}"]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        wanted = [self.nbd_socket, *self.qmp_sockets.values()]
        while not all(p.exists() for p in wanted):
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"qemu-storage-daemon not up after {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def uri(self, volume: str) -> str:
        return nbd_uri(self.nbd_socket, volume)

    async def qmp(self, monitor: str = "test", timeout: float = 30) -> QmpClient:
        """The product's QMP client on one of the daemon's monitors."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await QmpClient.connect(self.qmp_sockets[monitor])
            except QmpError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def volume_spec(self, volume: str, vpg: str, size: int, monitor: str) -> dict[str, str]:
        """The appliance's config of ``volume`` as the target of this daemon's mirror job,
        watched on QMP ``monitor``."""
        return {
            "name": volume,
            "vpg": vpg,
            "capture": "mirrorTarget",
            "size": str(size),
            "qmpSocket": str(self.qmp_sockets[monitor]),
            "mirrorJob": self.mirror_job(volume),
        }

    @staticmethod
    def mirror_job(volume: str) -> str:
        return f"mirror-{volume}"

    @classmethod
    async def start_mirror(cls, qmp: QmpClient, volume: str, **extra: Any) -> str:
        job = cls.mirror_job(volume)
        await qmp.execute(
            "blockdev-mirror",
            {
                "job-id": job,
                "device": f"{volume}-src",
                "target": f"{volume}-tgt",
                "sync": "full",
                "copy-mode": "write-blocking",
                **extra,
            },
        )
        return job

    @staticmethod
    async def wait_ready(qmp: QmpClient, jobs: Sequence[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all([await mirror_job_ready(qmp, job) for job in jobs]):
            if time.monotonic() > deadline:
                raise AssertionError(f"mirror jobs {jobs} not ready after {timeout}s")
            await asyncio.sleep(0.05)

    async def quit(self, qmp: QmpClient, timeout: float = 30) -> None:
        """Cancel every job (a ready mirror completes without pivoting) and quit."""
        assert self.proc is not None
        with contextlib.suppress(QmpError):
            for job in await qmp.execute("query-block-jobs") or []:
                await qmp.execute("block-job-cancel", {"device": job["device"]})
            await qmp.execute("quit")
        await qmp.close()
        rc = await asyncio.to_thread(self.proc.wait, timeout)
        assert rc == 0, f"qemu-storage-daemon exited {rc}:\n{self.log()}"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def env_seed(name: str, default: int) -> int:
    """A seed for a randomized test: ``default``, or the environment's to replay a failure."""
    return int(os.environ.get(name, default))


async def read_export(
    socket: Path, export: str, offset: int = 0, length: int | None = None, chunk: int = MiB
) -> bytes:
    """Bytes of an NBD export (all of it by default), read over a fresh connection."""
    client, info = await connect_and_go(str(socket), export)
    try:
        end = info.size if length is None else offset + length
        parts = [await client.read(o, min(chunk, end - o)) for o in range(offset, end, chunk)]
    finally:
        await client.disconnect()
        await client.close()
    return b"".join(parts)


async def export_description(socket: Path, export: str) -> str:
    """What the appliance says an export is (a PIT image names its checkpoint)."""
    client = await NBDClient.connect_unix(str(socket))
    try:
        await client.handshake()
        info = await client.info(export, (_wire.INFO_DESCRIPTION,))
        await client.option(_wire.OPT_ABORT)
    finally:
        await client.close()
    return info.description or ""


async def read_images(socket: Path, volumes: Sequence[str], which: str) -> dict[str, bytes]:
    """Each volume's PIT image `pit/<volume>@<which>`."""
    return {v: await read_export(socket, f"pit/{v}@{which}") for v in volumes}
