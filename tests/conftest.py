"""Fixtures shared by every test directory.

`devcluster` starts one real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the node simulator) for the whole session, on first use only, so unit-only runs
never pay for it. Set SECONDSITE_TEST_KUBECONFIG to run against a cluster that is already up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from secondsite.devcluster.cluster import DevCluster


class Kubectl(Protocol):
    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def devcluster() -> Iterator[DevCluster]:
    external = os.environ.get("SECONDSITE_TEST_KUBECONFIG")
    if external:
        cluster = DevCluster(name="external")
        cluster.dir.mkdir(parents=True, exist_ok=True)
        if not cluster.kubeconfig.exists() or cluster.kubeconfig.resolve() != Path(external):
            cluster.kubeconfig.unlink(missing_ok=True)
            cluster.kubeconfig.symlink_to(Path(external).resolve())
        yield cluster
        return
    # One cluster per test session, so concurrent sessions (several developers' runs, or a demo
    # cluster) never share state.
    cluster = DevCluster(name=f"pytest-{os.getpid()}")
    cluster.up(fresh=True)
    try:
        yield cluster
    finally:
        cluster.down(quiet=True)
        shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kubeconfig(devcluster: DevCluster) -> Path:
    return devcluster.kubeconfig


@pytest.fixture(scope="session")
def kubectl(devcluster: DevCluster) -> Kubectl:
    """Run the cluster's own kubectl; with check=True a failure fails the test with stderr."""

    def run(
        *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            devcluster.kubectl_argv(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    return run


@pytest.fixture
def wait_for() -> Callable[..., object]:
    """Poll `check` until it returns a truthy value (returned) or `timeout` passes (fails)."""
    import time

    def wait(check: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")

    return wait
