"""The oracle must catch what it is there to catch: these feed it images that are not prefixes."""

from __future__ import annotations

import pytest
from write_oracle import BLOCK, Workload, check_monotonic, stamp

SIZE = 16 * BLOCK


def replay(workload: Workload, upto: int, *, skip: int = 0) -> dict[str, bytes]:
    images = {name: bytearray(SIZE) for name in workload.volumes}
    for w in workload.writes[:upto]:
        if w.seq != skip:
            images[workload.volumes[w.volume]][w.offset : w.offset + BLOCK] = workload.data(w)
    return {k: bytes(v) for k, v in images.items()}


def workload(n: int = 40) -> Workload:
    wl = Workload(("a", "b"), region_blocks=16, seed=3)
    for i in range(n):
        wl.next().ack_ns = 1000 + i
    return wl


def test_prefix_passes_and_names_its_length() -> None:
    wl = workload()
    verdict = wl.oracle().check(replay(wl, 25), time_ns=1000 + 25, what="cp")
    assert (verdict.prefix, verdict.acked_before) == (25, 25)


def test_a_missing_middle_write_fails() -> None:
    wl = workload()
    # Drop a write that no later write of the prefix overwrote.
    oracle = wl.oracle()
    victim = next(
        w.seq
        for w in reversed(wl.writes[:30])
        if w.seq < 30 and oracle.allowed(w.volume, w.offset, 30) == {w.seq}
    )
    with pytest.raises(AssertionError, match="not a prefix"):
        oracle.check(replay(wl, 30, skip=victim), time_ns=0, what="cp")


def test_a_write_acked_before_the_checkpoint_must_be_in() -> None:
    wl = workload()
    with pytest.raises(AssertionError, match="acked before the checkpoint"):
        wl.oracle().check(replay(wl, 20), time_ns=1000 + 30, what="cp")


def test_misplaced_torn_and_garbage_blocks_fail() -> None:
    wl = workload()
    oracle = wl.oracle()
    good = replay(wl, 10)
    w = wl.writes[0]
    name = wl.volumes[w.volume]
    for bad in (
        stamp(w.seq, 1 - w.volume, w.offset),  # the other volume's block
        stamp(w.seq, w.volume, w.offset)[:-8] + b"\xff" * 8,  # torn
        b"\x01" * BLOCK,  # garbage
    ):
        images = dict(good)
        img = bytearray(images[name])
        img[w.offset : w.offset + BLOCK] = bad
        images[name] = bytes(img)
        with pytest.raises(AssertionError):
            oracle.check(images, time_ns=0, what="cp")


def test_an_uncertain_write_may_be_missing_but_nothing_else() -> None:
    wl = workload()
    wl.writes[-1].uncertain = True
    wl.writes[-1].ack_ns = 0
    oracle = wl.oracle()
    assert oracle.check(replay(wl, 40), 0, "with").prefix == 40
    assert oracle.check(replay(wl, 39), 0, "without").prefix == 39


def test_prefixes_must_not_shrink() -> None:
    wl = workload()
    oracle = wl.oracle()
    v1 = oracle.check(replay(wl, 30), 0, "cp1")
    v2 = oracle.check(replay(wl, 20), 0, "cp2")
    with pytest.raises(AssertionError, match="earlier one held"):
        check_monotonic(oracle, [(1, v1), (2, v2)])
