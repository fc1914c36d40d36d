"""The control API: HTTPS (or, when asked, plain HTTP) on the appliance's event loop.

Routes (every `/v1` route needs `Authorization: Bearer <token>`, and a client certificate when
`listen.tls.clientCaFile` is set; bodies are JSON, see `models`)::

    GET    /healthz                                    200 {"status": "ok"}          no auth
    GET    /metrics                                    Prometheus text format        no auth
    GET    /v1/config                                  ApplianceConfig
    PUT    /v1/config               ApplianceConfig    ApplyResult                   409 422
    GET    /v1/status                                  ApplianceStatus
    GET    /v1/vpgs/{vpg}                              VpgStatus                     404
    GET    /v1/protected/{vpg}                         ProtectedVpgStatus            404
    GET    /v1/vpgs/{vpg}/volumes/{volume}             VolumeStatus                  404
    POST   /v1/vpgs/{vpg}/volumes/{volume}/mirror-ready  MirrorReadyRequest -> VolumeStatus  409
    POST   /v1/vpgs/{vpg}/checkpoints  CheckpointRequest  201 CheckpointInfo         409
    GET    /v1/vpgs/{vpg}/checkpoints?since&until&tag&before&limit  CheckpointPage   422
    GET    /v1/vpgs/{vpg}/checkpoints/{ref}            CheckpointInfo                404
    POST   /v1/vpgs/{vpg}/images    ImageRequest       201 ImageInfo                 404 409
    GET    /v1/vpgs/{vpg}/images                       ImageList
    GET    /v1/vpgs/{vpg}/images/{id}                  ImageInfo                     404
    DELETE /v1/vpgs/{vpg}/images/{id}?force=true       ImageInfo                     404 409
    GET    /v1/vpgs/{vpg}/failover                     FailoverState
    POST   /v1/vpgs/{vpg}/promote   PromoteRequest     FailoverState                 404 409
    POST   /v1/vpgs/{vpg}/commit                       FailoverState                 409
    POST   /v1/vpgs/{vpg}/rollback                     FailoverState                 409
    POST   /v1/vpgs/{vpg}/reverse   ReverseRequest     ReverseResult                 404 409 422
    POST   /v1/vpgs/{vpg}/force-sync                   ProtectedVpgStatus            404 409

Reverse (reverse protection, failback; see `secondsite.appliance.reverse`): called on both
appliances of a VPG after a failover was committed on the recovery one. On the recovery appliance
(body: `role: protected`, the peer's `peer` name and `peerStream` address) the journal goes and
its replicas become in-path volumes streamed to the peer (a delta sync first: only blocks that
differ); on the protected one (body: `role: recovery` and the peer's `peer` name) the volumes
stop being served and their backing files become the replicas of a journal fed by the peer.
Asking for the role the VPG has already changes nothing (a retried request). The reversed config
is applied like a `PUT /v1/config`; 409 `cannot-reverse` says why a VPG cannot be reversed (no
committed failover, a promotion not committed, mirror targets, ...).

`force-sync` (on the protected appliance) starts a delta sync by block checksums of every
in-path volume of the VPG (409 nothing-to-sync when it has none: mirror targets are QEMU's to
resync); its progress is in each volume's `deltaSync`.

Errors are ``{"error": code, "message": ..., "details": [...]}`` (`errors` lists the codes);
401 carries ``WWW-Authenticate: Bearer``. A request that is not HTTP gets aiohttp's 400 and
its connection is closed; the server goes on serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel

from secondsite.appliance.config import ApplianceConfig, ListenSpec
from secondsite.appliance.journal import Checkpoint
from secondsite.appliance.reverse import ReverseRole

from .auth import TokenFile, server_ssl_context
from .errors import ApiError, UnknownVolumeError, api_error
from .metrics import ApplianceMetrics
from .models import (
    ApplianceStatus,
    CheckpointInfo,
    CheckpointPage,
    CheckpointRequest,
    ImageList,
    ImageRequest,
    MirrorReadyRequest,
    PromoteRequest,
    ProtectedVpgStatus,
    ReverseRequest,
    VolumeStatus,
    VpgStatus,
    check_checkpoint_ref,
)
from .query import parse_checkpoint_query, query_checkpoints, resolve_checkpoint

if TYPE_CHECKING:
    from secondsite.appliance.runtime import Appliance

__all__ = ["ControlServer"]

log = logging.getLogger("secondsite.appliance.control")

_M = TypeVar("_M", bound=BaseModel)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MAX_BODY = 4 << 20
_OPEN_PATHS = frozenset({"/healthz", "/metrics"})


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(by_alias=True),
        status=status,
        content_type="application/json",
    )


def _error_response(err: ApiError) -> web.Response:
    response = _json(err.body(), err.status)
    if err.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="secondsite-appliance"'
    return response


class _ProtocolLogger(logging.Logger):
    """aiohttp's server-side logger: a request that is not valid HTTP becomes one warning line
    (aiohttp has answered 400 and closed the connection) instead of an error with a traceback."""

    def __init__(self) -> None:
        super().__init__(log.name + ".http")
        self.parent = log

    def _bad_http(self, level: int, msg: object, args: tuple[object, ...], exc: object) -> bool:
        if not isinstance(exc, HttpProcessingError):
            return False
        where = str(msg) % args if args else str(msg)
        log.log(
            level, "event=bad-http status=%d where=%r error=%r", exc.code, where, exc.message[:200]
        )
        return True

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        if not self._bad_http(logging.WARNING, msg, args, exc_info):
            super().exception(msg, *args, exc_info=exc_info, **kw)

    def debug(self, msg: object, *args: object, **kw: Any) -> None:
        # aiohttp logs a first request with a bad method (often TLS or other binary traffic on
        # the port) at debug level.
        if not self._bad_http(logging.DEBUG, msg, args, kw.get("exc_info")):
            super().debug(msg, *args, **kw)


async def _body(request: web.Request, model: type[_M]) -> _M:
    """The request's JSON body as ``model``; an empty body means every default."""
    raw = await request.read()
    return model.model_validate_json(raw if raw.strip() else b"{}")


