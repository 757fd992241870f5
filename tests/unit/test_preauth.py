"""Before authentication a stranger gets little and costs little (issue 9 point 7): per-source
and node-wide limits on connections awaiting authentication that give up the least advanced
and oldest one (so a flood costs the flooder, and a user of the same host still logs in), a
short deadline for HELLO, no TLS state for a connection that never speaks, and records of
what a stranger claimed that join no session's trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvpn import auth, tls
from pvpn.config import ServerConfig, UserPolicy, parse_prefix
from pvpn.events import LinkEstablished, LinkRefused
from pvpn.nodes.server import ServerNode
from pvpn.user import UserLink

from net import OneNode, authorized, client_tls, limits, make_pki, signer, user_keys

SERVER_IP = "10.0.0.1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("preauth")
    ((crt, key),) = make_pki(d, {"server": SERVER_IP}).values()
    keys = user_keys("alice", "bob")
    return {"ca": str(d / "ca" / "ca.crt"), "crt": str(crt), "key": str(key),
            "users": authorized(d / "users", keys), "keys": keys,
            "server_ctx": tls.make_server_context(str(crt), str(key)),
            "client_ctx": tls.make_client_context(ca_file=str(d / "ca" / "ca.crt"))}


class Node(OneNode):
    """A server node, its links' user ends, and what it said to whom."""

    def __init__(self, w: dict[str, Any], **settings: float) -> None:
        self.w = w
        allow = [parse_prefix("10.9.0.0/24")]
        config = ServerConfig(Path("s.toml"), "server", [], Path(w["crt"]), Path(w["key"]),
                              w["users"], 0, (61000, 61999), "t",
                              {"alice": UserPolicy(list(allow)), "bob": UserPolicy(list(allow))})
        super().__init__(ServerNode(config, auth.AuthorizedKeys(w["users"]),
                                    auth.verify_signature, lambda dst: bytes(4)),
                         w["server_ctx"])
        if settings:
            self.node.limits = limits(**settings)

    @property
    def ids(self) -> int:
        return self.net.ids

    def open(self, peer: str = "10.0.0.7:40000", lazily: bool = False) -> int:
        """A connection from ``peer``; its TLS session made at once (or by the node, on the
        first bytes: ``lazily``)."""
        link = self.net.open(self.name, source=peer, lazily=lazily)
        assert link in self.node.links, "the node took it"
        self.settle()
        return link

    def client_tls(self) -> tls.TlsSession:
        return client_tls(self.w["client_ctx"], SERVER_IP)

    def stranger(self, kind: str, peer: str = "10.0.0.7:40000") -> int:
        """A connection that stops: "idle" (no byte), "partial" (half a ClientHello) or
        "tls" (a whole TLS handshake, then nothing)."""
        link = self.open(peer)
        if kind != "idle":
            client = self.client_tls()
            hello = client.data_to_send()
            self.links[link] = client
            self.node.receive_data(link, hello[:40] if kind == "partial" else hello, self.now)
            self.settle()
        return link

    def user(self, name: str, peer: str = "10.0.0.7:40000", session: bytes = b"") -> int:
        link = self.open(peer)
        user_link = UserLink(self.client_tls(), user=name, uid=1001, want=["10.9.0.0/24"],
                             client_name="clienthost", session=session,
                             signer=signer(self.w["keys"][name], name))
        user_link.start(self.now)
        self.links[link] = user_link
        self.settle()
        return link

    def established(self, link: int) -> bool:
        return any(isinstance(e, LinkEstablished) for e in self.events.get(link, []))


def test_a_silent_connection_costs_no_tls_state(world: Any) -> None:
    n = Node(world)
    link = n.open(lazily=True)
    assert n.node.links[link].tls is None
    client = n.client_tls()
    n.node.receive_data(link, client.data_to_send()[:40], n.now)
    assert n.node.links[link].tls is not None


def test_a_legitimate_user_logs_in_while_strangers_from_her_host_flood(world: Any) -> None:
    """300 connections from one host (a third silent, a third stopped in the ClientHello, a
    third stopped after TLS), alice's in the middle of them: alice is in, and no more than
    preauth_per_source strangers are held at any time."""
    n = Node(world)
    per_source = 32  # the default preauth_per_source
    kinds = ["idle", "partial", "tls"]
    for number in range(150):
        n.stranger(kinds[number % 3])
    alice = n.user("alice")
    for number in range(150):
        n.stranger(kinds[number % 3])
        held = [link for link in n.node.links.values()
                if not link.closed and link.state.value != "established"]
        assert len(held) <= per_source
    assert n.established(alice)
    evicted = [r for r in n.logs if r.event == "link:evicted"]
    assert evicted and len(evicted) < 30, "rate-limited records"


def test_a_full_node_gives_up_a_stranger_for_a_user(world: Any) -> None:
    """4,096 idle connections from one address took every link slot: nobody else got in."""
    n = Node(world)
    n.node.MAX_LINKS = 64
    for _ in range(64):
        n.stranger("idle", peer="192.0.2.9:1000")
    bob = n.user("bob", peer="198.51.100.2:2000")
    assert n.established(bob)


