"""The real Pulumi engine against the dev cluster: built CLI and kubernetes plugin, file backend.

The CLI and the kubernetes plugin are built from the Go module proxy by
`secondsite.devcluster.pulumi_build` (`make pulumi-engine`; here too if missing). The Python
language host cannot be built (its module is not served: see that module's docstring), so programs
run through the CLI's `--client` mode, with the Python SDK's own language runtime serving the
example program in this process: that is the Automation API's inline program, with the example's
Pulumi.yaml as project file. Everything else is the real thing: `pulumi login`, `stack init`,
`preview`, `up` and `destroy` by the CLI, the kubernetes plugin applying to the real API server.

Nothing is downloaded: the plugin is installed from the built file into a private PULUMI_HOME,
automatic plugin acquisition and the update check are off, and state lives in a file backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pulumi import automation as auto

from secondsite.devcluster import pulumi_build

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "pulumi"
PASSPHRASE = "secondsite-e2e"


@dataclasses.dataclass
class PulumiEnv:
    engine: pulumi_build.Engine
    home: Path
    work_dir: Path
    env: dict[str, str]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the built `pulumi` CLI in the example's directory."""
        proc = subprocess.run(
            [str(self.engine.pulumi), "--non-interactive", *args],
            cwd=self.work_dir,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"pulumi {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
        return proc

    def stack(self, name: str, config: Mapping[str, Any]) -> auto.Stack:
        """`pulumi stack init` a stack of the example, set its config, return it for operations."""
        self.cli("stack", "init", name)
        for key, value in config.items():
            kind = {bool: "bool", int: "int"}.get(type(value), "string")
            text = json.dumps(value) if isinstance(value, bool) else str(value)
            self.cli("config", "set", "--stack", name, "--type", kind, key, "--", text)
        return auto.select_stack(
            stack_name=name,
            project_name="secondsite-shop",
            program=run_example,
            opts=auto.LocalWorkspaceOptions(
                work_dir=str(self.work_dir),
                pulumi_home=str(self.home),
                env_vars=self.env,
                pulumi_command=auto.PulumiCommand(
                    root=str(self.engine.pulumi.parent.parent), skip_version_check=True
                ),
            ),
        )


def run_example() -> None:
    """The example program, as `pulumi up` would run its __main__.py."""
    runpy.run_path(str(EXAMPLE / "__main__.py"), run_name="__main__")
