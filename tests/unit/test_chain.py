"""Whole chains in memory: user -> gw1 -> gw2 -> server over real nested TLS sessions, with
real RSA authentication at every hop; gateways relay bytes they can't read."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP

from pvpn import auth, tls
from pvpn.commands import CloseLink, LogRecord, SendBytes
from pvpn.config import (
    GatewayConfig, GatewayPolicy, ServerConfig, UserPolicy, parse_next_hop_rule, parse_prefix,
)
from pvpn.envelope import MsgType
from pvpn.events import ChainFailed, ChainUp, PacketsReceived
from pvpn.nodes.gateway import GatewayNode
from pvpn.nodes.server import ServerNode
from pvpn.user import UserChain, UserLink

from net import Network, authorized, client_tls, first, limits, make_pki, signer, user_keys

ADDR = {"gw1": "10.0.1.1", "gw2": "10.0.2.1", "server": "10.0.3.1", "gw3": "10.0.4.1"}
NAT = ipaddress.ip_address("10.9.0.1").packed
MARKER = b"PVPN-SECRET-MARKER-0123456789"
HOPS = [ADDR["gw1"], ADDR["gw2"], ADDR["server"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("chain")
    certs = make_pki(d, ADDR)
    keys = user_keys("alice", "bob", "carol")
    return {"ca": str(d / "ca" / "ca.crt"), "certs": certs, "users": authorized(d / "users", keys),
            "keys": keys}


class Net(Network):
    """gw1, gw2, gw3 and the server by address, on an in-memory network."""

    def __init__(self, w: dict[str, Any], gw_users: dict[str, dict[str, list[str]]] | None = None,
                 gw_names: dict[str, str] | None = None) -> None:
        super().__init__(now=10.0, rounds=200)
        self.w = w
        gw_users = gw_users or {
            "gw1": {"alice": [f"{ADDR['gw2']}:4433"], "bob": [f"{ADDR['gw2']}:4433"]},
            "gw2": {"alice": [f"{ADDR['server']}:4433"], "bob": ["10.0.3.0/24"]},
            "gw3": {"alice": [f"{ADDR['gw1']}:4433"]},
        }
        for gw in ("gw1", "gw2", "gw3"):
            crt, key = w["certs"][gw]
            cfg = GatewayConfig(Path("g.toml"), (gw_names or {}).get(gw, gw), [], crt, key,
                                w["users"], 5.0, {
                                    user: GatewayPolicy([parse_next_hop_rule(r, "t") for r in rules])
                                    for user, rules in gw_users[gw].items()})
            self.add(ADDR[gw], GatewayNode(cfg, auth.AuthorizedKeys(w["users"]),
                                           auth.verify_signature),
                     tls.make_server_context(str(crt), str(key)))
        crt, key = w["certs"]["server"]
        allow = [parse_prefix("10.9.0.0/24")]
        scfg = ServerConfig(Path("s.toml"), "server", [], crt, key, w["users"], 0, (61000, 61999),
                            "t", {"alice": UserPolicy(list(allow)), "bob": UserPolicy(list(allow))})
        self.server = ServerNode(scfg, auth.AuthorizedKeys(w["users"]), auth.verify_signature,
                                 lambda dst: NAT)
        self.add(ADDR["server"], self.server, tls.make_server_context(str(crt), str(key)))

    pump = Network.settle

    def chain(self, user: str, hops: list[str], key_user: str | None = None,
              session: bytes = b"S" * 16, token: bytes | None = None) -> tuple[UserChain, list[Any]]:
        sign = signer(self.w["keys"][key_user or user], user)
        ctx = tls.make_client_context(ca_file=self.w["ca"])

        def make(index: int, before: list[str]) -> UserLink:
            last = index == len(hops) - 1
            return UserLink(client_tls(ctx, hops[index]), user=user, uid=1001,
                            want=["10.9.0.0/24"] if last else [], signer=sign,
                            client_name="c", session=session, token=token if last else None,
                            next_hop=None if last else f"{hops[index + 1]}:4433", path=before,
                            hops=16 - index)

        chain = UserChain(make, len(hops), hops)
        return chain, self.join(chain, hops[0])

    def join(self, chain: UserChain, first_hop: str) -> list[Any]:
        """``chain`` started, its first link opened to ``first_hop``, and the network settled:
        the list of what the chain will hear."""
        chain.start(self.now)
        link = self.open(first_hop, chain)
        chain.first = (first_hop, link)  # type: ignore[attr-defined]
        self.pump()
        return self.ends[first_hop].events[link]


def up_event(events: list[Any]) -> ChainUp:
    return first(events, ChainUp)


def alice_and_bob(net: Net) -> tuple[UserChain, list[Any], UserChain, list[Any]]:
    """alice's and bob's chains up through gw1 and gw2 (sessions A... and B...), and what
    each heard."""
    alice, a_events = net.chain("alice", HOPS, session=b"A" * 16)
    bob, b_events = net.chain("bob", HOPS, session=b"B" * 16)
    up_event(a_events), up_event(b_events)
    return alice, a_events, bob, b_events


def failure(events: list[Any]) -> ChainFailed:
    return first(events, ChainFailed)


def test_two_gateway_chain_carries_packets_end_to_end(world: Any) -> None:
    net = Net(world)
    chain, events = net.chain("alice", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    up = up_event(events)
    assert up.nodes == ["gw1", "gw2", "server"] and up.accept.session == b"S" * 16
    pkt = bytes(IP(src="10.0.0.2", dst="10.9.0.5") / UDP(sport=5000, dport=7) / MARKER)
    chain.send_packets([pkt])
    net.pump()
    (out,) = net.injected
    assert IP(out)[UDP].payload.load == MARKER
    assert net.server.receive_reply(
        bytes(IP(src="10.9.0.5", dst="10.9.0.1") / UDP(sport=7, dport=IP(out)[UDP].sport) / b"back"),
        net.now)
    net.pump()
    got = [p for e in events if isinstance(e, PacketsReceived) for p in e.packets]
    assert [IP(p)[UDP].payload.load for p in got] == [b"back"]
    # Every hop authenticated alice and logged the same session id.
    opened = [(addr, r.session, r.user) for addr, r in net.logs if r.event == "session:opened"]
    assert sorted(opened) == sorted((ADDR[n], (b"S" * 16).hex(), "alice")
                                    for n in ("gw1", "gw2", "server"))
    # The gateways relayed only ciphertext: the marker never showed in what they saw.
    assert net.seen_by_gateways and not any(MARKER in d for d in net.seen_by_gateways)
    assert not any(MARKER.decode() in repr(r) for _, r in net.logs)


def test_alice_and_bob_chains_through_the_same_gateways_never_cross(world: Any) -> None:
    net = Net(world)
    alice, a_events, bob, b_events = alice_and_bob(net)
    same = bytes(IP(src="10.0.0.2", dst="10.9.0.5") / UDP(sport=5000, dport=7) / b"q")
    alice.send_packets([same])
    bob.send_packets([same])
    net.pump()
    ports = [IP(p)[UDP].sport for p in net.injected]
    assert len(set(ports)) == 2
    for port, who in zip(ports, (b"to-alice", b"to-bob")):
        net.server.receive_reply(bytes(IP(src="10.9.0.5", dst="10.9.0.1") / UDP(sport=7, dport=port)
                                       / who), net.now)
    net.pump()
    def loads(ev: list[Any]) -> list[bytes]:
        return [IP(p)[UDP].payload.load for e in ev if isinstance(e, PacketsReceived) for p in e.packets]
    assert loads(a_events) == [b"to-alice"] and loads(b_events) == [b"to-bob"]


def test_gateway_refuses_a_user_it_does_not_allow(world: Any) -> None:
    net = Net(world)
    _, events = net.chain("carol", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    fail = failure(events)
    assert fail.fatal and fail.hop == 0
    assert "may not pass through gateway gw1" in fail.reason


def test_gateway_refuses_a_next_hop_it_does_not_allow(world: Any) -> None:
    net = Net(world)
    # gw1 lets alice go to gw2 only, not straight to the server.
    _, events = net.chain("alice", [ADDR["gw1"], ADDR["server"]])
    fail = failure(events)
    assert fail.fatal and "may not forward" in fail.reason and "next-hop-not-allowed" in fail.reason


def test_unreachable_next_hop_is_retryable(world: Any) -> None:
    net = Net(world, gw_users={"gw1": {"alice": ["10.0.0.0/8"]}, "gw2": {}, "gw3": {}})
    _, events = net.chain("alice", [ADDR["gw1"], "10.0.7.7", ADDR["server"]])
    fail = failure(events)
    assert not fail.fatal and "cannot reach" in fail.reason


def test_a_chain_that_never_comes_up_names_the_silent_hop_and_what_it_waits_for(
        world: Any) -> None:
    # A first hop that takes TCP and says nothing (this chain is fed nothing at all).
    ctx = tls.make_client_context(ca_file=world["ca"])

    def make(index: int, before: list[str]) -> UserLink:
        s = tls.TlsSession(ctx, server_side=False, server_name="10.0.0.99")
        s.start()
        return UserLink(s, user="alice", uid=1001, want=[], client_name="c",
                        signer=lambda n, b, node: b"")
    lonely = UserChain(make, 1, ["10.0.0.99:4433"])
    lonely.start(0.0)
    said = lonely.silent_hop(20)
    assert said.startswith("no answer from hop 1 of 1 (10.0.0.99:4433) within 20 s")
    assert "TLS handshake did not finish" in said

    # gw1 takes the user's signature, then waits for its next hop's connection.
    net = Net(world)
    net.hold_next = True
    chain, events = net.chain("alice", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    assert not chain.up and not events
    said = chain.silent_hop(40)
    assert said.startswith("no answer from hop 1 of 3 (")
    assert f"still be connecting to its next hop, {ADDR['gw2']}" in said

    # gw1 reached a next hop that takes TCP and never speaks TLS.
    net = Net(world, gw_users={"gw1": {"alice": ["10.0.0.0/8"]}, "gw2": {}, "gw3": {}})
    net.silent.add("10.0.6.6")
    chain, events = net.chain("alice", [ADDR["gw1"], "10.0.6.6", ADDR["server"]])
    assert not chain.up and not events
    said = chain.silent_hop(40)
    assert said.startswith("no answer from hop 2 of 3 (10.0.6.6), reached through gw1 within")
    assert "TLS handshake did not finish" in said


def test_a_looped_chain_is_refused(world: Any) -> None:
    # gw3 forwards to gw1, which is already in the path: gw1 refuses to be visited twice.
    users = {"gw1": {"alice": ["10.0.0.0/8"]}, "gw2": {}, "gw3": {"alice": ["10.0.0.0/8"]}}
    net = Net(world, gw_users=users)
    _, events = net.chain("alice", [ADDR["gw1"], ADDR["gw3"], ADDR["gw1"], ADDR["server"]])
    fail = failure(events)
    assert fail.fatal and "twice" in fail.reason


def test_a_node_met_twice_under_another_address_is_caught_by_the_user(world: Any) -> None:
    users = {"gw1": {"alice": ["10.0.0.0/8"]}, "gw2": {"alice": ["10.0.0.0/8"]}, "gw3": {}}
    net = Net(world, gw_users=users, gw_names={"gw2": "gw1"})  # gw2 claims gw1's name
    _, events = net.chain("alice", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    fail = failure(events)
    assert fail.fatal and "twice" in fail.reason


def test_server_refuses_to_act_as_a_gateway(world: Any) -> None:
    net = Net(world)
    _, events = net.chain("alice", [ADDR["server"], ADDR["gw1"]])
    assert "not a gateway" in failure(events).reason


def test_wrong_certificate_at_a_gateway_is_fatal(world: Any) -> None:
    net = Net(world)
    # The node at gw3's address presents gw2's certificate: not the name the user asked for.
    net.contexts[ADDR["gw3"]] = net.contexts[ADDR["gw2"]]
    users = {"alice": [parse_next_hop_rule("10.0.0.0/8", "t")]}
    net.nodes[ADDR["gw1"]].config.users["alice"] = GatewayPolicy(users["alice"])
    _, events = net.chain("alice", [ADDR["gw1"], ADDR["gw3"], ADDR["server"]])
    fail = failure(events)
    assert fail.fatal and fail.hop == 1 and "certificate" in fail.reason


def test_gateway_loss_then_resume_keeps_the_server_session(world: Any) -> None:
    net = Net(world)
    hops = [ADDR["gw1"], ADDR["gw2"], ADDR["server"]]
    chain, events = net.chain("alice", hops)
    accept = up_event(events).accept
    chain.send_packets([bytes(IP(src="10.0.0.2", dst="10.9.0.5") / UDP(sport=1, dport=7))])
    net.pump()
    port = IP(net.injected[0])[UDP].sport
    # gw1 dies: every link of the chain is gone; the server holds the session.
    for address, node in net.nodes.items():
        for link in list(node.links):
            node.link_lost(link, net.now)
        if hasattr(node, "splices"):
            node.splices.clear()
    assert accept.session in net.server.sessions
    again, events2 = net.chain("alice", hops, session=accept.session, token=accept.token)
    up2 = up_event(events2)
    assert up2.accept.resumed and up2.accept.session == accept.session
    assert net.server.receive_reply(
        bytes(IP(src="10.9.0.5", dst="10.9.0.1") / UDP(sport=7, dport=port) / b"after"), net.now)
    net.pump()
    assert any(isinstance(e, PacketsReceived) for e in events2)


def test_gateway_logs_say_who_from_where_to_where_and_how_much(world: Any) -> None:
    net = Net(world)
    chain, events = net.chain("alice", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    chain.close("bye")
    net.pump()
    for node in net.nodes.values():
        for link in list(node.links):
            node.link_lost(link, net.now)
    net.pump()
    closed = [r for addr, r in net.logs if addr == ADDR["gw1"] and r.event == "session:closed"]
    assert closed
    rec = closed[0]
    assert rec.user == "alice" and rec.uid == 1001 and rec.extra["next_hop"] == f"{ADDR['gw2']}:4433"
    assert rec.extra["bytes_to_next"] > 0 and rec.extra["bytes_from_next"] > 0
    assert rec.extra["envelopes_from_user"] > 0


def test_hop_limit_is_enforced_by_gateways(world: Any) -> None:
    net = Net(world)
    key = world["keys"]["alice"]
    ctx = tls.make_client_context(ca_file=world["ca"])
    hops = [ADDR["gw1"], ADDR["gw2"], ADDR["server"]]

    def make(index: int, before: list[str]) -> UserLink:
        s = tls.TlsSession(ctx, server_side=False, server_name=hops[index])
        s.start()
        return UserLink(s, user="alice", uid=1, want=[], client_name="c",
                        signer=lambda n, b, node: auth.sign_challenge(key, n, b, "alice", node),
                        session=b"H" * 16, next_hop=f"{hops[index + 1]}:4433", path=before,
                        hops=0)  # no hop left to spend

    events = net.join(UserChain(make, len(hops), hops), hops[0])
    fail = failure(events)
    assert fail.fatal and "hop limit" in fail.reason


# ---------------------------------------------------------------- special next hops (issue 9)


@pytest.mark.parametrize("next_hop", ["[::ffff:127.0.0.1]", "[::1]", "127.0.0.1", "[::127.0.0.1]",
                                      "169.254.169.254", "[fe80::1]", "224.0.0.1", "0.0.0.0",
                                      "10.0.1.1"])
def test_a_catch_all_next_rule_does_not_reach_special_or_own_addresses(world: Any,
                                                                      next_hop: str) -> None:
    """`::/0` used to permit ::ffff:127.0.0.1, the gateway's own IPv4 loopback; 10.0.1.1 is
    gw1's own address."""
    net = Net(world, gw_users={"gw1": {"alice": ["0.0.0.0/0", "::/0"]}, "gw2": {}, "gw3": {}})
    if next_hop == ADDR["gw1"]:  # the daemon reads them from the kernel
        net.nodes[ADDR["gw1"]].set_local_addresses(frozenset({parse_prefix(ADDR["gw1"])}))
    _, events = net.chain("alice", [ADDR["gw1"], next_hop, ADDR["server"]])
    fail = failure(events)
    assert fail.fatal and "next-hop-not-allowed" in fail.reason
    assert "no next rule of the user names" in fail.reason
    assert not any(r.event == "splice:connecting" for _, r in net.logs)


