"""The link protocol end to end in memory: a user's link and the server node, real TLS and RSA
over an in-memory transfer, packets NATed and replies routed back to the right user."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import msgpack
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

from pvpn import auth, tls
from pvpn.commands import CloseLink, LogRecord, SendBytes
from pvpn.config import ServerConfig, UserPolicy, parse_prefix
from pvpn.envelope import MsgType, encode_control
from pvpn import packet as pk
from pvpn.events import LinkClosed, LinkEstablished, LinkRefused, PacketsReceived
from pvpn.nodes.server import ServerNode
from pvpn.user import UserLink

from net import OneNode, authorized, client_tls, first, make_pki, signer, user_keys

SERVER_IP = "10.0.0.1"
NAT_SRC = ipaddress.ip_address("10.9.0.1").packed
NAT_SRC6 = ipaddress.ip_address("fd09::1").packed
TARGET = "10.9.0.5"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ((crt, key),) = make_pki(d, {"server": SERVER_IP}).values()
    other = tmp_path_factory.mktemp("other")
    make_pki(other, {})
    keys = user_keys("alice", "bob", "carol")
    users = authorized(d / "users", {name: keys[name] for name in ("alice", "bob")})
    return {"ca": str(d / "ca" / "ca.crt"), "other_ca": str(other / "ca" / "ca.crt"),
            "crt": str(crt), "key": str(key), "users": users, "keys": keys}


def make_node(p: dict[str, Any], mtu_for: Any = None) -> ServerNode:
    allow = [parse_prefix("10.9.0.0/24"), parse_prefix("fd09::/64")]
    config = ServerConfig(
        path=Path("server.toml"), name="server", listen=[], certificate=Path(p["crt"]),
        private_key=Path(p["key"]), authorized_keys=p["users"], queue=0,
        nat_ports=(61000, 61999), instance="t",
        users={"alice": UserPolicy(list(allow)), "bob": UserPolicy(list(allow))},
    )
    return ServerNode(config, auth.AuthorizedKeys(p["users"]), auth.verify_signature,
                      lambda dst: NAT_SRC if len(dst) == 4 else NAT_SRC6, mtu_for=mtu_for)


class Harness(OneNode):
    """One server node and any number of user links on an in-memory network."""

    def __init__(self, p: dict[str, Any], mtu_for: Any = None,
                 node: ServerNode | None = None) -> None:
        self.p = p
        self.server_ctx = tls.make_server_context(p["crt"], p["key"])
        super().__init__(node or make_node(p, mtu_for), self.server_ctx)

    transfer = OneNode.settle

    def connect(self, link_id: int, user: str, key_user: str | None = None, ca: str | None = None,
                want: tuple[str, ...] = ("10.9.0.0/24",), resume: Any = None) -> UserLink:
        client = client_tls(tls.make_client_context(ca_file=ca or self.p["ca"]), SERVER_IP)
        link = UserLink(client, user=user, uid=1000 + link_id,
                        signer=signer(self.p["keys"][key_user or user], user),
                        want=list(want), client_name="clienthost",
                        session=resume[0] if resume else b"",
                        token=resume[1] if resume else None)
        link.start(self.now)
        self.join(link_id, link, f"10.0.0.2:{40000 + link_id}")
        return link

    def join(self, link_id: int, link: UserLink, source: str = "peer") -> None:
        """``link`` connects from ``source`` as link ``link_id``, and the network settles."""
        self.net.open(self.name, link, source, link_id)
        self.transfer()

    def packets(self, link_id: int) -> list[bytes]:
        out = [p for e in self.events[link_id] if isinstance(e, PacketsReceived) for p in e.packets]
        self.events[link_id] = [e for e in self.events[link_id] if not isinstance(e, PacketsReceived)]
        return out


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
    assert any(r.event == "packet:dropped" and r.reason == "destination-not-allowed"
               and r.flow == "tcp 10.0.0.2:20 > 10.8.0.1:22" for r in h.logs)


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
    h.join(1, link)
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
    assert any(r.event == "packet:dropped" and r.reason == "icmp-error-no-flow" for r in h.logs)


# ---------------------------------------------------------------- policy on what is sent (issue 9)

from scapy.layers.inet import IPOption_LSRR, IPOption_SSRR  # noqa: E402
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig  # noqa: E402

from pvpn.drops import Drop  # noqa: E402

CLIENT = "10.0.0.2"


def drops(h: Harness) -> dict[str, int]:
    (session,) = h.node.sessions.values()
    return session.drops.as_dict()


def udp_flow(h: Harness, sport: int = 5000, dport: int = 53, dst: str = TARGET) -> int:
    """Alice sends one UDP packet; the NAT port it went out with."""
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst=dst) / UDP(sport=sport, dport=dport))])
    h.transfer()
    return int(IP(h.injected[-1])[UDP].sport)


def error_from_alice(kind: int = 3, code: int = 3, src: str = CLIENT, dst: str = TARGET,
                     payload: bytes = b"late", quote_src: str = TARGET) -> bytes:
    reply = IP(src=quote_src, dst=CLIENT) / UDP(sport=53, dport=5000) / payload
    return bytes(IP(src=src, dst=dst) / ICMP(type=kind, code=code) / reply)


@pytest.mark.parametrize("error, code", [pytest.param(e, c, id=n) for n, e, c in [
    # Outer destination must be the flow's remote: not the server, its loopback, another host.
    ("to the server itself", error_from_alice(dst="10.9.0.1"), Drop.ICMP_ERROR_REFUSED),
    ("to the server's loopback", error_from_alice(dst="127.0.0.1"), Drop.ICMP_ERROR_REFUSED),
    ("to another host", error_from_alice(dst="10.9.0.77"), Drop.ICMP_ERROR_REFUSED),
    ("from someone else", error_from_alice(src="10.0.0.9"), Drop.ICMP_ERROR_REFUSED),
    # Only what a host sends.
    ("redirect", error_from_alice(kind=5, code=1), Drop.ICMP_ERROR_REFUSED),
    ("source quench", error_from_alice(kind=4, code=0), Drop.ICMP_ERROR_REFUSED),
    ("ttl exceeded in transit", error_from_alice(kind=11, code=0), Drop.ICMP_ERROR_REFUSED),
    ("fragmentation needed", error_from_alice(kind=3, code=4), Drop.ICMP_ERROR_REFUSED),
    ("host unreachable", error_from_alice(kind=3, code=1), Drop.ICMP_ERROR_REFUSED),
    # At most 576 bytes, as sent (bytes past the IP length are refused whatever they are).
    ("64 KB of the user's choosing", error_from_alice(payload=b"A" * 60000),
     Drop.ICMP_ERROR_REFUSED),
    ("577 bytes", error_from_alice(payload=b"A" * (577 - 56)), Drop.ICMP_ERROR_REFUSED),
    ("trailing bytes", error_from_alice() + b"A" * 1000, Drop.MALFORMED_PACKET),
    ("options", bytes(IP(src=CLIENT, dst=TARGET, options=[IPOption_LSRR(routers=["10.9.0.1"])])
                      / ICMP(type=3, code=3) / (IP(src=TARGET, dst=CLIENT)
                                                / UDP(sport=53, dport=5000))), Drop.IP_OPTIONS),
]])
def test_icmp_errors_from_the_user_are_judged_on_what_is_sent(pki_dir: Any, error: bytes,
                                                              code: Drop) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    udp_flow(h)
    h.links[1].send_packets([error])
    h.transfer()
    assert len(h.injected) == 1, "the error went out"
    assert drops(h) == {code.value: 1}
    (record,) = [r for r in h.logs if r.event == "packet:dropped"]
    assert record.reason == code.value


@pytest.mark.parametrize("kind, code", [(3, 3), (3, 2), (3, 10), (3, 13), (12, 0)])
def test_icmp_errors_a_host_sends_still_go_out(pki_dir: Any, kind: int, code: int) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    nat_port = udp_flow(h)
    h.links[1].send_packets([error_from_alice(kind, code, payload=b"A" * (576 - 56))])
    h.transfer()
    assert len(h.injected) == 2 and drops(h) == {}
    out = IP(h.injected[1])
    assert (out.src, out.dst, out[ICMP].type, out[ICMP].code) == ("10.9.0.1", TARGET, kind, code)
    assert IP(bytes(out[ICMP].payload)).payload.dport == nat_port


def test_an_ipv6_packet_too_big_from_the_user_is_refused(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    h.links[1].send_packets([bytes(IPv6(src="fd00::2", dst="fd09::5") / UDP(sport=7, dport=53))])
    h.transfer()
    reply = IPv6(src="fd09::5", dst="fd00::2") / UDP(sport=53, dport=7)
    too_big = bytes(IPv6(src="fd00::2", dst="fd09::5") / ICMPv6PacketTooBig(mtu=1280) / reply)
    unreach = bytes(IPv6(src="fd00::2", dst="fd09::5") / ICMPv6DestUnreach(code=4) / reply)
    h.links[1].send_packets([too_big, unreach])
    h.transfer()
    assert len(h.injected) == 2 and drops(h) == {"icmp-error-refused": 1}


@pytest.mark.parametrize("option", [IPOption_LSRR(routers=["10.9.0.1"]),
                                    IPOption_SSRR(routers=["10.9.0.1", "10.9.0.7"])])
def test_ipv4_options_do_not_pass_the_nat(pki_dir: Any, option: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    nat_port = udp_flow(h)
    routed = IP(src=CLIENT, dst=TARGET, options=[option]) / UDP(sport=5000, dport=53) / b"x"
    h.links[1].send_packets([bytes(routed)])
    h.transfer()
    assert len(h.injected) == 1 and drops(h) == {"ip-options": 1}
    # A reply with options to a NAT mapping is taken and dropped; one to nothing of ours is
    # left to the host (someone else's).
    ours = IP(src=TARGET, dst="10.9.0.1", options=[option]) / UDP(sport=53, dport=nat_port)
    theirs = IP(src=TARGET, dst="10.9.0.1", options=[option]) / UDP(sport=53, dport=9)
    assert h.node.receive_reply(bytes(ours), h.now)
    assert not h.node.receive_reply(bytes(theirs), h.now)
    h.node.flush(h.now)
    h.transfer()
    assert h.packets(1) == [] and drops(h) == {"ip-options": 2}


def server_error(kind: int, code: int, nat_port: int, dst: str = "10.9.0.1",
                 payload: bytes = b"") -> bytes:
    """An ICMP error from a router about the packet the server sent for alice."""
    quote = IP(src="10.9.0.1", dst=TARGET) / UDP(sport=nat_port, dport=53) / payload
    return bytes(IP(src="10.9.0.254", dst=dst) / ICMP(type=kind, code=code) / quote)


def test_icmp_errors_from_the_network_are_judged_before_they_reach_the_user(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    nat_port = udp_flow(h)
    # A router's errors: the user's host needs them. Fragmentation needed goes to the server's
    # own kernel as well (not taken): the MTU it learns is what the server fragments to.
    assert not h.node.receive_reply(server_error(3, 4, nat_port), h.now)
    for kind, code in ((11, 0), (3, 1)):
        assert h.node.receive_reply(server_error(kind, code, nat_port), h.now)
    # Addressed to another address of the server than the one the quote was sent from, too
    # long, or of a type no host receives: taken (it is about our mapping) and dropped.
    assert h.node.receive_reply(server_error(3, 3, nat_port, dst="10.9.0.2"), h.now)
    assert h.node.receive_reply(server_error(3, 3, nat_port, payload=b"A" * 1000), h.now)
    assert h.node.receive_reply(server_error(5, 1, nat_port), h.now)
    assert not h.node.receive_reply(server_error(3, 3, nat_port + 1), h.now), "not ours"
    h.node.flush(h.now)
    h.transfer()
    delivered = [IP(p) for p in h.packets(1)]
    assert [(p[ICMP].type, p[ICMP].code) for p in delivered] == [(3, 4), (11, 0), (3, 1)]
    assert all(p.dst == CLIENT for p in delivered)
    assert drops(h) == {"reply-icmp-refused": 3}


def test_an_error_from_the_network_does_not_keep_a_mapping_alive(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    nat_port = udp_flow(h)
    (flow,) = h.node.flows.session_flows(next(iter(h.node.sessions)))
    seen = flow.last_seen
    h.now += 20
    assert h.node.receive_reply(server_error(3, 3, nat_port), h.now)
    assert flow.last_seen == seen and not flow.replied


def everywhere(h: Harness) -> None:
    h.node.config.users["alice"] = UserPolicy([parse_prefix("0.0.0.0/0"), parse_prefix("::/0")])


@pytest.mark.parametrize("dst", ["127.0.0.1", "127.0.0.53", "169.254.169.254", "224.0.0.251",
                                 "255.255.255.255", "0.0.0.0", "10.9.0.1", "10.9.0.255"])
def test_special_and_own_addresses_are_not_in_any_allow_list(pki_dir: Any, dst: str) -> None:
    h = Harness(pki_dir)
    everywhere(h)
    h.node.set_local_addresses(frozenset(parse_prefix(a) for a in
                                         ("10.9.0.1", "10.9.0.255", "127.0.0.1")))
    h.connect(1, "alice", want=("0.0.0.0/0",))
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst=dst) / UDP(sport=1, dport=53)),
                             bytes(IP(src=CLIENT, dst=TARGET) / UDP(sport=1, dport=53))])
    h.transfer()
    assert [IP(p).dst for p in h.injected] == [TARGET]
    assert drops(h) == {"destination-special": 1}


def test_ipv6_special_addresses_and_ipv4_mapped_ones(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    everywhere(h)
    h.connect(1, "alice", want=("::/0",))
    for dst in ("::1", "::ffff:127.0.0.1", "::ffff:10.9.0.5", "::127.0.0.1", "fe80::1", "ff02::1",
                "fd09::5"):
        h.links[1].send_packets([bytes(IPv6(src="fd00::2", dst=dst) / UDP(sport=1, dport=53))])
    h.transfer()
    assert [IPv6(p).dst for p in h.injected] == ["fd09::5"]
    assert drops(h) == {"destination-special": 6}


def test_an_allow_entry_inside_a_special_range_names_it(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.node.config.users["alice"] = UserPolicy([parse_prefix("0.0.0.0/0"),
                                               parse_prefix("127.0.0.0/8"),
                                               parse_prefix("10.9.0.1")])
    h.node.set_local_addresses(frozenset({parse_prefix("10.9.0.1"), parse_prefix("10.9.0.255")}))
    h.connect(1, "alice", want=("0.0.0.0/0",))
    for dst in ("127.0.0.1", "10.9.0.1", "10.9.0.255", "169.254.1.1"):
        h.links[1].send_packets([bytes(IP(src=CLIENT, dst=dst) / UDP(sport=1, dport=53))])
    h.transfer()
    assert [IP(p).dst for p in h.injected] == ["127.0.0.1", "10.9.0.1"]


def test_a_destination_excluded_as_a_whole_is_refused_at_login(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    everywhere(h)
    h.node.set_local_addresses(frozenset({parse_prefix("10.9.0.1")}))
    for link_id, want in ((1, "127.0.0.1/32"), (2, "10.9.0.1/32"), (3, "::ffff:0:0/96")):
        h.connect(link_id, "alice", want=(want,))
        refused = first(h.events[link_id], LinkRefused)
        assert refused.code == "destination-not-allowed" and "names it" in refused.reason
    assert not h.node.sessions


def test_an_address_that_becomes_the_servers_own_is_excluded_and_its_mappings_go(
        pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    udp_flow(h, dst="10.9.0.7")
    udp_flow(h, dst=TARGET)
    sid = next(iter(h.node.sessions))
    assert h.node.flows.sessions_flows(sid) == 2
    h.node.set_local_addresses(frozenset({parse_prefix("10.9.0.7")}))  # ip addr add ...
    assert [f.original.dst for f in h.node.flows.session_flows(sid)] == [ipaddress.ip_address(TARGET).packed]
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst="10.9.0.7") / UDP(sport=5000, dport=53))])
    h.transfer()
    assert len(h.injected) == 2 and drops(h) == {"destination-special": 1}
    assert h.node.describe(h.now)[0]["excluded"] == ["10.9.0.7"]


def test_drops_are_counted_by_code_and_their_records_are_bounded(pki_dir: Any) -> None:
    """3,000 packets to 3,000 ports: one counter, a bounded number of records, and each
    record's flow in its own field (issue 9: the reason used to embed the flow)."""
    h = Harness(pki_dir)
    h.connect(1, "alice")
    h.links[1].send_packets(bytes(IP(src=CLIENT, dst="10.8.0.1") / UDP(sport=1, dport=port))
                            for port in range(1, 3_001))
    h.transfer()
    assert drops(h) == {"destination-not-allowed": 3_000}
    records = [r for r in h.logs if r.event == "packet:dropped"]
    assert 1 <= len(records) <= 11  # the first, then a burst of at most 10 at one instant
    assert all(r.reason == "destination-not-allowed" and r.flow.startswith("udp 10.0.0.2:1 >")
               for r in records)
    h.now += 30  # the bucket refills: more records, still a few per second, with what was missed
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst="10.8.0.1") / UDP(sport=1, dport=1))])
    h.transfer()
    last = [r for r in h.logs if r.event == "packet:dropped"][-1]
    assert last.extra["count"] == 3_001 and last.extra["unlogged"] == 3_000 - len(records)
    assert h.node.describe(h.now)[0]["drops"] == {"destination-not-allowed": 3_001}


