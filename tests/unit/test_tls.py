"""TlsSession on memory BIOs: back-to-back sessions, nested sessions, refused certificates.

Certificates are made at test time with pvpn.pki. Sessions talk through transfer(), which
moves ciphertext between two endpoints in memory until both are quiet (as aioquic's tests do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from pvpn import pki
from pvpn.errors import CertificateError, ConfigError, LocalProtocolError, TlsError
from pvpn.tls import (
    AUTH_EXPORTER_LABEL,
    TlsSession,
    make_client_context,
    make_server_context,
)

from net import transfer

# --- certificates made once per module --------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server: Pair  # CA-signed, SANs: server, server.example, 10.77.1.2, fd77:0:0:1::2
    gw1: Pair  # CA-signed, SAN gw1
    expired: Pair
    future: Pair
    self_signed: Pair
    self_signed_expired: Pair
    foreign: Pair  # signed by other_ca, SAN server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    now = datetime.now(timezone.utc)
    ca_cert, _ = pki.create_ca(root / "ca")
    other_ca_cert, _ = pki.create_ca(root / "other-ca", name="other CA")
    out = root / "certs"

    def issue(name: str, **kwargs: object) -> Pair:
        return Pair(*pki.issue_certificate(root / "ca", name, out, **kwargs))  # type: ignore[arg-type]

    return Pki(
        ca=ca_cert,
        other_ca=other_ca_cert,
        server=issue("server", ips=["10.77.1.2", "fd77:0:0:1::2"], dns_names=["server.example"]),
        gw1=issue("gw1"),
        expired=issue(
            "expired", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        ),
        future=issue("future", not_before=now + timedelta(days=1)),
        self_signed=Pair(*pki.self_signed("selfie", out, ["10.77.1.2"], [])),
        self_signed_expired=Pair(
            *pki.self_signed(
                "selfie-old",
                out,
                not_before=now - timedelta(days=30),
                not_after=now - timedelta(days=1),
            )
        ),
        foreign=Pair(*pki.issue_certificate(root / "other-ca", "server", root / "foreign")),
    )


# --- helpers ----------------------------------------------------------------------------------


def server_for(pair: Pair) -> TlsSession:
    return TlsSession(make_server_context(str(pair.cert), str(pair.key)), server_side=True)


def client_for(
    server_name: str | None,
    *,
    ca: Path | None = None,
    pin: Path | None = None,
    session_pin: Path | None = None,
) -> TlsSession:
    context = make_client_context(
        ca_file=str(ca) if ca else None, pinned_certificate=str(pin) if pin else None
    )
    return TlsSession(
        context,
        server_side=False,
        server_name=server_name,
        pinned_certificate=str(session_pin) if session_pin else None,
    )


def handshake(client: TlsSession, server: TlsSession) -> None:
    client.start()
    transfer(client, server)
    assert client.handshake_complete and server.handshake_complete


def connected(certs: Pki, name: str = "server") -> tuple[TlsSession, TlsSession]:
    client, server = client_for(name, ca=certs.ca), server_for(certs.server)
    handshake(client, server)
    return client, server


# --- handshake and data -----------------------------------------------------------------------


def test_handshake_and_round_trip(certs: Pki) -> None:
    client, server = connected(certs)
    assert client.version == server.version == "TLSv1.3"
    assert client.cipher and client.cipher == server.cipher

    client.send(b"ping")
    transfer(client, server)
    assert server.read() == b"ping"
    assert server.read() == b""
    server.send(b"pong")
    transfer(client, server)
    assert client.read() == b"pong"


def test_nothing_to_do_is_empty(certs: Pki) -> None:
    client, server = connected(certs)
    assert client.data_to_send() == b"" and server.data_to_send() == b""
    assert client.read() == b"" and server.read() == b""
    client.receive_data(b"")
    client.send(b"")
    assert client.data_to_send() == b""


def test_large_transfer_spans_many_chunks(certs: Pki) -> None:
    client, server = connected(certs)
    payload = bytes(range(256)) * 4096 * 2  # 2 MiB: many records, several 256 KiB chunks
    client.send(payload)
    wire = client.data_to_send()
    assert len(wire) > len(payload)
    server.receive_data(wire)
    assert server.read() == payload


def test_many_small_sends_arrive_in_order(certs: Pki) -> None:
    client, server = connected(certs)
    messages = [f"packet {i};".encode() for i in range(500)]
    for message in messages:
        client.send(message)
    transfer(client, server)
    assert server.read() == b"".join(messages)


def test_send_before_handshake_is_flushed_once_established(certs: Pki) -> None:
    client, server = client_for("server", ca=certs.ca), server_for(certs.server)
    client.send(b"early ")
    client.send(b"bird")
    server.send(b"server early")
    client.start()
    transfer(client, server)
    assert server.read() == b"early bird"
    assert client.read() == b"server early"


def test_pending_before_handshake_is_bounded(certs: Pki) -> None:
    client = client_for("server", ca=certs.ca)
    client.send(b"x" * (4 * 1024 * 1024))
    with pytest.raises(LocalProtocolError):
        client.send(b"y")


def test_byte_by_byte_delivery(certs: Pki) -> None:
    client, server = client_for("server", ca=certs.ca), server_for(certs.server)
    client.start()
    for _ in range(20):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            break
        for i in range(len(to_server)):
            server.receive_data(to_server[i : i + 1])
        for i in range(len(to_client)):
            client.receive_data(to_client[i : i + 1])
    assert client.handshake_complete and server.handshake_complete

    client.send(b"one byte at a time")
    received = bytearray()
    for byte in client.data_to_send():
        server.receive_data(bytes([byte]))
        received += server.read()
    assert bytes(received) == b"one byte at a time"


def test_close_notify(certs: Pki) -> None:
    client, server = connected(certs)
    client.send(b"last words")
    client.close()
    transfer(client, server)
    assert server.read() == b"last words"
    assert server.peer_closed
    assert not client.peer_closed
    with pytest.raises(LocalProtocolError):
        client.send(b"more")
    client.close()  # idempotent
    server.close()
    transfer(client, server)
    assert client.read() == b""
    assert client.peer_closed


def test_tls12_still_works(certs: Pki) -> None:
    context = make_client_context(ca_file=str(certs.ca))
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    client = TlsSession(context, server_side=False, server_name="server")
    server = server_for(certs.server)
    handshake(client, server)
    assert client.version == server.version == "TLSv1.2"
    assert "ECDHE" in client.cipher
    assert client.binding() == server.binding()
    client.send(b"hello 1.2")
    transfer(client, server)
    assert server.read() == b"hello 1.2"


# --- nesting: a session inside another session's application data ----------------------------


def tunnel(
    outer_client: TlsSession,
    outer_server: TlsSession,
    inner_client: TlsSession,
    inner_server: TlsSession,
) -> None:
    """Carry the inner pair's ciphertext as application data of the outer pair."""
    for _ in range(30):
        moved = False
        up = inner_client.data_to_send()
        if up:
            outer_client.send(up)
        down = inner_server.data_to_send()
        if down:
            outer_server.send(down)
        wire_up, wire_down = outer_client.data_to_send(), outer_server.data_to_send()
        if wire_up:
            outer_server.receive_data(wire_up)
            moved = True
        if wire_down:
            outer_client.receive_data(wire_down)
            moved = True
        at_server, at_client = outer_server.read(), outer_client.read()
        if at_server:
            inner_server.receive_data(at_server)
        if at_client:
            inner_client.receive_data(at_client)
        if not (moved or up or down or at_server or at_client):
            return
    raise AssertionError("nested transfer did not settle")


