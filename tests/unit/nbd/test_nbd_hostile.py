"""Hostile and broken clients: every one gets an NBD error or a closed connection, and the server
goes on serving a well-behaved client afterwards. Includes Hypothesis fuzzing of the live server's
option and request parsers."""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_client import NBDClient, ReplyError
from nbd_helpers import Harness, MiB

from secondsite.appliance.nbd import BytesLike, MemoryExport, ServerSettings
from secondsite.appliance.nbd import _wire as w

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Hostile input is the client's fault: the server may warn, but must log no error (errors
    are what it logs for its own bugs and for exports that raise)."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def assert_server_healthy(nbd: Harness) -> None:
    """A well-behaved client can still negotiate, write and read."""
    async with await nbd.client("tiny") as client:
        await client.write(0, b"healthy")
        assert await client.read(0, 7) == b"healthy"


async def test_bad_request_magic_closes_only_that_connection(nbd: Harness) -> None:
    async with await nbd.client() as good, await nbd.client() as bad:
        bad.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, w.CMD_READ, 1, 0, 512))
        assert await bad.expect_closed() == b""
        await good.write(0, b"unaffected")
        assert await good.read(0, 10) == b"unaffected"
    await assert_server_healthy(nbd)


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(10, id="mid-header"),
        pytest.param(28 + 1000, id="mid-small-payload"),
        pytest.param(28 + 300_000, id="mid-large-payload"),
    ],
)
async def test_client_vanishing_mid_frame(nbd: Harness, cut: int) -> None:
    client = await nbd.client()
    payload = b"\xee" * MiB
    frame = w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 7, 0, len(payload)) + payload
    client.send(frame[:cut])
    await client.drain()
    await client.close()
    await nbd.provider.wait_released(1)
    async with await nbd.client() as other:
        assert await other.read(0, 4096) == bytes(4096)  # the cut write was never applied
    await assert_server_healthy(nbd)


async def test_payload_that_looks_like_requests_is_data(nbd: Harness) -> None:
    async with await nbd.client() as client:
        inner = w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_DISC, 0, 0, 0) * 2
        await client.write(4096, inner)
        assert await client.read(4096, len(inner)) == inner


async def test_requests_trickling_in_one_byte_at_a_time(nbd: Harness) -> None:
    async with await nbd.client() as client:
        write, write_frame = client.frame(w.CMD_WRITE, 0, 5, payload=b"hello")
        read, read_frame = client.frame(w.CMD_READ, 0, 5)
        for byte in write_frame + read_frame:
            client.send(bytes([byte]))
            await client.drain()
            await asyncio.sleep(0)
        assert (await client.reply(write)).error == 0
        assert (await client.reply(read)).data == b"hello"


async def test_garbage_instead_of_handshake(nbd: Harness) -> None:
    client = await NBDClient.connect_unix(nbd.path)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    received = await client.expect_closed()
    assert received.startswith(b"NBDMAGIC")
    await client.close()
    await assert_server_healthy(nbd)


async def test_option_claiming_gigabytes_then_vanishing(nbd: Harness) -> None:
    client = await NBDClient.connect_unix(nbd.path)
    await client.handshake()
    client.send(w.OPTION_HEADER.pack(w.IHAVEOPT, w.OPT_GO, 0xFFFFFFFF) + bytes(200_000))
    await client.drain()
    await client.close()
    await assert_server_healthy(nbd)


async def test_replies_nobody_reads_do_not_pile_up(nbd: Harness) -> None:
    class CountingReads(MemoryExport):
        reads = 0

        async def read(self, offset: int, length: int) -> BytesLike:
            self.reads += 1
            return await super().read(offset, length)

    export = CountingReads(MiB)
    nbd.provider.add("counting", export)
    async with await nbd.client("counting") as client:
        count = 2000  # 2000 MiB of replies requested, none read yet
        handles = [client.request(w.CMD_READ, 0, MiB) for _ in range(count)]
        await client.drain()
        await asyncio.sleep(0.3)
        assert export.reads < 100  # the server stopped reading requests instead of buffering
        for handle in handles:
            assert (await client.reply(handle)).error == 0
        assert export.reads == count


@FUZZ
@given(
    options=st.lists(
        st.tuples(
            st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0, 12, 0x7FFFFFFF, 0xFFFFFFFF]),
            st.binary(max_size=64),
        ),
        max_size=6,
    ),
    client_flags=st.sampled_from([0, 1, 2, 3, 4, 0xFFFFFFFF]),
    tail=st.binary(max_size=40),
)
async def test_fuzz_negotiation(
    nbd: Harness, options: list[tuple[int, bytes]], client_flags: int, tail: bytes
) -> None:
    client = await NBDClient.connect_unix(nbd.path)
    async with client:
        await client.recv(18)
        client.send(struct.pack(">I", client_flags))
        for option, data in options:
            client.send_option(option, data)
        client.send(tail)
        client.writer.write_eof()
        # Whatever it answered, the server closes the connection once the client is done: it
        # never hangs on a half-received option or request.
        await client.expect_closed(timeout=5)
    await assert_server_healthy(nbd)


