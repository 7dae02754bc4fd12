"""Key material for a real deployment: the SuperLink's TLS certificate and SuperNode auth keys.

Framework-free (only ``cryptography``), so the operator can make the files on any machine
before Flower is started. Every private key is created 0600 in one step, never written
world-readable first, and nothing is overwritten: reissuing keys is a deliberate act.

* TLS: a private CA signs the SuperLink's certificate. The CA certificate (``ca.crt``) is
  what every site passes as ``--root-certificates``; the CA key stays with the operator.
  The certificate names ``localhost`` and ``127.0.0.1`` plus every host name or IP the
  sites will dial, because TLS checks the address a SuperNode connects to against them.
* SuperNode authentication: one ECDSA P-384 key pair per site. The private key is in
  OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` loads), the public
  key in OpenSSH's one-line format (what ``flwr supernode register`` accepts).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_SANS",
    "CertificateConfig",
    "NodeKey",
    "TLSFiles",
    "make_certificates",
    "make_node_keys",
    "parse_san",
    "write_private",
]

DEFAULT_SANS = ("localhost", "127.0.0.1")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "superlink.crt", "superlink.key"


@dataclass(frozen=True)
class CertificateConfig:
    """What the SuperLink certificate vouches for and for how long."""

    sans: tuple[str, ...] = ()  # extra DNS names or IP addresses, beside DEFAULT_SANS
    days: int = 365
    ca_days: int = 3650
    common_name: str = "fedmerge SuperLink"

    def __post_init__(self) -> None:
        if self.days < 1 or self.ca_days < self.days:
            raise ValueError(f"validity must be at least 1 day and within the CA's ({self.days} vs {self.ca_days})")
        for san in self.sans:
            parse_san(san)  # fail before any file is written

    def all_sans(self) -> list[str]:
        """Defaults first, then the user's names, without duplicates."""
        return list(dict.fromkeys([*DEFAULT_SANS, *self.sans]))


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    """One site's authentication key pair."""

    name: str
    private_key: Path
    public_key: Path


def parse_san(value: str) -> x509.GeneralName:
    """An IP address becomes an IP SAN (TLS compares IPs only against those), anything else a DNS SAN."""
    value = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if not value or any(not label or len(label) > 63 for label in labels) or " " in value or "/" in value:
        raise ValueError(f"{value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically; refuse to replace an existing key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode is filtered by the umask; be explicit


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing key material: {', '.join(existing)}")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmerge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int, now: dt.datetime) -> x509.Certificate:
    name = _name("fedmerge deployment CA")
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # keyCertSign, cRLSign
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    config: CertificateConfig,
    now: dt.datetime,
) -> x509.Certificate:
    usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)  # signature, key encipherment
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(config.common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=config.days))
        .add_extension(x509.SubjectAlternativeName([parse_san(s) for s in config.all_sans()]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def make_certificates(out: Path, config: CertificateConfig | None = None) -> TLSFiles:
    """A fresh CA and a SuperLink certificate it signed, written under ``out``."""
    config = config or CertificateConfig()
    out.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    _refuse_existing([files.ca_cert, files.ca_key, files.cert, files.key])
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = _ca_certificate(ca_key, config.ca_days, now)
    cert = _server_certificate(key, ca, ca_key, config, now)
    write_private(files.ca_key, _pem_key(ca_key))
    write_private(files.key, _pem_key(key))
    _write_public(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_node_keys(out: Path, names: Sequence[str]) -> list[NodeKey]:
    """One ECDSA P-384 key pair per name: ``<name>.key`` (OpenSSH, 0600) and ``<name>.pub``."""
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"key names must be distinct and at least one: {list(names)}")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", name):
            raise ValueError(f"key name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)")
    out.mkdir(parents=True, exist_ok=True)
    keys = [NodeKey(n, out / f"{n}.key", out / f"{n}.pub") for n in names]
    _refuse_existing([p for k in keys for p in (k.private_key, k.public_key)])
    for node in keys:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write_private(node.private_key, private)
        _write_public(node.public_key, public + f" {node.name}\n".encode())
    return keys
