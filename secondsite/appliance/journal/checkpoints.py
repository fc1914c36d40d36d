"""The checkpoint table: every checkpoint still in the journal's window, in numpy columns.

A checkpoint at one per second for 30 days is 2.6 million rows, so rows are columns, not objects;
:class:`Checkpoint` values are made only for the rows a query returns. The table is persisted by
the CHECKPOINT records themselves (and cached in segment sidecars); the checkpoint the journal is
promoted to is kept in the journal's state file, so the oldest checkpoint survives the deletion of
the segment that held its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .index import Columns

__all__ = ["Checkpoint", "CheckpointTable"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A consistent (or, during bitmap sync, inconsistent) cut across the VPG's volumes.

    The image at a checkpoint holds every record with a smaller sequence number.
    """

    id: int
    seq: int
    time_ns: int
    tag: str | None = None
    consistent: bool = True

    @property
    def time(self) -> float:
        """Seconds since the epoch."""
        return self.time_ns / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "time_ns": self.time_ns,
            "tag": self.tag,
            "consistent": self.consistent,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Checkpoint:
        return cls(int(d["id"]), int(d["seq"]), int(d["time_ns"]), d["tag"], bool(d["consistent"]))


class CheckpointTable:
    """Checkpoints ordered by sequence number (and so by id and, normally, time)."""

    def __init__(self) -> None:
        self._cols = Columns(
            {
                "cid": np.int64,
                "seq": np.int64,
                "time_ns": np.int64,
                "consistent": np.bool_,
                "seg": np.int64,
            }
        )
        self._tags: dict[int, str] = {}
        self.floor: Checkpoint | None = None
        """The checkpoint the journal is promoted to: the replica alone is its image."""

    def __len__(self) -> int:
        return self._cols.n + (1 if self.floor is not None else 0)

    def append(
        self,
        cid: npt.ArrayLike,
        seq: npt.ArrayLike,
        time_ns: npt.ArrayLike,
        consistent: npt.ArrayLike,
        seg: npt.ArrayLike,
        tags: dict[int, str],
    ) -> None:
        self._cols.append_many(cid=cid, seq=seq, time_ns=time_ns, consistent=consistent, seg=seg)
        self._tags.update(tags)

    def _row(self, i: int) -> Checkpoint:
        cid = int(self._cols.view("cid")[i])
        return Checkpoint(
            cid,
            int(self._cols.view("seq")[i]),
            int(self._cols.view("time_ns")[i]),
            self._tags.get(cid),
            bool(self._cols.view("consistent")[i]),
        )

    def _all_rows(self, mask: npt.NDArray[np.bool_] | None = None) -> list[Checkpoint]:
        out = [self.floor] if self.floor is not None else []
        idx = np.flatnonzero(mask) if mask is not None else range(self._cols.n)
        out.extend(self._row(int(i)) for i in idx)
        return out

    def oldest(self) -> Checkpoint | None:
        if self.floor is not None:
            return self.floor
        return self._row(0) if self._cols.n else None

    def newest(self) -> Checkpoint | None:
        if self._cols.n:
            return self._row(self._cols.n - 1)
        return self.floor

    def by_id(self, cid: int) -> Checkpoint | None:
        if self.floor is not None and self.floor.id == cid:
            return self.floor
        ids = self._cols.view("cid")
        i = int(np.searchsorted(ids, cid))
        return self._row(i) if i < len(ids) and ids[i] == cid else None

    def by_tag(self, tag: str) -> list[Checkpoint]:
        ids = sorted(c for c, t in self._tags.items() if t == tag)
        found = [c for c in (self.by_id(i) for i in ids) if c is not None]
        if self.floor is not None and self.floor.tag == tag and self.floor not in found:
            found.insert(0, self.floor)
        return found

    def between(self, start_ns: int | None = None, end_ns: int | None = None) -> list[Checkpoint]:
        """Checkpoints with start_ns <= time_ns <= end_ns, oldest first."""
        t = self._cols.view("time_ns")
        mask = np.ones(len(t), dtype=bool)
        if start_ns is not None:
            mask &= t >= start_ns
        if end_ns is not None:
            mask &= t <= end_ns
        rows = self._all_rows(mask)
        if self.floor is not None and not (
            (start_ns is None or self.floor.time_ns >= start_ns)
            and (end_ns is None or self.floor.time_ns <= end_ns)
        ):
            rows = rows[1:]
        return rows

    def latest_at_or_before(self, time_ns: int) -> Checkpoint | None:
        """The newest checkpoint taken at or before ``time_ns`` (for "recover to time T")."""
        t = self._cols.view("time_ns")
        i = int(np.searchsorted(t, time_ns, side="right")) - 1
        if i >= 0:
            return self._row(i)
        if self.floor is not None and self.floor.time_ns <= time_ns:
            return self.floor
        return None

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        """Read-only views of the columns (seq and time_ns for retention planning)."""
        return {k: self._cols.view(k) for k in ("cid", "seq", "time_ns", "consistent", "seg")}

    def tags(self) -> dict[int, str]:
        return dict(self._tags)

    def drop_through(self, seq: int, floor: Checkpoint) -> None:
        """Forget checkpoints with seq <= ``seq`` (promoted); ``floor`` becomes the oldest."""
        seqs = self._cols.view("seq")
        n = int(np.searchsorted(seqs, seq, side="right"))
        for cid in self._cols.view("cid")[:n]:
            self._tags.pop(int(cid), None)
        self._cols.drop_prefix(n)
        self.floor = floor

    def drop_after(self, seq: int) -> None:
        """Forget checkpoints with seq > ``seq`` (failover commit drops the entries after it)."""
        seqs = self._cols.view("seq")
        keep = seqs <= seq
        for cid in self._cols.view("cid")[~keep]:
            self._tags.pop(int(cid), None)
        self._cols.keep_rows(keep)
