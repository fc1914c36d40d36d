"""Mutual TLS between appliances: contexts from PEM files (certificate, key, and the CA to trust).

Both sides present a certificate signed by the site CA and verify the peer's against it; TLS 1.3
only. The receiver requires a client certificate. The sender checks the receiver's name (DNS name
or IP address in its subjectAltName) unless told not to, e.g. when appliances are reached through
addresses their certificates do not list.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_context", "server_context"]


def _context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The receiver's context: its certificate, and client certificates required from ``ca``."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(
    cert: Path, key: Path, ca: Path, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """The sender's context: its client certificate, and the receiver verified against ``ca``."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    ctx.check_hostname = check_hostname
    return ctx
