"""The replication stream between appliances: protected side -> recovery side, one TCP (or mutual
TLS) connection per VPG and protected appliance, ordered, acknowledged and resumable.

Layers, each usable alone:

- ``frames``: the wire format (CRC32C per frame, optional zstd per DATA frame, block-checksum
  requests and answers for delta sync) and an incremental decoder that turns any input into
  frames or a :class:`ProtocolError`;
- ``buffer``: the protected side's bounded :class:`ProtectedBuffer` of unacknowledged records and
  the :class:`DirtyMap` bitmap sync falls back to;
- ``sender`` / ``receiver``: the two ends (:class:`StreamSender`, :class:`StreamReceiver`), with
  resume, heartbeats, and checkpoint holds across sources;
- ``sink``: what the receiver writes into (:class:`StreamSink`; :class:`MemorySink` for tests);
- ``tls`` and ``ratelimit``: mutual-TLS contexts, and a priority-weighted bandwidth limit.

Exceptions::

    ProtocolError      the peer sent a malformed or unexpected frame (the connection is dropped)
    RemoteError        the receiver answered ERROR (the sender reconnects after a backoff)
    SumsLost           a checksum request (delta sync) got no answer: the connection was lost
    CheckpointError    a cut across sources could not be taken (every source was released)
    BufferFull         a change does not fit in the protected buffer (switch to bitmap sync)
    SinkError          the sink cannot take a record
      SinkRefused      ... nor anything from this source (e.g. its volume table does not match)
"""

from .buffer import BufferFull, DirtyMap, ProtectedBuffer, SpillStats
from .frames import NO_VOLUME, ErrorCode, FrameDecoder, Op, ProtocolError, Record, VolumeEntry
from .ratelimit import BandwidthLimiter, Flow, Priority
from .receiver import CheckpointError, ReceiverSettings, SessionStats, StreamReceiver
from .sender import (
    Connector,
    RemoteError,
    SenderMetrics,
    SenderSettings,
    StreamSender,
    SumsLost,
    tcp_connector,
)
from .sink import MemorySink, MemorySinkState, SinkError, SinkRefused, StreamSink
from .tls import client_context, server_context

__all__ = [
    "NO_VOLUME",
    "BandwidthLimiter",
    "BufferFull",
    "CheckpointError",
    "Connector",
    "DirtyMap",
    "ErrorCode",
    "Flow",
    "FrameDecoder",
    "MemorySink",
    "MemorySinkState",
    "Op",
    "Priority",
    "ProtectedBuffer",
    "ProtocolError",
    "ReceiverSettings",
    "Record",
    "RemoteError",
    "SenderMetrics",
    "SenderSettings",
    "SessionStats",
    "SinkError",
    "SinkRefused",
    "SpillStats",
    "StreamReceiver",
    "StreamSender",
    "StreamSink",
    "SumsLost",
    "VolumeEntry",
    "client_context",
    "server_context",
    "tcp_connector",
]
