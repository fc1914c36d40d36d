"""One appliance process: its VPGs, the NBD server in front of them, the replication stream, and
the control API.

`secondsite appliance --config FILE` runs :func:`main`: it reads an :class:`ApplianceConfig`, opens
each VPG's journal (local ones, and those fed by replication streams), starts the VPGs it protects
for a recovery appliance, the stream listener (`listen.stream`), the NBD listeners and (with
`listen.control`) the control API, and serves until SIGTERM or SIGINT, when it stops the control
API, stops accepting NBD connections, lets requests in flight finish, ships what its protected
buffers hold (bounded), lets stream records in flight become durable, flushes and closes every
journal, and records a clean stop.

The config file may name listen addresses only: the control API's `PUT /v1/config` then declares
the VPGs and volumes (:meth:`Appliance.apply`, planned by the pure :func:`plan_apply`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from secondsite.appliance.capture import MirrorTargetExport
from secondsite.appliance.config import ApplianceConfig, JournalSpec, ProtectedVpgSpec, VolumeSpec
from secondsite.appliance.control.auth import TokenFileError
from secondsite.appliance.control.errors import (
    ApplyConflict,
    ApplyFailed,
    ApplyInvalid,
    Conflict,
    ImageBusyError,
    NotMirrorTargetError,
    UnknownImageError,
    UnknownVolumeError,
    UnknownVpgError,
)
from secondsite.appliance.control.models import (
    ApplyResult,
    Change,
    ChangeAction,
    CheckpointInfo,
    FailoverState,
    ImageInfo,
    ReverseResult,
)
from secondsite.appliance.control.server import ControlServer
from secondsite.appliance.exports import IMAGE_PREFIX, ApplianceExports, PitExport
from secondsite.appliance.journal import (
    Checkpoint,
    ImagesOpenError,
    Journal,
    JournalClosedError,
    discard_journal,
)
from secondsite.appliance.nbd.server import NBDServer, new_event_loop
from secondsite.appliance.protected import ProtectedVpg, discard_sync_state
from secondsite.appliance.recovery import RecoveryVpg
from secondsite.appliance.reverse import RecoveredVpg, ReversePlan, ReverseRole, plan_reverse
from secondsite.appliance.stream import BandwidthLimiter, StreamReceiver, StreamSink, server_context
from secondsite.appliance.vpg import JournaledVpg, VpgRuntime

__all__ = ["Appliance", "ImageRegistry", "PinnedImage", "load_config", "main", "plan_apply"]

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


# -- declarative apply --------------------------------------------------------------------------

_LIVE_JOURNAL_FIELDS = frozenset(
    {"history", "hardLimit", "warningPercent", "checkpointIntervalSeconds"}
)
"""Journal fields a running VPG takes on at once (`VpgRuntime.retune`)."""

_WHY_JOURNAL = {
    "directory": "a running VPG's journal cannot move; remove the VPG and add it again",
    "sources": "the sources of a running journal cannot change live; remove the VPG and add it "
    "again, or restart the appliance",
    "segmentBytes": "the segment size is fixed when the journal opens; restart the appliance",
    "scratchDirectory": "scratch overlays of open images live there; restart the appliance",
    "replicas": "the replicas of a running journal cannot move; remove the VPG and add it again",
}
_WHY_VOLUME = {
    "vpg": "a volume cannot move between VPGs while protected",
    "capture": "the capture mode of a protected volume is fixed: its export, journal and sync "
    "state depend on it",
    "size": "a protected volume cannot be resized live: its replica and journal have a fixed size",
    "backing": "the backing store of an in-path volume cannot be swapped live",
    "replica": "the replica of a protected volume cannot move live",
    "qmpSocket": "the QMP watcher of a mirror target cannot be repointed live",
    "mirrorJob": "the QMP watcher of a mirror target cannot be repointed live",
}


def _journal_fields(j: JournalSpec) -> dict[str, object]:
    """The journal's settings by wire name, quantities and durations normalized (1Gi == 2**30)."""
    fields = j.model_dump(by_alias=True, exclude={"vpg"})
    fields["history"] = j.history_seconds()
    fields["hardLimit"] = j.hard_limit_bytes()
    return fields


def _protected_fields(p: ProtectedVpgSpec) -> dict[str, object]:
    fields = p.model_dump(by_alias=True, exclude={"vpg"})
    fields["bufferBytes"] = p.buffer_size()
    return fields


