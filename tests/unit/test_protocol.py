"""The link protocol end to end in memory: a user's link and the server node, real TLS and RSA
over an in-memory transfer, packets NATed and replies routed back to the right user."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import msgpack
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from pvpn import auth, pki, tls
from pvpn.config import ServerConfig, UserPolicy, parse_prefix
from pvpn.envelope import MsgType, encode_control
from pvpn.protocol import (
    CloseLink, InjectPacket, LinkClosed, LinkEstablished, LinkRefused, LogRecord,
    PacketsReceived, SendBytes, ServerNode, UserLink,
)

SERVER_IP = "10.0.0.1"
NAT_SRC = ipaddress.ip_address("10.9.0.1").packed
NAT_SRC6 = ipaddress.ip_address("fd09::1").packed
TARGET = "10.9.0.5"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    pki.create_ca(d / "ca")
    crt, key = pki.issue_certificate(d / "ca", "server", d / "server", ips=[SERVER_IP])
    other = tmp_path_factory.mktemp("other")
    pki.create_ca(other / "ca")
    users = d / "users"
    users.mkdir()
    keys = {}
    for name in ("alice", "bob", "carol"):
        k = auth.generate_user_key(2048)
        keys[name] = k
        if name != "carol":
            auth.save_public_key(k, users / f"{name}.pub", name)
    return {"ca": str(d / "ca" / "ca.crt"), "other_ca": str(other / "ca" / "ca.crt"),
            "crt": str(crt), "key": str(key), "users": users, "keys": keys}


def make_node(p: dict[str, Any]) -> ServerNode:
    allow = [parse_prefix("10.9.0.0/24"), parse_prefix("fd09::/64")]
    config = ServerConfig(
        path=Path("server.toml"), name="server", listen=[], certificate=Path(p["crt"]),
        private_key=Path(p["key"]), authorized_keys=p["users"], queue=0,
        nat_ports=(61000, 61999), instance="t",
        users={"alice": UserPolicy(list(allow)), "bob": UserPolicy(list(allow))},
    )
    return ServerNode(config, auth.AuthorizedKeys(p["users"]), auth.verify_signature,
                      lambda dst: NAT_SRC if len(dst) == 4 else NAT_SRC6)


class Harness:
    """One server node and any number of user links, wired by an in-memory transfer()."""

    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        self.node = make_node(p)
        self.server_ctx = tls.make_server_context(p["crt"], p["key"])
        self.links: dict[int, UserLink] = {}
        self.events: dict[int, list[Any]] = {}
        self.injected: list[bytes] = []
        self.logs: list[Any] = []
        self.closed: set[int] = set()
        self.now = 100.0

    def connect(self, link_id: int, user: str, key_user: str | None = None, ca: str | None = None,
                want: tuple[str, ...] = ("10.9.0.0/24",), resume: Any = None) -> UserLink:
        client = tls.TlsSession(tls.make_client_context(ca_file=ca or self.p["ca"]),
                                server_side=False, server_name=SERVER_IP)
        key = self.p["keys"][key_user or user]
        link = UserLink(client, user=user, uid=1000 + link_id,
                        signer=lambda n, b, node: auth.sign_challenge(key, n, b, user, node),
                        want=list(want), client_name="clienthost",
                        session=resume[0] if resume else b"",
                        token=resume[1] if resume else None)
        client.start()
        link.start(self.now)
        self.links[link_id] = link
        self.events[link_id] = []
        self.node.link_opened(link_id, tls.TlsSession(self.server_ctx, server_side=True),
                              f"10.0.0.2:{40000 + link_id}", self.now)
        self.transfer()
        return link

    def transfer(self) -> None:
        for _ in range(50):
            moved = False
            for link_id, link in self.links.items():
                if link_id in self.closed:
                    continue
                data = link.data_to_send(self.now)
                if data:
                    moved = True
                    self.node.receive_data(link_id, data, self.now)
            self.node.flush(self.now)
            commands, self.node.commands = self.node.commands, []
            for cmd in commands:
                if isinstance(cmd, SendBytes) and cmd.link not in self.closed:
                    moved = True
                    self.events[cmd.link] += self.links[cmd.link].receive_data(cmd.data, self.now)
                elif isinstance(cmd, InjectPacket):
                    self.injected.append(cmd.packet)
                elif isinstance(cmd, LogRecord):
                    self.logs.append(cmd.record)
                elif isinstance(cmd, CloseLink):
                    self.closed.add(cmd.link)
            if not moved:
                return
        raise AssertionError("transfer did not settle")

    def packets(self, link_id: int) -> list[bytes]:
        out = [p for e in self.events[link_id] if isinstance(e, PacketsReceived) for p in e.packets]
        self.events[link_id] = [e for e in self.events[link_id] if not isinstance(e, PacketsReceived)]
        return out


def first(events: list[Any], kind: type) -> Any:
    found = [e for e in events if isinstance(e, kind)]
    assert found, f"no {kind.__name__} in {events}"
    return found[0]


def test_alice_gets_a_session_and_her_packets_are_natted_and_answered(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    est = first(h.events[1], LinkEstablished)
    assert len(est.session) == 16 and est.allow == ["10.9.0.0/24"] and not est.resumed
    syn = bytes(IP(src="10.0.0.2", dst=TARGET) / TCP(sport=40000, dport=80, flags="S"))
    h.links[1].send_packets([syn])
    h.transfer()
    (out,) = h.injected
    sent = IP(out)
    assert sent.src == "10.9.0.1" and sent.dst == TARGET and 61000 <= sent[TCP].sport <= 61999
    reply = bytes(IP(src=TARGET, dst="10.9.0.1") / TCP(sport=80, dport=sent[TCP].sport, flags="SA"))
    assert h.node.receive_reply(reply, h.now)
    h.node.flush(h.now)
    h.transfer()
    (back,) = h.packets(1)
    got = IP(back)
    assert got.dst == "10.0.0.2" and got[TCP].dport == 40000 and got.src == TARGET
    assert not h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / TCP(sport=80, dport=9)),
                                    h.now), "a packet of no flow is not ours"
    events = [r.event for r in h.logs]
    assert "session:opened" in events


def test_two_users_same_five_tuple_replies_never_cross(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    h.connect(2, "bob")
    same = bytes(IP(src="10.0.0.2", dst=TARGET) / UDP(sport=5555, dport=7) / b"x")
    h.links[1].send_packets([same])
    h.links[2].send_packets([same])
    h.transfer()
    ports = [IP(p)[UDP].sport for p in h.injected]
    assert len(set(ports)) == 2
    for port, link_id, payload in ((ports[1], 2, b"for-bob"), (ports[0], 1, b"for-alice")):
        assert h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / UDP(sport=7, dport=port)
                                          / payload), h.now)
    h.node.flush(h.now)
    h.transfer()
    assert [bytes(IP(p)[UDP].payload) for p in h.packets(1)] == [b"for-alice"]
    assert [bytes(IP(p)[UDP].payload) for p in h.packets(2)] == [b"for-bob"]


def test_ipv6_and_icmp_echo(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    ping = bytes(IP(src="10.0.0.2", dst=TARGET) / ICMP(id=77, seq=1) / b"hi")
    v6 = bytes(IPv6(src="fd00::2", dst="fd09::5") / UDP(sport=1234, dport=7) / b"six")
    h.links[1].send_packets([ping, v6])
    h.transfer()
    p4, p6 = (IP(h.injected[0]), IPv6(h.injected[1]))
    assert p4[ICMP].id != 77 and p6.src == "fd09::1"
    assert h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / ICMP(type=0, id=p4[ICMP].id, seq=1) / b"hi"), h.now)
    assert h.node.receive_reply(bytes(IPv6(src="fd09::5", dst="fd09::1") / UDP(sport=7, dport=p6[UDP].sport) / b"six"), h.now)
    h.node.flush(h.now)
    h.transfer()
    r4, r6 = h.packets(1)
    assert IP(r4)[ICMP].id == 77 and IP(r4).dst == "10.0.0.2"
    assert IPv6(r6).dst == "fd00::2" and IPv6(r6)[UDP].dport == 1234


def test_destination_not_allowed_is_dropped_per_packet(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    h.links[1].send_packets([bytes(IP(src="10.0.0.2", dst="10.8.0.1") / TCP(dport=22))])
    h.transfer()
    assert h.injected == []
    assert any(r.event == "packet:dropped" and r.reason == "destination not allowed" for r in h.logs)


@pytest.mark.parametrize("user, key_user, want, code", [
    ("carol", None, ("10.9.0.0/24",), "auth-failed"),          # unknown user
    ("alice", "bob", ("10.9.0.0/24",), "auth-failed"),         # wrong key
    ("alice", None, ("10.8.0.0/24",), "destination-not-allowed"),
])
def test_refusals(pki_dir: Any, user: str, key_user: str | None, want: tuple[str, ...],
                  code: str) -> None:
    h = Harness(pki_dir)
    h.connect(1, user, key_user=key_user, want=want)
    refused = first(h.events[1], LinkRefused)
    assert refused.code == code and user in refused.reason
    assert 1 in h.closed and not h.node.sessions
    assert any(r.event == "auth:refused" for r in h.logs)


def test_wrong_server_certificate_is_fatal_before_the_key_is_used(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    signed: list[bytes] = []
    client = tls.TlsSession(tls.make_client_context(ca_file=pki_dir["other_ca"]),
                            server_side=False, server_name=SERVER_IP)
    link = UserLink(client, user="alice", uid=1, signer=lambda *a: signed.append(a[0]) or b"",
                    want=["10.9.0.0/24"], client_name="c")
    client.start()
    h.links[1], h.events[1] = link, []
    h.node.link_opened(1, tls.TlsSession(h.server_ctx, server_side=True), "peer", h.now)
    h.transfer()
    closed = first(h.events[1], LinkClosed)
    assert closed.fatal and "unknown authority" in closed.reason and not signed


def test_garbage_closes_only_that_link(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    h.node.link_opened(9, tls.TlsSession(h.server_ctx, server_side=True), "evil", h.now)
    h.node.receive_data(9, b"GET / HTTP/1.0\r\n\r\n" * 10, h.now)
    assert any(isinstance(c, CloseLink) and c.link == 9 for c in h.node.commands)
    h.node.commands.clear()
    h.links[1].send_packets([bytes(IP(src="10.0.0.2", dst=TARGET) / TCP(dport=80))])
    h.transfer()
    assert len(h.injected) == 1, "alice is still served"


def test_resume_keeps_the_session_and_its_flows(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    link = h.connect(1, "alice")
    est = first(h.events[1], LinkEstablished)
    h.links[1].send_packets([bytes(IP(src="10.0.0.2", dst=TARGET) / TCP(sport=1, dport=80))])
    h.transfer()
    port = IP(h.injected[0])[TCP].sport
    h.node.link_lost(1, h.now)
    h.closed.add(1)
    assert h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / TCP(sport=80, dport=port)), h.now)
    h.connect(2, "alice", resume=(est.session, est.token))
    again = first(h.events[2], LinkEstablished)
    assert again.resumed and again.session == est.session
    assert h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / TCP(sport=80, dport=port)), h.now)
    h.node.flush(h.now)
    h.transfer()
    assert len(h.packets(2)) == 1
    # A wrong token gets a fresh session, never someone else's.
    h.connect(3, "alice", resume=(est.session, b"x" * 16))
    assert not first(h.events[3], LinkEstablished).resumed
    del link


def test_keepalive_and_dead_peer(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    link = h.connect(1, "alice")
    h.now += 11
    assert link.handle_timer(h.now) is None
    h.transfer()
    h.now += 40
    dead = link.handle_timer(h.now)
    assert isinstance(dead, LinkClosed) and "keepalive" in dead.reason
    h.node.handle_timer(h.now)
    assert any(isinstance(c, CloseLink) for c in h.node.commands)
    h.node.commands.clear()
    h.node.link_lost(1, h.now)
    h.now += 200
    h.node.handle_timer(h.now)
    assert not h.node.sessions, "a session not resumed within the grace period is reaped"


def test_user_close_ends_the_session(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    link = h.connect(1, "alice")
    link.close("bye")
    h.transfer()
    assert not h.node.sessions and 1 in h.closed


def test_close_all_sends_close_with_the_reason_then_ends_sessions(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    h.node.close_all("server shutting down")
    h.transfer()
    closed = first(h.events[1], LinkClosed)
    assert "server shutting down" in closed.reason and not closed.fatal
    assert not h.node.sessions
    assert any(r.event == "session:closed" and r.reason == "server shutting down" for r in h.logs)


def test_an_icmp_error_from_the_client_host_follows_its_flow(pki_dir: Any) -> None:
    """The client's kernel answers a reply it could not deliver; the error goes out NATed
    like the flow it is about, and an error about no flow of the session goes nowhere."""
    h = Harness(pki_dir)
    h.connect(1, "alice")
    h.links[1].send_packets([bytes(IP(src="10.0.0.2", dst=TARGET) / UDP(sport=5000, dport=53))])
    h.transfer()
    nat_port = IP(h.injected[0])[UDP].sport
    reply_as_delivered = IP(src=TARGET, dst="10.0.0.2") / UDP(sport=53, dport=5000) / b"late"
    error = bytes(IP(src="10.0.0.2", dst=TARGET) / ICMP(type=3, code=3) / reply_as_delivered)
    stray = bytes(IP(src="10.0.0.2", dst=TARGET) / ICMP(type=3, code=3)
                  / (IP(src=TARGET, dst="10.0.0.2") / UDP(sport=53, dport=7777)))
    h.links[1].send_packets([error, stray])
    h.transfer()
    assert len(h.injected) == 2
    out = IP(h.injected[1])
    assert out.src == "10.9.0.1" and out[ICMP].type == 3
    quoted = IP(bytes(out[ICMP].payload))  # scapy reads the quote as an IPerror layer
    assert quoted.dst == "10.9.0.1" and quoted.payload.dport == nat_port
    assert any(r.event == "packet:dropped" and "no flow" in r.reason for r in h.logs)


# ---------------------------------------------------------------- issue 9: no peer ends a node


CORRUPT_RECORD = b"\x17\x03\x03\x00\x40" + bytes(64)  # TLS application data that won't decrypt


def alice_with_a_flow(h: Harness) -> bytes:
    """alice up, one UDP flow of hers out; the reply the target would send to it."""
    h.connect(1, "alice")
    h.links[1].send_packets([bytes(IP(src="10.0.0.2", dst=TARGET) / UDP(sport=5000, dport=7))])
    h.transfer()
    port = IP(h.injected[-1])[UDP].sport
    return bytes(IP(src=TARGET, dst="10.9.0.1") / UDP(sport=7, dport=port) / b"reply")


def sent_after_close(commands: list[Any], link: int) -> list[Any]:
    closed_at = next((i for i, c in enumerate(commands)
                      if isinstance(c, CloseLink) and c.link == link), None)
    assert closed_at is not None, f"link {link} was not closed"
    return [c for c in commands[closed_at:] if isinstance(c, SendBytes) and c.link == link]


@pytest.mark.parametrize("reply_first", [True, False])
def test_a_link_whose_tls_failed_drops_its_queued_replies(pki_dir: Any, reply_first: bool) -> None:
    """Issue 9 point 2: alice stops reading and sends one corrupt TLS record; a reply routed to
    her link then made flush raise TlsError out of the timer and the queue drain, and
    pvpn-server exited with every session and NAT mapping. Now her link closes, its output
    is dropped, it leaves the dirty set, and bob is served on."""
    h = Harness(pki_dir)
    reply = alice_with_a_flow(h)
    h.connect(2, "bob")
    node = h.node
    if reply_first:
        assert node.receive_reply(reply, h.now)  # queued for her link, not yet flushed
    node.receive_data(1, CORRUPT_RECORD, h.now)
    assert node.receive_reply(reply, h.now)  # routed to her link after its TLS failed
    node.handle_timer(h.now + 1)
    node.flush(h.now + 1)
    assert not sent_after_close(node.commands, 1)
    assert not node._dirty and not node.links[1].pending
    assert any(isinstance(c, LogRecord) and c.record.event == "link:error"
               for c in node.commands)
    node.commands.clear()
    h.closed.add(1)
    h.links[2].send_packets([bytes(IP(src="10.0.0.2", dst=TARGET) / TCP(dport=80))])
    h.transfer()
    assert IP(h.injected[-1]).dst == TARGET, "bob is still served"


def test_an_output_failure_closes_that_link_only(pki_dir: Any) -> None:
    """A TLS session that fails while the node encrypts its output (here: closed under it)
    closes its own link, logged, and the flush goes on to the others."""
    h = Harness(pki_dir)
    reply = alice_with_a_flow(h)
    h.connect(2, "bob")
    node = h.node
    node.links[1].tls.close()  # type: ignore[union-attr]  # send() now fails on this link
    assert node.receive_reply(reply, h.now)
    node._send(node.links[2], MsgType.KEEPALIVE, node.links[2].session_id, encode_control({}))
    node.flush(h.now)
    assert any(isinstance(c, CloseLink) and c.link == 1 for c in node.commands)
    assert any(isinstance(c, SendBytes) and c.link == 2 for c in node.commands)
    assert any(isinstance(c, LogRecord) and c.record.event == "link:error"
               and "TLS failed on output" in c.record.reason for c in node.commands)


def crafted_hello(link: UserLink, **fields: Any) -> None:
    """Replace the HELLO a UserLink is about to send by one with ``fields`` changed, packed
    without the encoder's checks (as an attacker would)."""
    body = {"user": link.user, "want": ["10.9.0.0/24"], "token": None, "client": "c",
            "next": None, "path": [], **fields}
    link._pending[0] = msgpack.packb(
        [1, int(MsgType.HELLO), b"", link.uid, 0, 16, msgpack.packb(body, use_bin_type=True)],
        use_bin_type=True)


