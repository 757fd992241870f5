"""TLS on pyOpenSSL memory BIOs: no sockets, nestable.

A :class:`TlsSession` is a TLS connection with no transport of its own (as in mitmproxy's
``proxy/layers/tls.py``): ciphertext goes in through :meth:`TlsSession.receive_data` and comes
out of :meth:`TlsSession.data_to_send`; plaintext goes in through :meth:`TlsSession.send` and
comes out of :meth:`TlsSession.read`. Because the ciphertext is just bytes, one session's
ciphertext can be the application data of another session: the client's session with the
server runs inside its session with gateway 1, which runs over TCP. That is the gateway chain.

Certificate checks happen in the client's verify callback during the handshake, so a refused
certificate aborts the handshake with an alert to the server, and again after the handshake
as a belt-and-braces check. Failures raise :class:`pvpn.errors.CertificateError` with the
cause in plain words; every other TLS failure raises :class:`pvpn.errors.TlsError` with
OpenSSL's reason. No other exception escapes for anything the peer sends.
"""

from __future__ import annotations

import ipaddress
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import SSL, crypto
from service_identity import CertificateError as IdentityCertificateError
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from service_identity.hazmat import DNS_ID

from pvpn.errors import CertificateError, ConfigError, LocalProtocolError, TlsError

__all__ = [
    "AUTH_EXPORTER_LABEL",
    "BINDING_SIZE",
    "TlsSession",
    "make_client_context",
    "make_server_context",
]

# RFC 5705 exporter label (RFC 8446 §7.5 for TLS 1.3). Labels not registered with IANA should
# begin with "EXPERIMENTAL"; this one is private to pvpn and never meets another protocol's.
AUTH_EXPORTER_LABEL = b"EXPORTER-pvpn-user-auth"
BINDING_SIZE = 32

# recv() and bio_read() are asked for this much at a time. Big enough that a batch of packets
# (or a whole 16 KiB TLS record plus its neighbours) comes out in one call, so the common case
# is one call and no join.
_CHUNK = 256 * 1024
# Application data queued before the handshake completes. Overflow is the caller's bug (it
# should wait for handshake_complete), not memory growth.
_MAX_PENDING = 4 * 1024 * 1024

# Forward-secret AEAD suites only for TLS 1.2; TLS 1.3 suites are all AEAD + (EC)DHE.
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

_ServerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_Codes = SSL.X509VerificationCodes
_UNKNOWN_ISSUER = frozenset(
    {
        _Codes.ERR_UNABLE_TO_GET_ISSUER_CERT,
        _Codes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        _Codes.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
        _Codes.ERR_CERT_UNTRUSTED,
    }
)
_TIME_ERRORS = frozenset({_Codes.ERR_CERT_HAS_EXPIRED, _Codes.ERR_CERT_NOT_YET_VALID})
_PLAIN_REASONS: dict[int, str] = {
    _Codes.ERR_CERT_SIGNATURE_FAILURE: "certificate signature is invalid",
    _Codes.ERR_CERT_REVOKED: "certificate has been revoked",
    _Codes.ERR_INVALID_CA: "an issuer in the chain is not a CA certificate",
    _Codes.ERR_PATH_LENGTH_EXCEEDED: "certificate chain is longer than the CA allows",
    _Codes.ERR_INVALID_PURPOSE: "certificate is not for TLS servers (extendedKeyUsage)",
    _Codes.ERR_CERT_CHAIN_TOO_LONG: "certificate chain is too long",
    _Codes.ERR_KEYUSAGE_NO_CERTSIGN: "issuer certificate may not sign certificates",
    _Codes.ERR_UNHANDLED_CRITICAL_EXTENSION: "certificate has an unknown critical extension",
}


@dataclass(frozen=True)
class _Pin:
    """An exact leaf certificate to accept: SHA-256 of its DER encoding."""

    file: str
    sha256: bytes


@dataclass(frozen=True)
class _ClientPolicy:
    """How a client context checks servers; stored as the context's app data."""

    ca_file: str | None
    pin: _Pin | None