_RESTART_FIELDS = {
    "name": "the appliance's name is its identity in replication streams; restart the appliance "
    "with the new config",
    "streamTls": "the stream's TLS material is loaded at start; restart the appliance",
    "streamPlainTcp": "the stream's transport is chosen at start; restart the appliance",
}


def _appliance_fields(c: ApplianceConfig) -> dict[str, object]:
    return {
        "node": c.node,
        # The name matters while protected VPGs stream under it.
        "name": c.source_name if c.protected else None,
        "streamTls": c.stream_tls,
        "streamPlainTcp": c.stream_plain_tcp,
        "bandwidthLimit": c.bandwidth_bytes(),
    }


def _volume_fields(v: VolumeSpec) -> dict[str, object]:
    fields = v.model_dump(by_alias=True, exclude={"name"})
    fields["size"] = v.size_bytes()
    return fields


def _diff(old: dict[str, object], new: dict[str, object]) -> list[str]:
    return sorted(k for k in new if old.get(k) != new[k])


def plan_apply(
    current: ApplianceConfig,
    desired: ApplianceConfig,
    failover_phases: Mapping[str, str | None],
) -> list[Change]:
    """What applying ``desired`` over ``current`` changes, in the order it is applied.

    Raises :class:`ApplyConflict` listing every change that cannot be applied live: a new
    listen section, the appliance's name or stream TLS, a volume's capture/size/backing/replica/QMP
    settings or VPG, journal settings other than retention (history, hardLimit, warningPercent,
    checkpoint interval), a journal's sources, a protected VPG's settings or volumes (remove and
    add it again instead), removing a volume from a VPG that stays, or any change to a VPG in the
    middle of a failover (``failover_phases``). The bandwidth limit changes live.
    """
    conflicts: list[Conflict] = []
    changes: list[Change] = []
    if desired.listen != current.listen:
        conflicts.append(
            Conflict(
                "listen",
                "listen addresses, TLS and token files cannot change while the appliance runs; "
                "restart it with the new config",
            )
        )
    old_app, new_app = _appliance_fields(current), _appliance_fields(desired)
    for field in _diff(old_app, new_app):
        if field == "name" and not (current.protected and desired.protected):
            continue
        if field in _RESTART_FIELDS:
            conflicts.append(Conflict(field, _RESTART_FIELDS[field]))
        else:
            changes.append(
                Change(kind="appliance", name=field, action=ChangeAction.CHANGED, fields=[field])
            )
    changes += _plan_protected(current, desired, conflicts)
    old_vpgs = {j.vpg: j for j in current.journals}
    new_vpgs = {j.vpg: j for j in desired.journals}
    old_vols = {v.name: v for v in current.volumes}
    new_vols = {v.name: v for v in desired.volumes}
    dirs = {j.directory.resolve(): j.vpg for j in current.journals}

    def in_failover(vpg: str, what: str) -> bool:
        phase = failover_phases.get(vpg)
        if phase is not None:
            conflicts.append(
                Conflict(
                    f"vpgs.{vpg}",
                    f"cannot {what}: the VPG is in failover phase {phase}; commit or roll back "
                    "first",
                )
            )
        return phase is not None

    for name in sorted(old_vpgs.keys() | new_vpgs.keys()):
        old, new = old_vpgs.get(name), new_vpgs.get(name)
        vpg_changes: list[Change] = []
        if new is None:
            if not in_failover(name, "remove it"):
                vpg_changes += _with_volumes(
                    "vpg", name, ChangeAction.REMOVED, current.volumes_of(name)
                )
            changes += vpg_changes
            continue
        if old is None:
            owner = dirs.get(new.directory.resolve())
            if owner is not None:
                conflicts.append(
                    Conflict(
                        f"vpgs.{name}.directory",
                        f"{new.directory} is the journal directory of running VPG {owner}",
                    )
                )
            vpg_changes.append(Change(kind="vpg", name=name, action=ChangeAction.ADDED))
        else:
            changed = _diff(_journal_fields(old), _journal_fields(new))
            for field in changed:
                if field not in _LIVE_JOURNAL_FIELDS:
                    conflicts.append(Conflict(f"vpgs.{name}.{field}", _WHY_JOURNAL[field]))
            if changed:
                vpg_changes.append(
                    Change(kind="vpg", name=name, action=ChangeAction.CHANGED, fields=changed)
                )
        for vol in desired.volumes_of(name):
            was = old_vols.get(vol.name)
            if was is None:
                vpg_changes.append(Change(kind="volume", name=vol.name, action=ChangeAction.ADDED))
                continue
            for field in _diff(_volume_fields(was), _volume_fields(vol)):
                why = _WHY_VOLUME.get(field, "cannot change live")
                conflicts.append(Conflict(f"volumes.{vol.name}.{field}", why))
        if old is not None:
            for vol in current.volumes_of(name):
                if vol.name not in new_vols:
                    conflicts.append(
                        Conflict(
                            f"volumes.{vol.name}",
                            f"a volume cannot be removed from VPG {name} while it runs (its "
                            "checkpoints cover every volume); remove the whole VPG",
                        )
                    )
        if vpg_changes and old is not None and in_failover(name, "change it"):
            continue
        changes += vpg_changes
    if conflicts:
        raise ApplyConflict(conflicts)
    return changes


