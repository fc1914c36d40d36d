"""Request and response bodies: checkpoint references, status shapes, forward compatibility."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from secondsite.appliance.control.models import (
    CheckpointInfo,
    ImageRequest,
    PromoteRequest,
    VpgStatus,
)
from secondsite.appliance.journal import Checkpoint


@pytest.mark.parametrize(
    ("ref", "normalized"),
    [
        (7, "7"),
        ("7", "7"),
        ("latest", "latest"),
        ("tag:pre", "tag:pre"),
        ("time:1750000000", "time:1750000000"),
    ],
)
def test_checkpoint_refs(ref: int | str, normalized: str) -> None:
    assert PromoteRequest(checkpoint=ref).checkpoint == normalized


@pytest.mark.parametrize("ref", [-1, "newest", "tag:", "time:", "id:4", ""])
def test_bad_checkpoint_refs(ref: int | str) -> None:
    with pytest.raises(ValidationError):
        PromoteRequest(checkpoint=ref)


def test_requests_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError) as info:
        ImageRequest.model_validate({"volume": "d", "writeable": True})
    assert info.value.errors()[0]["loc"] == ("writeable",)
    assert ImageRequest.model_validate({"volume": "d"}).checkpoint == "latest"


def test_checkpoint_info_from_journal_and_from_status_agree() -> None:
    cp = Checkpoint(3, 30, 1_750_000_000_250_000_000, "t", True)
    info = CheckpointInfo.of(cp)
    assert info.time == datetime(2025, 6, 15, 15, 6, 40, 250000, tzinfo=UTC)
    # VpgRuntime.status() gives epoch seconds; the model reads both forms the same.
    from_status = CheckpointInfo.model_validate(
        {"id": 3, "seq": 30, "time": cp.time, "tag": "t", "consistent": True}
    )
    assert from_status == info
    assert CheckpointInfo.model_validate_json(info.model_dump_json()) == info


def test_status_keeps_fields_it_does_not_know() -> None:
    raw = {
        "vpg": "a",
        "consistent": True,
        "checkpointCount": 0,
        "durableSeq": 0,
        "promotedSeq": 0,
        "journal": {
            "usedBytes": 1,
            "historySecondsConfigured": 3600,
            "historySecondsActual": 0,
            "historyMet": True,
            "level": "ok",
        },
        "stream": {"bufferBytes": 5},
    }
    status = VpgStatus.model_validate(raw)
    assert status.model_dump(by_alias=True)["stream"] == {"bufferBytes": 5}
