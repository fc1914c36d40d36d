"""Fixtures of the replication e2e tests: a test PKI, a short working directory (unix socket paths
are limited to 107 bytes), and the appliance processes of a test, killed at teardown whatever
happened (their logs are printed when a test fails)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "appliance"))
from replication_harness import Node, Pki, make_pki


@pytest.fixture(scope="session")
def pki() -> Iterator[Pki]:
    path = Path(tempfile.mkdtemp(prefix="ssrpki"))
    try:
        yield make_pki(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ssrep", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nodes(request: pytest.FixtureRequest) -> Iterator[list[Node]]:
    """Register every Node a test starts: each is killed at teardown."""
    started: list[Node] = []
    yield started
    failed = getattr(request.node, "rep_call", None)
    for node in started:
        node.close()
        if failed is not None and failed.failed:
            print(f"--- log of {node.name}:\n{node.log(80)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
