"""A small certificate authority for pvpn nodes, so nobody needs openssl incantations.

``create_ca`` makes a CA (``ca.crt``, ``ca.key``); ``issue_certificate`` makes a node
certificate signed by it with the node's IP addresses and DNS names as subjectAltNames (what
:class:`pvpn.tls.TlsSession` checks, RFC 6125 — the commonName is never used for matching);
``self_signed`` makes a certificate with no CA, for pinning and for "unknown CA" tests.

All keys are EC P-256 (secp256r1): fast to generate and to sign with, small on the wire, and
supported by every TLS 1.2/1.3 implementation. Private keys are PEM PKCS#8, mode 0600, created
atomically; existing files are never overwritten.

These functions read the clock (for validity periods) and write files; they are tools for
setting up a deployment or a test, never called on the packet path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pvpn.auth import write_new_file
from pvpn.errors import ConfigError

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "CertificateInfo",
    "create_ca",
    "describe_certificate",
    "issue_certificate",
    "self_signed",
]

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"

# A file-name-safe node name: it becomes <name>.crt / <name>.key, so no "/" and no leading dot.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# An RFC 1123 host name (labels of letters, digits and inner hyphens).
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# Backdating not_before covers small clock differences between the CA host and the nodes.
_BACKDATE = timedelta(minutes=5)

_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertificateInfo(TypedDict):
    """What :func:`describe_certificate` returns."""

    subject: str  # RFC 4514, e.g. "CN=server"
    issuer: str
    sans: list[str]  # "DNS:server.example", "IP:10.77.1.2"
    not_before: str  # ISO 8601, UTC
    not_after: str
    sha256: str  # colon-separated upper-case hex of SHA-256(DER), as `openssl x509 -fingerprint`
    is_ca: bool


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: _SigningKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _check_file_name(name: str) -> None:
    if not _FILE_NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} can't be used as a certificate name: use letters, digits, '.', '_' and "
            f"'-' (it becomes the file name {name}.crt)"
        )


def _refuse_existing(*paths: Path) -> None:
    # Checked before anything is written so a refusal leaves no half-made key pair behind.
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"refusing to overwrite the existing file {path}: move it away first")


def _prepare_dir(directory: Path, mode: int) -> None:
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create directory {directory}: {exc.strerror}") from exc


def _validity(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    now = datetime.now(timezone.utc)
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else now + timedelta(days=days)
    if start.tzinfo is None or end.tzinfo is None:
        raise ConfigError("not_before and not_after must be timezone-aware datetimes")
    if end <= start:
        raise ConfigError(f"the validity period is empty: not_after {end} <= not_before {start}")
    return start, end


def _subject_alt_names(
    name: str, ips: Sequence[str], dns_names: Sequence[str]
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()

    def add_dns(value: str) -> None:
        lowered = value.lower()
        if lowered not in seen:
            seen.add(lowered)
            names.append(x509.DNSName(lowered))

    def add_ip(value: str) -> None:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ConfigError(f"{value!r} is not an IP address (in ips)") from None
        key = f"ip:{address}"
        if key not in seen:
            seen.add(key)
            names.append(x509.IPAddress(address))

    try:
        ipaddress.ip_address(name)
    except ValueError:
        if _HOSTNAME.fullmatch(name):
            add_dns(name)
    else:
        add_ip(name)
    for dns_name in dns_names:
        if not _HOSTNAME.fullmatch(dns_name):
            raise ConfigError(f"{dns_name!r} is not a valid DNS name (in dns_names)")
        add_dns(dns_name)
    for ip in ips:
        add_ip(ip)
    return names


def _leaf_builder(
    name: str,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer_key: _SigningKey,
    sans: list[x509.GeneralName],
    start: datetime,
    end: datetime,
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Nodes are TLS servers towards the previous hop and clients towards the next one.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder


def _write_pair(cert: x509.Certificate, key: _SigningKey, cert_path: Path, key_path: Path) -> None:
    write_new_file(key_path, _key_pem(key), 0o600)
    write_new_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def create_ca(directory: Path, name: str = "pvpn CA", days: int = 3650) -> tuple[Path, Path]:
    """Create ``ca.crt`` and ``ca.key`` (0600) in *directory* (made 0700 if new).

    The CA may sign only end-entity certificates (pathLenConstraint 0).
    """
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    _prepare_dir(directory, 0o700)
    _refuse_existing(cert_path, key_path)
    start, end = _validity(days, None, None)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert, key, cert_path, key_path)
    return cert_path, key_path


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, _SigningKey]:
    cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
    try:
        cert_data = cert_path.read_bytes()
        key_data = key_path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no CA in {ca_dir} ({exc.filename} is missing): create one with pvpn.pki.create_ca"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the CA in {ca_dir}: {exc.strerror}") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError:
        raise ConfigError(f"{cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{key_path} is neither an EC nor an RSA key")
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def issue_certificate(
    ca_dir: Path,
    name: str,
    out_dir: Path,
    *,
    ips: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue ``<name>.crt`` and ``<name>.key`` (0600) in *out_dir*, signed by the CA in *ca_dir*.

    subjectAltNames are *ips* and *dns_names*, plus *name* itself when it looks like a host
    name (or is an IP literal). *not_before* / *not_after* override the default validity
    (now - 5 minutes .. now + *days*) so tests can make expired or future certificates.
    """
    _check_file_name(name)
    ca_cert, ca_key = _load_ca(ca_dir)
    return _issue_leaf(name, out_dir, ips, dns_names, days, not_before, not_after,
                       (ca_cert.subject, ca_key))


def self_signed(
    name: str,
    out_dir: Path,
    ips: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    *,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """A certificate signed by its own key: ``<name>.crt``, ``<name>.key`` (0600).

    Use it with a pinned certificate, or to test that a CA-checking client refuses it.
    """
    _check_file_name(name)
    return _issue_leaf(name, out_dir, ips, dns_names, days, not_before, not_after, None)


def _issue_leaf(
    name: str,
    out_dir: Path,
    ips: Sequence[str],
    dns_names: Sequence[str],
    days: int,
    not_before: datetime | None,
    not_after: datetime | None,
    issuer: tuple[x509.Name, _SigningKey] | None,
) -> tuple[Path, Path]:
    """Write a new key and its certificate for *name*, signed by ``issuer`` (its name and
    key), or by the new key itself when None."""
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    sans = _subject_alt_names(name, ips, dns_names)
    start, end = _validity(days, not_before, not_after)
    _prepare_dir(out_dir, 0o755)
    _refuse_existing(cert_path, key_path)
    key = _new_key()
    issuer_name, issuer_key = issuer or (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key)
    cert = _leaf_builder(name, issuer_name, key.public_key(), issuer_key, sans, start, end).sign(
        issuer_key, hashes.SHA256()
    )
    _write_pair(cert, key, cert_path, key_path)
    return cert_path, key_path


def describe_certificate(path: Path) -> CertificateInfo:
    """Subject, issuer, SANs, validity and SHA-256 fingerprint of the first certificate in *path*."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no certificate at {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None
    sans: list[str] = []
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass  # a certificate without subjectAltNames simply has none to list
    else:
        sans.extend(f"DNS:{value}" for value in extension.value.get_values_for_type(x509.DNSName))
        sans.extend(f"IP:{value}" for value in extension.value.get_values_for_type(x509.IPAddress))
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=sans,
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        is_ca=is_ca,
    )