def test_nested_sessions_round_trip(certs: Pki) -> None:
    # The client's session with gw1 (outer) carries its session with the server (inner).
    outer_client, outer_server = client_for("gw1", ca=certs.ca), server_for(certs.gw1)
    handshake(outer_client, outer_server)
    inner_client, inner_server = client_for("server", ca=certs.ca), server_for(certs.server)
    inner_client.start()
    tunnel(outer_client, outer_server, inner_client, inner_server)
    assert inner_client.handshake_complete and inner_server.handshake_complete
    assert inner_client.binding() == inner_server.binding()
    assert inner_client.binding() != outer_client.binding()

    inner_client.send(b"GET / through two layers")
    tunnel(outer_client, outer_server, inner_client, inner_server)
    assert inner_server.read() == b"GET / through two layers"
    inner_server.send(b"200 OK" * 10000)
    tunnel(outer_client, outer_server, inner_client, inner_server)
    assert inner_client.read() == b"200 OK" * 10000


def test_nested_inner_certificate_failure_surfaces_at_inner_client(certs: Pki) -> None:
    outer_client, outer_server = client_for("gw1", ca=certs.ca), server_for(certs.gw1)
    handshake(outer_client, outer_server)
    inner_client, inner_server = client_for("server", ca=certs.ca), server_for(certs.foreign)
    inner_client.start()
    with pytest.raises(CertificateError, match="unknown authority"):
        tunnel(outer_client, outer_server, inner_client, inner_server)
    # The outer session is unharmed.
    outer_client.send(b"still here")
    transfer(outer_client, outer_server)
    assert outer_server.read() == b"still here"


# --- binding (RFC 5705 / RFC 8446 §7.5 exporter) ----------------------------------------------


