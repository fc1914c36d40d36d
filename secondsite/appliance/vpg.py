"""One VPG inside an appliance: its journal, its volumes' captures, checkpoints and retention.

Protected and recovery roles share this process for now (replication to self): captured writes go
straight into the VPG's journal. The VPG takes a checkpoint every `checkpointIntervalSeconds` (and
on request, with a tag) as a cut across all its volumes: the journal holds new acks, marks the cut
after every write submitted so far, and releases; the hold time is recorded. A checkpoint is
consistent only when every volume is fully synced: while an in-path volume resyncs, or a mirror
target's QEMU job is not yet ready, checkpoints are marked not consistent.

A state file in the journal directory records, per volume, whether it finished its initial sync and
whether the appliance stopped cleanly; an unclean stop makes in-path volumes resync (delta) at start
and mirror targets wait for QEMU to say the mirror is ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import enum
import logging
import threading
import time
from pathlib import Path
from typing import Any

from secondsite.appliance.capture import InPathExport, MirrorTargetExport
from secondsite.appliance.config import CaptureMode, JournalSpec, VolumeSpec
from secondsite.appliance.journal import Checkpoint, Journal, JournalConfig, RetentionPolicy
from secondsite.appliance.journal.state import read_json, write_json_atomic
from secondsite.appliance.nbd.file import FileExport
from secondsite.appliance.qmp import QmpClient, QmpError, mirror_job_ready
from secondsite.appliance.resync import ResyncProgress, resync_in_path

__all__ = ["SyncState", "VolumeRuntime", "VpgRuntime"]

log = logging.getLogger(__name__)

_RETENTION_PERIOD = 2.0
_QMP_POLL = 0.5


def retention_policy(spec: JournalSpec) -> RetentionPolicy:
    """The journal's retention policy for a journal spec."""
    return RetentionPolicy(
        history_seconds=float(spec.history_seconds()),
        hard_limit_bytes=spec.hard_limit_bytes(),
        warning_percent=float(spec.warning_percent),
    )


class SyncState(enum.StrEnum):
    """Where a volume stands with respect to its source."""

    INITIAL_SYNC = "InitialSync"
    DELTA_SYNC = "DeltaSync"
    PROTECTED = "Protected"
    NOT_SYNCED = "NotSynced"
    """A mirror target whose mirror job is gone (or QEMU unreachable), or not ready after a
    restart."""


@dataclasses.dataclass
class VolumeRuntime:
    spec: VolumeSpec
    export: InPathExport | MirrorTargetExport
    state: SyncState
    reason: str = ""
    progress: ResyncProgress | None = None

    @property
    def synced(self) -> bool:
        return self.state is SyncState.PROTECTED