def _read_file(path: str, role: str) -> bytes:
    """The bytes of *path*, or ConfigError saying which file and what to do."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"the {role} file {path} does not exist: check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {role} file {path}: {exc.strerror}") from exc


#: The most a PEM of trust anchors handed over by a user's process may be (a bundle of a few
#: dozen certificates; pvpn's own CA or pin is about 2 KB).
MAX_PEM = 48 * 1024


def _read_pem_certificates(path: str, role: str, data: bytes | None = None
                           ) -> list[x509.Certificate]:
    """Read *path* (or *data*, the contents a user's process read from it: then *path* only
    names it) as PEM certificates, or ConfigError saying which file and what to do."""
    if data is None:
        data = _read_file(path, role)
    elif len(data) > MAX_PEM:
        raise ConfigError(f"the {role} {path} is {len(data)} bytes; at most {MAX_PEM}")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"the {role} file {path} is not a PEM certificate "
            f"(expected '-----BEGIN CERTIFICATE-----')"
        ) from None
    return certificates


def _read_private_key(path: str) -> _ServerKey:
    data = _read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"the private key {path} is encrypted: give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"the private key file {path} is not a PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ConfigError(f"the private key {path} is not an EC, RSA or Ed25519 key")
    return key


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _load_pin(path: str, data: bytes | None = None) -> _Pin:
    # The first certificate of the file is the leaf; a pinned file may carry its chain too.
    leaf = _read_pem_certificates(path, "pinned certificate", data)[0]
    return _Pin(file=path, sha256=leaf.fingerprint(hashes.SHA256()))


def _openssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's reason strings from an SSL.Error (its args hold (lib, func, reason) tuples)."""
    if isinstance(exc, SSL.SysCallError):
        return str(exc.args[1]) if len(exc.args) > 1 else "system call failed"
    reasons: list[str] = []
    if exc.args and isinstance(exc.args[0], list):
        for entry in exc.args[0]:
            if isinstance(entry, tuple) and entry and entry[-1]:
                reasons.append(str(entry[-1]))
    return "; ".join(reasons) if reasons else (str(exc) or type(exc).__name__)


def _base_context() -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    # TLS 1.2 is the floor (RFC 8996 deprecates 1.0/1.1); OpenSSL prefers 1.3 when both ends
    # offer it, and the maximum is left at the library's highest.
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    context.set_cipher_list(_TLS12_CIPHERS)
    # Give the record buffers back whenever a session is idle: an idle session then costs
    # about 5 KB instead of about 45 (a node holds thousands, and a stranger may hold many
    # before authenticating); measured, no cost to throughput.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


def make_server_context(certificate: str, private_key: str) -> SSL.Context:
    """A server context with *certificate* (a PEM chain, leaf first) and *private_key*.

    Clients are not asked for certificates: users authenticate with RSA keys bound to the
    session (pvpn.auth), and nodes are identified by their server certificates.
    """
    leaf = _read_pem_certificates(certificate, "certificate")[0]
    key = _read_private_key(private_key)
    # Compared here, not left to OpenSSL, so the message can name both files.
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ConfigError(
            f"the private key {private_key} does not match the certificate {certificate}: "
            f"give the key the certificate was issued for"
        )
    context = _base_context()
    try:
        context.use_certificate_chain_file(certificate)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError(
            f"cannot use the certificate {certificate} with the key {private_key}: "
            f"{_openssl_reason(exc)}"
        ) from None
    context.set_verify(SSL.VERIFY_NONE)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def make_client_context(
    *, ca_file: str | None = None, pinned_certificate: str | None = None,
    pem: bytes | None = None,
) -> SSL.Context:
    """A client context trusting exactly one of: the CA in *ca_file*, or one pinned leaf.

    With a pinned certificate the chain checks are replaced by an exact match of the leaf
    (SHA-256 of DER); its validity period is still enforced.

    With *pem*, the file's contents as a user's process read them (pvpn-client, root, never
    opens a path a user chose), the path only names them in messages.
    """
    if (ca_file is None) == (pinned_certificate is None):
        raise ConfigError("give exactly one of a CA file (ca_file) or a pinned certificate")
    context = _base_context()
    pin: _Pin | None = None
    if ca_file is not None:
        anchors = _read_pem_certificates(ca_file, "CA certificate", pem)
        try:
            if pem is None:
                context.load_verify_locations(ca_file)
            else:
                store = context.get_cert_store()
                assert store is not None  # a new context always has one
                for anchor in anchors:
                    store.add_cert(crypto.X509.from_cryptography(anchor))
        except (SSL.Error, crypto.Error) as exc:
            reason = _openssl_reason(exc) if isinstance(exc, SSL.Error) else str(exc)
            raise ConfigError(f"cannot load the CA certificate {ca_file}: {reason}") from None
    elif pinned_certificate is not None:
        pin = _load_pin(pinned_certificate, pem)
    context.set_verify(SSL.VERIFY_PEER, _verify_callback)
    context.set_app_data(_ClientPolicy(ca_file=ca_file, pin=pin))
    return context


