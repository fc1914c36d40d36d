"""The declarative configuration of one appliance: what it serves, captures and journals.

`secondsite appliance --config FILE` reads it from YAML; the control API accepts the same model in
a `PUT`. Field names are camelCase in YAML and JSON, snake_case in Python.

A *volume* belongs to one VPG and is captured in one of two modes:

- `inPath`: the appliance serves the volume itself from `backing` (a file or block device): every
  write goes to the backing store and to the journal, then is acknowledged.
- `mirrorTarget`: a hypervisor (QEMU `blockdev-mirror`, `copy-mode=write-blocking`) mirrors every
  guest write to the appliance's export; the appliance journals it and acks. QEMU keeps the source.
  The volume stays in initial sync until the mirror job is actively synced, which the appliance
  learns from QEMU's QMP socket (`qmpSocket` and `mirrorJob`) or from the control API.

A *journal* belongs to one VPG and keeps every write of its volumes plus checkpoints, within
`history` and `hardLimit`.

Replication between appliances: on a *protected* appliance, a VPG listed in `protected` has its
volumes captured here and streamed to the recovery appliance at `recovery` (no journal here); on
the *recovery* appliance, the VPG's journal lists those protected appliances in `sources` and is
fed by the stream listener at `listen.stream`. Appliances authenticate each other with mutual TLS
(`streamTls`). A VPG whose volumes sit on several protected appliances has one `protected` entry
on each and one journal, listing them all, on the recovery appliance.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from secondsite.api.common import Duration, Quantity, parse_duration, parse_quantity
from secondsite.appliance.stream.ratelimit import Priority

__all__ = [
    "ApplianceConfig",
    "CaptureMode",
    "Compression",
    "ControlTlsSpec",
    "InitialSync",
    "JournalSpec",
    "ListenSpec",
    "Priority",
    "ProtectedVpgSpec",
    "StreamTlsSpec",
    "VolumeSpec",
]

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


class CaptureMode(enum.StrEnum):
    """How writes of a volume reach the appliance."""

    IN_PATH = "inPath"
    MIRROR_TARGET = "mirrorTarget"


class VolumeSpec(_Model):
    """One protected volume."""

    name: Name
    """The volume's name; also its NBD export name."""
    vpg: Name
    """The VPG it belongs to: a journal (local capture) or a `protected` entry (replicated to
    another appliance) for that VPG must be configured."""
    capture: CaptureMode = CaptureMode.IN_PATH
    """How writes reach the appliance."""
    backing: Path | None = None
    """inPath only: the file or block device holding the volume's data."""
    size: Quantity | None = None
    """Size in bytes (or a quantity such as 10Gi). Required for mirrorTarget; for inPath it
    defaults to the backing store's size."""
    replica: Path | None = None
    """The replica file of a locally journaled volume; default
    `<journal directory>/replicas/<name>.img`. (The replicas of a replicated volume live on the
    recovery appliance, in its journal directory.)"""
    qmp_socket: Path | None = None
    """mirrorTarget only: QEMU's QMP socket, watched to learn when the mirror job is synced."""
    mirror_job: str | None = None
    """mirrorTarget only: the id of the QEMU mirror job writing to this volume."""

    @model_validator(mode="after")
    def _check_mode(self) -> Self:
        if self.capture is CaptureMode.IN_PATH and self.backing is None:
            raise ValueError(f"volume {self.name}: inPath capture needs `backing`")
        if self.capture is CaptureMode.MIRROR_TARGET:
            if self.size is None:
                raise ValueError(f"volume {self.name}: mirrorTarget capture needs `size`")
            if self.backing is not None:
                raise ValueError(
                    f"volume {self.name}: mirrorTarget keeps no copy of the source; drop `backing`"
                )
        if (self.qmp_socket is None) != (self.mirror_job is None):
            raise ValueError(
                f"volume {self.name}: give both `qmpSocket` and `mirrorJob`, or neither"
            )
        return self

    def size_bytes(self) -> int | None:
        return None if self.size is None else int(parse_quantity(self.size))