def test_sessions_per_user_are_bounded_and_the_oldest_detached_one_makes_room(
        pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.node.config.sessions_per_user = 2
    h.connect(1, "alice")
    h.connect(2, "alice")
    h.connect(3, "alice")  # both others are live: refused
    refused = first(h.events[3], LinkRefused)
    assert refused.code == "too-many-sessions" and "pvpn disconnect" in refused.reason
    h.connect(4, "bob")  # another user is not affected
    assert len(h.node.sessions) == 3
    first_session = first(h.events[1], LinkEstablished)
    h.node.link_lost(1, h.now)  # alice's first link goes: its session waits for a resume
    h.closed.add(1)
    h.now += 1
    h.connect(5, "alice")  # a new session (no resume): the detached one makes room
    assert first(h.events[5], LinkEstablished)
    assert first_session.session not in h.node.sessions
    closed = [r for r in h.logs if r.event == "session:closed"]
    assert len(closed) == 1 and "the most one user may have" in closed[0].reason
    # Resuming is not a new session.
    second = first(h.events[2], LinkEstablished)
    h.node.link_lost(2, h.now)
    h.closed.add(2)
    h.connect(6, "alice", resume=(second.session, second.token))
    assert first(h.events[6], LinkEstablished).resumed
    assert sum(s.user == "alice" for s in h.node.sessions.values()) == 2


def test_nat_caps_and_share_count_over_the_users_sessions(pki_dir: Any) -> None:
    from pvpn.flowtable import FlowTable

    h = Harness(pki_dir)
    h.node.flows = FlowTable((61000, 61009), user_share=0.5, max_flows_per_user=8,
                             max_flows_per_session=7)
    h.connect(1, "alice")
    h.connect(2, "alice")
    h.connect(3, "bob")
    # Two sessions of alice: together no more than half of the target's 10 ports.
    for link_id in (1, 2):
        h.links[link_id].send_packets(bytes(IP(src=CLIENT, dst=TARGET)
                                            / TCP(sport=1000 + n, dport=80, flags="S"))
                                      for n in range(3))
    h.links[3].send_packets(bytes(IP(src=CLIENT, dst=TARGET) / TCP(sport=n, dport=80, flags="S"))
                            for n in range(1, 6))
    h.transfer()
    ports = [IP(p)[TCP].sport for p in h.injected]
    assert len(ports) == 10 and len(set(ports)) == 10  # alice 5, bob 5
    sessions = {s.uid: s for s in h.node.sessions.values()}
    assert sessions[1002].drops.as_dict() == {"nat-share": 1}
    for port in ports:  # every SYN answered: none of these mappings is an eviction candidate
        assert h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1")
                                          / TCP(sport=80, dport=port, flags="SA")), h.now)
    # The user's cap counts both sessions: 5 TCP mappings and 3 more reach alice's 8.
    for n in range(4):
        h.links[1].send_packets([bytes(IP(src=CLIENT, dst=f"10.9.0.{20 + n}")
                                       / UDP(sport=1, dport=53))])
        h.transfer()
        nat_port = IP(h.injected[-1])[UDP].sport
        h.node.receive_reply(bytes(IP(src=f"10.9.0.{20 + n}", dst="10.9.0.1")
                                   / UDP(sport=53, dport=nat_port)), h.now)
    assert len(h.injected) == 13
    assert sessions[1001].drops.as_dict() == {"flow-cap-user": 1}
    assert h.node.flows.user_flows("alice") == 8 and h.node.flows.user_flows("bob") == 5
    record = [r for r in h.logs if r.reason == "flow-cap-user"][0]
    assert record.flow == "udp 10.0.0.2:1 > 10.9.0.23:53" and "one user may" in record.extra["detail"]