def test_binding_equal_on_both_ends_and_unique_per_session(certs: Pki) -> None:
    c1, s1 = connected(certs)
    c2, s2 = connected(certs)
    assert len(c1.binding()) == 32
    assert c1.binding() == s1.binding()
    assert c2.binding() == s2.binding()
    assert c1.binding() != c2.binding()
    assert AUTH_EXPORTER_LABEL == b"EXPORTER-pvpn-user-auth"


def test_binding_before_handshake_is_local_error(certs: Pki) -> None:
    client = client_for("server", ca=certs.ca)
    with pytest.raises(LocalProtocolError):
        client.binding()
    client.start()
    with pytest.raises(LocalProtocolError):
        client.binding()


# --- certificate checks -----------------------------------------------------------------------

Setup = Callable[[Pki], tuple[TlsSession, TlsSession]]


def _case(pair: str, name: str | None, **kw: str) -> Setup:
    def setup(c: Pki) -> tuple[TlsSession, TlsSession]:
        args = {k: getattr(c, v) if v in ("ca", "other_ca") else getattr(c, v).cert for k, v in kw.items()}
        return client_for(name, **args), server_for(getattr(c, pair))

    return setup


REFUSED: list[tuple[str, Setup, list[str]]] = [
    ("wrong CA", _case("server", "server", ca="other_ca"), ["unknown authority", "other-ca/ca.crt"]),
    ("foreign server", _case("foreign", "server", ca="ca"), ["unknown authority", "CN=other CA"]),
    ("expired", _case("expired", "expired", ca="ca"), ["certificate has expired (notAfter "]),
    ("not yet valid", _case("future", "future", ca="ca"), ["certificate is not yet valid"]),
    ("self-signed", _case("self_signed", "selfie", ca="ca"), ["self-signed certificate", "CN=selfie"]),
    ("hostname", _case("server", "other.example", ca="ca"), ["certificate is for ", "not other.example"]),
    ("wrong IPv4", _case("server", "10.77.1.3", ca="ca"), ["certificate is for ", "10.77.1.2", "not 10.77.1.3"]),
    ("wrong IPv6", _case("server", "fd77::3", ca="ca"), ["certificate is for ", "not fd77::3"]),
    ("gw1 for server", _case("gw1", "server", ca="ca"), ["certificate is for gw1, not server"]),
    ("pin mismatch", _case("server", "server", pin="self_signed"), ["does not match the pinned certificate", "selfie.crt"]),
    ("pinned expired", _case("self_signed_expired", None, pin="self_signed_expired"), ["certificate has expired"]),
    ("pinned CA-signed expired", _case("expired", None, pin="expired"), ["certificate has expired"]),
    ("session pin mismatch", _case("server", "server", ca="ca", session_pin="gw1"), ["does not match the pinned certificate", "gw1.crt"]),
]