class JournalSpec(_Model):
    """The journal of one VPG."""

    vpg: Name
    directory: Path
    """Where segments, the checkpoint table and (by default) replicas live."""
    history: Duration = "24h"
    """How far back checkpoints are kept (1h to 30d)."""
    hard_limit: Quantity = "150Gi"
    """Most bytes the journal may use; older entries are promoted into the replica beyond it."""
    warning_percent: Annotated[int, Field(ge=1, le=100)] = 75
    """Warn when the journal uses this share of `hardLimit`."""
    checkpoint_interval_seconds: Annotated[float, Field(ge=0.1, le=3600)] = 5
    """Seconds between automatic checkpoints."""
    segment_bytes: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    """Size at which a journal segment file is closed and a new one started."""
    scratch_directory: Path | None = None
    """Where scratch overlays of writable PIT images go; default `<directory>/scratch`."""
    sources: list[Name] = []
    """The protected appliances (their `name`) whose streams feed this journal. Empty: the
    journal takes the writes of this appliance's own volumes (local capture). Checkpoints are cuts
    across every source, taken only while all of them are connected."""
    replicas: dict[Name, Path] = {}
    """Journals with `sources` only: the replica file of a volume, by volume name, for volumes
    whose replica is not `<directory>/replicas/<volume>.img` (say, after reverse protection, the
    file that was the volume's backing store when this appliance protected it). An existing file
    must have the volume's size; it is used as it is, not cleared."""

    @model_validator(mode="after")
    def _check_sources(self) -> Self:
        dup = {s for s in self.sources if self.sources.count(s) > 1}
        if dup:
            raise ValueError(f"journal {self.vpg}: sources listed twice: {', '.join(sorted(dup))}")
        if self.replicas and not self.sources:
            raise ValueError(
                f"journal {self.vpg}: `replicas` is for journals fed by `sources`; the replica "
                "of a locally captured volume is its volume's `replica`"
            )
        paths = [p.resolve() for p in self.replicas.values()]
        dup_paths = {str(p) for p in paths if paths.count(p) > 1}
        if dup_paths:
            raise ValueError(
                f"journal {self.vpg}: volumes share a replica file: {', '.join(sorted(dup_paths))}"
            )
        return self

    def replica_of(self, volume: str) -> Path:
        """The replica file of a stream-fed ``volume``."""
        return self.replicas.get(volume, self.directory / "replicas" / f"{volume}.img")

    def history_seconds(self) -> int:
        return parse_duration(self.history)

    def hard_limit_bytes(self) -> int:
        return int(parse_quantity(self.hard_limit))


def _host_port(value: str, field: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) -> (host, port); ValueError naming `field`."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{field} must be host:port, not {value!r}")
    return host.strip("[]"), int(port)


class ControlTlsSpec(_Model):
    """TLS of the control API: the server's certificate, and optionally the CA of its clients."""

    cert_file: Path
    """PEM certificate (chain) the control API presents."""
    key_file: Path
    """PEM private key of `certFile`."""
    client_ca_file: Path | None = None
    """PEM CA bundle. When set, clients must present a certificate signed by it (mutual TLS)
    for every `/v1` request; a certificate it did not sign is refused during the handshake.
    `/healthz` and `/metrics` stay reachable without one, for probes and scrapers."""


