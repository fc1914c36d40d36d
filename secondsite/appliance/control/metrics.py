"""`/metrics`: the appliance's figures in Prometheus' text format.

Each appliance has its own :class:`CollectorRegistry` (two appliances in one process, as in tests,
never share series). Labels are bounded: `vpg` and `volume` names, plus method, route template and
status code on the API's own counter; never checkpoint or image ids.

Most series are read from the runtime at scrape time (a custom collector), so they cannot drift
from `GET /v1/status`. Counters restart from zero when a VPG restarts, which `rate()` handles.

=================================================  =========  =============================
name                                               type       labels
=================================================  =========  =============================
secondsite_volume_captured_writes_total            counter    vpg, volume
secondsite_volume_captured_bytes_total             counter    vpg, volume
secondsite_volume_in_sync                          gauge      vpg, volume (1 = Protected)
secondsite_volume_sync_progress_ratio              gauge      vpg, volume (during a resync)
secondsite_journal_used_bytes                      gauge      vpg
secondsite_journal_limit_bytes                     gauge      vpg
secondsite_journal_history_seconds                 gauge      vpg (actual)
secondsite_journal_history_configured_seconds      gauge      vpg
secondsite_journal_prepared_bytes                  gauge      vpg
secondsite_journal_promotion_blocked               gauge      vpg (1 = open images hold it)
secondsite_checkpoints_total                       counter    vpg
secondsite_checkpoints_inconsistent_total          counter    vpg
secondsite_checkpoint_hold_seconds                 histogram  vpg
secondsite_vpg_rpo_seconds                         gauge      vpg
secondsite_vpg_consistent                          gauge      vpg
secondsite_vpg_failover_promoted                   gauge      vpg
secondsite_nbd_connections                         gauge
secondsite_images_pinned                           gauge
secondsite_control_requests_total                  counter    method, route, code
secondsite_replication_connected                   gauge      vpg (protected side)
secondsite_replication_lag_seconds                 gauge      vpg (protected side)
secondsite_replication_buffer_used_bytes           gauge      vpg (protected side)
secondsite_replication_buffer_capacity_bytes       gauge      vpg (protected side)
secondsite_replication_written_bytes_total         counter    vpg (protected side)
secondsite_replication_wire_bytes_total            counter    vpg (protected side)
secondsite_replication_source_connected            gauge      vpg, source (recovery side)
secondsite_stream_rejected_connections_total       counter    (recovery side)
=================================================  =========  =============================

Volumes of protected VPGs appear in the per-volume series too; the checkpoint hold histogram of a
recovery VPG times its cuts across the sources.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from secondsite.appliance.runtime import Appliance
    from secondsite.appliance.vpg import JournaledVpg

__all__ = ["ApplianceMetrics"]

_HOLD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class _RuntimeCollector(Collector):
    """Reads the appliance's state at scrape time."""

    def __init__(self, appliance: Appliance) -> None:
        self._appliance = appliance

    def collect(self) -> Iterator[Metric]:
        a = self._appliance
        writes = CounterMetricFamily(
            "secondsite_volume_captured_writes",
            "Writes (and zeroings) captured and journaled, per volume.",
            labels=["vpg", "volume"],
        )
        written = CounterMetricFamily(
            "secondsite_volume_captured_bytes",
            "Bytes of writes (and zeroings) captured and journaled, per volume.",
            labels=["vpg", "volume"],
        )
        in_sync = GaugeMetricFamily(
            "secondsite_volume_in_sync",
            "1 when the volume is Protected (in sync with its source), else 0.",
            labels=["vpg", "volume"],
        )
        progress = GaugeMetricFamily(
            "secondsite_volume_sync_progress_ratio",
            "Progress (0..1) of the volume's running initial or delta sync.",
            labels=["vpg", "volume"],
        )
        used = GaugeMetricFamily(
            "secondsite_journal_used_bytes", "Bytes the journal uses on disk.", labels=["vpg"]
        )
        limit = GaugeMetricFamily(
            "secondsite_journal_limit_bytes", "The journal's hard limit in bytes.", labels=["vpg"]
        )
        history = GaugeMetricFamily(
            "secondsite_journal_history_seconds",
            "How far back the journal's checkpoints reach now.",
            labels=["vpg"],
        )
        history_cfg = GaugeMetricFamily(
            "secondsite_journal_history_configured_seconds",
            "How far back the journal is configured to reach.",
            labels=["vpg"],
        )
        prepared = GaugeMetricFamily(
            "secondsite_journal_prepared_bytes",
            "Journal space written ahead of the records, on disk besides the used bytes.",
            labels=["vpg"],
        )
        blocked = GaugeMetricFamily(
            "secondsite_journal_promotion_blocked",
            "1 while open PIT images keep retention from promoting as far as it should.",
            labels=["vpg"],
        )
        taken = CounterMetricFamily(
            "secondsite_checkpoints", "Checkpoints taken (automatic and tagged).", labels=["vpg"]
        )
        inconsistent = CounterMetricFamily(
            "secondsite_checkpoints_inconsistent",
            "Checkpoints taken while a volume was out of sync (not consistent).",
            labels=["vpg"],
        )
        rpo = GaugeMetricFamily(
            "secondsite_vpg_rpo_seconds",
            "Now minus the time of the VPG's newest durable checkpoint.",
            labels=["vpg"],
        )
        consistent = GaugeMetricFamily(
            "secondsite_vpg_consistent",
            "1 when every volume of the VPG is in sync (new checkpoints are consistent).",
            labels=["vpg"],
        )
        promoted = GaugeMetricFamily(
            "secondsite_vpg_failover_promoted",
            "1 while the VPG is promoted to a checkpoint (live failover, before commit/rollback).",
            labels=["vpg"],
        )
        now = time.time()
        captured = [(n, v.volumes) for n, v in list(a.vpgs.items())]
        captured += [(n, p.volumes) for n, p in list(a.protected.items())]
        for name, volumes in captured:
            for vol_name, vol in list(volumes.items()):
                labels = [name, vol_name]
                writes.add_metric(labels, vol.export.writes)
                written.add_metric(labels, vol.export.bytes_written)
                in_sync.add_metric(labels, 1.0 if vol.synced else 0.0)
                if vol.progress is not None and not vol.synced:
                    progress.add_metric(labels, vol.progress.percent / 100.0)
        for name, vpg in list(a.vpgs.items()):
            taken.add_metric([name], vpg.checkpoints_taken)
            inconsistent.add_metric([name], vpg.inconsistent_checkpoints)
            consistent.add_metric([name], 1.0 if vpg.consistent else 0.0)
            journal = vpg.journal
            if journal is None:
                continue
            st = journal.status()
            used.add_metric([name], st.retention.used_bytes)
            if st.retention.hard_limit_bytes is not None:
                limit.add_metric([name], st.retention.hard_limit_bytes)
            history.add_metric([name], st.retention.history_seconds_actual)
            history_cfg.add_metric([name], st.retention.history_seconds_configured)
            prepared.add_metric([name], st.prepared_bytes)
            blocked.add_metric([name], 0.0 if st.promotion_blocked_at_seq is None else 1.0)
            if st.newest_checkpoint is not None:
                rpo.add_metric([name], max(0.0, now - st.newest_checkpoint.time))
            promoted.add_metric([name], 1.0 if st.failover_phase is not None else 0.0)
        yield from (writes, written, in_sync, progress, used, limit, history, history_cfg)
        yield from (prepared, blocked)
        yield from (taken, inconsistent, rpo, consistent, promoted)
        yield from self._replication()
        yield GaugeMetricFamily(
            "secondsite_nbd_connections",
            "NBD client connections open now.",
            value=a.nbd.connection_count,
        )
        yield GaugeMetricFamily(
            "secondsite_images_pinned",
            "PIT images created through the control API and not yet deleted.",
            value=len(a.images),
        )

    def _replication(self) -> Iterator[Metric]:
        a = self._appliance
        connected = GaugeMetricFamily(
            "secondsite_replication_connected",
            "1 while the VPG's stream to its recovery appliance is connected.",
            labels=["vpg"],
        )
        lag = GaugeMetricFamily(
            "secondsite_replication_lag_seconds",
            "Age of the oldest change the recovery side has not acknowledged durable (or of the "
            "oldest sync still running).",
            labels=["vpg"],
        )
        used = GaugeMetricFamily(
            "secondsite_replication_buffer_used_bytes",
            "Bytes held in the protected buffer.",
            labels=["vpg"],
        )
        capacity = GaugeMetricFamily(
            "secondsite_replication_buffer_capacity_bytes",
            "Size of the protected buffer.",
            labels=["vpg"],
        )
        written = CounterMetricFamily(
            "secondsite_replication_written_bytes",
            "Bytes the workload wrote into the protected buffer.",
            labels=["vpg"],
        )
        wire = CounterMetricFamily(
            "secondsite_replication_wire_bytes",
            "Bytes the stream put on the wire (after compression).",
            labels=["vpg"],
        )
        for name, pvpg in list(a.protected.items()):
            if pvpg.sender is None:
                continue
            m = pvpg.sender.metrics()
            connected.add_metric([name], 1.0 if m.connected else 0.0)
            lag.add_metric([name], pvpg.rpo_seconds())
            used.add_metric([name], m.lag_bytes)
            capacity.add_metric([name], m.buffer_capacity)
            written.add_metric([name], m.appended_bytes)
            wire.add_metric([name], m.wire_bytes_sent)
        sources = GaugeMetricFamily(
            "secondsite_replication_source_connected",
            "1 while a protected appliance's stream feeding the VPG's journal is connected.",
            labels=["vpg", "source"],
        )
        receiver = a.receiver
        live = set() if receiver is None else {(s.vpg, s.source) for s in receiver.stats()}
        for name, vpg in list(a.vpgs.items()):
            for source in vpg.spec.sources:
                sources.add_metric([name, source], 1.0 if (name, source) in live else 0.0)
        yield from (connected, lag, used, capacity, written, wire, sources)
        if receiver is not None:
            yield CounterMetricFamily(
                "secondsite_stream_rejected_connections",
                "Stream connections refused or dropped (TLS, protocol, unknown VPG or source).",
                value=receiver.rejected,
            )