class ControlServer:
    """Serves the control API of one :class:`Appliance` at ``listen.control``."""

    def __init__(self, appliance: Appliance, listen: ListenSpec) -> None:
        address = listen.control_address()
        assert address is not None and listen.token_file is not None, "checked by ListenSpec"
        self._appliance = appliance
        self._address = address
        self._tokens = TokenFile(listen.token_file)
        self._ssl = None if listen.tls is None else server_ssl_context(listen.tls)
        self._mtls = listen.tls is not None and listen.tls.client_ca_file is not None
        self.metrics = ApplianceMetrics(appliance)
        self._runner: web.AppRunner | None = None
        self._serving = False
        self.url: str | None = None
        """`https://host:port` (or `http://`) once started; the real port when 0 was asked."""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(
            middlewares=[self._errors_and_logs, self._authenticate], client_max_size=_MAX_BODY
        )
        self._routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, logger=_ProtocolLogger())
        await runner.setup()
        try:
            site = web.TCPSite(runner, *self._address, ssl_context=self._ssl, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        scheme = "http" if self._ssl is None else "https"
        self.url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        self._serving = True
        log.info("event=control-listening url=%s mtls=%s", self.url, self._mtls)

    async def stop(self) -> None:
        """Stop accepting requests; requests in flight get a few seconds to finish."""
        self._serving = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _errors_and_logs(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = e.reason.lower().replace(" ", "-")
            response = _error_response(ApiError(e.status, code, f"{e.reason}: {request.path}"))
        except Exception as e:
            err = api_error(e)
            if err is None:
                log.exception(
                    "event=request-failed method=%s path=%s", request.method, request.path
                )
                err = ApiError(500, "internal", f"internal error: {type(e).__name__}")
            response = _error_response(err)
        route = request.match_info.route.resource
        template = route.canonical if route is not None else "unmatched"
        self.metrics.requests.labels(request.method, template, str(response.status)).inc()
        level = logging.DEBUG if request.method == "GET" and response.status < 400 else logging.INFO
        log.log(
            level,
            "event=request method=%s path=%s status=%d ms=%.1f remote=%s",
            request.method,
            request.path,
            response.status,
            (time.perf_counter() - started) * 1e3,
            request.remote,
        )
        return response

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS:
            return await handler(request)
        reason = self._refusal(request)
        if reason is not None:
            log.warning(
                "event=unauthorized reason=%s method=%s path=%s remote=%s",
                reason,
                request.method,
                request.path,
                request.remote,
            )
            if reason == "no-client-certificate":
                raise ApiError(401, "unauthorized", "a client certificate is required")
            raise ApiError(401, "unauthorized", "a valid bearer token is required")
        return await handler(request)

    def _refusal(self, request: web.Request) -> str | None:
        """Why the request is not authenticated (a log word), or None when it is."""
        if self._mtls:
            transport = request.transport
            if transport is None or not transport.get_extra_info("peercert"):
                return "no-client-certificate"
        header = request.headers.get("Authorization")
        if header is None:
            return "missing-token"
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed-authorization"
        if not self._tokens.check(token.strip()):
            return "wrong-token"
        return None

    # -- routes ----------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics)
        r.add_get("/v1/config", self._get_config)
        r.add_put("/v1/config", self._put_config)
        r.add_get("/v1/status", self._status)
        r.add_get("/v1/vpgs/{vpg}", self._vpg_status)
        r.add_get("/v1/protected/{vpg}", self._protected_status)
        r.add_get("/v1/vpgs/{vpg}/volumes/{volume}", self._volume_status)
        r.add_post("/v1/vpgs/{vpg}/volumes/{volume}/mirror-ready", self._mirror_ready)
        r.add_post("/v1/vpgs/{vpg}/checkpoints", self._take_checkpoint)
        r.add_get("/v1/vpgs/{vpg}/checkpoints", self._list_checkpoints)
        r.add_get("/v1/vpgs/{vpg}/checkpoints/{ref}", self._get_checkpoint)
        r.add_post("/v1/vpgs/{vpg}/images", self._create_image)
        r.add_get("/v1/vpgs/{vpg}/images", self._list_images)
        r.add_get("/v1/vpgs/{vpg}/images/{image}", self._get_image)
        r.add_delete("/v1/vpgs/{vpg}/images/{image}", self._delete_image)
        r.add_get("/v1/vpgs/{vpg}/failover", self._failover)
        r.add_post("/v1/vpgs/{vpg}/promote", self._promote)
        r.add_post("/v1/vpgs/{vpg}/commit", self._commit)
        r.add_post("/v1/vpgs/{vpg}/rollback", self._rollback)
        r.add_post("/v1/vpgs/{vpg}/reverse", self._reverse)
        r.add_post("/v1/vpgs/{vpg}/force-sync", self._force_sync)

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self._serving:
            return web.json_response({"status": "stopping"}, status=503)
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _get_config(self, request: web.Request) -> web.Response:
        return _json(self._appliance.config)

    async def _put_config(self, request: web.Request) -> web.Response:
        desired = await _body(request, ApplianceConfig)
        return _json(await self._appliance.apply(desired))

    async def _status(self, request: web.Request) -> web.Response:
        return _json(ApplianceStatus.model_validate(self._appliance.status()))

    async def _vpg_status(self, request: web.Request) -> web.Response:
        vpg = request.match_info["vpg"]
        return _json(VpgStatus.model_validate(self._appliance.vpg_status(vpg)))

    async def _protected_status(self, request: web.Request) -> web.Response:
        vpg = request.match_info["vpg"]
        return _json(ProtectedVpgStatus.model_validate(self._appliance.protected_status(vpg)))

    def _volume(self, request: web.Request) -> VolumeStatus:
        vpg, volume = request.match_info["vpg"], request.match_info["volume"]
        status = VpgStatus.model_validate(self._appliance.vpg_status(vpg))
        if volume not in status.volumes:
            raise UnknownVolumeError(f"VPG {vpg} has no volume {volume!r}")
        return status.volumes[volume]

    async def _volume_status(self, request: web.Request) -> web.Response:
        return _json(self._volume(request))

    async def _mirror_ready(self, request: web.Request) -> web.Response:
        body = await _body(request, MirrorReadyRequest)
        self._appliance.set_mirror_ready(
            request.match_info["vpg"], request.match_info["volume"], body.ready
        )
        return _json(self._volume(request))

    async def _take_checkpoint(self, request: web.Request) -> web.Response:
        body = await _body(request, CheckpointRequest)
        vpg = self._appliance.vpg(request.match_info["vpg"])
        self._appliance.journal(vpg.name)  # 404/409 before taking anything
        cp = await vpg.checkpoint(tag=body.tag)
        return _json(CheckpointInfo.of(cp), 201)

    async def _list_checkpoints(self, request: web.Request) -> web.Response:
        query = parse_checkpoint_query(request.query)
        journal = self._appliance.journal(request.match_info["vpg"])
        page, next_before = query_checkpoints(journal.checkpoints, query)
        infos = [CheckpointInfo.of(cp) for cp in page]
        return _json(CheckpointPage(checkpoints=infos, next_before=next_before))

    def _resolve(self, vpg: str, ref: str, loc: list[str]) -> Checkpoint:
        journal = self._appliance.journal(vpg)
        try:
            cp = resolve_checkpoint(journal.checkpoints, check_checkpoint_ref(ref))
        except ValueError as e:
            detail = {"loc": loc, "msg": str(e), "type": "value_error"}
            raise ApiError(422, "invalid-request", str(e), [detail]) from e
        if cp is None:
            raise ApiError(404, "unknown-checkpoint", f"VPG {vpg} has no checkpoint {ref}")
        return cp

    async def _get_checkpoint(self, request: web.Request) -> web.Response:
        vpg, ref = request.match_info["vpg"], request.match_info["ref"]
        return _json(CheckpointInfo.of(self._resolve(vpg, ref, ["path", "ref"])))

    async def _create_image(self, request: web.Request) -> web.Response:
        body = await _body(request, ImageRequest)
        vpg = request.match_info["vpg"]
        cp = self._resolve(vpg, str(body.checkpoint), ["body", "checkpoint"])
        image = await self._appliance.open_image(vpg, body.volume, cp, writable=body.writable)
        return _json(self._appliance.image_info(image), 201)

    async def _list_images(self, request: web.Request) -> web.Response:
        vpg = self._appliance.vpg(request.match_info["vpg"]).name
        images = [self._appliance.image_info(i) for i in self._appliance.images.of_vpg(vpg)]
        return _json(ImageList(images=images))

    async def _get_image(self, request: web.Request) -> web.Response:
        vpg, image_id = request.match_info["vpg"], request.match_info["image"]
        self._appliance.vpg(vpg)
        return _json(self._appliance.image_info(self._appliance.images.find(vpg, image_id)))

    async def _delete_image(self, request: web.Request) -> web.Response:
        vpg, image_id = request.match_info["vpg"], request.match_info["image"]
        force = request.query.get("force", "false").lower()
        if force not in ("true", "false"):
            detail = {"loc": ["query", "force"], "msg": "true or false", "type": "bool_parsing"}
            raise ApiError(422, "invalid-request", "force must be true or false", [detail])
        self._appliance.vpg(vpg)
        image = self._appliance.images.find(vpg, image_id)
        info = self._appliance.image_info(image)
        self._appliance.delete_image(vpg, image_id, force=force == "true")
        return _json(info)

    async def _failover(self, request: web.Request) -> web.Response:
        return _json(self._appliance.failover_state(request.match_info["vpg"]))

    async def _promote(self, request: web.Request) -> web.Response:
        body = await _body(request, PromoteRequest)
        vpg = request.match_info["vpg"]
        cp = self._resolve(vpg, str(body.checkpoint), ["body", "checkpoint"])
        await self._appliance.promote(vpg, cp)
        return _json(self._appliance.failover_state(vpg))

    async def _commit(self, request: web.Request) -> web.Response:
        vpg = request.match_info["vpg"]
        await self._appliance.commit(vpg)
        return _json(self._appliance.failover_state(vpg))

    async def _rollback(self, request: web.Request) -> web.Response:
        vpg = request.match_info["vpg"]
        await self._appliance.rollback(vpg)
        return _json(self._appliance.failover_state(vpg))

    async def _reverse(self, request: web.Request) -> web.Response:
        body = await _body(request, ReverseRequest)
        result = await self._appliance.reverse(
            request.match_info["vpg"],
            ReverseRole(body.role),
            peer=body.peer,
            peer_stream=body.peer_stream,
            directory=body.directory,
            settings=body.settings,
        )
        return _json(result)

    async def _force_sync(self, request: web.Request) -> web.Response:
        pvpg = self._appliance.protected_vpg(request.match_info["vpg"])
        volumes = pvpg.force_sync()
        if not volumes:
            raise ApiError(
                409,
                "nothing-to-sync",
                f"VPG {pvpg.name} has no in-path volume here; its mirror targets are resynced "
                "by their QEMU mirror jobs",
            )
        log.info("vpg=%s event=force-sync volumes=%s", pvpg.name, ",".join(volumes))
        return _json(ProtectedVpgStatus.model_validate(pvpg.status()))