# ---------------------------------------------------------------- a reload reaches live sessions


def test_a_reload_ends_the_sessions_of_a_user_whose_policy_is_gone(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    h.connect(2, "bob")
    udp_flow(h)
    bob_policy = h.node.config.users["bob"]
    h.node.apply_policy({"bob": bob_policy}, h.now)  # alice's [users.alice] removed
    h.transfer()
    closed = first(h.events[1], LinkClosed)
    assert "policy of 'alice' at server was removed" in closed.reason
    assert 1 in h.closed and [s.user for s in h.node.sessions.values()] == ["bob"]
    assert len(h.node.flows) == 0, "her mappings went with her session"
    record = [r for r in h.logs if r.event == "session:closed"][0]
    assert record.user == "alice" and "removed" in record.reason
    assert not [e for e in h.events[2] if isinstance(e, LinkClosed)]
    # A packet she still sends goes nowhere; a new login is refused.
    h.connect(3, "alice")
    assert first(h.events[3], LinkRefused).code == "no-destinations"


def test_a_reload_narrows_the_sessions_of_a_user_whose_policy_shrank(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    udp_flow(h, dst="10.9.0.5")
    udp_flow(h, dst="10.9.0.200")
    sid = next(iter(h.node.sessions))
    assert h.node.flows.sessions_flows(sid) == 2
    h.node.apply_policy({"alice": UserPolicy([parse_prefix("10.9.0.0/25")]),
                         "bob": h.node.config.users["bob"]}, h.now)
    h.transfer()
    session = h.node.sessions[sid]
    assert [str(n) for n in session.allow.networks] == ["10.9.0.0/25"]
    assert [str(ipaddress.ip_address(f.original.dst))
            for f in h.node.flows.session_flows(sid)] == ["10.9.0.5"]
    (narrowed,) = [r for r in h.logs if r.event == "session:narrowed"]
    assert narrowed.extra["allow"] == ["10.9.0.0/25"] and narrowed.extra["flows"] == 1
    assert narrowed.extra["was"] == ["10.9.0.0/24", "fd09::/64"]
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst="10.9.0.200") / UDP(sport=5000, dport=53)),
                             bytes(IP(src=CLIENT, dst="10.9.0.5") / UDP(sport=5000, dport=53))])
    h.transfer()
    assert [IP(p).dst for p in h.injected[2:]] == ["10.9.0.5"]
    assert session.drops.as_dict() == {"destination-not-allowed": 1}
    # The same policy again changes nothing and says nothing.
    h.node.apply_policy(dict(h.node.config.users), h.now)
    h.transfer()
    assert len([r for r in h.logs if r.event == "session:narrowed"]) == 1
    # A policy that leaves none of what the session asked for ends it.
    h.node.apply_policy({"alice": UserPolicy([parse_prefix("10.99.0.0/16")])}, h.now)
    h.transfer()
    assert not h.node.sessions
    assert "none of its destinations" in first(h.events[1], LinkClosed).reason