def test_a_refusal_quoting_a_long_path_is_bounded(pki_dir: Any) -> None:
    """Issue 9 point 2: a REFUSE quoting a 66 KB user-supplied ``path`` raised
    LocalProtocolError out of the node; now what a node quotes is bounded before it builds the
    envelope (and such a path is refused as not node names)."""
    h = Harness(pki_dir)
    client = tls.TlsSession(tls.make_client_context(ca_file=h.p["ca"]), server_side=False,
                            server_name=SERVER_IP)
    key = h.p["keys"]["alice"]
    link = UserLink(client, user="alice", uid=1001, want=["10.9.0.0/24"], client_name="c",
                    signer=lambda n, b, node: auth.sign_challenge(key, n, b, "alice", node))
    crafted_hello(link, path=["p" * 1050] * 63 + ["server"])
    client.start()
    h.links[1], h.events[1] = link, []
    h.node.link_opened(1, tls.TlsSession(h.server_ctx, server_side=True), "peer", h.now)
    h.transfer()
    refused = first(h.events[1], LinkRefused)
    assert len(refused.reason) <= 1024 and 1 in h.closed


@pytest.mark.parametrize("fields, words", [
    ({"user": "\x1b[2J" + "a" * 4000}, "user name"),
    ({"client": "c" * 4000}, "client host name"),
    ({"path": ["gw1\x1b[31m"]}, "node names"),
    ({"next": "10.0.0.1:4433\n" + "x" * 4000}, "next hop"),
    ({"want": ["10.9.0.0/24"] * 65}, "destination prefixes"),
])
def test_hello_identifiers_are_checked_before_use(pki_dir: Any, fields: dict[str, Any],
                                                  words: str) -> None:
    """Issue 9 point 9: user name, client name, path entries and next hop from a HELLO are
    checked (length, charset) before they are used or logged: refused, with what is wrong."""
    h = Harness(pki_dir)
    client = tls.TlsSession(tls.make_client_context(ca_file=h.p["ca"]), server_side=False,
                            server_name=SERVER_IP)
    link = UserLink(client, user="alice", uid=1001, want=["10.9.0.0/24"], client_name="c",
                    signer=lambda n, b, node: b"")
    crafted_hello(link, **fields)
    client.start()
    h.links[1], h.events[1] = link, []
    h.node.link_opened(1, tls.TlsSession(h.server_ctx, server_side=True), "peer", h.now)
    h.transfer()
    refused = first(h.events[1], LinkRefused)
    assert refused.code == "bad-hello" and words in refused.reason
    assert refused.reason.isprintable() and len(refused.reason) < 300
    for record in h.logs:  # nothing of what was refused is logged as a name or a session
        assert record.user in ("", "alice") and not record.session


