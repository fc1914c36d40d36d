"""Fixed-newstyle negotiation: greeting, options and their replies, entering transmission."""

from __future__ import annotations

import struct

import pytest
from nbd_client import NBDClient, OptionFailed
from nbd_helpers import Harness, MiB

from secondsite.appliance.nbd import BlockSizes, MemoryExport, ServerSettings
from secondsite.appliance.nbd import _wire as w


async def connect(
    nbd: Harness, flags: int = w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES
) -> NBDClient:
    client = await NBDClient.connect_unix(nbd.path)
    await client.handshake(flags)
    return client


async def test_greeting_offers_fixed_newstyle_and_no_zeroes(nbd: Harness) -> None:
    client = await NBDClient.connect_unix(nbd.path)
    greeting = await client.recv(18)
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    await client.close()


async def test_list_names_every_export_and_rejects_payload(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        assert await client.list_exports() == ["mem", "ro", "tiny"]
        with pytest.raises(OptionFailed) as failed:
            await client.option(w.OPT_LIST, b"x")
        assert failed.value.reply == w.REP_ERR_INVALID
        assert await client.list_exports() == ["mem", "ro", "tiny"]  # still negotiating


async def test_info_describes_export_and_releases_it(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        info = await client.info("mem", (w.INFO_NAME, w.INFO_DESCRIPTION, w.INFO_BLOCK_SIZE))
        assert info.size == 16 * MiB
        assert info.name == "mem"
        assert info.description == "scratch memory"
        assert info.block_sizes == (1, 4096, 32 * MiB)
        expected = (
            w.TF_HAS_FLAGS
            | w.TF_SEND_FLUSH
            | w.TF_SEND_FUA
            | w.TF_SEND_TRIM
            | w.TF_SEND_WRITE_ZEROES
            | w.TF_SEND_FAST_ZERO
            | w.TF_CAN_MULTI_CONN
        )
        assert info.flags == expected
        await nbd.provider.wait_released(1)
        # INFO does not commit: GO may follow, with the same answers.
        go = await client.go("mem", (w.INFO_NAME, w.INFO_DESCRIPTION, w.INFO_BLOCK_SIZE))
        assert (go.size, go.flags, go.block_sizes) == (info.size, info.flags, info.block_sizes)
        assert await client.read(0, 512) == bytes(512)


async def test_structured_replies_add_df_flag(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        await client.negotiate_structured()
        info = await client.info("mem")
        assert info.flags & w.TF_SEND_DF


async def test_read_only_export_advertises_no_write_features(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        info = await client.info("ro")
        assert info.flags & w.TF_READ_ONLY
        assert not info.flags & (w.TF_SEND_TRIM | w.TF_SEND_WRITE_ZEROES | w.TF_SEND_FAST_ZERO)


async def test_block_size_sent_even_when_not_requested(nbd: Harness) -> None:
    nbd.provider.add("aligned", MemoryExport(MiB, block_sizes=BlockSizes(512, 4096, MiB)))
    async with await connect(nbd) as client:
        info = await client.info("aligned")
        assert info.block_sizes == (512, 4096, MiB)


async def test_unknown_export_is_an_error_and_negotiation_continues(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        for option in (w.OPT_INFO, w.OPT_GO):
            with pytest.raises(OptionFailed) as failed:
                await client.info("nope", go=option == w.OPT_GO)
            assert failed.value.reply == w.REP_ERR_UNKNOWN
            assert "nope" in failed.value.message
        await client.go("tiny")
        assert await client.read(0, 4096) == bytes(4096)


async def test_default_export_is_the_empty_name(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        info = await client.go("")
        assert info.size == 16 * MiB


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # too short
        b"\x00\x00\x00\x09mem\x00\x00",  # name length past the payload
        b"\x00\x00\x00\x03mem\x00\x02\x00\x01",  # fewer requests than counted
        b"\x00\x00\x00\x03mem\x00\x00\x00",  # trailing byte
        b"\x00\x00\x00\x03m\x00m\x00\x00",  # NUL in name
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # not UTF-8
    ],
)
async def test_malformed_info_request_is_invalid(nbd: Harness, payload: bytes) -> None:
    async with await connect(nbd) as client:
        with pytest.raises(OptionFailed) as failed:
            await client.option(w.OPT_GO, payload)
        assert failed.value.reply == w.REP_ERR_INVALID
        await client.go("mem")


@pytest.mark.parametrize("option", [w.OPT_STARTTLS, w.OPT_EXTENDED_HEADERS, 4, 42, 0xFFFFFFFF])
async def test_unsupported_options_get_unsup(nbd: Harness, option: int) -> None:
    async with await connect(nbd) as client:
        client.send_option(option, b"some payload")
        reply = await client.read_option_reply()
        assert (reply.option, reply.reply) == (option, w.REP_ERR_UNSUP)
        await client.go("mem")


async def test_oversized_option_payload_is_skipped(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        client.send_option(w.OPT_GO, bytes(1024 * 1024))
        reply = await client.read_option_reply()
        assert reply.reply == w.REP_ERR_TOO_BIG
        await client.go("mem")


async def test_abort_is_acknowledged_then_closed(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        client.send_option(w.OPT_ABORT)
        reply = await client.read_option_reply()
        assert (reply.option, reply.reply, reply.data) == (w.OPT_ABORT, w.REP_ACK, b"")
        assert await client.expect_closed() == b""


@pytest.mark.parametrize("no_zeroes", [True, False])
async def test_export_name_enters_transmission(nbd: Harness, no_zeroes: bool) -> None:
    flags = w.FLAG_C_FIXED_NEWSTYLE | (w.FLAG_C_NO_ZEROES if no_zeroes else 0)
    async with await connect(nbd, flags) as client:
        size, tflags = await client.export_name("tiny", no_zeroes=no_zeroes)
        assert size == 4096
        assert tflags & w.TF_HAS_FLAGS
        await client.write(0, b"x" * 4096)
        assert await client.read(0, 4096) == b"x" * 4096


async def test_export_name_unknown_closes_connection(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        client.send_option(w.OPT_EXPORT_NAME, b"nope")
        assert await client.expect_closed() == b""


async def test_non_fixed_client_may_only_send_export_name(nbd: Harness) -> None:
    async with await connect(nbd, 0) as client:
        size, _ = await client.export_name("tiny", no_zeroes=False)
        assert size == 4096
    async with await connect(nbd, 0) as client:
        client.send_option(w.OPT_LIST)
        assert await client.expect_closed() == b""


async def test_unknown_client_flags_close_connection(nbd: Harness) -> None:
    async with await connect(nbd, w.FLAG_C_FIXED_NEWSTYLE | 0x80) as client:
        assert await client.expect_closed() == b""


async def test_bad_option_magic_closes_connection(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        client.send(struct.pack(">QII", 0x1234, w.OPT_LIST, 0))
        assert await client.expect_closed() == b""


async def test_meta_context_requires_structured_replies(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        with pytest.raises(OptionFailed) as failed:
            await client.meta_context("mem", [w.META_BASE_ALLOCATION])
        assert failed.value.reply == w.REP_ERR_INVALID


async def test_meta_context_list_and_set(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        await client.negotiate_structured()
        assert await client.meta_context("mem", [], set_=False) == [(0, "base:allocation")]
        assert await client.meta_context("mem", ["base:"], set_=False) == [(0, "base:allocation")]
        assert await client.meta_context("mem", ["qemu:dirty-bitmap:x"], set_=False) == []
        assert await client.meta_context("mem", ["qemu:dirty-bitmap:x"]) == []
        assert await client.meta_context("mem", ["base:allocation"]) == [(1, "base:allocation")]
        with pytest.raises(OptionFailed) as failed:
            await client.meta_context("mem", ["no-namespace"])
        assert failed.value.reply == w.REP_ERR_INVALID


@pytest.mark.parametrize("settings", [ServerSettings(handshake_timeout=0.2)])
async def test_handshake_timeout_drops_silent_client(nbd: Harness) -> None:
    client = await NBDClient.connect_unix(nbd.path)
    assert await client.expect_closed(timeout=5) == b"NBDMAGICIHAVEOPT\x00\x03"
    await client.close()


@pytest.mark.parametrize("settings", [ServerSettings(max_options=5)])
async def test_too_many_options_drop_client(nbd: Harness) -> None:
    async with await connect(nbd) as client:
        for _ in range(5):
            await client.option(w.OPT_STRUCTURED_REPLY)
        client.send_option(w.OPT_STRUCTURED_REPLY)
        assert await client.expect_closed() == b""
