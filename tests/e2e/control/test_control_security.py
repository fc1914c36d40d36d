"""Who gets in: bearer tokens, server and client certificates, and requests that are not HTTP.

Every refusal is answered (or the handshake fails), logged without the token, and the appliance
keeps serving everyone else.
"""

from __future__ import annotations

import json

import pytest
from control_harness import TOKEN, ApplianceProcess, Pki, exchange, raw_request, tls_context

from secondsite.appliance.control import ControlClient, TransportError, UnauthorizedError
from secondsite.appliance.control.models import ErrorBody

pytestmark = pytest.mark.timeout(120)

WRONG = "not-the-token-3c9e"


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("https://").rpartition(":")
    return host, int(port)


async def test_missing_or_wrong_token_is_401_and_logged_without_the_token(
    appliance: ApplianceProcess, client: ControlClient, pki: Pki
) -> None:
    ctx = tls_context(pki)
    for headers, reason in (
        ({}, "missing-token"),
        ({"Authorization": f"Bearer {WRONG}"}, "wrong-token"),
        ({"Authorization": f"Basic {TOKEN}"}, "malformed-authorization"),
        ({"Authorization": "Bearer "}, "malformed-authorization"),
    ):
        status, response_headers, body = await raw_request(
            appliance.url, "GET", "/v1/status", ssl_context=ctx, headers=headers
        )
        assert status == 401, body
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
        error = ErrorBody.model_validate_json(body)
        assert error.error == "unauthorized" and TOKEN not in error.message
        assert f"event=unauthorized reason={reason}" in appliance.log()
    # Unknown paths are refused the same way: no route list for strangers.
    status, _, _ = await raw_request(appliance.url, "GET", "/v1/nothing", ssl_context=ctx)
    assert status == 401

    async with ControlClient(appliance.url, token=WRONG, ca_file=pki.crt("ca")) as wrong:
        with pytest.raises(UnauthorizedError) as info:
            await wrong.put_config(appliance.config([], []))
        assert info.value.status == 401
        assert await wrong.healthz()  # no token needed

    assert (await client.status()).vpgs == {}
    assert appliance.alive()
    assert WRONG not in appliance.log() and TOKEN not in appliance.log()


async def test_healthz_and_metrics_need_no_token(appliance: ApplianceProcess, pki: Pki) -> None:
    status, _, body = await raw_request(
        appliance.url, "GET", "/healthz", ssl_context=tls_context(pki)
    )
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, headers, body = await raw_request(
        appliance.url, "GET", "/metrics", ssl_context=tls_context(pki)
    )
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"secondsite_nbd_connections" in body


async def test_untrusted_server_certificate_is_refused_by_the_client(
    appliance: ApplianceProcess,
) -> None:
    async with ControlClient(appliance.url, token=TOKEN, retries=1) as client:  # system CAs
        with pytest.raises(TransportError):
            await client.status()


async def test_mutual_tls(mtls_appliance: ApplianceProcess, pki: Pki) -> None:
    url, ca = mtls_appliance.url, pki.crt("ca")
    async with ControlClient(url, token=TOKEN, ca_file=ca, client_cert=pki.pair("client")) as ok:
        assert (await ok.status()).vpgs == {}

    # A certificate another CA signed fails the handshake.
    async with ControlClient(
        url, token=TOKEN, ca_file=ca, client_cert=pki.pair("rogue"), retries=1
    ) as rogue:
        with pytest.raises(TransportError):
            await rogue.status()
        assert not await rogue.healthz()

    # Without a certificate: probes get through, /v1 does not, even with the right token.
    async with ControlClient(url, token=TOKEN, ca_file=ca) as anonymous:
        assert await anonymous.healthz()
        with pytest.raises(UnauthorizedError) as info:
            await anonymous.status()
        assert "client certificate" in info.value.message
    assert "reason=no-client-certificate" in mtls_appliance.log()

    async with ControlClient(url, token=TOKEN, ca_file=ca, client_cert=pki.pair("client")) as ok:
        assert (await ok.status()).vpgs == {}
    assert mtls_appliance.alive()


async def test_garbage_gets_400_and_the_server_survives(
    appliance: ApplianceProcess, client: ControlClient, pki: Pki
) -> None:
    ctx = tls_context(pki)
    for garbage in (
        b"\x00\x01\x02\x03 nonsense \xff\xfe\r\n\r\n",
        b"GET /v1/status HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    ):
        answer = await exchange(*host_port(appliance.url), garbage, ctx)
        assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer
    # Not even TLS: the handshake fails, the connection is dropped.
    assert not (
        await exchange(*host_port(appliance.url), b"GET /healthz HTTP/1.1\r\n\r\n", None)
    ).startswith(b"HTTP/1.1 200")
    assert await client.healthz()
    assert (await client.status()).vpgs == {}
    assert appliance.alive()


async def test_plain_http_when_asked(plain_appliance: ApplianceProcess) -> None:
    assert plain_appliance.url.startswith("http://127.0.0.1:")
    async with ControlClient(plain_appliance.url, token=TOKEN) as client:
        assert (await client.status()).control == plain_appliance.url
    async with ControlClient(plain_appliance.url, token=WRONG) as wrong:
        with pytest.raises(UnauthorizedError):
            await wrong.status()
