"""VPGs inside an appliance: what a VPG's captured volumes, and a VPG's journal, need here.

Three kinds of VPG run in an appliance, sharing the pieces of this module:

- :class:`VpgRuntime`, replication to self: captured writes go straight into the VPG's journal on
  this appliance;
- ``protected.ProtectedVpg``: captured writes go to the replication stream (no journal here);
- ``recovery.RecoveryVpg``: the journal here is fed by the stream from protected appliances.

A VPG with a journal (:class:`JournaledVpg`: the first and the last) takes a checkpoint every
`checkpointIntervalSeconds` (and on request, with a tag) as a cut across all its volumes, and
enforces the journal's retention. Locally, the journal holds new acks, marks the cut after every
write submitted so far, and releases; the hold time is recorded. A checkpoint is consistent only
when every volume is fully synced: while an in-path volume resyncs, or a mirror target's QEMU job
is not yet ready, checkpoints are marked not consistent.

A VPG with captured volumes keeps a state file (:class:`CaptureStateFile`) recording, per volume,
whether it finished its initial sync and whether the appliance stopped cleanly; an unclean stop
makes in-path volumes resync at start and mirror targets wait for QEMU to say the mirror is ready
again (:class:`MirrorWatch`).
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
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from secondsite.appliance.capture import InPathExport, MirrorTargetExport
from secondsite.appliance.config import CaptureMode, JournalSpec, VolumeSpec
from secondsite.appliance.journal import Checkpoint, Journal, JournalConfig, RetentionPolicy
from secondsite.appliance.journal.state import read_json, write_json_atomic
from secondsite.appliance.nbd.file import FileExport
from secondsite.appliance.qmp import QmpClient, QmpError, mirror_event_state, mirror_job_ready
from secondsite.appliance.resync import ResyncProgress, resync_in_path

__all__ = [
    "CaptureStateFile",
    "CheckpointSkipped",
    "JournaledVpg",
    "MirrorWatch",
    "SyncState",
    "TaskSet",
    "VolumeRuntime",
    "VpgRuntime",
    "open_backing",
    "retention_policy",
    "volume_status",
]

log = logging.getLogger(__name__)

_RETENTION_PERIOD = 2.0
_QMP_POLL = 0.5
_QMP_CONFIRM_TIMEOUT = 2.0
"""Seconds QEMU has to answer whether a mirror job is ready; then it counts as unreachable."""


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
    BITMAP_SYNC = "BitmapSync"
    """Replicated in-path volume: changes are tracked as dirty regions (the protected buffer
    overflowed), which are read back from the source and shipped."""
    PROTECTED = "Protected"
    NOT_SYNCED = "NotSynced"
    """A mirror target whose mirror job is gone (or QEMU unreachable), or not ready after a
    restart, or whose write failed."""


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


def volume_status(vol: VolumeRuntime) -> dict[str, Any]:
    """The JSON-able status of one captured volume (`control.models.VolumeStatus`)."""
    p = vol.progress
    return {
        "capture": str(vol.spec.capture),
        "state": str(vol.state),
        "reason": vol.reason,
        "size": vol.export.size,
        "writes": vol.export.writes,
        "bytesWritten": vol.export.bytes_written,
        "syncPercent": None if p is None else round(p.percent, 1),
        "syncEtaSeconds": None if p is None else p.eta_seconds,
    }


def open_backing(vs: VolumeSpec) -> FileExport:
    """The backing store of an in-path volume, checked against the declared size."""
    assert vs.backing is not None  # the config model requires it for in-path volumes
    backing = FileExport(str(vs.backing))
    size = vs.size_bytes() or backing.size
    if size != backing.size:
        backing.close()
        raise ValueError(
            f"volume {vs.name}: size {size} differs from backing store's {backing.size}"
        )
    return backing


class TaskSet:
    """The background tasks of one VPG: named, failures logged, all cancelled at stop."""

    def __init__(self, vpg: str) -> None:
        self.vpg = vpg
        self._tasks: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.vpg}: {what}")
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "vpg=%s event=task-failed task=%r error=%r",
                self.vpg,
                task.get_name(),
                task.exception(),
            )

    async def cancel_all(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def boot_id() -> str | None:
    """This boot of the node (Linux), or None when unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class CaptureStateFile:
    """`capture-state.json`: per volume, whether its initial sync finished; and whether the
    appliance stopped cleanly. Writes run in threads, newest state wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state: dict[str, Any] = {"volumes": {}}
        self._version = 0
        self._written = 0
        self._lock = threading.Lock()
        self.same_boot = False

    async def open(self) -> bool:
        """Read the file and record that the appliance runs (until :meth:`close`). Returns
        whether the previous run stopped cleanly (True for a new file)."""
        self._state = read_json(self.path) or {"volumes": {}}
        clean = bool(self._state.get("cleanShutdown", True))
        current = boot_id()
        # The previous run was in this boot of the node: whatever it wrote to files without
        # syncing survived even an unclean stop of the process (in the page cache).
        self.same_boot = current is not None and self._state.get("bootId") == current
        self._state["cleanShutdown"] = False
        self._state["bootId"] = current
        await self.save()
        return clean

    def known(self, volume: str) -> dict[str, Any]:
        """What the file says of ``volume`` (empty: never seen)."""
        known: dict[str, Any] = self._state["volumes"].get(volume, {})
        return known

    async def set_synced(self, volume: str, synced: bool) -> None:
        self._state["volumes"].setdefault(volume, {})["synced"] = synced
        await self.save()

    async def close(self, clean: bool = True) -> None:
        self._state["cleanShutdown"] = clean
        await self.save()

    def recovery_position(self) -> int:
        """Replicated VPG: the recovery side's durable position for this source at the last
        clean stop (0: unknown)."""
        return int(self._state.get("recoveryPosition", 0))

    async def set_recovery_position(self, position: int) -> None:
        self._state["recoveryPosition"] = position
        await self.save()

    async def save(self) -> None:
        self._version += 1
        await asyncio.to_thread(self._write, self._version, copy.deepcopy(self._state))

    def _write(self, version: int, state: dict[str, Any]) -> None:
        # Writers run in threads and may overlap (or outlive a cancelled task): one at a time,
        # since they share the file's tmp name, and never an older state over a newer one.
        with self._lock:
            if version > self._written:
                write_json_atomic(self.path, state)
                self._written = version


MirrorState = Callable[[VolumeRuntime, "bool | None", str], None]
"""``(volume, ready, why)``: the mirror job is ready (True), not ready (False), or gone or
unknown (None)."""


class MirrorWatch:
    """Follows the QEMU mirror jobs writing to a VPG's mirror targets. All volumes of one QEMU
    share one connection: a QMP socket serves one client at a time, a second one is never
    answered.

    QEMU's job events are applied as they arrive (a cancelled or failed job makes its volume
    not synced at once); a poll every ``_QMP_POLL`` seconds is the backstop. :meth:`confirm`
    asks every QEMU once more: when it returns, every event QEMU sent before answering has been
    applied, so a cut marked right after it cannot vouch for a mirror that had stopped.
    """

    def __init__(self, vpg: str, tasks: TaskSet, on_state: MirrorState) -> None:
        self.vpg = vpg
        self._tasks = tasks
        self._on_state = on_state
        self._watched: dict[Path, _QmpWatch] = {}

    def watch(self, vol: VolumeRuntime, socket: Path, job: str) -> None:
        watch = self._watched.get(socket)
        if watch is None:
            watch = self._watched[socket] = _QmpWatch(self.vpg, socket, self._on_state)
            self._tasks.spawn(watch.run(), f"qmp {socket}")
        watch.targets.append((vol, job))

    def clear(self) -> None:
        self._watched.clear()

    async def confirm(self) -> None:
        """Ask every watched QEMU for its jobs now and apply the answers (and every event sent
        before them)."""
        await asyncio.gather(*(w.poll(connect=False) for w in list(self._watched.values())))


class _QmpWatch:
    """The mirror jobs behind one QMP socket: one connection, its events, and polls."""

    def __init__(self, vpg: str, socket: Path, on_state: MirrorState) -> None:
        self.vpg = vpg
        self.socket = socket
        self.targets: list[tuple[VolumeRuntime, str]] = []
        self._on_state = on_state
        self._client: QmpClient | None = None
        self._events = 0
        """Events applied so far: a poll answer older than the newest event is not applied."""
        self._connecting = asyncio.Lock()

    def _event(self, event: dict[str, Any]) -> None:
        for vol, job in list(self.targets):
            said = mirror_event_state(event, job)
            if said is not None:
                self._events += 1
                log.info(
                    "vpg=%s volume=%s event=qmp-job-event qmp=%s job=%s ready=%s",
                    self.vpg,
                    vol.spec.name,
                    event.get("event"),
                    job,
                    said[0],
                )
                self._on_state(vol, *said)

    async def poll(self, *, connect: bool = True) -> None:
        """Ask QEMU whether each job is ready (connecting first if needed and ``connect``) and
        apply it; without QEMU's word, every volume is marked not synced."""
        try:
            async with self._connecting:
                if self._client is None and connect:
                    self._client = await QmpClient.connect(self.socket)
                    self._client.add_listener(self._event)
            client = self._client
            if client is None:
                return  # not connected: the volumes are marked not synced already
            for vol, job in list(self.targets):
                seen = self._events
                ready = await mirror_job_ready(client, job, timeout=_QMP_CONFIRM_TIMEOUT)
                if self._events != seen:
                    continue  # an event about the jobs came meanwhile: newer than this answer
                why = f"mirror job {job} " + ("not ready" if ready is False else "not found")
                self._on_state(vol, ready, why)
        except QmpError as e:
            if self._client is not None:
                client, self._client = self._client, None
                await client.close()
            log.debug("vpg=%s event=qmp-error socket=%s error=%s", self.vpg, self.socket, e)
            # Without QEMU's word the mirror cannot be vouched for: QEMU may have
            # stopped, or restarted and be writing before a new mirror job is ready.
            for vol, _ in list(self.targets):
                self._on_state(vol, None, f"QMP unreachable: {e}")

    async def run(self) -> None:
        try:
            while True:
                await self.poll()
                await asyncio.sleep(_QMP_POLL)
        finally:
            if self._client is not None:
                await self._client.close()


