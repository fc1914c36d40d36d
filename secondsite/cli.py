"""The `secondsite` command.

Each subcommand is one `Command` in `COMMANDS`: its name, a one-line help, a function that adds its
arguments to its parser, and a function that runs it and returns the exit status. A run function
imports what implements the subcommand when it runs, so that, say, `secondsite crds` does not load
kopf or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple


class Command(NamedTuple):
    """A subcommand of `secondsite`."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --- crds ---------------------------------------------------------------------------------------

REPO_CRDS = Path(__file__).resolve().parent.parent / "crds"
"""The checkout's crds/ directory, next to the secondsite package."""


def _crds_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_CRDS,
        metavar="DIR",
        help="directory of the CRD files (default: crds/ of this checkout)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if DIR differs from what would be written",
    )


def _crds_run(args: argparse.Namespace) -> int:
    from secondsite.api import crd

    directory: Path = args.out
    if not args.check:
        crd.write_crds(directory)
        return 0
    problems = crd.check_crds(directory)
    for problem in problems:
        print(f"{directory}: {problem}", file=sys.stderr)
    if problems:
        print("regenerate with: secondsite crds", file=sys.stderr)
        return 1
    return 0


# --- devcluster, demo ---------------------------------------------------------------------------


def _devcluster_arguments(parser: argparse.ArgumentParser) -> None:
    from secondsite.devcluster.commands import add_devcluster_arguments

    add_devcluster_arguments(parser)


def _devcluster_run(args: argparse.Namespace) -> int:
    from secondsite.devcluster.commands import run_devcluster

    return run_devcluster(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from secondsite.devcluster.demo import add_demo_arguments

    add_demo_arguments(parser)


def _demo_run(args: argparse.Namespace) -> int:
    from secondsite.devcluster.demo import run_demo

    return run_demo(args)


# --- appliance ----------------------------------------------------------------------------------


def _appliance_arguments(parser: argparse.ArgumentParser) -> None:
    from secondsite.appliance.runtime import add_arguments

    add_arguments(parser)


def _appliance_run(args: argparse.Namespace) -> int:
    from secondsite.appliance.runtime import main

    return main(args)


COMMANDS: list[Command] = [
    Command(
        "crds",
        "generate crds/ from the API models (or --check that it is up to date)",
        _crds_arguments,
        _crds_run,
    ),
    Command(
        "devcluster",
        "build, start, stop or inspect the local Kubernetes control plane",
        _devcluster_arguments,
        _devcluster_run,
    ),
    Command("demo", "start the dev cluster and show SecondSite in it", _demo_arguments, _demo_run),
    Command(
        "appliance",
        "run a replication appliance (NBD capture, journal, point-in-time images)",
        _appliance_arguments,
        _appliance_run,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `secondsite`, with a subparser per command of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="secondsite", description="Continuous data protection for Kubernetes."
    )
    subparsers = parser.add_subparsers(dest="command", title="commands", required=True)
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `secondsite` with `argv` (default: the process's arguments); return the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status