def test_a_reload_that_names_less_excludes_it_again(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.node.set_local_addresses(frozenset({parse_prefix("10.9.0.1")}))
    h.node.config.users["alice"] = UserPolicy([parse_prefix("10.9.0.0/24"),
                                               parse_prefix("10.9.0.1")])
    h.connect(1, "alice")
    udp_flow(h, dst="10.9.0.1")  # named: the server's own address is reachable
    assert len(h.injected) == 1
    h.node.apply_policy({"alice": UserPolicy([parse_prefix("10.9.0.0/24")])}, h.now)
    assert len(h.node.flows) == 0
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst="10.9.0.1") / UDP(sport=5000, dport=53))])
    h.transfer()
    assert len(h.injected) == 1 and drops(h) == {"destination-special": 1}


def test_a_resume_asking_for_less_drops_the_mappings_outside_it(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice")
    est = first(h.events[1], LinkEstablished)
    udp_flow(h, dst="10.9.0.5")
    nat_port = udp_flow(h, dst="10.9.0.200")
    h.node.link_lost(1, h.now)
    h.closed.add(1)
    h.connect(2, "alice", want=("10.9.0.0/25",), resume=(est.session, est.token))
    assert first(h.events[2], LinkEstablished).resumed
    assert h.node.flows.sessions_flows(est.session) == 1
    assert not h.node.receive_reply(bytes(IP(src="10.9.0.200", dst="10.9.0.1")
                                          / UDP(sport=53, dport=nat_port)), h.now)


def test_a_reload_that_changes_nothing_for_a_session_says_nothing(pki_dir: Any) -> None:
    h = Harness(pki_dir)
    h.connect(1, "alice", want=("fd09::/64", "10.9.0.0/25", "10.9.0.128/25"))
    udp_flow(h)
    h.node.apply_policy({"alice": UserPolicy([parse_prefix("10.9.0.0/16"),
                                              parse_prefix("fd09::/48")])}, h.now)
    h.transfer()
    assert not [r for r in h.logs if r.event == "session:narrowed"]
    assert len(h.node.flows) == 1 and len(h.node.sessions) == 1


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
    session = next(s for s in node.sessions.values() if s.user == "alice")
    counted = session.packets_in
    assert node.receive_reply(reply, h.now)  # routed to her link after its TLS failed
    assert session.packets_in == counted, "not counted as delivered: it goes nowhere"
    assert session.drops.as_dict().get("session-detached") == 1
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
    h.join(1, link)
    refused = first(h.events[1], LinkRefused)
    assert len(refused.reason) <= 1024 and 1 in h.closed


@pytest.mark.parametrize("fields, words", [
    ({"user": "\x1b[2J" + "a" * 4000}, "user name"),
    ({"client": "c" * 4000}, "client host name"),
    ({"path": ["gw1\x1b[31m"]}, "node names"),
    ({"next": "10.0.0.1:4433\n" + "x" * 4000}, "next hop"),
    ({"next": "[fe80::1%eth0]:4433"}, "next hop"),  # a zone: an interface of the node's choosing
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
    h.join(1, link)
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


def keepalive_flood(link: UserLink, count: int) -> bytes:
    for _ in range(count):
        link._send_control(MsgType.KEEPALIVE, {})
    return link.data_to_send(0.0)


def test_a_peer_that_does_not_read_gets_no_keepalive_answers_to_pile_up(pki_dir: Any) -> None:
    """An authenticated user who sends KEEPALIVEs as fast as the line goes and never reads
    made the node queue one KEEPALIVE_ACK per KEEPALIVE, as many bytes as it sent, without
    bound (the socket's high-water mark only dropped packets): the node's memory was the
    user's to fill. On a congested link a KEEPALIVE is not answered; the user's end does the
    same for a node."""
    h = Harness(pki_dir)
    link = h.connect(1, "alice")
    h.node.link_congested(1, True)
    flood = keepalive_flood(link, 5000)
    assert len(flood) > 100_000
    h.node.receive_data(1, flood, h.now)
    h.node.flush(h.now)
    queued = sum(len(c.data) for c in h.node.commands if isinstance(c, SendBytes))
    assert queued < 1000 and not h.node.links[1].closed
    h.node.commands.clear()
    h.node.link_congested(1, False)  # once it drains, KEEPALIVEs are answered again
    h.node.receive_data(1, keepalive_flood(link, 1), h.now)
    assert any(isinstance(c, SendBytes) and c.link == 1 for c in h.node.commands)
    # The user's end: a node flooding KEEPALIVEs at a congested tunnel gets nothing back.
    h.node.commands.clear()
    for _ in range(3000):
        h.node._send(h.node.links[1], MsgType.KEEPALIVE, h.node.links[1].session_id,
                     encode_control({}))
    h.node.flush(h.now)
    link.congested = True
    for cmd in h.node.commands:
        if isinstance(cmd, SendBytes):
            link.receive_data(cmd.data, h.now)
    assert len(link.data_to_send(h.now)) < 1000


def test_mappings_from_an_address_the_server_no_longer_has_go(pki_dir: Any) -> None:
    """An address the server sent from moved away (renumbered; a failover address taken over
    by the standby): its mappings went on sending with it, for up to 2 h 4 min, the raw
    socket never checking, and the replies, the users' data, reached whoever has it now.
    They are dropped when the server's addresses change; other mappings stay."""
    h = Harness(pki_dir)
    h.node.set_local_addresses(frozenset({parse_prefix("10.9.0.1"), parse_prefix("fd09::1")}))
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    udp_flow(h)
    h.links[1].send_packets([bytes(IPv6(src="fd00::2", dst="fd09::5") / UDP(sport=1, dport=53))])
    h.transfer()
    assert len(h.node.flows) == 2
    h.node.set_local_addresses(frozenset({parse_prefix("fd09::1")}))  # 10.9.0.1 is gone
    assert [f.nat_src for f in h.node.flows.session_flows(next(iter(h.node.sessions)))] == [
        NAT_SRC6]


def test_the_users_end_signs_no_flood_of_challenges(pki_dir: Any) -> None:
    """A node (a rogue gateway, say) sent CHALLENGE after CHALLENGE on an established link and
    the user's process signed every one: an RSA signature each, its CPU the node's to spend.
    Honest nodes challenge one at a time, at most every reauth_interval (10 s or more) and on a
    reload: a burst of 8 is answered, then one per 10 s; beyond that the link closes."""
    h = Harness(pki_dir)
    link = h.connect(1, "alice")
    node_link = h.node.links[1]

    def challenge(count: int) -> list[Any]:
        for _ in range(count):
            h.node._send(node_link, MsgType.CHALLENGE, node_link.session_id,
                         encode_control({"nonce": bytes(32), "node": "server"}))
        h.node.flush(h.now)
        events: list[Any] = []
        for cmd in h.node.commands:
            if isinstance(cmd, SendBytes):
                events += link.receive_data(cmd.data, h.now)
        h.node.commands.clear()
        return events

    assert not challenge(8) and link.reauthenticated == 8
    h.now += 10.0
    assert not challenge(1) and link.reauthenticated == 9
    closed = first(challenge(40), LinkClosed)
    assert "re-authentication" in closed.reason and link.reauthenticated == 9


def test_the_remote_end_of_a_ping_cannot_ping_the_users_host_back(pki_dir: Any) -> None:
    """An echo mapping took any echo with its id: the host alice pinged could send echo
    requests to the NAT address and id for 30 s, and they reached alice's client host through
    her tunnel (which answered). Only echo replies answer an echo mapping; a request is the
    server's to answer."""
    h = Harness(pki_dir)
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst=TARGET) / ICMP(id=77, seq=1)),
                             bytes(IPv6(src="fd00::2", dst="fd09::5") / ICMPv6EchoRequest(id=78))])
    h.transfer()
    ident4, ident6 = IP(h.injected[0])[ICMP].id, IPv6(h.injected[1])[ICMPv6EchoRequest].id
    back4 = IP(src=TARGET, dst="10.9.0.1") / ICMP(type=8, id=ident4, seq=9)
    back6 = IPv6(src="fd09::5", dst="fd09::1") / ICMPv6EchoRequest(id=ident6)
    assert not h.node.receive_reply(bytes(back4), h.now)
    assert not h.node.receive_reply(bytes(back6), h.now)
    assert h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / ICMP(type=0, id=ident4)),
                                h.now)
    assert h.node.receive_reply(bytes(IPv6(src="fd09::5", dst="fd09::1")
                                      / ICMPv6EchoReply(id=ident6)), h.now)