class VpgRuntime:
    """Runs one VPG; `await start()`, then serve its exports; `await stop()` closes cleanly."""

    def __init__(self, journal_spec: JournalSpec, volumes: list[VolumeSpec]) -> None:
        self.name = journal_spec.vpg
        self.spec = journal_spec
        self.volume_specs = volumes
        self.volumes: dict[str, VolumeRuntime] = {}
        self.journal: Journal | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._state_file = journal_spec.directory / "capture-state.json"
        self._state: dict[str, Any] = {}
        self._state_version = 0
        self._state_written = 0
        self._state_write_lock = threading.Lock()
        self._checkpoint_lock = asyncio.Lock()
        self._qmp_watched: dict[Path, list[tuple[VolumeRuntime, str]]] = {}
        self.checkpoints_taken = 0
        self.inconsistent_checkpoints = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        spec = self.spec
        spec.directory.mkdir(parents=True, exist_ok=True)
        self._state = read_json(self._state_file) or {"volumes": {}}
        clean = bool(self._state.get("cleanShutdown", True))
        self.journal = journal = await Journal.open(
            spec.directory,
            JournalConfig(
                vpg=self.name,
                segment_size=spec.segment_bytes,
                retention=retention_policy(spec),
                scratch_dir=spec.scratch_directory,
            ),
        )
        self._state["cleanShutdown"] = False
        await self._save_state()
        for vs in self.volume_specs:
            self.volumes[vs.name] = await self._start_volume(journal, vs, clean)
        self._spawn(self._checkpoint_loop(), "checkpoints")
        self._spawn(self._retention_loop(), "retention")
        log.info(
            "vpg=%s event=started volumes=%s clean=%s next_seq=%d",
            self.name,
            ",".join(self.volumes),
            clean,
            journal.next_seq,
        )

    async def _start_volume(self, journal: Journal, vs: VolumeSpec, clean: bool) -> VolumeRuntime:
        known = self._state["volumes"].get(vs.name, {})
        if vs.capture is CaptureMode.IN_PATH:
            assert vs.backing is not None
            backing = FileExport(str(vs.backing))
            size = vs.size_bytes() or backing.size
            if size != backing.size:
                backing.close()
                raise ValueError(
                    f"volume {vs.name}: size {size} differs from backing store's {backing.size}"
                )
            await journal.add_volume(vs.name, size, vs.replica)
            export: InPathExport | MirrorTargetExport = InPathExport(vs.name, journal, backing)
            vol = VolumeRuntime(vs, export, SyncState.PROTECTED)
            if not known.get("synced"):
                vol.state, vol.reason = SyncState.INITIAL_SYNC, "new volume"
                self._spawn(self._resync(vol, fresh=not known), f"resync {vs.name}")
            elif not clean:
                vol.state, vol.reason = SyncState.DELTA_SYNC, "unclean stop"
                self._spawn(self._resync(vol, fresh=False), f"resync {vs.name}")
        else:
            mirror_size = vs.size_bytes()
            assert mirror_size is not None  # the config model requires it for mirror targets
            await journal.add_volume(vs.name, mirror_size, vs.replica)
            export = MirrorTargetExport(vs.name, journal, mirror_size)
            synced = bool(known.get("synced")) and clean
            vol = VolumeRuntime(
                vs,
                export,
                SyncState.PROTECTED if synced else SyncState.INITIAL_SYNC,
                "" if synced else "waiting for the mirror job to be ready",
            )
            if vs.qmp_socket is not None and vs.mirror_job is not None:
                self._watch_mirror(vol, vs.qmp_socket, vs.mirror_job)
        return vol

    def _spawn(self, coro: Any, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}: {what}")
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "vpg=%s event=task-failed task=%r error=%r",
                self.name,
                task.get_name(),
                task.exception(),
            )

    async def stop(self) -> None:
        """Stop loops, close the journal (flushing), and record a clean stop."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._qmp_watched.clear()
        for vol in self.volumes.values():
            if isinstance(vol.export, InPathExport):
                await vol.export.backing.flush()
                vol.export.backing.close()
            else:
                vol.export.close()
        if self.journal is not None:
            await self.journal.close()
            self._state["cleanShutdown"] = True
            await self._save_state()
        log.info("vpg=%s event=stopped", self.name)

    # -- sync --------------------------------------------------------------------------------

    async def _save_state(self) -> None:
        self._state_version += 1
        await asyncio.to_thread(self._write_state, self._state_version, copy.deepcopy(self._state))

    def _write_state(self, version: int, state: dict[str, Any]) -> None:
        # Writers run in threads and may overlap (or outlive a cancelled task): one at a time,
        # since they share the file's tmp name, and never an older state over a newer one.
        with self._state_write_lock:
            if version > self._state_written:
                write_json_atomic(self._state_file, state)
                self._state_written = version

    async def _mark_synced(self, vol: VolumeRuntime, synced: bool) -> None:
        self._state["volumes"].setdefault(vol.spec.name, {})["synced"] = synced
        await self._save_state()

    async def _resync(self, vol: VolumeRuntime, *, fresh: bool) -> None:
        assert isinstance(vol.export, InPathExport)
        vol.progress = ResyncProgress(vol.reason, vol.export.size)
        log.info(
            "vpg=%s volume=%s event=resync-start reason=%r fresh=%s",
            self.name,
            vol.spec.name,
            vol.reason,
            fresh,
        )
        await self._mark_synced(vol, False)
        await resync_in_path(vol.export, vol.progress, fresh=fresh, vpg=self.name)
        vol.state, vol.reason = SyncState.PROTECTED, ""
        await self._mark_synced(vol, True)

    async def add_volume(self, spec: VolumeSpec) -> VolumeRuntime:
        """Start protecting one more volume while the VPG runs.

        It starts as after an unclean stop: a volume the journal knew before (say, its VPG was
        removed and added again) gets a delta sync instead of being trusted, since writes may have
        bypassed capture meanwhile.
        """
        assert self.journal is not None
        if spec.name in self.volumes:
            raise ValueError(f"volume {spec.name} is already protected by VPG {self.name}")
        volume = await self._start_volume(self.journal, spec, clean=False)
        self.volume_specs.append(spec)
        self.volumes[spec.name] = volume
        log.info("vpg=%s volume=%s event=volume-added state=%s", self.name, spec.name, volume.state)
        return volume

    def retune(self, spec: JournalSpec) -> None:
        """Apply a new history, hard limit, warning level or checkpoint interval live."""
        if spec.directory != self.spec.directory or spec.vpg != self.spec.vpg:
            raise ValueError("a VPG's journal directory and name cannot change while it runs")
        self.spec = spec
        if self.journal is not None:
            # The journal reads its policy on every retention pass and status call.
            self.journal.config = dataclasses.replace(
                self.journal.config, retention=retention_policy(spec)
            )

    def set_mirror_ready(self, volume: str, ready: bool) -> None:
        """What the control API calls when whoever runs the mirror says it is (not) ready."""
        vol = self.volumes[volume]
        if not isinstance(vol.export, MirrorTargetExport):
            raise ValueError(f"volume {volume} is not a mirror target")
        self._set_mirror_state(vol, ready, "told by the control API")

    def _set_mirror_state(self, vol: VolumeRuntime, ready: bool | None, why: str) -> None:
        new = SyncState.PROTECTED if ready else SyncState.INITIAL_SYNC
        if ready is None:
            new = SyncState.NOT_SYNCED
        if new is vol.state:
            return
        log.info(
            "vpg=%s volume=%s event=sync-state from=%s to=%s why=%r",
            self.name,
            vol.spec.name,
            vol.state,
            new,
            why,
        )
        vol.state = new
        vol.reason = "" if ready else why
        self._spawn(self._mark_synced(vol, bool(ready)), "state")

    def _watch_mirror(self, vol: VolumeRuntime, socket: Path, job: str) -> None:
        """Follow mirror job `job` of the QEMU at `socket`. All volumes of one QEMU share one
        connection: a QMP socket serves one client at a time, a second one is never answered."""
        targets = self._qmp_watched.get(socket)
        if targets is None:
            targets = self._qmp_watched[socket] = []
            self._spawn(self._watch_qmp(socket, targets), f"qmp {socket}")
        targets.append((vol, job))

    async def _watch_qmp(self, socket: Path, targets: list[tuple[VolumeRuntime, str]]) -> None:
        client: QmpClient | None = None
        try:
            while True:
                try:
                    if client is None:
                        client = await QmpClient.connect(socket)
                    for vol, job in list(targets):
                        ready = await mirror_job_ready(client, job)
                        why = f"mirror job {job} " + (
                            "not ready" if ready is False else "not found"
                        )
                        self._set_mirror_state(vol, ready, why)
                except QmpError as e:
                    if client is not None:
                        await client.close()
                        client = None
                    log.debug("vpg=%s event=qmp-error socket=%s error=%s", self.name, socket, e)
                    # Without QEMU's word the mirror cannot be vouched for: QEMU may have
                    # stopped, or restarted and be writing before a new mirror job is ready.
                    for vol, _ in list(targets):
                        self._set_mirror_state(vol, None, f"QMP unreachable: {e}")
                await asyncio.sleep(_QMP_POLL)
        finally:
            if client is not None:
                await client.close()

    # -- checkpoints and retention -----------------------------------------------------------

    @property
    def consistent(self) -> bool:
        return all(v.synced for v in self.volumes.values())

    async def checkpoint(self, tag: str | None = None) -> Checkpoint:
        """Take a checkpoint now (a cut across every volume); durable when it returns."""
        assert self.journal is not None
        async with self._checkpoint_lock:
            cp = await self.journal.checkpoint(tag=tag, consistent=self.consistent)
        self.checkpoints_taken += 1
        if not cp.consistent:
            self.inconsistent_checkpoints += 1
        if tag is not None:
            log.info("vpg=%s event=checkpoint id=%d tag=%s seq=%d", self.name, cp.id, tag, cp.seq)
        return cp

    async def _checkpoint_loop(self) -> None:
        # The interval is read every round, so `retune` takes effect at the next checkpoint.
        next_at = time.monotonic() + self.spec.checkpoint_interval_seconds
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            interval = self.spec.checkpoint_interval_seconds
            next_at += interval
            if next_at < time.monotonic():  # fell behind (a stall): don't burst to catch up
                next_at = time.monotonic() + interval
            assert self.journal is not None
            if self.journal.failover_phase is not None:
                continue  # promoted for a failover: the journal takes no checkpoints until commit
            try:
                await self.checkpoint()
            except Exception as e:
                log.error("vpg=%s event=checkpoint-failed error=%r", self.name, e)

    async def _retention_loop(self) -> None:
        assert self.journal is not None
        while True:
            await asyncio.sleep(_RETENTION_PERIOD)
            for vol in self.volumes.values():
                if isinstance(vol.export, MirrorTargetExport):
                    vol.export.close_idle_view()
            try:
                promoted = await self.journal.enforce_retention()
            except Exception as e:
                log.error("vpg=%s event=retention-failed error=%r", self.name, e)
                continue
            if promoted is not None:
                log.info(
                    "vpg=%s event=promoted checkpoint=%d seq=%d used_bytes=%d",
                    self.name,
                    promoted.id,
                    promoted.seq,
                    self.journal.used_bytes(),
                )

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able summary: checkpoints, history, journal use, and each volume's sync state."""
        assert self.journal is not None
        st = self.journal.status()
        newest, oldest = st.newest_checkpoint, st.oldest_checkpoint
        holds = self.journal.hold_percentiles()
        return {
            "vpg": self.name,
            "consistent": self.consistent,
            "rpoSeconds": None if newest is None else max(0.0, time.time() - newest.time),
            "newestCheckpoint": None if newest is None else _cp(newest),
            "oldestCheckpoint": None if oldest is None else _cp(oldest),
            "checkpointCount": st.checkpoint_count,
            "durableSeq": st.durable_seq,
            "promotedSeq": st.promoted_seq,
            "journal": {
                "usedBytes": st.retention.used_bytes,
                "hardLimitBytes": st.retention.hard_limit_bytes,
                "usedPercent": st.retention.used_percent,
                "historySecondsConfigured": st.retention.history_seconds_configured,
                "historySecondsActual": st.retention.history_seconds_actual,
                "historyMet": st.retention.history_met,
                "level": str(st.retention.level),
                "messages": list(st.retention.messages),
            },
            "holdMs": holds,
            "volumes": {
                name: {
                    "capture": str(v.spec.capture),
                    "state": str(v.state),
                    "reason": v.reason,
                    "size": v.export.size,
                    "writes": v.export.writes,
                    "bytesWritten": v.export.bytes_written,
                    "syncPercent": None if v.progress is None else round(v.progress.percent, 1),
                    "syncEtaSeconds": None if v.progress is None else v.progress.eta_seconds,
                }
                for name, v in self.volumes.items()
            },
        }


def _cp(cp: Checkpoint) -> dict[str, Any]:
    return {"id": cp.id, "seq": cp.seq, "time": cp.time, "tag": cp.tag, "consistent": cp.consistent}
