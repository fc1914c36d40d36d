"""A typed async client of an appliance's control API (what the operator uses).

::

    async with ControlClient("https://10.1.2.3:8443", token=token, ca_file=ca) as appliance:
        result = await appliance.put_config(config)      # ApplyResult: what changed
        status = await appliance.vpg_status("db")        # VpgStatus
        image = await appliance.create_image("db", "disk0", "tag:before-upgrade")

Every method returns a model of `models` (or `ApplianceConfig`) and raises only these::

    ControlError                  anything this client raises; itself: an answer it cannot parse
     +-- TransportError           no answer: refused, reset, TLS handshake failed, timed out
     +-- ErrorResponse            the appliance answered with an error: .status .code .message
          |                       .details (the JSON error body)
          +-- InvalidRequestError     400, 422: the request is wrong (details: pydantic's locations)
          +-- UnauthorizedError       401: token or client certificate missing or wrong
          +-- NotFoundError           404: unknown VPG, volume, checkpoint or image
          +-- ConflictError           409: not possible now (a config change that cannot be
          |                           applied live, a failover phase, open images)
          +-- UnsupportedError        501: the appliance cannot do this yet
          +-- ServerError             any other 5xx

GETs and `PUT /v1/config` are idempotent and retried (tenacity, exponential backoff) on a
`TransportError` or a 502/503/504; POSTs and DELETEs are sent once, since a lost answer does not
say whether they happened. Each attempt is bounded by ``timeout`` seconds.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from secondsite.appliance.config import ApplianceConfig

from .models import (
    ApplianceStatus,
    ApplyResult,
    CheckpointInfo,
    CheckpointPage,
    CheckpointRef,
    CheckpointRequest,
    ErrorBody,
    FailoverState,
    ImageInfo,
    ImageList,
    ImageRequest,
    MirrorReadyRequest,
    PromoteRequest,
    ProtectedVpgStatus,
    ReverseRequest,
    ReverseResult,
    VolumeStatus,
    VpgStatus,
)

__all__ = [
    "ConflictError",
    "ControlClient",
    "ControlError",
    "ErrorResponse",
    "InvalidRequestError",
    "NotFoundError",
    "ServerError",
    "TransportError",
    "UnauthorizedError",
    "UnsupportedError",
]

_M = TypeVar("_M", bound=BaseModel)


class ControlError(Exception):
    """Base of the client's errors; raised as itself for an answer the client cannot parse."""


class TransportError(ControlError):
    """The appliance could not be reached or did not answer in time."""