# ---------------------------------------------------------------- datagrams of any size

from pvpn import fragments  # noqa: E402
from scapy.layers.inet import defragment  # noqa: E402

CLIENT6 = "fd00::2"


def big_harness(pki_dir: Any, mtu: int) -> Harness:
    h = Harness(pki_dir, mtu_for=lambda dst: mtu)
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    return h


def test_a_datagram_larger_than_the_link_leaves_in_fragments_of_the_natted_datagram(
        pki_dir: Any) -> None:
    h = big_harness(pki_dir, 1500)
    data = bytes(range(256)) * 200
    sent = bytes(IP(src=CLIENT, dst=TARGET, id=99) / UDP(sport=5000, dport=7) / data)
    h.links[1].send_packets([sent])
    h.transfer()
    assert len(h.injected) == 35 and all(len(p) <= 1500 for p in h.injected)
    (whole,) = defragment([IP(p) for p in h.injected])
    assert whole.src == "10.9.0.1" and bytes(whole[UDP].payload) == data
    assert whole[UDP].chksum == IP(bytes(whole[IP]))[UDP].chksum  # still right after the NAT
    h.injected.clear()
    sent6 = bytes(IPv6(src=CLIENT6, dst="fd09::5") / UDP(sport=5000, dport=7) / data)
    h.links[1].send_packets([sent6])
    h.transfer()
    assert len(h.injected) > 1 and all(len(p) <= 1500 for p in h.injected)
    rebuilt = fragments.Reassembler()
    out = [rebuilt.feed(p, 0.0) for p in h.injected][-1]
    assert out is not None and IPv6(out).src == "fd09::1" and bytes(IPv6(out)[UDP].payload) == data
    assert h.packets(1) == []  # no error: a datagram too large for the sender's link
    assert drops(h) == {}


