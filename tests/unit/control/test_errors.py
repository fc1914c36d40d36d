"""How errors become HTTP answers, and how the client turns answers back into exceptions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from secondsite.appliance import journal
from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.control.client import (
    ConflictError,
    ErrorResponse,
    InvalidRequestError,
    NotFoundError,
    ServerError,
    UnauthorizedError,
    UnsupportedError,
    error_for,
)
from secondsite.appliance.control.errors import (
    ApiError,
    ApplyConflict,
    ApplyInvalid,
    Conflict,
    ImageBusyError,
    UnknownVpgError,
    api_error,
)
from secondsite.appliance.control.models import ErrorBody


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (UnknownVpgError("no VPG 'x'"), 404, "unknown-vpg"),
        (journal.UnknownCheckpointError("gone"), 404, "unknown-checkpoint"),
        (journal.UnknownVolumeError("no"), 404, "unknown-volume"),
        (journal.FailoverStateError("already promoted"), 409, "failover-state"),
        (journal.ImagesOpenError("2 images"), 409, "images-open"),
        (ImageBusyError("1 connection"), 409, "image-busy"),
        (journal.JournalClosedError("closed"), 409, "vpg-stopped"),
        (journal.OutOfRangeError("past the end"), 422, "out-of-range"),
        (journal.JournalIOError("EIO"), 500, "journal-failed"),
    ],
)
def test_domain_errors(exc: Exception, status: int, code: str) -> None:
    err = api_error(exc)
    assert err is not None
    assert (err.status, err.code, err.message) == (status, code, exc.args[0])


def test_unexpected_errors_are_not_mapped() -> None:
    assert api_error(ZeroDivisionError()) is None
    assert api_error(KeyError("x")) is None


def test_conflicts_carry_every_path() -> None:
    err = api_error(
        ApplyConflict([Conflict("listen", "restart"), Conflict("volumes.d.size", "no")])
    )
    assert err is not None and (err.status, err.code) == (409, "config-conflict")
    assert err.details == [
        {"path": "listen", "message": "restart"},
        {"path": "volumes.d.size", "message": "no"},
    ]
    assert "volumes.d.size: no" in err.message


def test_apply_invalid_keeps_locations() -> None:
    loc = ["volumes", 0, "backing"]
    err = api_error(ApplyInvalid([{"loc": loc, "msg": "missing", "type": "value_error"}]))
    assert err is not None and err.status == 422 and err.details[0]["loc"] == loc


def test_validation_errors_keep_pydantic_locations_and_no_input() -> None:
    with pytest.raises(ValidationError) as info:
        ApplianceConfig.model_validate_json(
            b'{"listen": {"nbdUnix": "/s"}, "journals": [{"vpg": "BAD", "directory": "/j"}]}'
        )
    err = api_error(info.value)
    assert err is not None and (err.status, err.code) == (422, "invalid-request")
    assert err.details[0]["loc"] == ["journals", 0, "vpg"]
    assert "input" not in err.details[0]
    with pytest.raises(ValidationError) as info:
        ApplianceConfig.model_validate_json(b"{nope")
    err = api_error(info.value)
    assert err is not None and (err.status, err.code) == (400, "invalid-json")


def test_api_error_body_round_trips() -> None:
    body = ApiError(404, "unknown-image", "no image 'x'").body()
    assert ErrorBody.model_validate_json(body.model_dump_json()) == body


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequestError),
        (401, UnauthorizedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, InvalidRequestError),
        (501, UnsupportedError),
        (500, ServerError),
        (503, ServerError),
        (418, ErrorResponse),
    ],
)
def test_client_exception_for_status(status: int, cls: type[ErrorResponse]) -> None:
    raw = ErrorBody(error="some-code", message="why", details=[{"path": "p"}]).model_dump_json()
    exc = error_for(status, raw.encode())
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.message, exc.details) == (
        status,
        "some-code",
        "why",
        [{"path": "p"}],
    )


def test_client_exception_for_a_non_json_answer() -> None:
    exc = error_for(502, b"<html>bad gateway</html>")
    assert (
        isinstance(exc, ServerError) and exc.code == "http-error" and "bad gateway" in exc.message
    )
