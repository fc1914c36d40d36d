"""Test PKI for mutual TLS (on tests/pki.py): a site CA with a receiver and a sender certificate,
and a second, unrelated CA with a sender certificate of its own (which the receiver must refuse).
A sender's certificate names the source it speaks for (the receiver checks that)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pki import CLIENT, SERVER, CertFiles
from pki import Pki as Files

__all__ = ["CertFiles", "Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    receiver: CertFiles
    sender: CertFiles
    foreign_sender: CertFiles
    """Signed by another CA."""


def make_pki(directory: Path, sender: str = "node-1") -> Pki:
    """``sender``: the source the sender's certificate names."""
    files = Files(directory)
    files.ca("site-ca")
    files.ca("other-ca")
    return Pki(
        receiver=files.cert("recovery-appliance", "site-ca", usages=SERVER),
        sender=files.cert(sender, "site-ca", usages=CLIENT),
        foreign_sender=files.cert("intruder", "other-ca", usages=CLIENT),
    )