def test_a_df_packet_too_big_for_the_link_gets_fragmentation_needed_back(pki_dir: Any) -> None:
    h = big_harness(pki_dir, 1280)
    sent = bytes(IP(src=CLIENT, dst=TARGET, flags="DF") / UDP(sport=5000, dport=7) / (b"x" * 1400))
    h.links[1].send_packets([sent])
    h.transfer()
    assert h.injected == [] and drops(h) == {"too-big": 1}
    (error,) = h.packets(1)
    parsed = IP(error)
    assert (parsed[ICMP].type, parsed[ICMP].code, parsed[ICMP].nexthopmtu) == (3, 4, 1280)
    assert parsed.dst == CLIENT and bytes(parsed[ICMP].payload)[:20] == sent[:20]
    assert pk.received_icmp_error_refusal(error) is None
    # What fits leaves whole, DF and all; without DF a larger one is fragmented.
    h.links[1].send_packets([bytes(IP(src=CLIENT, dst=TARGET, flags="DF") / UDP(sport=5000)
                                   / (b"x" * 1252)),
                             bytes(IP(src=CLIENT, dst=TARGET) / UDP(sport=5000) / (b"x" * 1400))])
    h.transfer()
    assert [len(p) for p in h.injected] == [1280, 1276, 172]


def test_ipv6_gets_one_packet_too_big_then_the_server_fragments(pki_dir: Any) -> None:
    h = big_harness(pki_dir, 1280)
    sent = bytes(IPv6(src=CLIENT6, dst="fd09::5") / UDP(sport=5000, dport=7) / (b"x" * 1400))
    h.links[1].send_packets([sent])
    h.transfer()
    assert h.injected == [] and drops(h) == {"too-big": 1}
    (error,) = h.packets(1)
    assert IPv6(error)[ICMPv6PacketTooBig].mtu == 1280 and IPv6(error).dst == CLIENT6
    assert pk.received_icmp_error_refusal(error) is None
    # Its kernel knows the MTU now: a datagram that still comes bigger is one it would have
    # fragmented, so the server fragments it (RFC 8201 5.2: the source fragments).
    h.links[1].send_packets([sent])
    h.transfer()
    assert len(h.injected) == 2 and all(len(p) <= 1280 for p in h.injected)
    assert h.packets(1) == [] and drops(h) == {"too-big": 1}