class ApplianceMetrics:
    """The registry behind `/metrics`, and the few series the API itself records."""

    def __init__(self, appliance: Appliance) -> None:
        self.registry = CollectorRegistry()
        self._appliance = appliance
        self.registry.register(_RuntimeCollector(appliance))
        self.requests = Counter(
            "secondsite_control_requests",
            "Control API requests answered, by route template and status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.hold = Histogram(
            "secondsite_checkpoint_hold_seconds",
            "How long taking a checkpoint held write acknowledgements.",
            ["vpg"],
            buckets=_HOLD_BUCKETS,
            registry=self.registry,
        )
        self._hold_seen: dict[str, tuple[JournaledVpg, int]] = {}

    def _observe_holds(self) -> None:
        # The journal keeps the most recent hold durations in a ring, not a histogram; each
        # checkpoint is one hold, so the checkpoints taken since the last scrape say how many of
        # the newest durations are new. A scrape gap longer than the ring loses samples.
        vpgs = self._appliance.vpgs
        for name in list(self._hold_seen):
            if name not in vpgs:
                del self._hold_seen[name]
                self.hold.remove(name)
        for name, vpg in list(vpgs.items()):
            if vpg.journal is None:
                continue
            runtime, seen = self._hold_seen.get(name, (vpg, 0))
            if runtime is not vpg:  # the VPG was removed and added again: a new runtime
                seen = 0
            new = vpg.checkpoints_taken - seen
            child = self.hold.labels(name)
            if new > 0:
                samples = vpg.hold_times()
                for seconds in samples[max(0, len(samples) - new) :]:
                    child.observe(seconds)
            self._hold_seen[name] = (vpg, vpg.checkpoints_taken)

    def exposition(self) -> bytes:
        """The text format of every series, as of now."""
        self._observe_holds()
        return generate_latest(self.registry)