class ErrorResponse(ControlError):
    """The appliance answered with an error status."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


class InvalidRequestError(ErrorResponse):
    """400 or 422."""


class UnauthorizedError(ErrorResponse):
    """401."""


class NotFoundError(ErrorResponse):
    """404."""


class ConflictError(ErrorResponse):
    """409."""


class UnsupportedError(ErrorResponse):
    """501."""


class ServerError(ErrorResponse):
    """5xx other than 501."""


_BY_STATUS: dict[int, type[ErrorResponse]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    403: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
    501: UnsupportedError,
}
_RETRY_STATUSES = frozenset({502, 503, 504})


def error_for(status: int, raw: bytes) -> ErrorResponse:
    """The exception for an error answer (its JSON error body, or the raw text when not JSON)."""
    try:
        body = ErrorBody.model_validate_json(raw)
        code, message, details = body.error, body.message, body.details
    except ValidationError:
        code, message, details = "http-error", raw.decode(errors="replace")[:500], []
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ErrorResponse)
    return cls(status, code, message, details)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ErrorResponse):
        return exc.status in _RETRY_STATUSES
    return isinstance(exc, TransportError)


def _time_param(value: datetime | float) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("give an aware datetime (with tzinfo)")
        return value.isoformat()
    return repr(float(value))


class ControlClient:
    """One appliance's control API. Use as ``async with``, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str,
        ca_file: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
        timeout: float = 30.0,
        retries: int = 3,
    ) -> None:
        """``base_url``: `https://host:port` (or `http://` for a plain-HTTP appliance).
        ``ca_file``: the CA that signed the appliance's certificate (default: the system's).
        ``client_cert``: (certificate, key) files for mutual TLS.
        ``retries``: attempts of an idempotent request, including the first."""
        self._base = URL(base_url)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._ssl: ssl.SSLContext | bool = True
        if self._base.scheme == "https":
            ctx = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
            if client_cert is not None:
                ctx.load_cert_chain(*client_cert)
            self._ssl = ctx
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = max(1, retries)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, *segments: str) -> URL:
        url = self._base
        for segment in segments:
            url = url / segment
        return url

    # -- transport -------------------------------------------------------------------------

    async def _once(
        self, method: str, url: URL, body: BaseModel | None, params: Mapping[str, str] | None
    ) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        data = None if body is None else body.model_dump_json(by_alias=True, exclude_none=True)
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, url, data=data, params=params, headers=headers, ssl=self._ssl
            ) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise TransportError(f"{method} {url}: {type(e).__name__}: {e}") from e
        if response.status >= 400:
            raise error_for(response.status, raw)
        return response.status, raw

    async def _call(
        self,
        method: str,
        url: URL,
        *,
        body: BaseModel | None = None,
        params: Mapping[str, str] | None = None,
    ) -> bytes:
        idempotent = method in ("GET", "PUT")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retries if idempotent else 1),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                _, raw = await self._once(method, url, body, params)
        return raw

    async def _model(
        self,
        model: type[_M],
        method: str,
        url: URL,
        *,
        body: BaseModel | None = None,
        params: Mapping[str, str] | None = None,
    ) -> _M:
        raw = await self._call(method, url, body=body, params=params)
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise ControlError(f"{method} {url}: unexpected answer: {e}") from e

    # -- probes ----------------------------------------------------------------------------

    async def healthz(self) -> bool:
        """Whether the appliance says it is serving (no retries: a probe)."""
        try:
            await self._once("GET", self._url("healthz"), None, None)
        except (TransportError, ErrorResponse):
            return False
        return True

    async def metrics(self) -> str:
        """The Prometheus text exposition."""
        return (await self._call("GET", self._url("metrics"))).decode()

    # -- config and status -----------------------------------------------------------------

    async def get_config(self) -> ApplianceConfig:
        return await self._model(ApplianceConfig, "GET", self._url("v1", "config"))

    async def put_config(self, config: ApplianceConfig) -> ApplyResult:
        """Declare the appliance's whole config; the answer lists what changed (empty: nothing).
        Raises ConflictError (details: one {path, message} each) for changes it cannot apply
        live, and then applies none of them."""
        return await self._model(ApplyResult, "PUT", self._url("v1", "config"), body=config)

    async def status(self) -> ApplianceStatus:
        return await self._model(ApplianceStatus, "GET", self._url("v1", "status"))

    async def vpg_status(self, vpg: str) -> VpgStatus:
        return await self._model(VpgStatus, "GET", self._url("v1", "vpgs", vpg))

    async def protected_status(self, vpg: str) -> ProtectedVpgStatus:
        """A VPG this appliance captures and replicates to a recovery appliance."""
        return await self._model(ProtectedVpgStatus, "GET", self._url("v1", "protected", vpg))

    async def volume_status(self, vpg: str, volume: str) -> VolumeStatus:
        url = self._url("v1", "vpgs", vpg, "volumes", volume)
        return await self._model(VolumeStatus, "GET", url)

    async def set_mirror_ready(self, vpg: str, volume: str, ready: bool) -> VolumeStatus:
        """Tell a mirror-target volume whether the hypervisor's mirror job is (still) synced."""
        url = self._url("v1", "vpgs", vpg, "volumes", volume, "mirror-ready")
        body = MirrorReadyRequest(ready=ready)
        return await self._model(VolumeStatus, "POST", url, body=body)

    # -- checkpoints -----------------------------------------------------------------------

    async def take_checkpoint(self, vpg: str, tag: str | None = None) -> CheckpointInfo:
        """A checkpoint across every volume of the VPG, durable when this returns."""
        url = self._url("v1", "vpgs", vpg, "checkpoints")
        return await self._model(CheckpointInfo, "POST", url, body=CheckpointRequest(tag=tag))

    async def list_checkpoints(
        self,
        vpg: str,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        tag: str | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> CheckpointPage:
        """One page of checkpoints, newest first; times as aware datetimes or epoch seconds.
        Pass the page's ``next_before`` as ``before`` for the next one."""
        params: dict[str, str] = {}
        if since is not None:
            params["since"] = _time_param(since)
        if until is not None:
            params["until"] = _time_param(until)
        if tag is not None:
            params["tag"] = tag
        if before is not None:
            params["before"] = str(before)
        if limit is not None:
            params["limit"] = str(limit)
        url = self._url("v1", "vpgs", vpg, "checkpoints")
        return await self._model(CheckpointPage, "GET", url, params=params)

    async def get_checkpoint(self, vpg: str, ref: CheckpointRef) -> CheckpointInfo:
        """The checkpoint a reference names: `latest`, an id, `tag:<tag>` or `time:<time>`."""
        url = self._url("v1", "vpgs", vpg, "checkpoints", str(ref))
        return await self._model(CheckpointInfo, "GET", url)

    # -- images ----------------------------------------------------------------------------

    async def create_image(
        self, vpg: str, volume: str, checkpoint: CheckpointRef = "latest", *, writable: bool = False
    ) -> ImageInfo:
        """Open the volume's image at a checkpoint and serve it over NBD until deleted."""
        body = ImageRequest(volume=volume, checkpoint=checkpoint, writable=writable)
        url = self._url("v1", "vpgs", vpg, "images")
        return await self._model(ImageInfo, "POST", url, body=body)

    async def list_images(self, vpg: str) -> list[ImageInfo]:
        url = self._url("v1", "vpgs", vpg, "images")
        return (await self._model(ImageList, "GET", url)).images

    async def get_image(self, vpg: str, image_id: str) -> ImageInfo:
        url = self._url("v1", "vpgs", vpg, "images", image_id)
        return await self._model(ImageInfo, "GET", url)

    async def delete_image(self, vpg: str, image_id: str, *, force: bool = False) -> ImageInfo:
        """Close the image (a writable image's scratch overlay is discarded). Refused with
        ConflictError while NBD clients use it, unless ``force``."""
        url = self._url("v1", "vpgs", vpg, "images", image_id)
        params = {"force": "true"} if force else None
        return await self._model(ImageInfo, "DELETE", url, params=params)

    # -- failover --------------------------------------------------------------------------

    async def failover_state(self, vpg: str) -> FailoverState:
        return await self._model(FailoverState, "GET", self._url("v1", "vpgs", vpg, "failover"))

    async def promote(self, vpg: str, checkpoint: CheckpointRef) -> FailoverState:
        """Live failover: make every replica of the VPG its image at ``checkpoint``; appends
        stop until :meth:`commit` or :meth:`rollback`."""
        url = self._url("v1", "vpgs", vpg, "promote")
        body = PromoteRequest(checkpoint=checkpoint)
        return await self._model(FailoverState, "POST", url, body=body)

    async def commit(self, vpg: str) -> FailoverState:
        return await self._model(FailoverState, "POST", self._url("v1", "vpgs", vpg, "commit"))

    async def rollback(self, vpg: str) -> FailoverState:
        return await self._model(FailoverState, "POST", self._url("v1", "vpgs", vpg, "rollback"))

    async def reverse(
        self,
        vpg: str,
        role: Literal["protected", "recovery"],
        *,
        peer: str,
        peer_stream: str | None = None,
        directory: Path | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ReverseResult:
        """Reverse the VPG's direction of protection after a committed failover (call it on
        both appliances): this appliance takes ``role`` (`protected` where the VPG failed over
        to, `recovery` where it came from; a repeated call changes nothing), ``peer`` is the
        other appliance's name, ``peer_stream`` its stream address (needed where this appliance
        becomes protected and streams to it); ``directory`` where the new role keeps its files;
        ``settings`` more settings of the new role (`ReverseRequest.settings`). Raises
        ConflictError when the VPG cannot be reversed here (the message says why), and then
        changes nothing."""
        url = self._url("v1", "vpgs", vpg, "reverse")
        body = ReverseRequest(
            role=role,
            peer=peer,
            peer_stream=peer_stream,
            directory=directory,
            settings=dict(settings or {}),
        )
        return await self._model(ReverseResult, "POST", url, body=body)

    async def force_sync(self, vpg: str) -> ProtectedVpgStatus:
        """Delta-sync every in-path volume of a VPG protected by this appliance (by block
        checksums: only blocks that differ from the recovery side are shipped)."""
        return await self._model(
            ProtectedVpgStatus, "POST", self._url("v1", "vpgs", vpg, "force-sync")
        )