def _with_volumes(
    kind: Literal["vpg", "protected"], name: str, action: ChangeAction, volumes: list[VolumeSpec]
) -> list[Change]:
    """A VPG's entry (journal or protected) added or removed together with its volumes."""
    return [
        Change(kind=kind, name=name, action=action),
        *(Change(kind="volume", name=v.name, action=action) for v in volumes),
    ]


def _plan_protected(
    current: ApplianceConfig, desired: ApplianceConfig, conflicts: list[Conflict]
) -> list[Change]:
    """Protected VPGs come and go live; a running one keeps its settings and volume table (its
    stream's HELLO carries the table, and its sync state depends on it)."""
    changes: list[Change] = []
    old = {p.vpg: p for p in current.protected}
    new = {p.vpg: p for p in desired.protected}
    for name in sorted(old.keys() | new.keys()):
        was, now = old.get(name), new.get(name)
        if now is None:
            changes += _with_volumes(
                "protected", name, ChangeAction.REMOVED, current.volumes_of(name)
            )
            continue
        if was is None:
            changes += _with_volumes(
                "protected", name, ChangeAction.ADDED, desired.volumes_of(name)
            )
            continue
        for field in _diff(_protected_fields(was), _protected_fields(now)):
            conflicts.append(
                Conflict(
                    f"protected.{name}.{field}",
                    "a protected VPG's settings are fixed while it streams; remove it and add "
                    "it again (its volumes then resync), or restart the appliance",
                )
            )
        old_vols = {v.name: v for v in current.volumes_of(name)}
        new_vols = {v.name: v for v in desired.volumes_of(name)}
        for vol in sorted(old_vols.keys() ^ new_vols.keys()):
            conflicts.append(
                Conflict(
                    f"volumes.{vol}",
                    f"the volume table of protected VPG {name} is fixed while it streams; remove "
                    "the VPG and add it again, or restart the appliance",
                )
            )
        for vol in sorted(old_vols.keys() & new_vols.keys()):
            for field in _diff(_volume_fields(old_vols[vol]), _volume_fields(new_vols[vol])):
                why = _WHY_VOLUME.get(field, "cannot change live")
                conflicts.append(Conflict(f"volumes.{vol}.{field}", why))
    return changes


def _preflight(desired: ApplianceConfig, changes: list[Change]) -> None:
    """Check what the config model cannot: in-path backing stores of added volumes exist and
    have the declared size. Raises :class:`ApplyInvalid` before anything is touched."""
    added = {c.name for c in changes if c.kind == "volume" and c.action == "added"}
    errors: list[dict[str, Any]] = []
    for i, vol in enumerate(desired.volumes):
        if vol.name not in added or vol.backing is None:
            continue
        loc: list[str | int] = ["volumes", i, "backing"]
        try:
            with open(vol.backing, "rb") as f:
                size = f.seek(0, os.SEEK_END)
        except OSError as e:
            errors.append({"loc": loc, "msg": f"cannot open {vol.backing}: {e.strerror}"})
            continue
        declared = vol.size_bytes()
        if declared is not None and declared != size:
            errors.append(
                {
                    "loc": ["volumes", i, "size"],
                    "msg": f"size {declared} differs from the backing store's {size}",
                }
            )
    if errors:
        raise ApplyInvalid([{**e, "type": "value_error"} for e in errors])


# -- images pinned through the API ---------------------------------------------------------------


