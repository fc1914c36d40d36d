"""The pure wire codecs: option payload parsers (fuzzed) and reply encoders."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secondsite.appliance.nbd import _wire as w

names = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=40
)


def info_payload(name: bytes, requests: list[int]) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(f">H{len(requests)}H", len(requests), *requests)
    )


def meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


@given(name=names, requests=st.lists(st.integers(0, 0xFFFF), max_size=20))
def test_info_request_round_trip(name: str, requests: list[int]) -> None:
    assert w.parse_info_request(info_payload(name.encode(), requests)) == (name, requests)


@settings(max_examples=500)
@given(data=st.binary(max_size=80))
def test_info_request_parser_only_raises_option_errors(data: bytes) -> None:
    try:
        name, requests = w.parse_info_request(data)
    except w.OptionError as exc:
        assert exc.reply in (w.REP_ERR_INVALID, w.REP_ERR_TOO_BIG)
    else:
        assert info_payload(name.encode(), requests) == data  # accepted only if exact


@given(
    name=names,
    queries=st.lists(names.map(lambda q: "x-" + q.replace(":", "") + ":" + q), max_size=5),
)
def test_meta_context_request_round_trip(name: str, queries: list[str]) -> None:
    payload = meta_payload(name.encode(), [q.encode() for q in queries])
    assert w.parse_meta_context_request(payload) == (name, queries)


@settings(max_examples=500)
@given(
    data=st.binary(max_size=80)
    | st.builds(
        lambda name, queries, tail: meta_payload(name, queries) + tail,
        st.binary(max_size=10),
        st.lists(st.binary(max_size=12), max_size=4),
        st.binary(max_size=3),
    )
)
def test_meta_context_parser_only_raises_option_errors(data: bytes) -> None:
    try:
        w.parse_meta_context_request(data)
    except w.OptionError as exc:
        assert exc.reply in (w.REP_ERR_INVALID, w.REP_ERR_TOO_BIG)


def test_meta_context_query_count_is_bounded() -> None:
    payload = struct.pack(">I", 0) + struct.pack(">I", 100_000)
    with pytest.raises(w.OptionError) as failed:
        w.parse_meta_context_request(payload)
    assert failed.value.reply == w.REP_ERR_TOO_BIG


def test_strings_longer_than_4096_bytes_are_refused() -> None:
    with pytest.raises(w.OptionError) as failed:
        w.parse_info_request(info_payload(b"n" * 4097, []))
    assert failed.value.reply == w.REP_ERR_TOO_BIG


def test_option_reply_layout() -> None:
    assert w.option_reply(w.OPT_LIST, w.REP_SERVER, w.rep_server("disk")) == (
        bytes.fromhex("0003e889045565a9") + struct.pack(">III", 3, 2, 8) + b"\x00\x00\x00\x04disk"
    )


def test_error_chunks_layout() -> None:
    plain = w.error_chunk(0xABC, w.NBD_EIO, "oops", None)
    assert plain == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 0xABC, 10, 5, 4) + b"oops"
    with_offset = w.error_chunk(0xABC, w.NBD_EINVAL, "", 4096)
    assert with_offset == struct.pack(">IHHQIIHQ", 0x668E33EF, 1, 0x8002, 0xABC, 14, 22, 0, 4096)


@given(message=st.text(max_size=6000))
def test_messages_are_valid_protocol_strings(message: str) -> None:
    raw = w.truncate_message(message)
    assert len(raw) <= 4096
    assert b"\0" not in raw
    raw.decode("utf-8")


@pytest.mark.parametrize(
    ("host", "nbd"),
    [
        (errno.EPERM, 1),
        (errno.EROFS, 1),
        (errno.EIO, 5),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EOVERFLOW, 75),
        (errno.ENOTSUP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.ENOENT, 5),
        (errno.EBADF, 5),
    ],
)
def test_host_errno_maps_to_protocol_values(host: int, nbd: int) -> None:
    assert w.nbd_errno(host) == nbd
