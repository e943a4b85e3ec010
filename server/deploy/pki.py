"""The deployment's keys and certificates: a CA, the SuperLink's TLS certificate, merchants'
node keys (ECDSA P-384, OpenSSH encoding, as Flower's SuperNode authentication expects)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class DeployError(ValueError):
    """The deployment cannot be set up as asked; the message says what to change."""


# --------------------------------------------------------------------------- crypto
def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _private_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_secret(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def make_ca(common_name: str, *, days: int = 3650) -> tuple[Any, Any]:
    """A self-signed CA: (private key, certificate). ECDSA P-384, may sign end-entity certs only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshop"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - datetime.timedelta(minutes=5)  # tolerate small clock skew between machines
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_certificate(ca_key: Any, ca_cert: Any, *, names: Sequence[str], addresses: Sequence[str],
                            days: int = 825) -> tuple[Any, Any]:
    """The SuperLink's TLS certificate, signed by the CA; SANs = names + addresses (+ loopback)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    # The SuperLink starts its ServerApp processes against its own Runtime API on loopback,
    # over the same TLS certificate: loopback must be a valid name for it.
    dns = list(dict.fromkeys([*names, "localhost"]))
    ips = list(dict.fromkeys([*addresses, "127.0.0.1", "::1"]))
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    start = _now() - datetime.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshop"),
                         x509.NameAttribute(NameOID.COMMON_NAME, (names or addresses)[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_key() -> tuple[bytes, bytes]:
    """A SuperNode's authentication key pair: (OpenSSH private key, OpenSSH public key), P-384."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def check_public_key(path: Path) -> bytes:
    """A merchant-supplied public key, checked to be an OpenSSH NIST-curve EC key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    raw = Path(path).expanduser().read_bytes()
    try:
        key = serialization.load_ssh_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise DeployError(f"--public-key {path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                 "secp521r1"):
        raise DeployError(f"--public-key {path}: must be an ECDSA key on a NIST curve (e.g. ssh-keygen -t ecdsa "
                          "-b 384), as Flower's SuperNode authentication expects")
    return raw if raw.endswith(b"\n") else raw + b"\n"