class ListenSpec(_Model):
    """Where the appliance listens."""

    nbd_unix: Path | None = None
    """A unix socket for the NBD server."""
    nbd_tcp: str | None = None
    """host:port for the NBD server over TCP (loopback or the pod's address)."""
    control: str | None = None
    """host:port of the control API (port 0 picks a free one). HTTPS with `tls`, or plain HTTP
    only when `controlPlainHttp` is set."""
    tls: ControlTlsSpec | None = None
    """Certificate, key and (for mutual TLS) client CA of the control API."""
    token_file: Path | None = None
    """File holding the bearer token every `/v1` request must carry; required with `control`.
    Re-read when it changes, so a rotated secret takes effect without a restart."""
    control_plain_http: bool = False
    """Serve the control API over plain HTTP, without TLS: for tests and development only."""
    stream: str | None = None
    """host:port of the replication stream listener, where protected appliances connect (port 0
    picks a free one). Needed by journals with `sources`."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.nbd_unix is None and self.nbd_tcp is None:
            raise ValueError("listen: give nbdUnix, nbdTcp or both")
        if self.nbd_tcp is not None:
            _host_port(self.nbd_tcp, "listen.nbdTcp")
        if self.stream is not None:
            _host_port(self.stream, "listen.stream")
        if self.control is None:
            if self.tls is not None or self.token_file is not None or self.control_plain_http:
                raise ValueError("listen: tls, tokenFile and controlPlainHttp need `control`")
            return self
        _host_port(self.control, "listen.control")
        if self.token_file is None:
            raise ValueError(
                "listen.control needs `tokenFile`: the control API always wants a token"
            )
        if self.tls is None and not self.control_plain_http:
            raise ValueError(
                "listen.control needs `tls` (certFile, keyFile), or `controlPlainHttp: true` "
                "to serve plain HTTP (tests and development only)"
            )
        if self.tls is not None and self.control_plain_http:
            raise ValueError("listen: give `tls` or `controlPlainHttp`, not both")
        return self

    def tcp_address(self) -> tuple[str, int] | None:
        return None if self.nbd_tcp is None else _host_port(self.nbd_tcp, "listen.nbdTcp")

    def control_address(self) -> tuple[str, int] | None:
        return None if self.control is None else _host_port(self.control, "listen.control")

    def stream_address(self) -> tuple[str, int] | None:
        return None if self.stream is None else _host_port(self.stream, "listen.stream")


class StreamTlsSpec(_Model):
    """Mutual TLS between appliances: one certificate serves both ends of the stream."""

    cert_file: Path
    """PEM certificate (chain) this appliance presents, to senders as a server and to the
    recovery appliance as a client: give it both extended key usages (or none)."""
    key_file: Path
    """PEM private key of `certFile`."""
    ca_file: Path
    """PEM CA bundle the peer appliance's certificate must be signed by."""
    verify_hostname: bool = True
    """Senders check that the recovery appliance's certificate names the host of `recovery`
    (DNS name or IP address in its subjectAltName). Turn off only when appliances are reached
    through addresses their certificates cannot list."""


class Compression(enum.StrEnum):
    """Compression of the replication stream's data frames."""

    NONE = "none"
    ZSTD = "zstd"
    """Every batch is compressed (zstd level 3) when that saves at least 10 %."""
    ADAPTIVE = "adaptive"
    """Like zstd, but after a batch that did not compress well the next few go uncompressed
    before trying again: cheap on incompressible data."""


class InitialSync(enum.StrEnum):
    """How a protected VPG's volumes that have not finished their initial sync are synced."""

    FULL = "full"
    """Ship every block of the source."""
    DELTA = "delta"
    """Ask the recovery appliance for block checksums of its replica state and ship only the
    blocks that differ: for a replica that already holds most of the data (reverse protection)."""


