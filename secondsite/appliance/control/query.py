"""Checkpoint queries of the control API: parsing times and query strings, selecting checkpoints.

Pure functions over a :class:`CheckpointTable`; the server only wires them to HTTP. A table may
hold millions of rows (one checkpoint a second for 30 days), so a query works on its numpy columns
and builds :class:`Checkpoint` values only for the page it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

from secondsite.appliance.exports import select_checkpoint
from secondsite.appliance.journal import Checkpoint
from secondsite.appliance.journal.checkpoints import CheckpointTable

from .errors import ApiError
from .models import MAX_PAGE

__all__ = [
    "DEFAULT_PAGE",
    "CheckpointQuery",
    "parse_checkpoint_query",
    "parse_time",
    "query_checkpoints",
    "resolve_checkpoint",
]

DEFAULT_PAGE = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(text: str) -> int:
    """RFC3339 (`2025-06-01T12:00:00Z`, with an offset) or epoch seconds (`1748779200.5`) -> ns.

    ValueError when it is neither, or when an RFC3339 time has no offset (ambiguous).
    """
    text = text.strip()
    try:
        seconds = Decimal(text)
    except InvalidOperation:
        pass
    else:
        if not seconds.is_finite() or seconds < 0:
            raise ValueError(f"{text!r} is not a time")
        return int(seconds * 1_000_000_000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither RFC3339 nor epoch seconds") from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset (add Z or +hh:mm)")
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


@dataclass(frozen=True)
class CheckpointQuery:
    """Which checkpoints `GET /v1/vpgs/{vpg}/checkpoints` lists, newest first."""

    since_ns: int | None = None
    """Taken at or after this time."""
    until_ns: int | None = None
    """Taken at or before this time."""
    tag: str | None = None
    """Only checkpoints with this tag."""
    before: int | None = None
    """Only checkpoints with a smaller id (the cursor of the next page)."""
    limit: int = DEFAULT_PAGE


def parse_checkpoint_query(params: Mapping[str, str]) -> CheckpointQuery:
    """The query string of a checkpoint listing; an `ApiError` (422) names every bad parameter."""
    errors: list[dict[str, Any]] = []
    values: dict[str, Any] = {}

    def bad(name: str, msg: str) -> None:
        errors.append({"loc": ["query", name], "msg": msg, "type": "value_error"})

    unknown = sorted(set(params) - {"since", "until", "tag", "before", "limit"})
    for name in unknown:
        bad(name, "unknown parameter (since, until, tag, before, limit)")
    for name, key in (("since", "since_ns"), ("until", "until_ns")):
        if name in params:
            try:
                values[key] = parse_time(params[name])
            except ValueError as e:
                bad(name, str(e))
    if "tag" in params:
        if params["tag"]:
            values["tag"] = params["tag"]
        else:
            bad("tag", "empty tag")
    for name, low, high in (("before", 0, None), ("limit", 1, MAX_PAGE)):
        if name not in params:
            continue
        text = params[name]
        if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            bad(name, f"{text!r} is not an integer in {span}")
        else:
            values[name] = int(text)
    if "since_ns" in values and "until_ns" in values and values["since_ns"] > values["until_ns"]:
        bad("until", "until is before since")
    if errors:
        raise ApiError(422, "invalid-request", "bad query parameters", errors)
    return CheckpointQuery(**values)


def query_checkpoints(
    table: CheckpointTable, query: CheckpointQuery
) -> tuple[list[Checkpoint], int | None]:
    """The page of checkpoints ``query`` selects, newest first, and the `before` cursor of the
    next page (None when this is the last)."""
    cols = table.columns()
    cid, time_ns = cols["cid"], cols["time_ns"]
    mask = np.ones(len(cid), dtype=bool)
    if query.since_ns is not None:
        mask &= time_ns >= query.since_ns
    if query.until_ns is not None:
        mask &= time_ns <= query.until_ns
    if query.before is not None:
        mask &= cid < query.before
    if query.tag is not None:
        tagged = [c for c, t in table.tags().items() if t == query.tag]
        mask &= np.isin(cid, np.asarray(tagged, dtype=np.int64))
    rows = np.flatnonzero(mask)[::-1][: query.limit + 1]
    page = [cp for cp in (table.by_id(int(cid[i])) for i in rows) if cp is not None]
    floor = table.floor
    if floor is not None and len(page) <= query.limit and _matches(floor, query):
        page.append(floor)
    if len(page) > query.limit:
        page = page[: query.limit]
        return page, page[-1].id
    return page, None


def _matches(cp: Checkpoint, query: CheckpointQuery) -> bool:
    return (
        (query.since_ns is None or cp.time_ns >= query.since_ns)
        and (query.until_ns is None or cp.time_ns <= query.until_ns)
        and (query.before is None or cp.id < query.before)
        and (query.tag is None or cp.tag == query.tag)
    )


def resolve_checkpoint(table: CheckpointTable, ref: str) -> Checkpoint | None:
    """The checkpoint a reference names (see `models`), or None.

    ``time:<t>`` picks the newest *consistent* checkpoint taken at or before ``t``: an
    inconsistent one (taken while a volume was out of sync) is no point to recover to.
    ValueError when the time does not parse.
    """
    if not ref.startswith("time:"):
        return select_checkpoint(table, ref)
    at = parse_time(ref.removeprefix("time:"))
    cols = table.columns()
    upto = int(np.searchsorted(cols["time_ns"], at, side="right"))
    consistent = np.flatnonzero(cols["consistent"][:upto])
    if len(consistent):
        return table.by_id(int(cols["cid"][consistent[-1]]))
    floor = table.floor
    if floor is not None and floor.consistent and floor.time_ns <= at:
        return floor
    return None