def test_a_path_mtu_error_reaches_the_user_and_the_servers_kernel(pki_dir: Any) -> None:
    h = big_harness(pki_dir, 1500)
    nat_port = udp_flow(h)
    assert not h.node.receive_reply(server_error(3, 4, nat_port), h.now)  # accepted as well
    h.node.flush(h.now)
    h.transfer()
    (delivered,) = h.packets(1)
    assert IP(delivered)[ICMP].code == 4


# -- a restart of the server (issue 10 section 2) ----------------------------------------------


def restarted(h: Harness, downtime: float = 1.0, node: ServerNode | None = None
              ) -> tuple[Harness, dict[str, Any]]:
    """The server of ``h`` after a restart: its snapshot through the file's bytes, put back
    into a new node (on a clock of its own) ``downtime`` seconds later."""
    from pvpn.state import decode_state, encode_state

    saved = decode_state(encode_state(h.node.snapshot(h.now)))
    again = Harness(h.p, node=node)
    again.now = h.now + 5000.0
    report = again.node.restore(saved, again.now, downtime)
    again.transfer()  # its records
    return again, report


def download(h: Harness, link_id: int = 1) -> tuple[bytes, int]:
    """alice's connection to TARGET:80 opened and answered; its SYN and its NAT port."""
    syn = bytes(IP(src=CLIENT, dst=TARGET) / TCP(sport=40000, dport=80, flags="S", seq=1000))
    h.links[link_id].send_packets([syn])
    h.transfer()
    port = int(IP(h.injected[-1])[TCP].sport)
    assert h.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / TCP(
        sport=80, dport=port, flags="SA", seq=5000, ack=1001)), h.now)
    h.node.flush(h.now)
    h.transfer()
    assert len(h.packets(link_id)) == 1
    return syn, port


def ack(seq: int = 1001, ack_no: int = 5001) -> bytes:
    return bytes(IP(src=CLIENT, dst=TARGET) / TCP(sport=40000, dport=80, flags="A", seq=seq,
                                                   ack=ack_no))


def test_a_restarted_server_resumes_the_session_with_its_mappings(pki_dir: Any) -> None:
    """The same session, token and NAT port after a restart: the remote end's retransmission
    reaches alice, and her segments leave with the port the remote end knows."""
    h = Harness(pki_dir)
    h.connect(1, "alice")
    est = first(h.events[1], LinkEstablished)
    _, port = download(h)
    b, report = restarted(h)
    assert report["sessions"] == 1 and report["flows"] == 1 and not report["skipped"]
    (record,) = [r for r in b.logs if r.event == "session:restored"]
    assert record.session == est.session.hex() and record.extra["flows"] == 1
    (session,) = b.node.sessions.values()
    assert session.link is None and session.token == b""  # detached, its token not kept
    b.connect(2, "alice", resume=(est.session, est.token))
    again = first(b.events[2], LinkEstablished)
    assert again.resumed and again.session == est.session and again.token == est.token
    b.links[2].send_packets([ack()])
    b.transfer()
    (out,) = b.injected
    assert IP(out)[TCP].sport == port and IP(out).src == "10.9.0.1"
    assert b.node.receive_reply(bytes(IP(src=TARGET, dst="10.9.0.1") / TCP(
        sport=80, dport=port, flags="PA", seq=5001, ack=1001) / b"data"), b.now)
    b.node.flush(b.now)
    b.transfer()
    (back,) = b.packets(2)
    assert IP(back)[TCP].dport == 40000 and bytes(IP(back)[TCP].payload) == b"data"
    # Someone else's token (or none) for that id still gets a new session, not alice's.
    b.connect(3, "alice", resume=(est.session, b"x" * 16))
    other = first(b.events[3], LinkEstablished)
    assert not other.resumed and other.session != est.session


def test_a_server_restarted_without_its_state_resets_the_connection(pki_dir: Any) -> None:
    """No mapping for a segment in the middle of a connection: alice's TCP gets a reset at
    once (at her exact receive point) instead of a new NAT port the remote end never saw."""
    h = Harness(pki_dir)
    h.connect(1, "alice")
    est = first(h.events[1], LinkEstablished)
    download(h)
    b = Harness(pki_dir)  # the state is gone
    b.connect(2, "alice", resume=(est.session, est.token))
    assert not first(b.events[2], LinkEstablished).resumed
    b.links[2].send_packets([ack(seq=1001, ack_no=777_000)])
    b.transfer()
    assert b.injected == [] and len(b.node.flows) == 0
    (reset,) = b.packets(2)
    got = IP(reset)
    assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == (TARGET, CLIENT, 80, 40000)
    assert got[TCP].flags == "R" and got[TCP].seq == 777_000
    assert drops(b) == {"tcp-no-mapping": 1}
    # A reset of hers is not answered; a new connection (a SYN) is mapped as ever.
    b.links[2].send_packets([bytes(IP(src=CLIENT, dst=TARGET) / TCP(sport=40000, dport=80,
                                                                    flags="R", seq=1001))])
    b.links[2].send_packets([bytes(IP(src=CLIENT, dst=TARGET) / TCP(sport=40001, dport=80,
                                                                    flags="S"))])
    b.transfer()
    assert b.packets(2) == [] and len(b.injected) == 1


def test_an_orderly_stop_keeps_the_sessions_for_their_resume(pki_dir: Any) -> None:
    """SIGTERM with a state file: no CLOSE (the user's process holds and resumes), the
    sessions detached, not ended, and in the snapshot with their mappings."""
    h = Harness(pki_dir)
    h.connect(1, "alice")
    download(h)
    h.node.detach_all("server stopping", h.now)
    h.transfer()
    assert 1 in h.closed
    assert not [e for e in h.events[1] if isinstance(e, LinkClosed)], "no CLOSE was sent"
    assert not [r for r in h.logs if r.event == "session:closed"]
    (session,) = h.node.sessions.values()
    assert session.link is None and session.detached_since == h.now
    (saved,) = h.node.snapshot(h.now).sessions
    assert saved.detached == 0.0 and len(saved.flows) == 1