def mirror_sync_state(ready: bool | None) -> SyncState:
    """A mirror target's state from its job's readiness (see :data:`MirrorState`)."""
    if ready is None:
        return SyncState.NOT_SYNCED
    return SyncState.PROTECTED if ready else SyncState.INITIAL_SYNC


class CheckpointSkipped(Exception):
    """An automatic checkpoint was not taken this round, for a reason that is no failure of the
    appliance (e.g. a replication source is not connected); the next round tries again."""


class JournaledVpg:
    """A VPG whose journal lives on this appliance: the journal, the checkpoint loop, retention,
    and the journal's part of the status. Subclasses say how a cut is taken (:meth:`_cut`) and
    whether it is consistent; `await start()`, then `await stop()`."""

    def __init__(self, journal_spec: JournalSpec) -> None:
        self.name = journal_spec.vpg
        self.spec = journal_spec
        self.journal: Journal | None = None
        self.volumes: dict[str, VolumeRuntime] = {}
        """Volumes captured on this appliance (none on a recovery appliance)."""
        self.tasks = TaskSet(self.name)
        self._checkpoint_lock = asyncio.Lock()
        self.checkpoints_taken = 0
        self.inconsistent_checkpoints = 0
        self.checkpoint_problem = ""
        """Why the last automatic checkpoint was not taken ("" when it was)."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    @property
    def consistent(self) -> bool:
        """Whether a checkpoint taken now would be consistent."""
        raise NotImplementedError

    async def _cut(self, tag: str | None) -> Checkpoint:
        """Take a cut across every volume; the checkpoint is durable when this returns."""
        raise NotImplementedError

    def _housekeeping(self) -> None:
        """Runs every retention round, before retention."""

    async def _open_journal(self) -> Journal:
        spec = self.spec
        spec.directory.mkdir(parents=True, exist_ok=True)
        self.journal = await Journal.open(
            spec.directory,
            JournalConfig(
                vpg=self.name,
                segment_size=spec.segment_bytes,
                retention=retention_policy(spec),
                scratch_dir=spec.scratch_directory,
            ),
        )
        return self.journal

    def _start_loops(self) -> None:
        self.tasks.spawn(self._checkpoint_loop(), "checkpoints")
        self.tasks.spawn(self._retention_loop(), "retention")

    def has_volume(self, volume: str) -> bool:
        """Whether the journal keeps ``volume`` (captured here or replicated from a source)."""
        if volume in self.volumes:
            return True
        return self.journal is not None and any(v.name == volume for v in self.journal.volumes())

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

    async def checkpoint(self, tag: str | None = None) -> Checkpoint:
        """Take a checkpoint now (a cut across every volume); durable when it returns."""
        assert self.journal is not None
        async with self._checkpoint_lock:
            cp = await self._cut(tag)
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
            except CheckpointSkipped as e:
                if str(e) != self.checkpoint_problem:
                    log.warning("vpg=%s event=checkpoint-skipped reason=%r", self.name, str(e))
                self.checkpoint_problem = str(e)
            except Exception as e:
                self.checkpoint_problem = f"checkpoint failed: {e!r}"
                log.error("vpg=%s event=checkpoint-failed error=%r", self.name, e)
            else:
                if self.checkpoint_problem:
                    log.info("vpg=%s event=checkpoints-resumed", self.name)
                self.checkpoint_problem = ""

    async def _retention_loop(self) -> None:
        assert self.journal is not None
        while True:
            await asyncio.sleep(_RETENTION_PERIOD)
            self._housekeeping()
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

    def status(self) -> dict[str, Any]:
        """A JSON-able summary (`control.models.VpgStatus`): checkpoints, history, journal use,
        and each captured volume's sync state."""
        assert self.journal is not None
        st = self.journal.status()
        newest, oldest = st.newest_checkpoint, st.oldest_checkpoint
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
                "preparedBytes": st.prepared_bytes,
                "promotionBlockedAtSeq": st.promotion_blocked_at_seq,
            },
            "holdMs": self.hold_percentiles(),
            "checkpointProblem": self.checkpoint_problem,
            "volumes": {name: volume_status(v) for name, v in self.volumes.items()},
        }

    def hold_percentiles(self) -> dict[str, float]:
        """Checkpoint hold times (how long acks were held for a cut)."""
        assert self.journal is not None
        return self.journal.hold_percentiles()

    def hold_times(self) -> list[float]:
        """Recent checkpoint hold durations, seconds, oldest first."""
        assert self.journal is not None
        return self.journal.hold_times()