def test_the_busiest_source_pays_when_the_node_is_at_its_limit(world: Any) -> None:
    n = Node(world, preauth_max=20, preauth_per_source=10)
    for host in range(4):
        for _ in range(4 if host else 8):
            n.stranger("tls", peer=f"192.0.2.{host + 1}:1000")
    assert sum(1 for l in n.node.links.values() if l.preauth) == 20
    n.stranger("idle", peer="198.51.100.2:2000")
    evicted = [l for l in n.node.links.values() if l.closed]
    assert len(evicted) == 1 and evicted[0].source == "192.0.2.1"


def test_an_authenticated_link_is_never_evicted(world: Any) -> None:
    n = Node(world, preauth_max=8, preauth_per_source=4)
    alice = n.user("alice")
    assert n.established(alice)
    for _ in range(40):
        n.stranger("tls")
    assert alice not in n.closed


def test_ipv6_sources_are_counted_by_their_64(world: Any) -> None:
    n = Node(world, preauth_max=64, preauth_per_source=4)
    for host in range(12):
        n.stranger("idle", peer=f"[2001:db8:0:1::{host + 1}]:5000")
    assert sum(1 for l in n.node.links.values() if l.preauth) == 4


def test_no_hello_within_hello_timeout_closes_the_link(world: Any) -> None:
    n = Node(world)
    link = n.stranger("tls")
    n.now += 10 + 1  # the default hello_timeout, and a second
    n.node.handle_timer(n.now)
    n.settle()
    assert link in n.closed
    assert any(r.event == "link:error" and "no HELLO" in r.reason for r in n.logs)


def test_a_strangers_records_join_no_session(world: Any) -> None:
    """Issue 9 point 9: an unauthenticated HELLO names any session id, and its auth:refused
    record merged into that session's trace."""
    n = Node(world)
    alice = n.user("alice")
    (session,) = n.node.sessions
    n.logs.clear()
    forger = n.open(peer="203.0.113.5:4001")
    key = world["keys"]["bob"]  # bob's key, alice's name, alice's session id
    link = UserLink(n.client_tls(), user="alice", uid=1001, want=["10.9.0.0/24"],
                    client_name="x", session=session,
                    signer=lambda nonce, b, node: auth.sign_challenge(key, nonce, b, "alice", node))
    link.start(n.now)
    n.links[forger] = link
    n.settle()
    n.node.link_lost(forger, n.now)
    n.settle()
    assert any(isinstance(e, LinkRefused) for e in n.events[forger])
    strangers = [r for r in n.logs if r.peer.startswith("203.0.113.5")]
    assert strangers and all(r.session == "" for r in strangers)
    assert n.established(alice)


def test_a_stranger_cannot_park_a_large_frame_before_authenticating(world: Any) -> None:
    """After TLS a stranger sent most of a 64 KB frame and stopped: the node held it (about
    170 KB of decoder buffer, four times what the connection costs otherwise) until the HELLO
    deadline, on every connection it was allowed. Before authentication a frame may hold at
    most 16 KB (the largest HELLO is under 9 KB): more closes the link. A user whose HELLO
    names 64 prefixes and 64 nodes is not affected."""
    import msgpack

    from pvpn.envelope import MsgType

    n = Node(world)
    link = n.stranger("tls")
    client = n.links[link]
    client.send(msgpack.packb([1, int(MsgType.HELLO), b"", 0, 0, 16, b"x" * 60000])[:-1])
    n.node.receive_data(link, client.data_to_send(), n.now)
    assert n.node.links[link].closed
    big = n.open("10.0.0.8:40000")
    key = world["keys"]["alice"]
    n.links[big] = UserLink(
        n.client_tls(), user="alice", uid=1001, client_name="clienthost",
        want=[f"10.9.0.{i}/32" for i in range(64)],
        path=[f"gw{i:02d}" + "x" * 58 for i in range(64)],
        signer=lambda nonce, b, node: auth.sign_challenge(key, nonce, b, "alice", node))
    n.settle()
    assert n.established(big)


def test_a_flood_of_strangers_cannot_rotate_the_log_away(world: Any) -> None:
    """Each stranger's connection wrote its records (link:opened, link:evicted or link:error,
    link:closed), unbounded: a few minutes of connections from one host filled the node's
    200 MB of log history with them. Records about connections that never authenticated are
    written within a budget, per source and for everyone, per kind of record; a record says
    how many it stands for, and a user's session is logged as always."""
    n = Node(world)
    for number in range(1500):
        n.stranger("idle", f"10.0.0.7:{number}")
        n.node.link_lost(n.ids, n.now)
    for number in range(1500):  # from many addresses: the node-wide budget holds
        n.stranger("idle", f"10.1.{number // 250}.{number % 250}:1")
    assert len(n.logs) < 300  # of some 6,000
    n.now += 60
    n.stranger("idle", "10.0.0.7:9")
    (later,) = [r for r in n.logs[-3:] if r.event == "link:opened"]
    assert later.extra["unlogged"] > 1000
    alice = n.user("alice")
    assert n.established(alice)
    assert any(r.event == "session:opened" and r.user == "alice" for r in n.logs)