def _verify_callback(
    connection: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """OpenSSL's per-certificate verify callback; hands over to the owning TlsSession."""
    ref = connection.get_app_data()
    session = ref() if isinstance(ref, weakref.ref) else None
    if not isinstance(session, TlsSession):
        return False  # a connection we don't own: refuse rather than guess
    return session._verify_certificate(cert, errnum, depth, bool(ok))


def _format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _names_of(cert: x509.Certificate) -> str:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "no names (it has no subjectAltName)"
    names = [str(n) for n in extension.value.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in extension.value.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) if names else "no DNS or IP names"


class TlsSession:
    """One TLS connection over memory BIOs.

    Driven by the owner's I/O: :meth:`receive_data` with ciphertext from the peer (which also
    drives the handshake) and :meth:`send` with application data; the owner then drains
    :meth:`data_to_send` (ciphertext for the peer) and :meth:`read` (plaintext). Nothing here
    blocks, reads a clock other than OpenSSL's certificate-time check, or touches a socket.

    Client side: *server_name* (a DNS name or an IP literal) must match the certificate's
    subjectAltNames (service_identity, RFC 6125) unless the context or *pinned_certificate*
    pins the exact leaf, in which case the pin is the identity and *server_name* only feeds
    SNI. SNI is sent for DNS names only (RFC 6066 §3 forbids IP literals).
    """

    def __init__(
        self,
        context: SSL.Context,
        *,
        server_side: bool,
        server_name: str | None = None,
        pinned_certificate: str | None = None,
    ) -> None:
        self.server_side = server_side
        self.server_name = server_name
        self._pin: _Pin | None = None
        self._ca_file: str | None = None
        self._server_ip: str | None = None
        self._cert_error: str | None = None
        self._failure: str | None = None
        self._established = False
        self._peer_closed = False
        self._closed = False
        self._pending: list[bytes] = []
        self._pending_size = 0

        if server_side:
            if server_name is not None or pinned_certificate is not None:
                raise LocalProtocolError("server_name and pinned_certificate are for clients")
        else:
            policy = context.get_app_data()
            if not isinstance(policy, _ClientPolicy):
                raise LocalProtocolError("a client TlsSession needs make_client_context()")
            self._ca_file = policy.ca_file
            self._pin = _load_pin(pinned_certificate) if pinned_certificate else policy.pin
            if server_name is None and self._pin is None:
                # Without a name, any certificate from the CA would do: refuse to be that lax.
                raise LocalProtocolError("a client checking a CA needs the server_name")
            if server_name is not None:
                self._check_server_name(server_name)

        self._conn = SSL.Connection(context, None)
        # A weak reference: the connection must not keep its session alive (no cycle).
        self._conn.set_app_data(weakref.ref(self))
        if server_side:
            self._conn.set_accept_state()
        else:
            if server_name is not None and self._server_ip is None:
                self._conn.set_tlsext_host_name(server_name.encode("idna"))
            self._conn.set_connect_state()

    def _check_server_name(self, server_name: str) -> None:
        try:
            self._server_ip = str(ipaddress.ip_address(server_name))
        except ValueError:
            try:
                DNS_ID(server_name)
                server_name.encode("idna")
            except (ValueError, UnicodeError):
                raise ConfigError(
                    f"{server_name!r} is neither a DNS name nor an IP address"
                ) from None

    # --- properties ----------------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self._established

    @property
    def peer_closed(self) -> bool:
        """True once the peer's close_notify has been read."""
        return self._peer_closed

    @property
    def version(self) -> str:
        """The negotiated protocol, e.g. ``"TLSv1.3"``."""
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        """The negotiated cipher suite, e.g. ``"TLS_AES_256_GCM_SHA384"`` ("" before it's known)."""
        return self._conn.get_cipher_name() or ""

    # --- driving -------------------------------------------------------------------------

    def start(self) -> None:
        """Client: write the ClientHello (then call data_to_send). Server: nothing to do."""
        if not self.server_side and not self._established and self._failure is None:
            self._drive_handshake()

    def receive_data(self, data: bytes) -> None:
        """Feed ciphertext from the peer; drives the handshake while it is running.

        Application data is left for :meth:`read`, which the owner calls after each batch
        (undecrypted records wait in the memory BIO until then). Raises CertificateError when the server's
        certificate is refused and TlsError for any other failure; after a failure the
        session is dead, but :meth:`data_to_send` still returns the alert for the peer.
        """
        if self._failure is not None:
            raise TlsError(f"TLS session already failed: {self._failure}")
        if not data:
            return
        self._conn.bio_write(data)
        if not self._established:
            self._drive_handshake()

    def read(self) -> bytes:
        """All application data decrypted so far (b"" if none).

        SSL_read returns at most one record per call, so this loops until OpenSSL wants more
        ciphertext (WantReadError); a close_notify sets :attr:`peer_closed`.
        """
        if not self._established or self._peer_closed:
            return b""
        recv = self._conn.recv
        try:
            first = recv(_CHUNK)
        except SSL.WantReadError:
            return b""
        except SSL.ZeroReturnError:
            self._peer_closed = True
            return b""
        except SSL.Error as exc:
            raise self._fail(TlsError(_openssl_reason(exc))) from None
        chunks = [first]
        while True:
            try:
                chunks.append(recv(_CHUNK))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._peer_closed = True
                break
            except SSL.Error as exc:
                raise self._fail(TlsError(_openssl_reason(exc))) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, data: bytes) -> None:
        """Encrypt application data; queued until the handshake completes, then flushed."""
        if self._closed:
            raise LocalProtocolError("send() after close()")
        if self._failure is not None:
            raise TlsError(f"TLS session already failed: {self._failure}")
        if not data:
            return
        if not self._established:
            if self._pending_size + len(data) > _MAX_PENDING:
                raise LocalProtocolError(
                    f"more than {_MAX_PENDING} bytes sent before the handshake completed"
                )
            self._pending.append(bytes(data))
            self._pending_size += len(data)
            return
        try:
            self._conn.sendall(data)
        except SSL.Error as exc:
            raise self._fail(TlsError(_openssl_reason(exc))) from None

    def data_to_send(self) -> bytes:
        """All ciphertext waiting for the peer (b"" if none)."""
        bio_read = self._conn.bio_read
        try:
            first = bio_read(_CHUNK)
        except SSL.WantReadError:
            return b""
        # A memory BIO hands over all it holds up to the size asked for: a short read means
        # it is empty, so the usual case costs one call and no exception.
        if len(first) < _CHUNK:
            return first
        chunks = [first]
        while True:
            try:
                chunk = bio_read(_CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _CHUNK:
                break
        return b"".join(chunks)

    def close(self) -> None:
        """Send close_notify (if the handshake completed); further send() is an error."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._pending_size = 0
        if not self._established or self._failure is not None:
            # Nothing to close politely: OpenSSL refuses SSL_shutdown during the handshake,
            # and after a fatal alert the session is already over.
            return
        try:
            self._conn.shutdown()
        except SSL.Error as exc:
            raise self._fail(TlsError(_openssl_reason(exc))) from None

    def binding(self) -> bytes:
        """32 bytes that both ends derive identically and no other TLS session shares.

        The RFC 5705 keying-material exporter (RFC 8446 §7.5 in TLS 1.3) over
        :data:`AUTH_EXPORTER_LABEL` with no context. A user's signature covers it
        (pvpn.auth), binding the authentication to this session. For TLS 1.2 the exporter is
        only session-unique with the extended master secret (RFC 7627), which OpenSSL
        negotiates by default and which both pvpn ends support.
        """
        if not self._established:
            raise LocalProtocolError("binding() before the TLS handshake completed")
        return self._conn.export_keying_material(AUTH_EXPORTER_LABEL, BINDING_SIZE)

    # --- internals -----------------------------------------------------------------------

    def _fail(self, error: TlsError) -> TlsError:
        self._failure = str(error)
        return error

    def _drive_handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.ZeroReturnError:
            raise self._fail(TlsError("the peer closed the connection during the handshake")) from None
        except SSL.Error as exc:
            if self._cert_error is not None:
                raise self._fail(CertificateError(self._cert_error)) from None
            raise self._fail(TlsError(_openssl_reason(exc))) from None
        if not self.server_side:
            self._check_peer_after_handshake()
        self._established = True
        pending, self._pending, self._pending_size = self._pending, [], 0
        for data in pending:
            self.send(data)

    def _check_peer_after_handshake(self) -> None:
        # The verify callback has already checked all of this; checking the final peer
        # certificate again makes the guarantee independent of when OpenSSL calls it.
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            raise self._fail(CertificateError("the server sent no certificate"))
        if self._pin is not None:
            problem = self._pin_problem(cert, self._pin)
        else:
            problem = self._identity_problem(cert)
        if problem is not None:
            # The session is dead; the owner drops the transport, which tells the server.
            raise self._fail(CertificateError(problem))

    @staticmethod
    def _pin_problem(cert: x509.Certificate, pin: _Pin) -> str | None:
        if cert.fingerprint(hashes.SHA256()) != pin.sha256:
            return f"certificate does not match the pinned certificate {pin.file}"
        return None

    def _identity_problem(self, cert: x509.Certificate) -> str | None:
        """Why *cert* is not for server_name (RFC 6125 via service_identity), or None."""
        if self.server_name is None:
            return None
        try:
            if self._server_ip is not None:
                verify_certificate_ip_address(cert, self._server_ip)
            else:
                verify_certificate_hostname(cert, self.server_name)
        except (VerificationError, IdentityCertificateError):
            return f"certificate is for {_names_of(cert)}, not {self.server_name}"
        return None

    def _verify_certificate(self, x509_cert: crypto.X509, errnum: int, depth: int, ok: bool) -> bool:
        """Decide one step of OpenSSL's chain verification; record why when refusing."""
        if self._cert_error is not None:
            return False
        cert = x509_cert.to_cryptography()
        problem: str | None
        if self._pin is not None:
            # Pinned: the chain is replaced by the exact leaf, so issuer errors are ignored
            # (and certificates above the leaf don't matter), but the validity period does.
            if depth > 0:
                return True
            problem = self._pin_problem(cert, self._pin)
            if problem is None and not ok and errnum in _TIME_ERRORS:
                problem = self._time_problem(cert, errnum, depth)
        elif not ok:
            problem = self._chain_problem(cert, errnum, depth)
        elif depth == 0:
            # OpenSSL calls with ok=1 for the leaf last, after the whole chain verified:
            # check the name now so a mismatch aborts the handshake with an alert.
            problem = self._identity_problem(cert)
        else:
            problem = None
        if problem is not None:
            self._cert_error = problem
            return False
        return True

    def _time_problem(self, cert: x509.Certificate, errnum: int, depth: int) -> str:
        which = "certificate" if depth == 0 else f"CA certificate {cert.subject.rfc4514_string()}"
        if errnum == _Codes.ERR_CERT_HAS_EXPIRED:
            return f"{which} has expired (notAfter {_format_time(cert.not_valid_after_utc)})"
        return f"{which} is not yet valid (notBefore {_format_time(cert.not_valid_before_utc)})"

    def _chain_problem(self, cert: x509.Certificate, errnum: int, depth: int) -> str:
        trusted = f"the CA in {self._ca_file}"
        if errnum in _TIME_ERRORS:
            return self._time_problem(cert, errnum, depth)
        if errnum == _Codes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT or (
            depth == 0 and errnum in _UNKNOWN_ISSUER and cert.issuer == cert.subject
        ):
            return f"self-signed certificate ({cert.subject.rfc4514_string()}; not issued by {trusted})"
        if errnum == _Codes.ERR_SELF_SIGNED_CERT_IN_CHAIN:
            return f"self-signed certificate in the chain (not {trusted})"
        if errnum in _UNKNOWN_ISSUER:
            return (
                f"certificate is signed by an unknown authority "
                f"(issuer {cert.issuer.rfc4514_string()}, not {trusted})"
            )
        reason = _PLAIN_REASONS.get(errnum, f"certificate verification failed (X509 error {errnum})")
        return reason if depth == 0 else f"{reason} (at chain depth {depth})"