@pytest.mark.parametrize("rule, next_hop", [("127.0.0.1:4433", "127.0.0.1"),
                                            ("[::ffff:127.0.0.0/104]:4433", "[::ffff:127.0.0.1]"),
                                            ("10.0.1.1", "10.0.1.1")])
def test_a_rule_that_names_a_special_or_own_address_lets_it_through(world: Any, rule: str,
                                                                    next_hop: str) -> None:
    net = Net(world, gw_users={"gw1": {"alice": ["::/0", "0.0.0.0/0", rule]}, "gw2": {},
                               "gw3": {}})
    net.nodes[ADDR["gw1"]].set_local_addresses(frozenset({parse_prefix(ADDR["gw1"])}))
    _, events = net.chain("alice", [ADDR["gw1"], next_hop, ADDR["server"]])
    # Past the policy: gw1 connected onwards (where the in-memory network has nothing, or
    # back to gw1 itself, which refuses a chain that visits it twice).
    assert any(r.event == "splice:connecting" for _, r in net.logs)
    assert "next-hop-not-allowed" not in failure(events).reason


# ---------------------------------------------------------------- a reload reaches live splices


def gw_policy(*rules: str) -> GatewayPolicy:
    return GatewayPolicy([parse_next_hop_rule(r, "t") for r in rules])


