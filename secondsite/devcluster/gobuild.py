"""What every build of upstream Go programs from the module proxy shares: the cache, the Go
environment, named steps whose failure says which step and what the tool said, and a `go build`
that reports progress. Used by `build` (Kubernetes) and `pulumi_build` (the Pulumi engine).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

Progress = Callable[[str], None]
"""Where a build reports what it is doing, one line at a time."""


class BuildError(RuntimeError):
    """A build step failed; the message names the step and carries the tool's last output lines."""


def cache_root() -> Path:
    """Where SecondSite keeps builds and dev clusters: $SECONDSITE_CACHE or ~/.cache/secondsite."""
    env = os.environ.get("SECONDSITE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "secondsite"


def go_env() -> dict[str, str]:
    """The environment of a build: no cgo, the local toolchain, module mode, no workspace."""
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "0")
    env["GOFLAGS"] = "-mod=mod -buildvcs=false"
    env.setdefault("GOTOOLCHAIN", "local")
    env["GOWORK"] = "off"
    return env


def run_step(
    step: str, argv: Sequence[str], cwd: Path, env: dict[str, str], progress: Progress
) -> str:
    """Run one named step; its stdout, or BuildError with the step's name and last output."""
    progress(f"{step}: {' '.join(argv[:3])} ...")
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as e:
        raise BuildError(f"step {step!r} failed: {e.filename} not found (is Go installed?)") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BuildError(f"step {step!r} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def stream_build(argv: list[str], cwd: Path, env: dict[str, str], progress: Progress) -> None:
    """Run `go build -v`, reporting progress as packages compile; fail with the compiler's words."""
    progress("compile: go build (a cold build takes several minutes on 2 cores)")
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    tail: list[str] = []
    count = 0
    last = time.monotonic()
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-39:], line]
        count += 1
        if time.monotonic() - last >= 15:
            progress(f"compile: {count} packages so far (now {line})")
            last = time.monotonic()
    rc = proc.wait()
    if rc != 0:
        errors = "\n".join(tail[-25:])
        raise BuildError(f"step 'go build' failed (exit {rc}):\n{errors}")
    progress(f"compile: done, {count} packages compiled")