@dataclasses.dataclass
class PinnedImage:
    """A PIT image created through the control API: open until deleted, served as `image/<id>`."""

    id: str
    vpg: str
    export: PitExport
    created: float = dataclasses.field(default_factory=time.time)


class ImageRegistry(Mapping[str, PitExport]):
    """The appliance's pinned images; as a mapping of id -> export it is what the NBD provider
    looks `image/<id>` up in."""

    def __init__(self) -> None:
        self._images: dict[str, PinnedImage] = {}

    def __getitem__(self, image_id: str) -> PitExport:
        return self._images[image_id].export

    def __iter__(self) -> Iterator[str]:
        return iter(self._images)

    def __len__(self) -> int:
        return len(self._images)

    def add(self, image: PinnedImage) -> None:
        self._images[image.id] = image

    def find(self, vpg: str, image_id: str) -> PinnedImage:
        image = self._images.get(image_id)
        if image is None or image.vpg != vpg:
            raise UnknownImageError(f"VPG {vpg} has no image {image_id!r}")
        return image

    def of_vpg(self, vpg: str) -> list[PinnedImage]:
        return [i for i in self._images.values() if i.vpg == vpg]

    def close(self, image: PinnedImage) -> None:
        """Forget the image and close it (its journal pin goes with it)."""
        self._images.pop(image.id, None)
        image.export.image.close()

    def close_all(self) -> None:
        for image in list(self._images.values()):
            self.close(image)


# -- the appliance -------------------------------------------------------------------------------