request_frames = st.lists(
    st.tuples(
        st.sampled_from([w.REQUEST_MAGIC] * 9 + [0x12345678]),
        st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 4, 8, 16]),
        st.integers(0, 12),
        st.integers(0, 2**64 - 1),
        st.sampled_from([0, 1, 4095, 16 * MiB - 1, 16 * MiB, 2**63, 2**64 - 1])
        | st.integers(0, 16 * MiB),
        st.sampled_from([0, 1, 512, 65536, 32 * MiB + 1, 0xFFFFFFFF]) | st.integers(0, 8192),
    ),
    max_size=8,
)


@FUZZ
@given(frames=request_frames, structured=st.booleans())
async def test_fuzz_requests(
    nbd: Harness, frames: list[tuple[int, int, int, int, int, int]], structured: bool
) -> None:
    client = await nbd.client("mem", structured=structured, meta=structured)
    async with client:
        for magic, flags, cmd, handle, offset, length in frames:
            payload = b""
            if cmd == w.CMD_WRITE and magic == w.REQUEST_MAGIC:
                payload = bytes(min(length, 70000))  # may be short: the frame is then cut
            client.send(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length))
            client.send(payload)
        client.writer.write_eof()
        # The server answers (or drops the connection on a bad magic), then closes.
        await client.expect_closed(timeout=5)
    await assert_server_healthy(nbd)


@FUZZ
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 16 * MiB - 1), st.integers(1, 200_000), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
async def test_fuzz_valid_pipelined_io_matches_a_model(
    nbd: Harness, writes: list[tuple[int, int, bool]]
) -> None:
    """Pipelined writes and zeroes of random sizes land exactly where a bytearray model says."""
    nbd.provider.add("model", MemoryExport(16 * MiB))
    async with await nbd.client("model") as client:
        await client.write_zeroes(0, 16 * MiB)
        model = bytearray(16 * MiB)
        handles = []
        for index, (offset, length, zero) in enumerate(writes):
            length = min(length, 16 * MiB - offset)
            if zero:
                model[offset : offset + length] = bytes(length)
                handles.append(client.request(w.CMD_WRITE_ZEROES, offset, length))
            else:
                data = bytes([index + 1]) * length
                model[offset : offset + length] = data
                handles.append(client.request(w.CMD_WRITE, offset, length, payload=data))
        # Overlapping in-flight writes may apply in any order per the protocol; this export
        # applies them in arrival order, which the model assumes.
        for handle in handles:
            assert (await client.reply(handle)).error == 0
        for offset, length, _ in writes:
            length = min(length, 16 * MiB - offset)
            assert await client.read(offset, length) == model[offset : offset + length]


async def test_read_error_reply_is_complete_in_simple_mode(nbd: Harness) -> None:
    """Simple replies to failed reads carry no payload: the next reply parses cleanly."""
    async with await nbd.client(structured=False) as client:
        bad = client.request(w.CMD_READ, 16 * MiB, 4096)
        good = client.request(w.CMD_READ, 0, 4096)
        assert (await client.reply(bad)).error != 0
        assert (await client.reply(good)).data == bytes(4096)
        with pytest.raises(ReplyError):
            await client.read(2**63, 1)


@pytest.mark.parametrize("settings", [ServerSettings(max_connections=2)])
async def test_connections_beyond_the_limit_are_dropped(nbd: Harness) -> None:
    async with await nbd.client() as first, await nbd.client() as second:
        third = await NBDClient.connect_unix(nbd.path)
        assert await third.expect_closed() == b""
        await third.close()
        await first.write(0, b"1")
        await second.write(1, b"2")
        assert await first.read(0, 2) == b"12"
    await nbd.provider.wait_released(2)
    await assert_server_healthy(nbd)


async def test_oversized_write_is_refused_before_its_payload_arrives(nbd: Harness) -> None:
    """A write claiming 4 GiB is answered at once and its payload dropped as it streams in:
    the server never buffers it (peak traced memory stays far below the claimed size)."""
    tracemalloc.start()
    try:
        async with await nbd.client() as client:
            handle = client.request(w.CMD_WRITE, 0, 0xFFFFFFFF, payload=b"\xab" * MiB)
            reply = await client.reply(handle)
            assert reply.error == errno.EINVAL
            for _ in range(16):
                client.send(b"\xcd" * MiB)
                await client.drain()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    await assert_server_healthy(nbd)
