"""The test suites' PKI: CAs and certificates as PEM files in one directory, `<stem>.crt` and
`<stem>.key` each, made with the dev cluster's certificate builder
(:func:`secondsite.devcluster.pki.issue`), valid for a day."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from secondsite.devcluster.pki import Issuer, issue, name, write_cert, write_key

__all__ = ["BOTH", "CLIENT", "SERVER", "CertFiles", "Pki"]

SERVER = (ExtendedKeyUsageOID.SERVER_AUTH,)
CLIENT = (ExtendedKeyUsageOID.CLIENT_AUTH,)
BOTH = SERVER + CLIENT
"""An appliance's stream certificate serves senders and connects to recovery appliances."""
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    """A certificate, its key, and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class Pki:
    dir: Path
    _cas: dict[str, Issuer] = field(default_factory=dict, repr=False)

    def crt(self, stem: str) -> Path:
        return self.dir / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.dir / f"{stem}.key"

    def pair(self, stem: str) -> tuple[Path, Path]:
        return self.crt(stem), self.key(stem)

    def ca(self, stem: str) -> Path:
        """A new self-signed CA named ``stem``; returns its certificate file."""
        ca = issue(name(stem), validity=_DAY)
        self._cas[stem] = ca
        self._write(stem, ca)
        return self.crt(stem)

    def cert(
        self,
        stem: str,
        ca: str,
        *,
        cn: str | None = None,
        sans: Sequence[str] = ("localhost", "127.0.0.1"),
        usages: Sequence[x509.ObjectIdentifier] = BOTH,
    ) -> CertFiles:
        """A certificate for common name ``cn`` (default ``stem``) signed by the CA ``ca``."""
        pair = issue(name(cn or stem), self._cas[ca], sans=sans, usages=usages, validity=_DAY)
        self._write(stem, pair)
        return CertFiles(self.crt(stem), self.key(stem), self.crt(ca))

    def _write(self, stem: str, pair: Issuer) -> None:
        write_cert(self.crt(stem), pair[0])
        write_key(self.key(stem), pair[1])