def closed_chain(events: list[Any]) -> ChainFailed:
    return failure(events)


def test_a_reload_ends_the_splices_of_a_user_whose_gateway_policy_is_gone(world: Any) -> None:
    net = Net(world)
    _, a_events, _, b_events = alice_and_bob(net)
    gw1 = net.nodes[ADDR["gw1"]]
    assert len(gw1.splices) == 2
    gw1.apply_policy({"bob": gw_policy(f"{ADDR['gw2']}:4433")}, net.now)
    net.pump()
    assert [gw1.links[i].user for i in gw1.splices] == ["bob"]
    assert "may no longer pass through gateway gw1" in str(closed_chain(a_events))
    closed = [r for addr, r in net.logs if addr == ADDR["gw1"] and r.event == "session:closed"]
    assert len(closed) == 1 and closed[0].user == "alice" and "policy changed" in closed[0].reason


def test_a_reload_ends_a_splice_whose_next_hop_is_no_longer_permitted(world: Any) -> None:
    net = Net(world)
    hops = [ADDR["gw1"], ADDR["gw2"], ADDR["server"]]
    _, events = net.chain("alice", hops)
    up_event(events)
    gw2 = net.nodes[ADDR["gw2"]]
    gw2.apply_policy({"alice": gw_policy("10.0.3.0/24:9999"), "bob": gw_policy("10.0.3.0/24")},
                     net.now)  # alice's rule now names another port only
    net.pump()
    assert not gw2.splices
    assert "may no longer forward 'alice' to 10.0.3.1:4433" in str(closed_chain(events))
    # An unchanged policy leaves everything as it is.
    net2 = Net(world)
    _, events2 = net2.chain("alice", hops)
    gw1 = net2.nodes[ADDR["gw1"]]
    gw1.apply_policy(dict(gw1.config.users), net2.now)
    net2.pump()
    assert len(gw1.splices) == 1 and not [e for e in events2 if not isinstance(e, ChainUp)]