class Appliance:
    """The running appliance. `await start()`, then `await stop()`; `apply()` reconfigures it."""

    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        self.limiter = BandwidthLimiter(config.bandwidth_bytes())
        """Shared by every sender of the appliance, weighted by VPG priority."""
        self.receiver: StreamReceiver | None = None
        """The replication stream's listener (with `listen.stream`)."""
        if config.listen.stream is not None:
            tls = config.stream_tls
            self.receiver = StreamReceiver(
                self._sink,
                ssl_context=None
                if tls is None
                else server_context(tls.cert_file, tls.key_file, tls.ca_file),
            )
        self.vpgs: dict[str, JournaledVpg] = {
            j.vpg: self._journaled(j, config) for j in config.journals
        }
        """VPGs journaled here: captured here (replication to self) or fed by the stream."""
        self.protected: dict[str, ProtectedVpg] = {
            p.vpg: self._protected(p, config) for p in config.protected
        }
        """VPGs captured here and replicated to a recovery appliance."""
        self.images = ImageRegistry()
        self.exports = ApplianceExports(self.vpgs, self.images, self.protected)
        self.nbd = NBDServer(self.exports)
        self.addresses: list[str] = []
        self.stream_address: str | None = None
        """`host:port` the stream listener is bound to, once started."""
        self.control: ControlServer | None = None
        self._apply_lock = asyncio.Lock()
        self._promoted: dict[str, Checkpoint] = {}

    def _journaled(self, spec: JournalSpec, config: ApplianceConfig) -> JournaledVpg:
        if spec.sources:
            assert self.receiver is not None, "the config model wants listen.stream for sources"
            return RecoveryVpg(spec, self.receiver)
        return VpgRuntime(spec, config.volumes_of(spec.vpg))

    def _protected(self, spec: ProtectedVpgSpec, config: ApplianceConfig) -> ProtectedVpg:
        source = config.source_name
        assert source is not None, "the config model wants a name for protected VPGs"
        return ProtectedVpg(
            spec,
            config.volumes_of(spec.vpg),
            source=source,
            tls=config.stream_tls,
            limiter=self.limiter,
        )

    def _sink(self, vpg: str) -> StreamSink | None:
        """The stream receiver's lookup: the journal sink of a recovery VPG."""
        runtime = self.vpgs.get(vpg)
        return runtime.sink if isinstance(runtime, RecoveryVpg) else None

    async def start(self) -> None:
        started: list[JournaledVpg | ProtectedVpg] = []
        try:
            for vpg in self.vpgs.values():
                await _start_vpg(vpg)
                started.append(vpg)
            for pvpg in self.protected.values():
                await _start_vpg(pvpg)
                started.append(pvpg)
            listen = self.config.listen
            stream = listen.stream_address()
            if stream is not None and self.receiver is not None:
                host, port = await self.receiver.listen(*stream)
                self.stream_address = f"{f'[{host}]' if ':' in host else host}:{port}"
            if listen.nbd_unix is not None:
                listen.nbd_unix.parent.mkdir(parents=True, exist_ok=True)
                await self.nbd.listen_unix(listen.nbd_unix)
            tcp = listen.tcp_address()
            if tcp is not None:
                await self.nbd.listen_tcp(*tcp)
            self.addresses = self.nbd.addresses
            if listen.control is not None:
                self.control = ControlServer(self, listen)
                await self.control.start()
        except BaseException:
            await self.nbd.close()
            if self.receiver is not None:
                await self.receiver.close()
            for runtime in reversed(started):
                await runtime.stop()
            raise
        log.info(
            "event=serving name=%s node=%s nbd=%s stream=%s control=%s vpgs=%s protected=%s",
            self.config.source_name or "-",
            self.config.node or "-",
            ",".join(self.addresses),
            self.stream_address or "-",
            self.control.url if self.control is not None else "-",
            ",".join(self.vpgs) or "-",
            ",".join(self.protected) or "-",
        )

    async def stop(self) -> None:
        started = time.monotonic()
        if self.control is not None:
            await self.control.stop()
        await self.nbd.close()
        self.images.close_all()
        for pvpg in self.protected.values():
            await pvpg.stop()
        if self.receiver is not None:
            await self.receiver.close()
        for vpg in self.vpgs.values():
            await vpg.stop()
        log.info("event=stopped seconds=%.2f", time.monotonic() - started)

    # -- lookups and status ----------------------------------------------------------------

    def vpg(self, name: str) -> JournaledVpg:
        vpg = self.vpgs.get(name)
        if vpg is None:
            where = (
                f"; it is protected here and journaled on {self.protected[name].spec.recovery}"
                if name in self.protected
                else ""
            )
            raise UnknownVpgError(f"no VPG {name!r} journaled on this appliance{where}")
        return vpg

    def protected_vpg(self, name: str) -> ProtectedVpg:
        pvpg = self.protected.get(name)
        if pvpg is None:
            raise UnknownVpgError(f"no VPG {name!r} protected (replicated) from this appliance")
        return pvpg

    def journal(self, name: str) -> Journal:
        journal = self.vpg(name).journal
        if journal is None:
            raise JournalClosedError(f"VPG {name} is not running")
        return journal

    def vpg_status(self, name: str) -> dict[str, Any]:
        vpg = self.vpg(name)
        st = vpg.status()
        phase = None if vpg.journal is None else vpg.journal.failover_phase
        st["failoverPhase"] = phase
        st["images"] = len(self.images.of_vpg(name))
        if phase is not None:
            st["state"] = "FailingOver"
        else:
            st.setdefault("state", "Protected" if vpg.consistent else "Syncing")
        return st

    def protected_status(self, name: str) -> dict[str, Any]:
        return self.protected_vpg(name).status()

    def status(self) -> dict[str, Any]:
        receiver = self.receiver
        return {
            "node": self.config.node,
            "name": self.config.source_name,
            "nbd": self.addresses,
            "stream": self.stream_address,
            "control": None if self.control is None else self.control.url,
            "connections": self.nbd.connection_count,
            "streamConnections": 0 if receiver is None else len(receiver.stats()),
            "streamRejected": 0 if receiver is None else receiver.rejected,
            "vpgs": {name: self.vpg_status(name) for name in list(self.vpgs)},
            "protected": {name: self.protected_status(name) for name in list(self.protected)},
        }

    # -- declarative config ----------------------------------------------------------------

    async def apply(self, desired: ApplianceConfig) -> ApplyResult:
        """Make the running appliance match ``desired``; idempotent.

        Starts added VPGs (journaled, recovery and protected), adds volumes to running journaled
        VPGs, retunes retention and the bandwidth limit, then stops removed VPGs (their journals
        stay on disk; images pinned on them are closed). A VPG that changes role (journaled here
        and now protected, or the other way round: reverse protection) is stopped in its old
        role before it starts in the new one, since both use the same files. Changes that cannot
        be applied live raise :class:`ApplyConflict` and an unusable backing store
        :class:`ApplyInvalid`, both before anything is touched. An I/O error while starting
        raises :class:`ApplyFailed` after stopping what this call started and restarting VPGs
        in the roles they had (volumes added to running VPGs stay).
        """
        async with self._apply_lock:
            return await self._apply(desired)

    async def _apply(
        self, desired: ApplianceConfig, between: Callable[[], None] | None = None
    ) -> ApplyResult:
        """:meth:`apply` under the lock; ``between`` runs in a thread after VPGs switching roles
        stopped and before anything starts."""
        phases = {n: v.journal.failover_phase for n, v in self.vpgs.items() if v.journal}
        changes = plan_apply(self.config, desired, phases)
        _preflight(desired, changes)
        current = self.config
        switching = _role_switches(changes)
        stayed = {j.vpg for j in current.journals} & {j.vpg for j in desired.journals}
        started: list[JournaledVpg | ProtectedVpg] = []
        for name in switching:
            await self._stop_role(name)
        try:
            if between is not None:
                await asyncio.to_thread(between)
            for change in changes:
                if change.kind == "vpg" and change.action == "added":
                    vpg = self._journaled(desired.journal_for(change.name), desired)
                    await _start_vpg(vpg)
                    started.append(vpg)
                    self.vpgs[vpg.name] = vpg
                elif change.kind == "protected" and change.action == "added":
                    pvpg = self._protected(desired.protected_for(change.name), desired)
                    await _start_vpg(pvpg)
                    started.append(pvpg)
                    self.protected[pvpg.name] = pvpg
                elif change.kind == "volume" and change.action == "added":
                    spec = next(v for v in desired.volumes if v.name == change.name)
                    if spec.vpg in stayed:
                        running = self.vpgs[spec.vpg]
                        assert isinstance(running, VpgRuntime)
                        await running.add_volume(spec)
        except Exception as e:
            for runtime in reversed(started):
                if isinstance(runtime, ProtectedVpg):
                    self.protected.pop(runtime.name, None)
                else:
                    self.vpgs.pop(runtime.name, None)
                await runtime.stop()
            restarted = await self._restart_roles(current, switching)
            log.error(
                "event=apply-failed error=%r undone=%s restarted=%s",
                e,
                ",".join(v.name for v in started) or "-",
                ",".join(restarted) or "-",
            )
            raise ApplyFailed(
                f"applying failed: {e}; the VPGs this request started were stopped again"
                + (f" and {', '.join(restarted)} restarted as before" if restarted else "")
            ) from e
        for change in changes:
            if change.name in switching and change.action == "removed":
                continue  # stopped above
            if change.kind == "vpg" and change.action == "changed":
                self.vpgs[change.name].retune(desired.journal_for(change.name))
            elif change.kind == "vpg" and change.action == "removed":
                await self._remove_vpg(change.name)
            elif change.kind == "protected" and change.action == "removed":
                await self.protected.pop(change.name).stop()
            elif change.kind == "appliance" and change.name == "bandwidthLimit":
                self.limiter.rate = desired.bandwidth_bytes()
        self.config = desired
        for change in changes:
            log.info(
                "event=applied kind=%s name=%s action=%s fields=%s",
                change.kind,
                change.name,
                change.action,
                ",".join(change.fields) or "-",
            )
        return ApplyResult(changes=changes)

    async def _stop_role(self, name: str) -> None:
        """Stop VPG ``name`` in the role it has here (journaled or protected)."""
        if name in self.vpgs:
            await self._remove_vpg(name)
        else:
            await self.protected.pop(name).stop()
        log.info("vpg=%s event=role-stopped why=role-switch", name)

    async def _restart_roles(self, config: ApplianceConfig, names: list[str]) -> list[str]:
        """Start VPGs ``names`` again as ``config`` has them (undoing a failed role switch);
        returns those that started (one that fails is logged and stays stopped)."""
        restarted: list[str] = []
        for name in names:
            runtime: JournaledVpg | ProtectedVpg
            if any(j.vpg == name for j in config.journals):
                runtime = self._journaled(config.journal_for(name), config)
            else:
                runtime = self._protected(config.protected_for(name), config)
            try:
                await _start_vpg(runtime)
            except Exception as e:
                log.error("vpg=%s event=restart-failed error=%r", name, e)
                continue
            if isinstance(runtime, ProtectedVpg):
                self.protected[name] = runtime
            else:
                self.vpgs[name] = runtime
            restarted.append(name)
        return restarted

    # -- reverse protection ----------------------------------------------------------------

    async def reverse(
        self,
        vpg_name: str,
        role: ReverseRole,
        *,
        peer: str,
        peer_stream: str | None = None,
        directory: Path | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ReverseResult:
        """Swap the VPG's direction of protection with the appliance ``peer`` (`reverse`
        module), this appliance taking ``role``: plan this appliance's side and apply it like a
        `PUT /v1/config`, discarding stale state between the old role's stop and the new one's
        start. Nothing changes when the VPG has ``role`` already. Raises :class:`ReverseRefused`
        (nothing changed) when the VPG cannot be reversed here."""
        async with self._apply_lock:
            recovered = None
            if vpg_name in self.vpgs:
                journal = self.journal(vpg_name)
                committed = journal.committed_failover
                recovered = RecoveredVpg(
                    failover_phase=journal.failover_phase,
                    committed_checkpoint=None if committed is None else committed.id,
                    replicas={v.name: v.replica_path for v in journal.volumes()},
                    images=[i.id for i in self.images.of_vpg(vpg_name)],
                )
            plan = plan_reverse(
                self.config,
                vpg_name,
                role,
                peer=peer,
                peer_stream=peer_stream,
                directory=directory,
                settings=settings,
                recovered=recovered,
            )
            result = await self._apply(plan.config, lambda: _discard_stale_state(plan))
        log.info(
            "vpg=%s event=reversed role=%s peer=%s changes=%d",
            vpg_name,
            plan.role,
            peer,
            len(result.changes),
        )
        return ReverseResult(vpg=vpg_name, role=plan.role.value, changes=result.changes)

    async def _remove_vpg(self, name: str) -> None:
        vpg = self.vpgs.pop(name)
        for image in self.images.of_vpg(name):
            self.images.close(image)
        self._promoted.pop(name, None)
        await vpg.stop()

    # -- images ----------------------------------------------------------------------------

    async def open_image(
        self, vpg_name: str, volume: str, checkpoint: Checkpoint, *, writable: bool
    ) -> PinnedImage:
        """Open and pin the image of ``volume`` at ``checkpoint`` until :meth:`delete_image`."""
        vpg = self.vpg(vpg_name)
        if not vpg.has_volume(volume):
            raise UnknownVolumeError(f"VPG {vpg_name} has no volume {volume!r}")
        image = await self.journal(vpg_name).open_image(volume, checkpoint, writable=writable)
        pinned = PinnedImage(
            secrets.token_hex(6), vpg_name, PitExport(image, checkpoint, pinned=True)
        )
        self.images.add(pinned)
        log.info(
            "vpg=%s volume=%s event=image-opened image=%s checkpoint=%d writable=%s",
            vpg_name,
            volume,
            pinned.id,
            checkpoint.id,
            writable,
        )
        return pinned

    def delete_image(self, vpg_name: str, image_id: str, *, force: bool = False) -> PinnedImage:
        """Close a pinned image; refused while NBD clients use it, unless ``force``."""
        image = self.images.find(vpg_name, image_id)
        if image.export.connections and not force:
            raise ImageBusyError(
                f"image {image_id} has {image.export.connections} NBD connection(s); "
                "disconnect them first, or delete with force=true"
            )
        self.images.close(image)
        log.info(
            "vpg=%s event=image-deleted image=%s connections=%d",
            vpg_name,
            image_id,
            image.export.connections,
        )
        return image

    def image_info(self, image: PinnedImage) -> ImageInfo:
        export = IMAGE_PREFIX + image.id
        pit = image.export
        return ImageInfo(
            id=image.id,
            vpg=image.vpg,
            volume=pit.image.volume,
            checkpoint=CheckpointInfo.of(pit.checkpoint),
            writable=pit.image.writable,
            size=pit.size,
            export=export,
            nbd=[_nbd_uri(address, export) for address in self.addresses],
            connections=pit.connections,
            created=datetime.fromtimestamp(image.created, UTC),
        )

    # -- failover --------------------------------------------------------------------------

    async def promote(self, vpg_name: str, checkpoint: Checkpoint) -> Checkpoint:
        """Live failover: every replica of the VPG becomes its image at ``checkpoint``."""
        journal = self.journal(vpg_name)
        runtime = self.vpgs[vpg_name]
        if isinstance(runtime, RecoveryVpg) and runtime.sink is not None:
            # Views a delta sync keeps open for a while are no images a user holds.
            runtime.sink.close_idle_views()
        pinned = self.images.of_vpg(vpg_name)
        if pinned:
            ids = ", ".join(i.id for i in pinned)
            raise ImagesOpenError(f"images {ids} of VPG {vpg_name} are open; delete them first")
        cp = await journal.promote_to(checkpoint)
        self._promoted[vpg_name] = cp
        log.info("vpg=%s event=promoted checkpoint=%d", vpg_name, cp.id)
        return cp

    async def commit(self, vpg_name: str) -> None:
        await self.journal(vpg_name).commit()
        cp = self._promoted.pop(vpg_name, None)
        log.info("vpg=%s event=failover-committed checkpoint=%s", vpg_name, cp and cp.id)

    async def rollback(self, vpg_name: str) -> None:
        await self.journal(vpg_name).rollback()
        cp = self._promoted.pop(vpg_name, None)
        log.info("vpg=%s event=failover-rolled-back checkpoint=%s", vpg_name, cp and cp.id)

    def failover_state(self, vpg_name: str) -> FailoverState:
        phase = self.journal(vpg_name).failover_phase
        cp = self._promoted.get(vpg_name) if phase is not None else None
        return FailoverState(
            vpg=vpg_name, phase=phase, checkpoint=None if cp is None else CheckpointInfo.of(cp)
        )

    def set_mirror_ready(self, vpg_name: str, volume: str, ready: bool) -> None:
        vpg: JournaledVpg | ProtectedVpg
        vpg = self.protected[vpg_name] if vpg_name in self.protected else self.vpg(vpg_name)
        if volume not in vpg.volumes:
            raise UnknownVolumeError(f"VPG {vpg_name} has no volume {volume!r}")
        if not isinstance(vpg.volumes[volume].export, MirrorTargetExport):
            raise NotMirrorTargetError(f"volume {volume} is captured in-path, not a mirror target")
        assert isinstance(vpg, VpgRuntime | ProtectedVpg)  # the ones with captured volumes
        vpg.set_mirror_ready(volume, ready)


def _role_switches(changes: list[Change]) -> list[str]:
    """VPGs that a change list removes in one role (journaled, protected) and adds in the
    other."""
    roles = {"vpg", "protected"}
    removed = {(c.kind, c.name) for c in changes if c.kind in roles and c.action == "removed"}
    added = {(c.kind, c.name) for c in changes if c.kind in roles and c.action == "added"}
    return sorted({name for kind, name in removed if ((roles - {kind}).pop(), name) in added})


def _discard_stale_state(plan: ReversePlan) -> None:
    """Delete the journal files and sync state a reverse leaves behind or finds in its way
    (stale positions in a journal would make it skip a new sender's records as resent; a stale
    sync state would take a volume as synced)."""
    for directory in plan.stale_journals():
        discard_journal(directory)
        log.info("vpg=%s event=journal-discarded directory=%s", plan.vpg, directory)
    for spec, volumes in plan.stale_sync_states():
        discard_sync_state(spec, volumes)
        log.info("vpg=%s event=sync-state-discarded directory=%s", plan.vpg, spec.directory)


async def _start_vpg(vpg: JournaledVpg | ProtectedVpg) -> None:
    """Start a VPG; if that fails midway, close what it opened (its journal) before raising."""
    try:
        await vpg.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await vpg.stop()
        raise


def _nbd_uri(address: str, export: str) -> str:
    """`unix:/run/nbd.sock` or `tcp:host:port` -> the NBD URI of ``export`` there."""
    kind, _, where = address.partition(":")
    if kind == "unix":
        return f"nbd+unix:///{export}?socket={where}"
    host, _, port = where.rpartition(":")
    return f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{export}"


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
        lines = list(appliance.addresses)
        if appliance.stream_address is not None:
            lines.append(f"stream:{appliance.stream_address}")
        if appliance.control is not None:
            lines.append(f"control:{appliance.control.url}")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, ready_file)
    await stop.wait()
    log.info("event=stopping why=signal")
    await appliance.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="appliance config (YAML)")
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write the listening addresses to this file once serving (for supervisors and "
        "tests): NBD ones as tcp:HOST:PORT or unix:PATH, the stream listener as "
        "stream:HOST:PORT, the control API as control:URL",
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
    except (OSError, TokenFileError) as e:
        log.error("event=failed error=%r", e)
        return 1
    finally:
        loop.close()
    return 0
