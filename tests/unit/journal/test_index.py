"""The newest-wins resolver behind PIT images, against a byte-per-byte model."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from secondsite.appliance.journal.index import Columns, resolve_extents

SIZE = 300


def paint(starts: list[int], ends: list[int], values: list[int]) -> list[int]:
    out = [-1] * SIZE
    for s, e, v in zip(starts, ends, values, strict=True):
        out[s:e] = [v] * (e - s)
    return out


intervals = st.lists(
    st.tuples(st.integers(0, SIZE), st.integers(0, 80), st.integers(0, 6)), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(intervals)
def test_resolve_matches_painting(ivs: list[tuple[int, int, int]]) -> None:
    starts = [s for s, _, _ in ivs]
    ends = [min(SIZE, s + n) for s, n, _ in ivs]
    values = [v for _, _, v in ivs]
    m = resolve_extents(np.array(starts, np.int64), np.array(ends, np.int64), np.array(values))
    got = [-1] * SIZE
    for s, e, v in zip(m.starts.tolist(), m.ends.tolist(), m.values.tolist(), strict=True):
        got[s:e] = [v] * (e - s)
    assert got == paint(starts, ends, values)
    # Output is sorted, non-overlapping, without empty extents.
    assert (m.ends > m.starts).all()
    assert (m.starts[1:] >= m.ends[:-1]).all()


def test_overlapping_clips_to_the_range() -> None:
    m = resolve_extents(np.array([0, 100]), np.array([50, 200]), np.array([1, 2]))
    s, e, v = m.overlapping(40, 120)
    assert s.tolist() == [40, 100] and e.tolist() == [50, 120] and v.tolist() == [1, 2]
    s, _, _ = m.overlapping(60, 90)
    assert len(s) == 0


def test_columns_keep_old_views_valid_across_growth_and_drops() -> None:
    c = Columns({"x": np.int64}, capacity=2)
    c.append_many(x=[1, 2])
    old = c.view("x")
    c.append_many(x=[3, 4, 5])
    c.drop_prefix(2)
    assert old.tolist() == [1, 2]
    assert c.view("x").tolist() == [3, 4, 5]
    c.keep_rows(np.array([True, False, True]))
    assert c.view("x").tolist() == [3, 5]
