"""Fixtures of the Pulumi engine e2e tests (see pulumi_engine_env for how the engine runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pulumi_engine_env import EXAMPLE, PASSPHRASE, REPO, PulumiEnv

from secondsite.devcluster import pulumi_build


@pytest.fixture(scope="session")
def pulumi_env(
    tmp_path_factory: pytest.TempPathFactory, kubeconfig: Path, kubectl: Any
) -> PulumiEnv:
    # `make test` builds the engine first (`make pulumi-engine`); a cold build takes longer than
    # a test may, so a missing engine fails here, saying how to build it.
    engine = pulumi_build.cached()
    if engine is None:
        pytest.fail(
            "the Pulumi engine is not built: run `make pulumi-engine`"
            " (python -m secondsite.devcluster.pulumi_build)"
        )
    base = tmp_path_factory.mktemp("pulumi")
    home = base / "home"
    work_dir = base / "example"
    shutil.copytree(EXAMPLE, work_dir, ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **engine.environment(home),
        "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
        "KUBECONFIG": str(kubeconfig),
    }
    pulumi_env = PulumiEnv(engine=engine, home=home, work_dir=work_dir, env=env)

    engine.install_plugins(home)
    plugins = pulumi_env.cli("plugin", "ls", "--json")
    installed = {(p["name"], p["kind"], p["version"]) for p in json.loads(plugins.stdout)}
    assert ("kubernetes", "resource", engine.kubernetes_plugin_version) in installed, installed
    (base / "state").mkdir()
    pulumi_env.cli("login", f"file://{base / 'state'}")

    kubectl("apply", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    return pulumi_env
