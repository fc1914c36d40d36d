"""Mutual TLS between appliances, and peers the receiver must refuse while it keeps serving
everyone else."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl

import pytest
from stream_certs import Pki
from stream_harness import Rig, assert_replicated

from secondsite.appliance.stream import (
    MemorySink,
    ReceiverSettings,
    SenderSettings,
    StreamReceiver,
    client_context,
    server_context,
    tcp_connector,
)
from secondsite.appliance.stream import frames as f

FAST = SenderSettings(peer_timeout=0.5, heartbeat_interval=0.1, backoff_min=0.05, backoff_max=0.2)


async def _tls_receiver(rig: Rig, pki: Pki, sink: MemorySink) -> tuple[int, StreamReceiver]:
    r = pki.receiver
    rx, port = await rig.receiver({"vpg-a": sink}, ssl_context=server_context(r.cert, r.key, r.ca))
    return port, rx


async def test_mutual_tls_replicates(rig: Rig, pki: Pki) -> None:
    sink = MemorySink()
    port, _ = await _tls_receiver(rig, pki, sink)
    s = pki.sender
    src = rig.source(
        "node-1",
        tcp_connector("127.0.0.1", port, ssl_context=client_context(s.cert, s.key, s.ca)),
        settings=FAST,
    )
    await src.random_workload(random.Random(1), 500)
    await src.flushed()
    assert_replicated(src, sink)
    assert src.sender.metrics().sessions == 1


def _refused_client(pki: Pki, case: str) -> ssl.SSLContext:
    s = pki.sender
    if case == "foreign-ca":
        o = pki.foreign_sender
        return client_context(o.cert, o.key, s.ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no client certificate at all
    ctx.load_verify_locations(cafile=str(s.ca))
    return ctx


@pytest.mark.parametrize("case", ["foreign-ca", "no-client-cert", "plain-tcp"])
async def test_unauthenticated_senders_are_refused(
    rig: Rig, pki: Pki, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    sink = MemorySink()
    port, rx = await _tls_receiver(rig, pki, sink)
    ctx = None if case == "plain-tcp" else _refused_client(pki, case)
    bad = rig.source("intruder", tcp_connector("127.0.0.1", port, ssl_context=ctx), settings=FAST)
    bad.write(0, 0, b"x" * 4096)
    # Meanwhile a legitimate sender is served.
    s = pki.sender
    good = rig.source(
        "node-1",
        tcp_connector("127.0.0.1", port, ssl_context=client_context(s.cert, s.key, s.ca)),
        settings=FAST,
    )
    await good.random_workload(random.Random(2), 200)
    await good.flushed()
    await asyncio.sleep(0.3)  # a few of the intruder's retries
    m = bad.sender.metrics()
    assert m.sessions == 0 and m.durable_seq == 0 and not m.connected
    assert "intruder" not in sink.state.applied
    assert rx.rejected >= 1
    assert "event=tls-refused" in caplog.text
    assert_replicated(good, sink)


async def test_a_client_checks_the_receiver_certificate(rig: Rig, pki: Pki) -> None:
    """A receiver whose certificate is not from the site CA is not trusted by senders."""
    sink = MemorySink()
    o = pki.foreign_sender  # a certificate from the other CA, used as a server here
    _, port = await rig.receiver({"vpg-a": sink}, ssl_context=server_context(o.cert, o.key, o.ca))
    s = pki.sender
    src = rig.source(
        "node-1",
        tcp_connector("127.0.0.1", port, ssl_context=client_context(s.cert, s.key, s.ca)),
        settings=FAST,
    )
    src.write(0, 0, b"x")
    await asyncio.sleep(0.3)
    m = src.sender.metrics()
    assert m.sessions == 0 and "CERTIFICATE_VERIFY_FAILED" in m.last_error


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello, on plain TCP
    f.MAGIC + bytes([f.FRAME_VERSION, f.FrameType.DATA, 0, 0]) + b"\xff\xff\xff\xff\0\0\0\0",
    f.encode(f.Ack(5)),  # a valid frame, in the wrong place
    f.encode(f.Hello("vpg-a", "x", (f.VolumeEntry("disk0", 10),)))[:-3] + b"zzz",  # bad CRC
]


async def test_garbage_from_a_peer_is_logged_and_closed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "secondsite.appliance.stream")
    sink = MemorySink()
    rx, port = await rig.receiver({"vpg-a": sink})
    good = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    rng = random.Random(3)
    for junk in GARBAGE:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(junk)
            await good.random_workload(rng, 50)
            reply = await asyncio.wait_for(reader.read(), 5)  # then EOF: closed by the receiver
        finally:
            writer.close()
            await writer.wait_closed()
        frames = f.decode_all(reply) if reply else []
        assert len(frames) == 1 and isinstance(frames[0], f.Error), reply
        assert frames[0].code == f.ErrorCode.PROTOCOL
    await good.flushed()
    assert_replicated(good, sink)
    assert good.sender.metrics().sessions == 1  # never disturbed
    assert rx.rejected == len(GARBAGE)
    assert caplog.text.count("event=protocol-error") == len(GARBAGE)


async def test_silent_peer_is_dropped_after_the_handshake_timeout(rig: Rig) -> None:
    rx, port = await rig.receiver({"vpg-a": MemorySink()}, ReceiverSettings(handshake_timeout=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()
    assert rx.rejected == 1


async def test_a_source_must_be_the_appliance_its_certificate_names(
    rig: Rig, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender with a valid certificate of the site that claims another appliance's name in its
    HELLO is refused (REFUSED, and a warning naming both); the honest one is served."""
    sink = MemorySink()
    port, rx = await _tls_receiver(rig, pki, sink)
    s = pki.sender  # names node-1
    ctx = client_context(s.cert, s.key, s.ca)
    honest = rig.source("node-1", tcp_connector("127.0.0.1", port, ssl_context=ctx))
    liar = rig.source("node-9", tcp_connector("127.0.0.1", port, ssl_context=ctx), settings=FAST)
    honest.write(0, 0, b"x" * 512)
    liar.write(0, 0, b"y" * 512)
    await honest.flushed()
    await asyncio.sleep(0.3)
    m = liar.sender.metrics()
    assert m.sessions == 0 and m.durable_seq == 0
    assert "REFUSED" in m.last_error and "not source 'node-9'" in m.last_error, m.last_error
    assert set(sink.state.applied) == {"node-1"}
    assert rx.rejected >= 1
    assert "source=node-9" in caplog.text
    assert "names ['localhost', 'node-1'], not source 'node-9'" in caplog.text


async def test_plain_tcp_takes_any_source_name(rig: Rig) -> None:
    """Without TLS there is no certificate to check a source against: plain TCP is unchanged."""
    sink = MemorySink()
    _, port = await rig.receiver({"vpg-a": sink})
    src = rig.source("any-name", tcp_connector("127.0.0.1", port), settings=FAST)
    src.write(0, 0, b"z" * 512)
    await src.flushed()
    assert set(sink.state.applied) == {"any-name"}