def test_a_splice_still_connecting_when_the_policy_goes_is_refused(world: Any) -> None:
    net = Net(world)
    gw1 = net.nodes[ADDR["gw1"]]
    held: list[int] = []
    gw1.next_opened = lambda link, now: held.append(link)  # the next hop never answers
    _, events = net.chain("alice", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    assert held and not gw1.splices[held[0]].connected
    gw1.apply_policy({}, net.now)
    net.pump()
    fail = failure(events)
    assert fail.fatal and "user-not-allowed" in fail.reason and not gw1.splices


# ---------------------------------------------------------------- issue 9


CORRUPT_RECORD = b"\x17\x03\x03\x00\x40" + bytes(64)  # TLS application data that won't decrypt


def test_a_failed_next_hop_refused_on_a_link_whose_tls_failed_raises_nothing(world: Any) -> None:
    """Issue 9 point 2: the gateway queued a REFUSE on a closed link (its TLS failed while it
    connected onward), and the next flush raised TlsError out of the daemon."""
    net = Net(world)
    net.hold_next = True
    chain, events = net.chain("alice", HOPS)
    ((address, opening),) = net.held
    gw1 = net.nodes[address]
    gw1.receive_data(opening.link, CORRUPT_RECORD, net.now)
    gw1.next_failed(opening.link, "timed out", net.now)
    gw1.handle_timer(net.now + 1)
    gw1.flush(net.now + 1)
    assert not gw1._dirty and not gw1.links[opening.link].pending
    closed_at = max(i for i, c in enumerate(gw1.commands)
                    if isinstance(c, CloseLink) and c.link == opening.link)
    assert not [c for c in gw1.commands[closed_at:]
                if isinstance(c, SendBytes) and c.link == opening.link]
    assert not any(isinstance(c, LogRecord) and c.record.event == "auth:refused"
                   for c in gw1.commands), "nobody left to tell"


def test_one_auth_per_link_a_second_closes_it(world: Any) -> None:
    """Issue 9 point 8: the gateway took AUTH again while it connected onward: 500 copies of
    one AUTH opened 501 connections to the next hop. A second AUTH closes the link."""
    net = Net(world)
    net.hold_next = True
    chain, events = net.chain("alice", HOPS)
    assert len(net.held) == 1
    address, opening = net.held[0]
    gw1 = net.nodes[address]
    user_link = chain.links[0]
    signature = auth.sign_challenge(world["keys"]["alice"], gw1.links[opening.link].nonce,
                                    user_link.tls.binding(), "alice", "gw1")
    for _ in range(499):
        user_link._send_control(MsgType.AUTH, {"signature": signature})
    net.pump()
    assert len(net.held) == 1, "one next-hop connection, whatever the copies"
    assert opening.link in net.ends[address].closed
    assert any(r.event == "link:error" and "unexpected AUTH" in r.reason
               for a, r in net.logs if a == address)


@pytest.mark.parametrize("rogue", ["gw1", "gw2"])
def test_a_rogue_gateway_cannot_speak_inside_the_tunnel(world: Any, rogue: str) -> None:
    """Issue 9 point 3: a PACKET envelope from a gateway hop was taken by the user's process
    as if the server had sent it (and injected into the user's TUN). Only the last hop carries
    packets; a gateway hop that sends one is closed with a reason, and nothing is delivered."""
    net = Net(world)
    chain, events = net.chain("alice", HOPS)
    up_event(events)
    gw = net.nodes[ADDR[rogue]]
    (link,) = [node_link for node_link in gw.links.values() if not node_link.closed]
    forged = bytes(IP(src="10.9.0.5", dst="10.0.0.2") / UDP(sport=53, dport=5000) / b"forged")
    gw._send(link, MsgType.PACKET, link.session_id, forged)
    net.pump()
    assert not [e for e in events if isinstance(e, PacketsReceived)], "nothing delivered"
    fail = failure(events)
    assert fail.where == rogue and "only the server may carry packets" in fail.reason


def test_the_server_hop_carries_packets_only(world: Any) -> None:
    net = Net(world)
    chain, events = net.chain("alice", HOPS)
    up_event(events)
    (link,) = [node_link for node_link in net.server.links.values() if not node_link.closed]
    net.server._send(link, MsgType.DATA, link.session_id, b"\x16\x03\x03 not yours")
    net.pump()
    fail = failure(events)
    assert fail.where == "server" and "packets only" in fail.reason


def send_and_count(net: Net, chain: UserChain, events: list[Any]) -> int:
    """One UDP packet through ``chain`` and its reply back: how many replies arrived."""
    before = len(net.injected)
    chain.send_packets([bytes(IP(src="10.0.0.2", dst="10.9.0.5") / UDP(sport=4000, dport=7))])
    net.pump()
    if len(net.injected) == before:
        return 0
    port = IP(net.injected[-1])[UDP].sport
    net.server.receive_reply(bytes(IP(src="10.9.0.5", dst="10.9.0.1") / UDP(sport=7, dport=port)
                                   / b"back"), net.now)
    net.pump()
    got = [e for e in events if isinstance(e, PacketsReceived)]
    events[:] = [e for e in events if not isinstance(e, PacketsReceived)]
    return len(got)


def test_live_sessions_reauthenticate_at_the_interval_over_the_same_link(world: Any) -> None:
    """Issue 9 point 8: every hop challenges a live session again every reauth_interval; the
    user's process signs the fresh nonce bound to the same TLS session, and traffic goes on."""
    net = Net(world)
    for node in net.nodes.values():
        node.limits = limits(reauth_interval=60)
    chain, events = net.chain("alice", HOPS)
    up_event(events)
    net.pass_time(30, step=5)
    assert not any(r.event == "auth:renewed" for _, r in net.logs)
    net.pass_time(31, step=5)
    renewed = sorted(r.extra.get("node", a) for a, r in net.logs if r.event == "auth:renewed")
    assert renewed == sorted([ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    assert [link.reauthenticated for link in chain.links] == [1, 1, 1]
    assert chain.up and send_and_count(net, chain, events) == 1


def keyed_world(world: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The world with a users directory of its own (a test may remove keys from it)."""
    users = tmp_path / "users"
    shutil.copytree(world["users"], users)
    return {**world, "users": users}


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_a_reload_ends_sessions_whose_key_is_gone_and_reauthenticates_the_rest(
        world: Any, tmp_path: Path, change: str) -> None:
    """Issue 9 point 8: removing a user's key and reloading left their sessions running
    indefinitely. On a reload (NodeBase.reauthenticate, what SIGHUP calls) a user with no key
    left is ended at every hop at once, a user whose key was replaced fails the challenge that
    every other live session gets at once, and the others go on."""
    w = keyed_world(world, tmp_path)
    net = Net(w)
    alice, a_events, bob, b_events = alice_and_bob(net)
    (w["users"] / "alice.pub").unlink()
    if change == "replaced":  # her process still holds the old key
        auth.save_public_key(w["keys"]["carol"], w["users"] / "alice.pub", "not alice's key")
    # A removed key: every node reloads (its own administrator's SIGHUP). A replaced one: the
    # server's administrator reloads, the gateways still pass alice.
    reloaded = list(net.nodes.values()) if change == "removed" else [net.server]
    for node in reloaded:
        node.reauthenticate(net.now)
    net.pump()
    assert b"A" * 16 not in net.server.sessions
    closed = [(a, r) for a, r in net.logs if r.event == "session:closed" and r.user == "alice"]
    assert {a for a, _ in closed} == {ADDR["server"]} | (
        {ADDR["gw1"], ADDR["gw2"]} if change == "removed" else set())
    assert all("revoked" in r.reason for _, r in closed)
    assert alice.failed is not None and not alice.up
    # bob proved his key again at every node that reloaded and is served on.
    renewed = {a for a, r in net.logs if r.event == "auth:renewed" and r.user == "bob"}
    assert renewed == ({ADDR["gw1"], ADDR["gw2"], ADDR["server"]} if change == "removed"
                       else {ADDR["server"]})
    assert bob.up and send_and_count(net, bob, b_events) == 1


def test_a_revoked_key_ends_the_session_at_the_next_interval(world: Any, tmp_path: Path) -> None:
    w = keyed_world(world, tmp_path)
    net = Net(w)
    net.server.limits = limits(reauth_interval=60)
    chain, events = net.chain("alice", HOPS)
    up_event(events)
    (w["users"] / "alice.pub").unlink()
    net.pass_time(61, step=5)
    assert not net.server.sessions
    assert any(r.event == "auth:revoked" for a, r in net.logs if a == ADDR["server"])
    assert chain.failed is not None


def test_an_unanswered_challenge_closes_the_link(world: Any) -> None:
    net = Net(world)
    net.server.limits = limits(reauth_interval=60, auth_timeout=15)
    chain, events = net.chain("alice", HOPS)
    up_event(events)
    chain.links[-1]._signer = lambda *args: None  # type: ignore[assignment,return-value]
    chain.links[-1]._control = lambda envelope, now: None  # type: ignore[method-assign]  # mute
    net.pass_time(61, step=5)
    net.pass_time(16, step=5)
    assert any(r.event == "link:error" and "re-authentication" in r.reason
               for a, r in net.logs if a == ADDR["server"])


def test_a_gateway_answers_no_keepalives_on_a_link_that_does_not_read(world: Any) -> None:
    """The gateway's side of the KEEPALIVE echo: a user who never reads its link gets no
    answers queued for it while the link is congested (pvpn-gateway tells the node)."""
    net = Net(world)
    chain, events = net.chain("alice", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    up_event(events)
    gw1 = net.nodes[ADDR["gw1"]]
    _, link_id = chain.first  # type: ignore[attr-defined]
    gw1.link_congested(link_id, True)
    for _ in range(5000):
        chain.links[0]._send_control(MsgType.KEEPALIVE, {})
    gw1.receive_data(link_id, chain.links[0].data_to_send(net.now), net.now)
    gw1.flush(net.now)
    assert sum(len(c.data) for c in gw1.commands if isinstance(c, SendBytes)) < 1000


def test_one_user_cannot_take_every_link_of_a_gateway(world: Any) -> None:
    """A user the gateway lets through could open splice after splice (each an onward
    connection) until the gateway held MAX_LINKS links and refused everyone else ("too many
    links"). One user has at most sessions_per_user splices, connecting ones included; the
    next is refused with the reason, and other users still get in."""
    net = Net(world)
    gw1 = net.nodes[ADDR["gw1"]]
    gw1.MAX_LINKS = 12
    net.hold_next = True  # the onward connections hang: splices stay connecting
    for _ in range(12):
        net.chain("alice", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    assert len(gw1.splices) == 10  # the default sessions_per_user
    refused = [r for a, r in net.logs if r.event == "auth:refused"]
    assert refused and all(r.extra["code"] == "too-many-sessions" for r in refused)
    net.hold_next = False
    for address, cmd in net.held:
        net.nodes[address].next_failed(cmd.link, "no route", net.now)
    net.held.clear()
    chain, events = net.chain("bob", [ADDR["gw1"], ADDR["gw2"], ADDR["server"]])
    up_event(events)
