"""Durations and quantities: the helpers the operator uses to read specs and write status."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secondsite.api import format_duration, format_quantity, parse_duration, parse_quantity


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("90m", 5400),
        ("24h", 86400),
        ("30d", 2592000),
        ("1d2h3m4s", 93784),
        ("23h41m", 85260),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "1h1d", "24 h", "1.5h", "-1h", "1w"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59, "59s"), (3600, "1h"), (86400, "1d"), (90061, "1d1h1m1s")]
)
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_format_duration_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("quantity", "value"),
    [
        ("150Gi", Decimal(150 * 2**30)),
        ("1Ki", Decimal(1024)),
        ("500M", Decimal(500_000_000)),
        ("250m", Decimal("0.25")),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("1e3", Decimal(1000)),
        ("2E+2", Decimal(200)),
        (".5k", Decimal(500)),
        ("7", Decimal(7)),
        (4096, Decimal(4096)),
    ],
)
def test_parse_quantity(quantity: int | str, value: Decimal) -> None:
    assert parse_quantity(quantity) == value


@pytest.mark.parametrize("quantity", ["", "Gi", "150GB", "1 Gi", "-1Gi", "lots", "1.2.3"])
def test_parse_quantity_rejects(quantity: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(quantity)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1023, "1023"),
        (1024, "1Ki"),
        (150 * 2**30, "150Gi"),
        (int(37.5 * 2**30), "37.5Gi"),
    ],
)
def test_format_quantity(size: int, text: str) -> None:
    assert format_quantity(size) == text


@given(st.integers(min_value=0, max_value=2**70))
def test_format_quantity_is_a_quantity_within_a_twentieth(size: int) -> None:
    value = parse_quantity(format_quantity(size))
    assert abs(value - size) <= Decimal(size) / 20
