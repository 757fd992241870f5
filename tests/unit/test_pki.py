"""The small CA: files, modes, extensions, SANs, validity and refusals."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pvpn import pki
from pvpn.errors import ConfigError


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        ext.get_values_for_type(x509.DNSName),
        [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)],
    )


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.create_ca(tmp_path / "ca")
    return tmp_path / "ca"


def test_create_ca_files_and_modes(tmp_path: Path) -> None:
    cert_path, key_path = pki.create_ca(tmp_path / "new" / "ca", name="Test CA", days=30)
    assert cert_path.name == "ca.crt" and key_path.name == "ca.key"
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    assert mode(tmp_path / "new" / "ca") == 0o700
    cert = load(cert_path)
    assert cert.subject.rfc4514_string() == "CN=Test CA"
    assert cert.issuer == cert.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=10)
    cert.verify_directly_issued_by(cert)


def test_create_ca_refuses_to_overwrite(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        pki.create_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == before


def test_issue_certificate(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue_certificate(
        ca_dir,
        "server",
        tmp_path / "out",
        ips=["10.77.1.2", "fd77:0:0:1::2"],
        dns_names=["vpn.example.org"],
    )
    assert (cert_path.name, key_path.name) == ("server.crt", "server.key")
    assert mode(key_path) == 0o600
    cert = load(cert_path)
    cert.verify_directly_issued_by(load(ca_dir / "ca.crt"))
    assert cert.subject.rfc4514_string() == "CN=server"
    dns, ips = sans(cert)
    assert dns == ["server", "vpn.example.org"]
    assert ips == ["10.77.1.2", "fd77:0:0:1::2"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usages
    # EC P-256 keys.
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.public_key() == key.public_key()


def test_issue_name_as_san_only_if_it_looks_like_a_host(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, _ = pki.issue_certificate(ca_dir, "node_1", tmp_path, ips=["10.0.0.1"])
    assert sans(load(cert_path)) == ([], ["10.0.0.1"])
    cert_path, _ = pki.issue_certificate(ca_dir, "10.0.0.9", tmp_path)
    assert sans(load(cert_path)) == ([], ["10.0.0.9"])
    cert_path, _ = pki.issue_certificate(ca_dir, "gw1.example", tmp_path, dns_names=["GW1.example"])
    assert sans(load(cert_path)) == (["gw1.example"], [])  # deduplicated, lower case


def test_issue_validity_overrides(ca_dir: Path, tmp_path: Path) -> None:
    start = datetime(2020, 1, 1, tzinfo=timezone.utc)
    end = datetime(2020, 6, 1, tzinfo=timezone.utc)
    cert_path, _ = pki.issue_certificate(ca_dir, "old", tmp_path, not_before=start, not_after=end)
    cert = load(cert_path)
    assert cert.not_valid_before_utc == start and cert.not_valid_after_utc == end

    cert_path, _ = pki.issue_certificate(ca_dir, "short", tmp_path, days=1)
    cert = load(cert_path)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=1, minutes=10)


def test_issue_refusals(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CA in"):
        pki.issue_certificate(tmp_path / "no-ca", "server", tmp_path)
    for bad_name in ("../x", "a/b", "", ".hidden", "with space"):
        with pytest.raises(ConfigError, match="can't be used as a certificate name"):
            pki.issue_certificate(ca_dir, bad_name, tmp_path)
    with pytest.raises(ConfigError, match="not an IP address"):
        pki.issue_certificate(ca_dir, "server", tmp_path, ips=["10.0.0.256"])
    with pytest.raises(ConfigError, match="not a valid DNS name"):
        pki.issue_certificate(ca_dir, "server", tmp_path, dns_names=["bad name"])
    with pytest.raises(ConfigError, match="validity period is empty"):
        pki.issue_certificate(
            ca_dir, "server", tmp_path, not_before=datetime(2030, 1, 1, tzinfo=timezone.utc),
            not_after=datetime(2029, 1, 1, tzinfo=timezone.utc),
        )
    with pytest.raises(ConfigError, match="timezone-aware"):
        pki.issue_certificate(ca_dir, "server", tmp_path, not_before=datetime(2030, 1, 1))
    assert not (tmp_path / "server.crt").exists() and not (tmp_path / "server.key").exists()

    pki.issue_certificate(ca_dir, "server", tmp_path)
    before = (tmp_path / "server.key").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        pki.issue_certificate(ca_dir, "server", tmp_path)
    assert (tmp_path / "server.key").read_bytes() == before


def test_issue_refuses_a_half_existing_pair(ca_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("an old certificate\n")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        pki.issue_certificate(ca_dir, "server", tmp_path)
    assert not (tmp_path / "server.key").exists()


def test_issue_detects_mismatched_ca_key(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "a")
    pki.create_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").unlink()
    (tmp_path / "b" / "ca.key").rename(tmp_path / "a" / "ca.key")
    with pytest.raises(ConfigError, match="is not the key of"):
        pki.issue_certificate(tmp_path / "a", "server", tmp_path)


def test_self_signed(tmp_path: Path) -> None:
    cert_path, key_path = pki.self_signed("lonely", tmp_path, ["192.0.2.1"], ["lonely.example"])
    cert = load(cert_path)
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert sans(cert) == (["lonely", "lonely.example"], ["192.0.2.1"])
    assert mode(key_path) == 0o600


def test_describe_certificate(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, _ = pki.issue_certificate(ca_dir, "gw1", tmp_path, ips=["10.77.1.1"])
    info = pki.describe_certificate(cert_path)
    cert = load(cert_path)
    assert info["subject"] == "CN=gw1"
    assert info["issuer"] == "CN=pvpn CA"
    assert info["sans"] == ["DNS:gw1", "IP:10.77.1.1"]
    assert datetime.fromisoformat(info["not_before"]) == cert.not_valid_before_utc
    assert datetime.fromisoformat(info["not_after"]) == cert.not_valid_after_utc
    der = cert.public_bytes(serialization.Encoding.DER)
    assert info["sha256"].replace(":", "") == hashlib.sha256(der).hexdigest().upper()
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", info["sha256"])
    assert info["is_ca"] is False
    assert pki.describe_certificate(ca_dir / "ca.crt")["is_ca"] is True


def test_describe_certificate_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no certificate at"):
        pki.describe_certificate(tmp_path / "missing.crt")
    junk = tmp_path / "junk.crt"
    junk.write_text("junk")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        pki.describe_certificate(junk)


def test_ip_sans_are_real_addresses(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, _ = pki.issue_certificate(ca_dir, "v6", tmp_path, ips=["FD77:0:0:1:0:0:0:2"])
    ext = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ext.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("fd77:0:0:1::2")]
