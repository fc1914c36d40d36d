"""One appliance process: its VPGs and the NBD server in front of them.

`secondsite appliance --config FILE` runs :func:`main`: it reads an :class:`ApplianceConfig`, opens
each VPG's journal, starts the NBD listeners, and serves until SIGTERM or SIGINT, when it stops
accepting connections, lets requests in flight finish, flushes and closes every journal, and
records a clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.exports import ApplianceExports
from secondsite.appliance.nbd.server import NBDServer, new_event_loop
from secondsite.appliance.vpg import VpgRuntime

__all__ = ["Appliance", "load_config", "main"]

log = logging.getLogger("secondsite.appliance")


class ConfigError(ValueError):
    """The configuration file is missing, not YAML, or not a valid ApplianceConfig."""


def load_config(path: Path) -> ApplianceConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    try:
        return ApplianceConfig.model_validate(data)
    except ValidationError as e:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in e.errors()
        ]
        raise ConfigError(f"{path} is not a valid appliance config:\n" + "\n".join(lines)) from e


class Appliance:
    """The running appliance. `await start()`, then `await stop()`."""

    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        self.vpgs: dict[str, VpgRuntime] = {
            j.vpg: VpgRuntime(j, config.volumes_of(j.vpg)) for j in config.journals
        }
        self.exports = ApplianceExports(self.vpgs)
        self.nbd = NBDServer(self.exports)
        self.addresses: list[str] = []

    async def start(self) -> None:
        started: list[VpgRuntime] = []
        try:
            for vpg in self.vpgs.values():
                await vpg.start()
                started.append(vpg)
            listen = self.config.listen
            if listen.nbd_unix is not None:
                listen.nbd_unix.parent.mkdir(parents=True, exist_ok=True)
                await self.nbd.listen_unix(listen.nbd_unix)
            tcp = listen.tcp_address()
            if tcp is not None:
                await self.nbd.listen_tcp(*tcp)
        except BaseException:
            await self.nbd.close()
            for vpg in started:
                await vpg.stop()
            raise
        self.addresses = self.nbd.addresses
        log.info(
            "event=serving node=%s nbd=%s vpgs=%s",
            self.config.node or "-",
            ",".join(self.addresses),
            ",".join(self.vpgs),
        )

    async def stop(self) -> None:
        started = time.monotonic()
        await self.nbd.close()
        for vpg in self.vpgs.values():
            await vpg.stop()
        log.info("event=stopped seconds=%.2f", time.monotonic() - started)

    def status(self) -> dict[str, Any]:
        return {
            "node": self.config.node,
            "nbd": self.addresses,
            "connections": self.nbd.connection_count,
            "vpgs": {name: vpg.status() for name, vpg in self.vpgs.items()},
        }


def setup_logging(level: str = "INFO") -> None:
    """Structured key=value lines on stderr; each line names its VPG/volume where it has one."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


async def serve(config: ApplianceConfig, ready_file: Path | None = None) -> None:
    appliance = Appliance(config)
    await appliance.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text("\n".join(appliance.addresses) + "\n")
        os.replace(tmp, ready_file)
    await stop.wait()
    log.info("event=stopping why=signal")
    await appliance.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="appliance config (YAML)")
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write the listening addresses to this file once serving (for supervisors and tests)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(config, args.ready_file))
    except OSError as e:
        log.error("event=failed error=%r", e)
        return 1
    finally:
        loop.close()
    return 0
