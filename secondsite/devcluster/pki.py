"""Certificates and keys for a dev cluster: one CA, the API server's serving certificate, client
certificates for the admin and the controllers, and the service-account signing key.

Everything is generated with `cryptography` into the cluster's state directory on first start and
reused afterwards. Keys are ECDSA P-256 (fast to make, accepted everywhere in Kubernetes).
:func:`issue` makes every certificate here, and those of the test suites' PKI (tests/pki.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=3650)


@dataclasses.dataclass(frozen=True)
class ClientIdentity:
    """A client certificate's subject: the user name and its groups (organisations)."""

    file_stem: str
    user: str
    groups: tuple[str, ...] = ()


ADMIN = ClientIdentity("admin", "secondsite-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("scheduler", "system:kube-scheduler")
APISERVER_KUBELET = ClientIdentity("apiserver-kubelet-client", "kube-apiserver-kubelet-client")
CLIENTS = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, APISERVER_KUBELET)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    """``key`` as unencrypted PKCS#8 PEM, readable by its owner only."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    """A subject: common name ``cn`` and organisations ``orgs`` (Kubernetes reads them as the
    user name and its groups)."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
"""A CA: its certificate and key."""


def issue(
    subject: x509.Name,
    issuer: Issuer | None = None,
    *,
    sans: Sequence[str] = (),
    usages: Sequence[x509.ObjectIdentifier] = (),
    validity: datetime.timedelta = _VALIDITY,
) -> Issuer:
    """A new key and its certificate: a self-signed CA without ``issuer``, else a leaf signed by
    it, with the subjectAltNames ``sans`` (IP addresses or DNS names) and the extended key
    ``usages``. Valid from five minutes ago (clock skew) for ``validity``."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    signer = key if issuer is None else issuer[1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in sans]), critical=False
        )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


@dataclasses.dataclass(frozen=True)
class Pki:
    """Paths of the generated material in one directory."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def client_cert(self, who: ClientIdentity) -> Path:
        return self.dir / f"{who.file_stem}.crt"

    def client_key(self, who: ClientIdentity) -> Path:
        return self.dir / f"{who.file_stem}.key"

    def exists(self) -> bool:
        files = [self.ca_cert, self.ca_key, self.serving_cert, self.serving_key]
        files += [self.sa_key, self.sa_pub]
        files += [self.client_cert(c) for c in CLIENTS] + [self.client_key(c) for c in CLIENTS]
        return all(f.exists() for f in files)


def ensure_pki(directory: Path) -> Pki:
    """Create the CA, serving, client and service-account material unless already there."""
    pki = Pki(directory)
    if pki.exists():
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    ca = issue(name("secondsite-devcluster-ca"))
    _write(pki.ca_cert, pki.ca_key, ca)
    sans = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    sans += ["kubernetes.default.svc.cluster.local", "127.0.0.1"]
    serving = issue(name("kube-apiserver"), ca, sans=sans, usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    _write(pki.serving_cert, pki.serving_key, serving)
    for who in CLIENTS:
        client = issue(name(who.user, who.groups), ca, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        _write(pki.client_cert(who), pki.client_key(who), client)

    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key(pki.sa_key, sa)
    pki.sa_pub.write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def _write(cert_path: Path, key_path: Path, pair: Issuer) -> None:
    write_cert(cert_path, pair[0])
    write_key(key_path, pair[1])
