"""The listen section's control API fields: what a config must say to serve the API."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from secondsite.appliance.config import ListenSpec

NBD = {"nbdUnix": "/run/ss/nbd.sock"}
TLS = {"certFile": "/etc/ss/tls.crt", "keyFile": "/etc/ss/tls.key"}


def listen(**kw: Any) -> ListenSpec:
    return ListenSpec.model_validate({**NBD, **kw})


def test_https_with_token() -> None:
    spec = listen(control="0.0.0.0:8443", tls=TLS, tokenFile="/etc/ss/token")
    assert spec.control_address() == ("0.0.0.0", 8443)
    assert spec.tls is not None and spec.tls.client_ca_file is None


def test_mutual_tls_and_ipv6() -> None:
    spec = listen(control="[::1]:0", tls={**TLS, "clientCaFile": "/etc/ss/ca.crt"}, tokenFile="/t")
    assert spec.control_address() == ("::1", 0)
    assert spec.tls is not None and str(spec.tls.client_ca_file) == "/etc/ss/ca.crt"


def test_plain_http_only_when_asked() -> None:
    assert listen(control="127.0.0.1:0", tokenFile="/t", controlPlainHttp=True).tls is None
    with pytest.raises(ValidationError, match="controlPlainHttp: true"):
        listen(control="127.0.0.1:0", tokenFile="/t")
    with pytest.raises(ValidationError, match="not both"):
        listen(control="127.0.0.1:0", tokenFile="/t", tls=TLS, controlPlainHttp=True)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"control": "127.0.0.1:8443", "tls": TLS}, "tokenFile"),
        ({"control": "8443", "tls": TLS, "tokenFile": "/t"}, "host:port"),
        ({"control": "host:99999", "tls": TLS, "tokenFile": "/t"}, "host:port"),
        ({"tls": TLS}, "need `control`"),
        ({"tokenFile": "/t"}, "need `control`"),
    ],
)
def test_refused(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        listen(**fields)


def test_no_control_api_is_fine() -> None:
    assert listen().control_address() is None