def test_the_users_end_drops_its_output_when_its_tls_fails(pki_dir: Any) -> None:
    """The user's process has the same rule: a link whose TLS failed (a corrupt record from
    the node) drops what it had queued instead of raising TlsError when asked for its bytes;
    a failure on output is reported by the next timer."""
    h = Harness(pki_dir)
    link = h.connect(1, "alice")
    link.send_packets([bytes(IP(src="10.0.0.2", dst=TARGET) / UDP(sport=1, dport=7))])
    (closed,) = [e for e in link.receive_data(CORRUPT_RECORD, h.now) if isinstance(e, LinkClosed)]
    link._send_control(MsgType.KEEPALIVE, {})  # something queued after the failure, too
    link.data_to_send(h.now)  # raised TlsError; now at most TLS's alert
    assert link.data_to_send(h.now) == b"" and closed.reason.startswith("TlsError")
    other = h.connect(2, "bob")
    other.tls.close()  # type: ignore[attr-defined]  # its TLS refuses to send from now on
    other.send_packets([bytes(IP(src="10.0.0.2", dst=TARGET) / UDP(sport=1, dport=7))])
    assert other.data_to_send(h.now) == b""
    failed = other.handle_timer(h.now)
    assert isinstance(failed, LinkClosed) and "TLS failed on output" in failed.reason