def test_the_state_keeps_no_token_and_no_key(pki_dir: Any) -> None:
    from pvpn.state import encode_state, token_hash

    h = Harness(pki_dir)
    h.connect(1, "alice")
    est = first(h.events[1], LinkEstablished)
    data = encode_state(h.node.snapshot(h.now))
    assert est.token not in data and token_hash(est.token) in data
    key = pki_dir["keys"]["alice"]
    assert key.public_key().public_numbers().n.to_bytes(256, "big") not in data


@pytest.mark.parametrize("change", ["key removed", "policy removed", "expired", "narrowed"])
def test_what_a_restart_cannot_bring_back_ends(pki_dir: Any, tmp_path: Path,
                                              change: str) -> None:
    """A session whose user lost their key or policy, or whose grace ran out while the
    server was away, is not put back (a session:closed record says why), and its user's
    resume gets nothing of it: issue 9's revocation holds across a restart."""
    import shutil

    h = Harness(pki_dir)
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    est = first(h.events[1], LinkEstablished)
    download(h)
    users = tmp_path / "users"
    shutil.copytree(pki_dir["users"], users)
    node = make_node(pki_dir)
    node._keys = auth.AuthorizedKeys(users)
    downtime = 1.0
    if change == "key removed":
        (users / "alice.pub").unlink()
    elif change == "policy removed":
        del node.config.users["alice"]
    elif change == "expired":
        downtime = node.config.resume_grace + 1
    else:
        node.config.users["alice"] = UserPolicy([parse_prefix("fd09::/64")])
    b, report = restarted(h, downtime, node)
    if change == "narrowed":  # what is still allowed comes back, the rest (her IPv4) not
        (session,) = b.node.sessions.values()
        assert [str(n) for n in session.allow.networks] == ["fd09::/64"]
        assert report["flows"] == 0
        assert report["skipped"] == {"mapping: its destination is not allowed now": 1}
        return
    assert report["sessions"] == 0 and not b.node.sessions and len(b.node.flows) == 0
    (closed,) = [r for r in b.logs if r.event == "session:closed"]
    assert closed.session == est.session.hex() and closed.user == "alice"
    assert closed.reason.startswith("not resumed within" if change == "expired" else "revoked")
    b.connect(2, "alice", resume=(est.session, est.token))
    if change == "expired":
        assert not first(b.events[2], LinkEstablished).resumed
    else:
        assert first(b.events[2], LinkRefused).code == (
            "auth-failed" if change == "key removed" else "no-destinations")
        assert not b.node.sessions


def test_a_forged_state_gives_no_more_than_a_live_user_could_have(pki_dir: Any) -> None:
    """Mappings are checked as the table and the policy check their own: a destination
    outside the allow list, a NAT address that is not the server's, a port outside
    nat_ports, beyond the caps; sessions beyond sessions_per_user; another node's state."""
    from pvpn.flowtable import FlowTable, SavedFlow
    from pvpn.packet import FlowKey
    from pvpn.state import SavedSession, ServerState, token_hash

    def tcp_flow(sport: int, dst: str = TARGET, nat: bytes = NAT_SRC,
                 port: int | None = None) -> SavedFlow:
        key = FlowKey(6, ipaddress.ip_address(CLIENT).packed, sport,
                      ipaddress.ip_address(dst).packed, 80)
        return SavedFlow(key, nat, port or 61000 + sport, 1.0, 64, 0.0)

    def session(n: int, user: str, flows: list[SavedFlow],
                allow: tuple[str, ...] = ("0.0.0.0/0",)) -> SavedSession:
        return SavedSession(bytes([n]) * 16, token_hash(b"t" * 16), user, 1001, "c",
                            "10.0.0.2:1", allow, 10.0, 5.0, (0, 0, 0, 0), tuple(flows))

    node = make_node(pki_dir)
    node.config.sessions_per_user = 2
    node.flows = FlowTable((61000, 61999), max_flows_per_session=3, tcp_pickup=False)
    forged = [
        session(1, "alice", [tcp_flow(1), tcp_flow(2, dst="10.8.0.1"),
                             tcp_flow(3, nat=ipaddress.ip_address("10.9.0.99").packed),
                             tcp_flow(4, port=70), tcp_flow(5), tcp_flow(6), tcp_flow(7)]),
        session(2, "alice", [tcp_flow(1, port=61001)]),  # bob's? no: the port is taken
        session(3, "alice", []),  # alice's third: one more than sessions_per_user
        session(4, "mallory", [tcp_flow(9)]),  # nobody the server knows
    ]
    report = node.restore(ServerState("server", 0.0, 0, tuple(forged)), 100.0, 1.0)
    assert report["sessions"] == 2 and report["flows"] == 3
    assert report["skipped"] == {
        "too-many": 1, "revoked": 1,
        "mapping: its destination is not allowed now": 1,
        "mapping: its NAT address is not the server's": 1,
        "mapping: NAT port 70 outside nat_ports 61000-61999": 1,
        "mapping: the session holds as many mappings as one session may (3)": 1,
        "mapping: its NAT port towards that endpoint is taken": 1,
    }
    # What the policy allows is what the session gets, whatever the file said.
    assert all([str(n) for n in s.allow.networks] == ["10.9.0.0/24"]
               for s in node.sessions.values())
    with pytest.raises(ValueError, match="written by node 'gw1'"):
        make_node(pki_dir).restore(ServerState("gw1", 0.0, 0, ()), 100.0, 1.0)


def test_a_peer_s_close_notify_closes_its_link_at_once(pki_dir: Any) -> None:
    """close_notify without CLOSE (a user's process stopping to resume later): the node closes
    the link at once, saying why, instead of waiting for TCP or dead_after; the session is
    detached for its resume, as when the connection goes."""
    h = Harness(pki_dir)
    h.connect(1, "alice")
    session_id = first(h.events[1], LinkEstablished).session
    h.links[1].tls.close()
    h.transfer()
    assert 1 in h.closed, "the link waits for its TCP connection or dead_after"
    (said,) = [r for r in h.logs if r.event == "link:closed"]
    assert "close_notify" in said.reason and said.session == session_id.hex()
    h.node.link_lost(1, h.now)  # the adapter closed the connection
    h.transfer()
    assert h.node.sessions[session_id].link is None
    assert [r.event for r in h.logs if r.event.startswith("session:")][-1] == "session:detached"
