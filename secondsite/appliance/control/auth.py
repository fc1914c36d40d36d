"""Who may use the control API: a bearer token from a file, and TLS (optionally mutual).

The token file is read at start (the server refuses to start without a usable token) and re-read
when it changes, at most once a second, so a rotated Kubernetes Secret takes effect without a
restart. Tokens are compared in constant time and never logged.

With a client CA the TLS context asks every client for a certificate but does not insist during
the handshake: a certificate the CA did not sign fails the handshake, while a client without one
gets through to `/healthz` and `/metrics` (kubelet probes and Prometheus present none) and is
turned away from `/v1` by the server.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import time
from pathlib import Path

from secondsite.appliance.config import ControlTlsSpec

__all__ = ["TokenFile", "TokenFileError", "server_ssl_context"]

log = logging.getLogger("secondsite.appliance.control")

_RECHECK_SECONDS = 1.0


class TokenFileError(RuntimeError):
    """The token file is missing, unreadable or empty."""


class TokenFile:
    """The bearer token the API expects, kept in step with its file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._token = self._read()

    def _read(self) -> bytes:
        try:
            st = os.stat(self.path)
            token = self.path.read_bytes().strip()
        except OSError as e:
            raise TokenFileError(f"cannot read token file {self.path}: {e.strerror}") from e
        if not token:
            raise TokenFileError(f"token file {self.path} is empty")
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return token

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < _RECHECK_SECONDS:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as e:
            log.warning("event=token-file-unreadable path=%s error=%s", self.path, e.strerror)
            return
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
            return
        try:
            self._token = self._read()
        except TokenFileError as e:
            log.warning("event=token-file-unreadable keeping=previous error=%r", str(e))
            return
        log.info("event=token-reloaded path=%s", self.path)

    def check(self, presented: str) -> bool:
        """Whether ``presented`` is the current token (constant-time comparison)."""
        self._refresh()
        return hmac.compare_digest(presented.encode(), self._token)


def server_ssl_context(tls: ControlTlsSpec) -> ssl.SSLContext:
    """TLS 1.2+ with the appliance's certificate; with a client CA, clients are asked for theirs."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
