"""Fixtures of the control API's e2e tests: a test PKI and appliance processes (see
control_harness.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from control_harness import TOKEN, ApplianceProcess, Pki, make_pki

from secondsite.appliance.control import ControlClient


@pytest.fixture(scope="session")
def pki() -> Iterator[Pki]:
    directory = Path(tempfile.mkdtemp(prefix="ctlpki"))
    yield make_pki(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="ctle", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _listen(workdir: Path, **extra: Any) -> dict[str, Any]:
    token = workdir / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    return {
        "nbdUnix": str(workdir / "nbd.sock"),
        "control": "127.0.0.1:0",
        "tokenFile": str(token),
        **extra,
    }


def _run(process: ApplianceProcess) -> Iterator[ApplianceProcess]:
    process.start()
    try:
        yield process
    finally:
        code = process.stop()
        log = process.log()
        assert code == 0, log
        assert TOKEN not in log, "the token leaked into the log"
        assert "Traceback" not in log, log


@pytest.fixture
def appliance(workdir: Path, pki: Pki) -> Iterator[ApplianceProcess]:
    """HTTPS with a bearer token (no client certificates)."""
    tls = {"certFile": str(pki.crt("server")), "keyFile": str(pki.key("server"))}
    yield from _run(ApplianceProcess(workdir, _listen(workdir, tls=tls)))


@pytest.fixture
def mtls_appliance(workdir: Path, pki: Pki) -> Iterator[ApplianceProcess]:
    """HTTPS that wants client certificates signed by the test CA."""
    tls = {
        "certFile": str(pki.crt("server")),
        "keyFile": str(pki.key("server")),
        "clientCaFile": str(pki.crt("ca")),
    }
    yield from _run(ApplianceProcess(workdir, _listen(workdir, tls=tls)))


@pytest.fixture
def plain_appliance(workdir: Path) -> Iterator[ApplianceProcess]:
    """Plain HTTP, as asked for with `controlPlainHttp` (tests and development only)."""
    yield from _run(ApplianceProcess(workdir, _listen(workdir, controlPlainHttp=True)))


@pytest.fixture
async def client(appliance: ApplianceProcess, pki: Pki) -> AsyncIterator[ControlClient]:
    async with ControlClient(
        appliance.url, token=TOKEN, ca_file=pki.crt("ca"), timeout=30, retries=2
    ) as c:
        yield c
