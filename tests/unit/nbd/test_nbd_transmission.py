"""Transmission phase: commands, flags, bounds, errors, ordering, concurrency and disconnects."""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import pytest
from nbd_client import NBDClient, ReplyError, connect_and_go
from nbd_helpers import CountingExport, FaultyExport, GatedExport, Harness, MiB

from secondsite.appliance.nbd import BlockSizes, FileExport, MemoryExport, NBDError, ServerSettings
from secondsite.appliance.nbd import _wire as w


def pattern(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (size // 256) + bytes(size % 256)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    "size", [1, 512, 4096, 128 * 1024, 128 * 1024 + 1, 1 * MiB + 7, 32 * MiB], ids=str
)
async def test_write_then_read_back(nbd: Harness, structured: bool, size: int) -> None:
    async with await nbd.client(structured=structured) as client:
        data = pattern(size, size % 251)
        offset = 16 * MiB - size if size < 16 * MiB else 0
        if size > 16 * MiB:
            nbd.provider.add("big", MemoryExport(size))
            await client.close()
            client = await nbd.client("big", structured=structured)
        await client.write(offset, data)
        assert await client.read(offset, size) == data
        await client.close()


@pytest.mark.parametrize("structured", [False, True])
async def test_zero_length_requests_succeed(nbd: Harness, structured: bool) -> None:
    async with await nbd.client(structured=structured) as client:
        assert await client.read(100, 0) == b""
        await client.write(100, b"")
        await client.trim(100, 0)
        await client.write_zeroes(100, 0)
        assert await client.read(0, 1) == b"\0"


async def test_pipelined_requests_are_answered_by_handle(nbd: Harness) -> None:
    async with await nbd.client() as client:
        writes = [
            client.request(w.CMD_WRITE, i * 4096, 4096, payload=pattern(4096, i)) for i in range(64)
        ]
        reads = [client.request(w.CMD_READ, i * 4096, 4096) for i in range(64)]
        for handle in writes:
            assert (await client.reply(handle)).error == 0
        for i, handle in enumerate(reads):
            assert (await client.reply(handle)).data == pattern(4096, i)


async def test_fua_flush_trim_and_zero_reach_the_export(nbd: Harness) -> None:
    export = CountingExport(MiB)
    nbd.provider.add("counting", export)
    async with await nbd.client("counting") as client:
        await client.write(0, b"a" * 4096, flags=w.CMD_FLAG_FUA)
        assert export.fua_writes == 1
        await client.flush()
        await client.call(w.CMD_FLUSH, flags=w.CMD_FLAG_FUA)  # FUA is valid on every command
        assert export.flushes == 2
        await client.trim(0, 4096, flags=w.CMD_FLAG_FUA)  # FUA trim: trim, then flush
        assert export.flushes == 3
        assert await client.read(0, 4096) == bytes(4096)
        await client.write(0, b"b" * 8192)
        await client.write_zeroes(0, 4096, flags=w.CMD_FLAG_NO_HOLE | w.CMD_FLAG_FUA)
        await client.write_zeroes(4096, 4096, flags=w.CMD_FLAG_FAST_ZERO)
        assert export.zero_calls == [
            {"fua": True, "may_trim": False, "fast": False},
            {"fua": False, "may_trim": True, "fast": True},
        ]
        assert await client.read(0, 8192) == bytes(8192)
        with pytest.raises(ReplyError) as failed:
            await client.write_zeroes(0, 4096, flags=w.CMD_FLAG_FAST_ZERO | w.CMD_FLAG_NO_HOLE)
        assert failed.value.error == errno.ENOTSUP


async def test_df_read_is_one_chunk_and_needs_structured_replies(nbd: Harness) -> None:
    async with await nbd.client(structured=True) as client:
        await client.write(0, b"z" * 65536)
        reply = await client.call(w.CMD_READ, 0, 65536, flags=w.CMD_FLAG_DF)
        assert reply.chunks == [w.REPLY_TYPE_OFFSET_DATA]
        assert reply.data == b"z" * 65536
    async with await nbd.client(structured=False) as client:
        with pytest.raises(ReplyError) as failed:
            await client.read(0, 512, flags=w.CMD_FLAG_DF)
        assert failed.value.error == errno.EINVAL


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (w.CMD_READ, 16 * MiB - 512, 1024, 0, errno.EINVAL),
        (w.CMD_READ, 2**64 - 1, 1, 0, errno.EINVAL),
        (w.CMD_READ, 0, 32 * MiB + 1, 0, errno.EINVAL),
        (w.CMD_READ, 0, 512, w.CMD_FLAG_NO_HOLE, errno.EINVAL),
        (w.CMD_TRIM, 16 * MiB, 1, 0, errno.EINVAL),
        (w.CMD_TRIM, 0, 512, w.CMD_FLAG_NO_HOLE, errno.EINVAL),
        (w.CMD_WRITE_ZEROES, 16 * MiB - 1, 2, 0, errno.ENOSPC),
        (w.CMD_WRITE_ZEROES, 0, 512, w.CMD_FLAG_DF, errno.EINVAL),
        (w.CMD_FLUSH, 0, 512, 0, errno.EINVAL),
        (w.CMD_FLUSH, 0, 0, w.CMD_FLAG_NO_HOLE, errno.EINVAL),
        (w.CMD_CACHE, 0, 512, 0, errno.EINVAL),
        (w.CMD_BLOCK_STATUS, 0, 512, 0, errno.EINVAL),  # no metadata context negotiated
        (99, 0, 0, 0, errno.EINVAL),
    ],
)
async def test_invalid_requests_get_errors_and_the_session_goes_on(
    nbd: Harness, structured: bool, cmd: int, offset: int, length: int, flags: int, error: int
) -> None:
    async with await nbd.client(structured=structured) as client:
        with pytest.raises(ReplyError) as failed:
            await client.call(cmd, offset, length, flags=flags)
        assert failed.value.error == error
        if structured:
            assert failed.value.message  # errors carry a message
        await client.write(0, b"ok")
        assert await client.read(0, 2) == b"ok"


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    ("offset", "size", "flags", "error"),
    [
        (16 * MiB - 100, 200, 0, errno.ENOSPC),  # past the end: payload still consumed
        (0, 200, w.CMD_FLAG_NO_HOLE, errno.EINVAL),  # flag not valid for writes
        (16 * MiB - 100, 256 * 1024, 0, errno.ENOSPC),  # large payload past the end
        (0, 32 * MiB + 4096, 0, errno.EINVAL),  # over the maximum: discarded unread
    ],
)
async def test_refused_write_payload_is_consumed(
    nbd: Harness, structured: bool, offset: int, size: int, flags: int, error: int
) -> None:
    async with await nbd.client(structured=structured) as client:
        # The payload looks like requests: if the server parsed it, the session would break.
        fake = w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_DISC, 1, 0, 0)
        payload = (fake * (size // len(fake) + 1))[:size]
        with pytest.raises(ReplyError) as failed:
            await client.write(offset, payload, flags=flags)
        assert failed.value.error == error
        await client.write(0, b"still in sync")
        assert await client.read(0, 13) == b"still in sync"


async def test_read_only_export_refuses_modification(nbd: Harness) -> None:
    async with await nbd.client("ro") as client:
        for cmd, length, payload in [
            (w.CMD_WRITE, 4, b"nope"),
            (w.CMD_TRIM, 512, b""),
            (w.CMD_WRITE_ZEROES, 512, b""),
        ]:
            with pytest.raises(ReplyError) as failed:
                await client.call(cmd, 0, length, payload=payload)
            assert failed.value.error == errno.EPERM
        assert await client.read(0, 512) == bytes(512)
        await client.flush()


async def test_minimum_block_size_is_enforced(nbd: Harness) -> None:
    nbd.provider.add("aligned", MemoryExport(MiB, block_sizes=BlockSizes(512, 4096, MiB)))
    async with await nbd.client("aligned") as client:
        for offset, length in [(1, 512), (0, 511), (512, 1000)]:
            with pytest.raises(ReplyError) as failed:
                await client.read(offset, length)
            assert failed.value.error == errno.EINVAL
        with pytest.raises(ReplyError) as failed:
            await client.read(0, MiB + 512)  # above this export's maximum
        assert failed.value.error == errno.EINVAL
        await client.write(512, b"q" * 512)
        assert await client.read(0, 1024) == bytes(512) + b"q" * 512


@pytest.mark.parametrize("suspend", [False, True], ids=["inline", "suspending"])
@pytest.mark.parametrize("structured", [False, True])
async def test_export_errors_become_nbd_errors(
    nbd: Harness, caplog: pytest.LogCaptureFixture, suspend: bool, structured: bool
) -> None:
    export = FaultyExport(MiB, suspend=suspend)
    nbd.provider.add("faulty", export)
    async with await nbd.client("faulty", structured=structured) as client:
        export.fail["write"] = NBDError(errno.ENOSPC, "journal full")
        with pytest.raises(ReplyError) as failed:
            await client.write(0, b"data")
        assert failed.value.error == errno.ENOSPC
        if structured:
            assert failed.value.message == "journal full"

        export.fail["write"] = NBDError(errno.EDQUOT, "quota")
        with pytest.raises(ReplyError) as failed:
            await client.write(0, b"data")
        assert failed.value.error == errno.ENOSPC  # EDQUOT is not an NBD error value

        export.fail["read"] = NBDError(errno.EIO, "bad sector")
        reply = await client.reply(client.request(w.CMD_READ, 4096, 512))
        assert reply.error == errno.EIO
        assert reply.data is None
        if structured:
            assert reply.chunks == [w.REPLY_TYPE_ERROR_OFFSET]

        caplog.clear()
        with caplog.at_level(logging.ERROR, "secondsite.appliance.nbd"):
            export.fail["flush"] = RuntimeError("bug in the export")
            with pytest.raises(ReplyError) as failed:
                await client.flush()
            assert failed.value.error == errno.EIO
        assert any("bug in the export" in str(r.exc_info) for r in caplog.records)

        del export.fail["read"]
        export.read_result = b"short"
        with pytest.raises(ReplyError) as failed:
            await client.read(0, 512)
        assert failed.value.error == errno.EIO
        export.read_result = None
        export.fail.clear()
        assert await client.read(0, 4) == bytes(4)  # the failed writes changed nothing
        await client.write(0, b"fine")
        assert await client.read(0, 4) == b"fine"


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager"])
async def test_export_sees_writes_in_arrival_order_and_replies_follow_completion(
    nbd: Harness, eager: bool
) -> None:
    export = GatedExport(MiB, eager=eager)
    nbd.provider.add("gated", export)
    async with await nbd.client("gated") as client:
        handles = [
            client.request(w.CMD_WRITE, i * 512, 512, payload=bytes([i]) * 512) for i in range(8)
        ]
        await export.wait_calls(8)
        assert export.calls == [("write", i * 512, 512) for i in range(8)]
        for i in reversed(range(8)):
            export.release(i)
            reply = await client.reply(handles[i])
            assert reply.error == 0
        assert export.finished == [i * 512 for i in reversed(range(8))]
        assert await client.read(0, 4096) == b"".join(bytes([i]) * 512 for i in range(8))


@pytest.mark.parametrize("settings", [ServerSettings(max_inflight_requests=4)])
async def test_inflight_limit_stops_reading_requests(nbd: Harness) -> None:
    export = GatedExport(MiB, eager=True)
    nbd.provider.add("gated", export)
    async with await nbd.client("gated") as client:
        handles = [client.request(w.CMD_WRITE, i * 512, 512, payload=b"x" * 512) for i in range(10)]
        await export.wait_calls(4)
        await asyncio.sleep(0.1)
        assert len(export.calls) == 4
        export.release(0)
        await client.reply(handles[0])
        await export.wait_calls(5)
        for i in range(1, 10):
            await export.wait_calls(i + 1)
            export.release(i)
            assert (await client.reply(handles[i])).error == 0


async def test_disconnect_answers_outstanding_requests_then_closes(nbd: Harness) -> None:
    export = GatedExport(MiB, eager=False)
    nbd.provider.add("gated", export)
    client = await nbd.client("gated")
    first = client.request(w.CMD_WRITE, 0, 3, payload=b"abc")
    second = client.request(w.CMD_FLUSH)
    await client.disconnect()
    await export.wait_calls(2)
    export.release(1)
    export.release(0)
    assert (await client.reply(first)).error == 0
    assert (await client.reply(second)).error == 0
    assert await client.expect_closed() == b""
    await nbd.provider.wait_released(1)
    await client.close()


async def test_vanished_client_does_not_disturb_others(nbd: Harness) -> None:
    export = GatedExport(MiB, eager=True)
    nbd.provider.add("gated", export)
    vanishing = await nbd.client("gated")
    vanishing.request(w.CMD_WRITE, 0, 5, payload=b"first")
    await export.wait_calls(1)
    await vanishing.close()  # gone with a request in flight
    async with await nbd.client() as other:
        await other.write(0, b"other client")
        assert await other.read(0, 12) == b"other client"
    # The orphaned request still completes (its write is applied), then the export is released.
    assert nbd.provider.released.count(export) == 0
    export.release(0)
    await nbd.provider.wait_released(2)
    assert export in nbd.provider.released
    assert export.finished == [0]


@pytest.mark.parametrize("settings", [ServerSettings(drain_timeout=0.2)])
async def test_requests_outliving_their_client_are_cancelled(nbd: Harness) -> None:
    export = GatedExport(MiB, eager=True)
    nbd.provider.add("gated", export)
    client = await nbd.client("gated")
    client.request(w.CMD_WRITE, 0, 5, payload=b"stuck")
    await export.wait_calls(1)
    await client.close()
    await nbd.provider.wait_released(1)
    assert export.gates[0].cancelled()
    assert export.finished == []


async def test_server_close_releases_every_export(nbd: Harness) -> None:
    clients = [await nbd.client(name) for name in ("mem", "ro", "tiny")]
    assert nbd.server.connection_count == 3
    await nbd.server.close()
    assert nbd.server.connection_count == 0
    assert len(nbd.provider.released) == 3
    for client in clients:
        assert await client.expect_closed() == b""
        await client.close()


async def test_many_clients_at_once(nbd: Harness) -> None:
    async def worker(index: int) -> None:
        async with await nbd.client() as client:
            handles = [
                client.request(
                    w.CMD_WRITE, (index * 64 + i) * 4096, 4096, payload=pattern(4096, index + i)
                )
                for i in range(64)
            ]
            for handle in handles:
                assert (await client.reply(handle)).error == 0
            for i in range(64):
                assert await client.read((index * 64 + i) * 4096, 4096) == pattern(4096, index + i)

    await asyncio.gather(*(worker(i) for i in range(8)))


async def test_block_status_of_memory_export(nbd: Harness) -> None:
    client, _ = await connect_and_go(nbd.path, "mem", meta=True)
    async with client:
        extents = await client.block_status(0, 65536)
        assert extents == {1: [(65536, 0)]}
        with pytest.raises(ReplyError) as failed:
            await client.block_status(16 * MiB - 512, 1024)
        assert failed.value.error == errno.EINVAL


async def test_block_status_needs_matching_export_name(nbd: Harness) -> None:
    client = await NBDClient.connect_unix(nbd.path)
    async with client:
        await client.handshake()
        await client.negotiate_structured()
        await client.meta_context("tiny", [w.META_BASE_ALLOCATION])
        await client.go("mem")
        with pytest.raises(ReplyError) as failed:
            await client.block_status(0, 512)
        assert failed.value.error == errno.EINVAL


async def test_block_status_reports_file_holes(nbd: Harness, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "sparse.img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"d" * MiB)
    with FileExport(path) as export:
        nbd.provider.add("file", export)
        client, _ = await connect_and_go(nbd.path, "file", meta=True)
        async with client:
            extents = (await client.block_status(0, 4 * MiB))[1]
            assert extents == [(MiB, 3), (MiB, 0), (2 * MiB, 3)]
            one = (await client.block_status(0, 4 * MiB, flags=w.CMD_FLAG_REQ_ONE))[1]
            assert one == [(MiB, 3)]
            await client.trim(MiB, MiB)
            assert (await client.block_status(0, 4 * MiB))[1] == [(4 * MiB, 3)]
            assert await client.read(MiB, 4096) == bytes(4096)


@pytest.mark.parametrize(
    ("extents", "req_one", "expected"),
    [
        ([(100, 0), (100, 0), (824, 3)], False, [(200, 0), (824, 3)]),  # merged
        ([(100, 0), (5000, 3)], False, [(100, 0), (924, 3)]),  # clipped at the request end
        ([(100, 0), (100, 3)], True, [(100, 0)]),  # REQ_ONE
        ([(100, 7)], False, [(100, 3)]),  # unknown flags dropped
    ],
)
async def test_block_status_extents_are_sanitised(
    nbd: Harness, extents: list[tuple[int, int]], req_one: bool, expected: list[tuple[int, int]]
) -> None:
    export = FaultyExport(MiB, suspend=False)
    export.extents = extents
    nbd.provider.add("faulty", export)
    client, _ = await connect_and_go(nbd.path, "faulty", meta=True)
    async with client:
        flags = w.CMD_FLAG_REQ_ONE if req_one else 0
        assert (await client.block_status(0, 1024, flags=flags))[1] == expected
        export.extents = []
        with pytest.raises(ReplyError) as failed:
            await client.block_status(0, 1024)
        assert failed.value.error == errno.EIO
