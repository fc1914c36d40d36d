"""Checkpoint queries: time parsing, query strings, pages over a checkpoint table, references."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pytest

from secondsite.appliance.control.errors import ApiError
from secondsite.appliance.control.query import (
    CheckpointQuery,
    parse_checkpoint_query,
    parse_time,
    query_checkpoints,
    resolve_checkpoint,
)
from secondsite.appliance.journal import Checkpoint
from secondsite.appliance.journal.checkpoints import CheckpointTable

S = 1_000_000_000
T0 = 1_750_000_000 * S


def table(
    n: int, tags: dict[int, str] | None = None, inconsistent: Collection[int] = ()
) -> CheckpointTable:
    """Checkpoints 1..n, one a second from T0; ``inconsistent`` ids are not consistent."""
    t = CheckpointTable()
    ids = np.arange(1, n + 1, dtype=np.int64)
    t.append(
        ids,
        ids * 10,
        T0 + (ids - 1) * S,
        np.array([i not in inconsistent for i in ids]),
        np.zeros(n, dtype=np.int64),
        tags or {},
    )
    return t


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1750000000", T0),
        ("1750000000.5", T0 + S // 2),
        ("2025-06-15T15:06:40Z", T0),
        ("2025-06-15T17:06:40+02:00", T0),
        ("2025-06-15T15:06:40.25Z", T0 + S // 4),
    ],
)
def test_parse_time(text: str, ns: int) -> None:
    assert parse_time(text) == ns


@pytest.mark.parametrize("text", ["2025-06-15T15:06:40", "yesterday", "", "-5", "nan", "inf"])
def test_parse_time_refuses_ambiguous_or_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_parse_query() -> None:
    q = parse_checkpoint_query(
        {
            "since": "1750000000",
            "until": "2025-06-15T15:07:00Z",
            "tag": "x",
            "limit": "5",
            "before": "9",
        }
    )
    assert q == CheckpointQuery(since_ns=T0, until_ns=T0 + 20 * S, tag="x", before=9, limit=5)
    assert parse_checkpoint_query({}).limit == 100


def test_parse_query_names_every_bad_parameter() -> None:
    with pytest.raises(ApiError) as info:
        parse_checkpoint_query(
            {"since": "soon", "limit": "0", "before": "-1", "tag": "", "sort": "asc"}
        )
    err = info.value
    assert err.status == 422
    assert sorted(d["loc"][1] for d in err.details) == ["before", "limit", "since", "sort", "tag"]
    with pytest.raises(ApiError) as info:
        parse_checkpoint_query({"limit": "1001"})
    assert info.value.details[0]["loc"] == ["query", "limit"]
    with pytest.raises(ApiError) as info:
        parse_checkpoint_query({"since": "1750000010", "until": "1750000000"})
    assert info.value.details[0]["loc"] == ["query", "until"]


def test_pages_are_newest_first_and_cover_every_checkpoint_once() -> None:
    t = table(25)
    seen: list[int] = []
    before = None
    while True:
        page, before = query_checkpoints(t, CheckpointQuery(limit=10, before=before))
        seen += [cp.id for cp in page]
        if before is None:
            break
    assert seen == list(range(25, 0, -1))


def test_exact_last_page_has_no_cursor() -> None:
    page, cursor = query_checkpoints(table(10), CheckpointQuery(limit=10))
    assert len(page) == 10 and cursor is None


def test_time_range_and_tag() -> None:
    t = table(20, tags={3: "nightly", 7: "upgrade", 12: "nightly"})
    page, _ = query_checkpoints(t, CheckpointQuery(since_ns=T0 + 4 * S, until_ns=T0 + 6 * S))
    assert [cp.id for cp in page] == [7, 6, 5]
    page, _ = query_checkpoints(t, CheckpointQuery(tag="nightly"))
    assert [(cp.id, cp.tag) for cp in page] == [(12, "nightly"), (3, "nightly")]
    page, _ = query_checkpoints(t, CheckpointQuery(tag="nightly", since_ns=T0 + 5 * S))
    assert [cp.id for cp in page] == [12]
    assert query_checkpoints(t, CheckpointQuery(tag="never")) == ([], None)


def test_promoted_floor_is_the_oldest_row() -> None:
    t = table(10, tags={4: "keep"})
    floor = Checkpoint(4, 40, T0 + 3 * S, "keep", True)
    t.drop_through(40, floor)
    page, _ = query_checkpoints(t, CheckpointQuery())
    assert [cp.id for cp in page] == [10, 9, 8, 7, 6, 5, 4]
    page, _ = query_checkpoints(t, CheckpointQuery(tag="keep"))
    assert page == [floor]
    page, cursor = query_checkpoints(t, CheckpointQuery(limit=6))
    assert [cp.id for cp in page] == [10, 9, 8, 7, 6, 5] and cursor == 5
    page, cursor = query_checkpoints(t, CheckpointQuery(limit=6, before=cursor))
    assert page == [floor] and cursor is None


def test_resolve_references() -> None:
    t = table(10, tags={2: "a", 5: "a"}, inconsistent={9, 10})
    assert (cp := resolve_checkpoint(t, "latest")) is not None and cp.id == 8
    assert (cp := resolve_checkpoint(t, "tag:a")) is not None and cp.id == 5
    assert (cp := resolve_checkpoint(t, "3")) is not None and cp.id == 3
    assert resolve_checkpoint(t, "tag:b") is None
    assert resolve_checkpoint(t, "99") is None


def test_resolve_time_picks_newest_consistent_at_or_before() -> None:
    t = table(10, inconsistent={6, 7})
    cp = resolve_checkpoint(t, "time:1750000004.5")
    assert cp is not None and cp.id == 5
    cp = resolve_checkpoint(t, f"time:{(T0 + 6 * S) / S}")  # checkpoint 7's time: 6, 7 torn
    assert cp is not None and cp.id == 5
    assert resolve_checkpoint(t, "time:1749999999") is None
    with pytest.raises(ValueError):
        resolve_checkpoint(t, "time:tomorrow")
