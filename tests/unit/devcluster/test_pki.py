"""The generated certificates chain to the CA and carry what the API server checks."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secondsite.devcluster import pki


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_pki_chain_sans_and_identities(tmp_path: Path) -> None:
    keys = pki.ensure_pki(tmp_path / "pki")
    ca = _cert(keys.ca_cert)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    serving = _cert(keys.serving_cert)
    serving.verify_directly_issued_by(ca)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    admin = _cert(keys.client_cert(pki.ADMIN))
    admin.verify_directly_issued_by(ca)
    orgs = [a.value for a in admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert orgs == ["system:masters"]
    eku = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert oct(keys.ca_key.stat().st_mode & 0o777) == "0o600"


def test_pki_is_reused(tmp_path: Path) -> None:
    first = pki.ensure_pki(tmp_path)
    before = first.ca_cert.read_bytes()
    second = pki.ensure_pki(tmp_path)
    assert second.ca_cert.read_bytes() == before
