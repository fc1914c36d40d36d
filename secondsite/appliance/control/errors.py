"""Errors of the appliance's operations, and the HTTP answer each one gets.

The runtime raises the domain errors below (and the journal raises its own); the server turns any
of them into an :class:`ApiError` with :func:`api_error`, whose body is
``{"error": code, "message": ..., "details": [...]}``:

============================  ======  ==========================
raised                        status  code
============================  ======  ==========================
UnknownVpgError               404     unknown-vpg
UnknownVolumeError (both)     404     unknown-volume
UnknownCheckpointError        404     unknown-checkpoint
UnknownImageError             404     unknown-image
ApplyConflict                 409     config-conflict
FailoverStateError            409     failover-state
ImagesOpenError               409     images-open
ImageBusyError                409     image-busy
NotMirrorTargetError          409     not-mirror-target
ReverseRefused                409     cannot-reverse
CheckpointSkipped             409     checkpoint-not-taken
JournalClosedError            409     vpg-stopped
VolumeExistsError             409     volume-exists
ApplyInvalid                  422     invalid-config
OutOfRangeError               422     out-of-range
pydantic ValidationError      422     invalid-request (400 invalid-json when not JSON)
JournalIOError, Corrupt...    500     journal-failed
============================  ======  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from secondsite.appliance import journal
from secondsite.appliance.vpg import CheckpointSkipped

from .models import ErrorBody

__all__ = [
    "ApiError",
    "ApplyConflict",
    "ApplyFailed",
    "ApplyInvalid",
    "Conflict",
    "ImageBusyError",
    "NotMirrorTargetError",
    "ReverseRefused",
    "UnknownImageError",
    "UnknownVolumeError",
    "UnknownVpgError",
    "api_error",
    "validation_details",
]


class UnknownVpgError(LookupError):
    """No VPG of that name runs on this appliance."""


class UnknownVolumeError(LookupError):
    """The VPG has no volume of that name."""


class UnknownImageError(LookupError):
    """No image with that id was created through the API (or it was deleted)."""


class ImageBusyError(RuntimeError):
    """The image still has NBD connections; disconnect them, or delete with force."""


class NotMirrorTargetError(RuntimeError):
    """Mirror readiness was set for a volume captured in-path."""


class ReverseRefused(RuntimeError):
    """The VPG cannot be reversed on this appliance now; the message says why and what to do."""


@dataclass(frozen=True)
class Conflict:
    """One change that cannot be applied live."""

    path: str
    """Where in the config, e.g. `volumes.disk0.size` or `vpgs.db.directory`."""
    message: str
    """Why it cannot be applied, and what to do instead."""


class ApplyConflict(Exception):
    """The desired config holds changes that cannot be applied live; nothing was applied."""

    def __init__(self, conflicts: Sequence[Conflict]) -> None:
        self.conflicts = list(conflicts)
        super().__init__("; ".join(f"{c.path}: {c.message}" for c in self.conflicts))


class ApplyInvalid(Exception):
    """The desired config is well-formed but cannot work here (e.g. a backing file is missing);
    nothing was applied. ``errors`` are pydantic-style ``{loc, msg, type}`` entries."""

    def __init__(self, errors: Sequence[dict[str, Any]]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in self.errors))


class ApplyFailed(Exception):
    """Applying failed midway on an I/O error; what this apply had started was stopped again."""


class ApiError(Exception):
    """An error answer: HTTP status, a stable code, a message and optional details."""

    def __init__(
        self, status: int, code: str, message: str, details: Sequence[dict[str, Any]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details)

    def body(self) -> ErrorBody:
        return ErrorBody(error=self.code, message=self.message, details=self.details)


def _loc(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc) or "(body)"


def validation_details(exc: ValidationError, prefix: Sequence[str] = ()) -> list[dict[str, Any]]:
    """pydantic's errors as JSON: location (under ``prefix``), message and type; no input echo."""
    return [
        {"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


_BY_TYPE: list[tuple[type[BaseException], int, str]] = [
    (UnknownVpgError, 404, "unknown-vpg"),
    (UnknownVolumeError, 404, "unknown-volume"),
    (journal.UnknownVolumeError, 404, "unknown-volume"),
    (journal.UnknownCheckpointError, 404, "unknown-checkpoint"),
    (UnknownImageError, 404, "unknown-image"),
    (journal.FailoverStateError, 409, "failover-state"),
    (journal.ImagesOpenError, 409, "images-open"),
    (ImageBusyError, 409, "image-busy"),
    (NotMirrorTargetError, 409, "not-mirror-target"),
    (ReverseRefused, 409, "cannot-reverse"),
    (CheckpointSkipped, 409, "checkpoint-not-taken"),
    (journal.JournalClosedError, 409, "vpg-stopped"),
    (journal.VolumeExistsError, 409, "volume-exists"),
    (journal.OutOfRangeError, 422, "out-of-range"),
    (journal.JournalIOError, 500, "journal-failed"),
    (journal.CorruptJournalError, 500, "journal-failed"),
    (ApplyFailed, 500, "apply-failed"),
]


def api_error(exc: BaseException) -> ApiError | None:
    """The answer for an error the appliance raised, or None for an unexpected one (a bug: 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ApplyConflict):
        details = [{"path": c.path, "message": c.message} for c in exc.conflicts]
        return ApiError(409, "config-conflict", f"cannot apply live: {exc}", details)
    if isinstance(exc, ApplyInvalid):
        return ApiError(422, "invalid-config", str(exc), exc.errors)
    if isinstance(exc, ValidationError):
        details = validation_details(exc)
        if any(d["type"] == "json_invalid" for d in details):
            return ApiError(400, "invalid-json", "the request body is not valid JSON", details)
        summary = "; ".join(f"{_loc(d['loc'])}: {d['msg']}" for d in details[:5])
        return ApiError(422, "invalid-request", summary, details)
    for cls, status, code in _BY_TYPE:
        if isinstance(exc, cls):
            message = str(exc.args[0]) if exc.args else str(exc)
            return ApiError(status, code, message or code)
    return None