class ProtectedVpgSpec(_Model):
    """A VPG whose volumes this appliance captures and streams to a recovery appliance."""

    vpg: Name
    recovery: str
    """host:port of the recovery appliance's stream listener (its `listen.stream`)."""
    directory: Path
    """Where this appliance keeps the VPG's small state file (which volumes finished their
    initial sync, and whether the appliance stopped cleanly); no journal lives here."""
    priority: Priority = Priority.MEDIUM
    """Share of the appliance's `bandwidthLimit` when VPGs contend for it (High 4 : Medium 2 :
    Low 1)."""
    buffer_bytes: Quantity = "256Mi"
    """The protected buffer: changes kept in memory until the recovery side has them durably.
    When it is full, in-path volumes fall back to bitmap sync and mirror targets to
    backpressure."""
    compression: Compression = Compression.ADAPTIVE
    initial_sync: InitialSync = InitialSync.FULL
    """For volumes that have not finished their initial sync: `full` ships every block, `delta`
    asks the recovery appliance for block checksums of its replica state and ships only blocks
    that differ."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        _host_port(self.recovery, f"protected {self.vpg}: recovery")
        if self.buffer_size() < 1 << 20:
            raise ValueError(f"protected {self.vpg}: bufferBytes must be at least 1Mi")
        return self

    def recovery_address(self) -> tuple[str, int]:
        return _host_port(self.recovery, f"protected {self.vpg}: recovery")

    def buffer_size(self) -> int:
        return int(parse_quantity(self.buffer_bytes))


class ApplianceConfig(_Model):
    """Everything one appliance serves."""

    node: str | None = None
    """The node this appliance runs for (informational; appears in logs and status)."""
    name: Name | None = None
    """This appliance's identity in replication streams (the `sources` of recovery journals
    name it); default `node`."""
    listen: ListenSpec
    journals: list[JournalSpec] = []
    protected: list[ProtectedVpgSpec] = []
    """VPGs captured here and replicated to a recovery appliance."""
    volumes: list[VolumeSpec] = []
    stream_tls: StreamTlsSpec | None = None
    """Mutual TLS of the replication stream, both as sender and as receiver."""
    stream_plain_tcp: bool = False
    """Replicate over plain TCP, without TLS: for tests and development only."""
    bandwidth_limit: Quantity | None = None
    """Bytes per second all of this appliance's senders may put on the wire together (shared by
    VPG priority); none: unlimited."""

    @model_validator(mode="after")
    def _check_refs(self) -> Self:
        vpgs = [j.vpg for j in self.journals]
        dup = {v for v in vpgs if vpgs.count(v) > 1}
        if dup:
            raise ValueError(f"more than one journal for VPG {', '.join(sorted(dup))}")
        remote = [p.vpg for p in self.protected]
        dup = {v for v in remote if remote.count(v) > 1}
        if dup:
            raise ValueError(f"VPG {', '.join(sorted(dup))} is listed twice in `protected`")
        both = set(vpgs) & set(remote)
        if both:
            raise ValueError(
                f"VPG {', '.join(sorted(both))} is both journaled here and replicated to another "
                "appliance: give it a journal or a `protected` entry, not both"
            )
        names = [v.name for v in self.volumes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"volume names must be unique: {', '.join(sorted(dup))}")
        fed = {j.vpg for j in self.journals if j.sources}
        for vol in self.volumes:
            if vol.vpg in fed:
                raise ValueError(
                    f"volume {vol.name}: the journal of VPG {vol.vpg} is fed by the stream from "
                    "its `sources`; its volumes are captured on those appliances, not here"
                )
            if vol.vpg not in vpgs and vol.vpg not in remote:
                raise ValueError(
                    f"volume {vol.name}: no journal and no `protected` entry for VPG {vol.vpg}"
                )
        backings = {v.backing.resolve(): v.name for v in self.volumes if v.backing is not None}
        for j in self.journals:
            for volume in j.replicas:
                served = backings.get(j.replica_of(volume).resolve())
                if served is not None:
                    raise ValueError(
                        f"journal {j.vpg}: the replica of {volume} is the backing store of "
                        f"volume {served}, which this appliance serves"
                    )
        if fed and self.listen.stream is None:
            raise ValueError(
                f"journals with sources ({', '.join(sorted(fed))}) need `listen.stream`"
            )
        replicating = bool(self.protected) or self.listen.stream is not None
        if replicating and self.stream_tls is None and not self.stream_plain_tcp:
            raise ValueError(
                "replication needs `streamTls` (certFile, keyFile, caFile), or "
                "`streamPlainTcp: true` to replicate without TLS (tests and development only)"
            )
        if self.stream_tls is not None and self.stream_plain_tcp:
            raise ValueError("give `streamTls` or `streamPlainTcp`, not both")
        if self.protected and self.source_name is None:
            raise ValueError(
                "protected VPGs need the appliance's `name` (or `node`): recovery appliances "
                "know their sources by it"
            )
        if self.bandwidth_limit is not None and self.bandwidth_bytes() == 0:
            raise ValueError("bandwidthLimit must be positive (leave it out for no limit)")
        return self

    @property
    def source_name(self) -> str | None:
        """This appliance's name in replication streams."""
        return self.name or self.node

    def bandwidth_bytes(self) -> float | None:
        if self.bandwidth_limit is None:
            return None
        return float(parse_quantity(self.bandwidth_limit))

    def journal_for(self, vpg: str) -> JournalSpec:
        return next(j for j in self.journals if j.vpg == vpg)

    def protected_for(self, vpg: str) -> ProtectedVpgSpec:
        return next(p for p in self.protected if p.vpg == vpg)

    def volumes_of(self, vpg: str) -> list[VolumeSpec]:
        return [v for v in self.volumes if v.vpg == vpg]