class CapturedVolumes:
    """What the capture side of a VPG does the same way whether it journals locally
    (:class:`VpgRuntime`) or streams to a recovery appliance (`protected.ProtectedVpg`): mirror
    readiness of its volumes and whether a cut marked now is consistent."""

    name: str
    volumes: dict[str, VolumeRuntime]
    tasks: TaskSet
    _state: CaptureStateFile

    @property
    def consistent(self) -> bool:
        """Every volume is Protected: a cut marked now is a consistent one."""
        return all(v.synced for v in self.volumes.values())

    def set_mirror_ready(self, volume: str, ready: bool) -> None:
        """What the control API calls when whoever runs the mirror says it is (not) ready."""
        vol = self.volumes[volume]
        if not isinstance(vol.export, MirrorTargetExport):
            raise ValueError(f"volume {volume} is not a mirror target")
        self._set_mirror_state(vol, ready, "told by the control API")

    def _set_mirror_state(self, vol: VolumeRuntime, ready: bool | None, why: str) -> None:
        new = mirror_sync_state(ready)
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
        self.tasks.spawn(self._state.set_synced(vol.spec.name, bool(ready)), "state")


class VpgRuntime(CapturedVolumes, JournaledVpg):
    """One VPG journaled on this appliance with its captured volumes (replication to self)."""

    def __init__(self, journal_spec: JournalSpec, volumes: list[VolumeSpec]) -> None:
        super().__init__(journal_spec)
        self.volume_specs = volumes
        self._state = CaptureStateFile(journal_spec.directory / "capture-state.json")
        self._mirrors = MirrorWatch(self.name, self.tasks, self._set_mirror_state)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.spec.directory.mkdir(parents=True, exist_ok=True)
        clean = await self._state.open()
        journal = await self._open_journal()
        for vs in self.volume_specs:
            self.volumes[vs.name] = await self._start_volume(journal, vs, clean)
        self._start_loops()
        log.info(
            "vpg=%s event=started volumes=%s clean=%s next_seq=%d",
            self.name,
            ",".join(self.volumes),
            clean,
            journal.next_seq,
        )

    async def _start_volume(self, journal: Journal, vs: VolumeSpec, clean: bool) -> VolumeRuntime:
        known = self._state.known(vs.name)
        if vs.capture is CaptureMode.IN_PATH:
            backing = open_backing(vs)
            await journal.add_volume(vs.name, backing.size, vs.replica)
            export: InPathExport | MirrorTargetExport = InPathExport(vs.name, journal, backing)
            vol = VolumeRuntime(vs, export, SyncState.PROTECTED)
            if not known.get("synced"):
                vol.state, vol.reason = SyncState.INITIAL_SYNC, "new volume"
                self.tasks.spawn(self._resync(vol, fresh=not known), f"resync {vs.name}")
            elif not clean:
                vol.state, vol.reason = SyncState.DELTA_SYNC, "unclean stop"
                self.tasks.spawn(self._resync(vol, fresh=False), f"resync {vs.name}")
        else:
            mirror_size = vs.size_bytes()
            assert mirror_size is not None  # the config model requires it for mirror targets
            await journal.add_volume(vs.name, mirror_size, vs.replica)
            export = MirrorTargetExport(vs.name, journal, mirror_size, journal)
            synced = bool(known.get("synced")) and clean
            vol = VolumeRuntime(
                vs,
                export,
                SyncState.PROTECTED if synced else SyncState.INITIAL_SYNC,
                "" if synced else "waiting for the mirror job to be ready",
            )
            if vs.qmp_socket is not None and vs.mirror_job is not None:
                self._mirrors.watch(vol, vs.qmp_socket, vs.mirror_job)
        return vol

    async def stop(self) -> None:
        """Stop loops, close the journal (flushing), and record a clean stop."""
        await self.tasks.cancel_all()
        self._mirrors.clear()
        for vol in self.volumes.values():
            if isinstance(vol.export, InPathExport):
                await vol.export.backing.flush()
                vol.export.backing.close()
            else:
                vol.export.close()
        if self.journal is not None:
            await self.journal.close()
            await self._state.close()
        log.info("vpg=%s event=stopped", self.name)

    # -- sync --------------------------------------------------------------------------------

    async def _resync(self, vol: VolumeRuntime, *, fresh: bool) -> None:
        assert isinstance(vol.export, InPathExport) and self.journal is not None
        vol.progress = ResyncProgress(vol.reason, vol.export.size)
        log.info(
            "vpg=%s volume=%s event=resync-start reason=%r fresh=%s",
            self.name,
            vol.spec.name,
            vol.reason,
            fresh,
        )
        await self._state.set_synced(vol.spec.name, False)
        await resync_in_path(vol.export, self.journal, vol.progress, fresh=fresh, vpg=self.name)
        vol.state, vol.reason = SyncState.PROTECTED, ""
        await self._state.set_synced(vol.spec.name, True)

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

    # -- checkpoints -------------------------------------------------------------------------

    async def _cut(self, tag: str | None) -> Checkpoint:
        assert self.journal is not None
        await self._mirrors.confirm()  # a mirror job stopped just now must not be vouched for
        return await self.journal.checkpoint(tag=tag, consistent=self.consistent)

    def _housekeeping(self) -> None:
        for vol in self.volumes.values():
            if isinstance(vol.export, MirrorTargetExport):
                vol.export.close_idle_view()


def _cp(cp: Checkpoint) -> dict[str, Any]:
    return {"id": cp.id, "seq": cp.seq, "time": cp.time, "tag": cp.tag, "consistent": cp.consistent}