@pytest.mark.parametrize(("setup", "words"), [(s, w) for _, s, w in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_refused_certificate(certs: Pki, setup: Setup, words: list[str]) -> None:
    client, server = setup(certs)
    client.start()
    with pytest.raises(CertificateError) as info:
        transfer(client, server)
    for word in words:
        assert word in str(info.value)
    assert not client.handshake_complete
    # The client's alert reaches the server, which fails with a plain TlsError.
    with pytest.raises(TlsError):
        server.receive_data(client.data_to_send())
    assert not server.handshake_complete
    # A failed session stays failed.
    with pytest.raises(TlsError):
        client.receive_data(b"\x17\x03\x03\x00\x01x")


ACCEPTED: list[tuple[str, Setup]] = [
    ("DNS SAN", _case("server", "server.example", ca="ca")),
    ("name SAN", _case("server", "server", ca="ca")),
    ("DNS SAN case-insensitive", _case("server", "Server.Example", ca="ca")),
    ("IPv4 SAN", _case("server", "10.77.1.2", ca="ca")),
    ("IPv6 SAN", _case("server", "fd77:0:0:1::2", ca="ca")),
    ("IPv6 SAN uncompressed", _case("server", "FD77:0:0:1:0:0:0:2", ca="ca")),
    ("pinned self-signed", _case("self_signed", "selfie", pin="self_signed")),
    ("pinned, no name", _case("self_signed", None, pin="self_signed")),
    ("pinned CA-signed", _case("server", "anything", pin="server")),
    ("session pin over CA context", _case("self_signed", "selfie", ca="ca", session_pin="self_signed")),
]


@pytest.mark.parametrize("setup", [s for _, s in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_accepted_certificate(certs: Pki, setup: Setup) -> None:
    client, server = setup(certs)
    handshake(client, server)
    assert client.binding() == server.binding()


# --- configuration errors ---------------------------------------------------------------------


def test_client_context_needs_exactly_one_trust_anchor(certs: Pki) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        make_client_context()
    with pytest.raises(ConfigError, match="exactly one"):
        make_client_context(ca_file=str(certs.ca), pinned_certificate=str(certs.ca))


def test_client_context_missing_or_bad_files(certs: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(ConfigError, match=r"nope\.crt does not exist"):
        make_client_context(ca_file=str(missing))
    with pytest.raises(ConfigError, match=r"nope\.crt does not exist"):
        make_client_context(pinned_certificate=str(missing))
    junk = tmp_path / "junk.crt"
    junk.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"junk\.crt is not a PEM certificate"):
        make_client_context(ca_file=str(junk))
    with pytest.raises(ConfigError, match=r"junk\.crt is not a PEM certificate"):
        make_client_context(pinned_certificate=str(junk))
    with pytest.raises(ConfigError, match="cannot read"):
        make_client_context(ca_file=str(tmp_path))


def test_server_context_key_must_match_certificate(certs: Pki) -> None:
    with pytest.raises(ConfigError) as info:
        make_server_context(str(certs.server.cert), str(certs.gw1.key))
    assert "does not match" in str(info.value)
    assert str(certs.server.cert) in str(info.value) and str(certs.gw1.key) in str(info.value)


def test_server_context_missing_or_bad_files(certs: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        make_server_context(str(tmp_path / "x.crt"), str(certs.server.key))
    with pytest.raises(ConfigError, match=r"x\.key does not exist"):
        make_server_context(str(certs.server.cert), str(tmp_path / "x.key"))
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"junk\.key"):
        make_server_context(str(certs.server.cert), str(junk))


def test_session_argument_misuse(certs: Pki) -> None:
    server_context = make_server_context(str(certs.server.cert), str(certs.server.key))
    client_context = make_client_context(ca_file=str(certs.ca))
    with pytest.raises(LocalProtocolError):
        TlsSession(client_context, server_side=False)  # CA mode needs a name
    with pytest.raises(LocalProtocolError):
        TlsSession(server_context, server_side=False, server_name="server")  # not a client context
    with pytest.raises(LocalProtocolError):
        TlsSession(server_context, server_side=True, server_name="server")
    with pytest.raises(ConfigError):
        TlsSession(client_context, server_side=False, server_name="not a host name!")


# --- garbage from the peer --------------------------------------------------------------------


def test_garbage_to_server_is_tls_error(certs: Pki) -> None:
    server = server_for(certs.server)
    with pytest.raises(TlsError):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not server.handshake_complete
    with pytest.raises(TlsError, match="already failed"):
        server.receive_data(b"more")


def test_garbage_to_client_is_tls_error(certs: Pki) -> None:
    client = client_for("server", ca=certs.ca)
    client.start()
    client.data_to_send()
    with pytest.raises(TlsError) as info:
        client.receive_data(b"\x16\x03\x03\x00\x05hello")
    assert not isinstance(info.value, CertificateError)


def test_tampered_record_is_tls_error(certs: Pki) -> None:
    client, server = connected(certs)
    client.send(b"secret" * 10)
    record = bytearray(client.data_to_send())
    record[-1] ^= 0x01
    server.receive_data(bytes(record))
    with pytest.raises(TlsError):
        server.read()


@pytest.fixture(scope="module")
def server_context(certs: Pki) -> SSL.Context:
    return make_server_context(str(certs.server.cert), str(certs.server.key))


@pytest.fixture(scope="module")
def client_hello(certs: Pki) -> bytes:
    client = client_for("server", ca=certs.ca)
    client.start()
    return client.data_to_send()


def _feed_server(context: SSL.Context, pieces: list[bytes]) -> None:
    server = TlsSession(context, server_side=True)
    try:
        for piece in pieces:
            server.receive_data(piece)
            server.read()
    except TlsError:
        pass  # the only failure allowed
    server.data_to_send()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 2048), max_size=8))
def test_fuzz_server_only_raises_tls_error(
    server_context: SSL.Context, data: bytes, cuts: list[int]
) -> None:
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    _feed_server(server_context, [data[a:b] for a, b in zip(points, points[1:])] or [data])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_client_hello_only_raises_tls_error(
    server_context: SSL.Context, client_hello: bytes, data: st.DataObject
) -> None:
    # Mutating a real ClientHello reaches far deeper into OpenSSL's parser than random bytes.
    hello = bytearray(client_hello)
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(hello) - 1))
        hello[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    tail = data.draw(st.binary(max_size=64))
    _feed_server(server_context, [bytes(hello[:cut]), bytes(hello[cut:]) + tail])
