"""Mutual TLS between appliances: contexts from PEM files (certificate, key, and the CA to trust).

Both sides present a certificate signed by the site CA and verify the peer's against it; TLS 1.3
only. The receiver requires a client certificate. The sender checks the receiver's name (DNS name
or IP address in its subjectAltName) unless told not to, e.g. when appliances are reached through
addresses their certificates do not list.

The receiver also checks who a sender is: the source a HELLO claims (the protected appliance's
`name`) must be named by the sender's certificate, as a DNS name of its subjectAltName or as its
common name (:func:`identity_refusal`). Without that, any appliance of the site could feed a
journal in another appliance's name. Names compare case-insensitively; wildcards are not honoured
(a wildcard certificate would speak for every appliance).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

__all__ = ["certificate_names", "client_context", "identity_refusal", "server_context"]


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


def certificate_names(cert: dict[str, Any]) -> list[str]:
    """The names a peer certificate (as :meth:`ssl.SSLSocket.getpeercert` decodes it) speaks
    for: the DNS names of its subjectAltName, then its common names."""
    dns = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    cns = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return [*dns, *cns]


def identity_refusal(source: str, cert: dict[str, Any] | None) -> str | None:
    """Why a sender whose certificate is ``cert`` may not speak for ``source``, or None if its
    certificate names ``source``."""
    names = certificate_names(cert or {})
    if source.casefold() in (n.casefold() for n in names):
        return None
    return f"the sender's certificate names {names or 'nothing'}, not source {source!r}"
