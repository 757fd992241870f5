"""Whatever peers do, no exception leaves a node (issue 9 point 2): a Hypothesis state machine
drives a real ServerNode and a real GatewayNode (real TLS, real RSA) with random interleavings
of valid traffic, corrupt TLS records, forged envelopes, strangers that stop half-way, slow
readers (congested links whose output is not read), failed and lost next hops, lost links,
reloads that remove, replace and restore keys and policies, time passing and shutdowns. After
every step the nodes' books are checked: no closed link keeps output or stays dirty, nothing
is sent on a link after it was closed, and the pre-authentication counts add up and stay
within their limits."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP

from pvpn import auth, tls
from pvpn.config import (
    GatewayConfig, GatewayPolicy, NodeLimits, ServerConfig, UserPolicy, parse_next_hop_rule,
    parse_prefix,
)
from pvpn.envelope import MsgType, encode_envelope
from pvpn.nodes.gateway import GatewayNode
from pvpn.nodes.server import ServerNode
from pvpn.user import UserLink

from net import Network, authorized, client_tls, make_pki, signer, user_keys

ADDR = {"server": "10.0.3.1", "gateway": "10.0.1.1"}
CORRUPT_RECORD = b"\x17\x03\x03\x00\x40" + bytes(64)
LIMITS = NodeLimits(hello_timeout=10, auth_timeout=15, reauth_interval=60,
                    preauth_per_source=3, preauth_max=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("states")
    certs = make_pki(d, ADDR)
    return {"dir": d, "certs": certs, "keys": user_keys("alice", "bob", "carol"),
            "client_ctx": tls.make_client_context(ca_file=str(d / "ca" / "ca.crt")),
            "server_ctx": {role: tls.make_server_context(str(c), str(k))
                           for role, (c, k) in certs.items()}}


class NodeMachine(RuleBasedStateMachine):
    world: ClassVar[dict[str, Any]]
    examples: ClassVar[itertools.count[int]] = itertools.count()
    links = Bundle("links")

    def __init__(self) -> None:
        super().__init__()
        w = self.world
        self.users_dir = w["dir"] / f"users{next(self.examples)}"
        authorized(self.users_dir, {name: w["keys"][name] for name in ("alice", "bob")})
        allow = [parse_prefix("10.9.0.0/24")]
        crt, key = w["certs"]["server"]
        self.server_policy = {"alice": UserPolicy(list(allow)), "bob": UserPolicy(list(allow))}
        server = ServerNode(
            ServerConfig(Path("s.toml"), "server", [], crt, key, self.users_dir, 0,
                         (61000, 61099), "t", dict(self.server_policy), limits=LIMITS),
            auth.AuthorizedKeys(self.users_dir), auth.verify_signature,
            lambda dst: bytes([10, 9, 0, 1]))
        crt, key = w["certs"]["gateway"]
        rules = [parse_next_hop_rule("10.0.3.0/24", "t")]
        self.gateway_policy = {"alice": GatewayPolicy(list(rules)),
                               "bob": GatewayPolicy(list(rules))}
        gateway = GatewayNode(
            GatewayConfig(Path("g.toml"), "gw1", [], crt, key, self.users_dir, 5.0,
                          dict(self.gateway_policy), limits=LIMITS),
            auth.AuthorizedKeys(self.users_dir), auth.verify_signature)
        # The gateway's next hops are the rules' to open, fail, lose and feed (the_next_hop).
        self.net = Network(now=1000.0, rounds=40)
        self.net.hold_next = True
        for kind, node in (("server", server), ("gateway", gateway)):
            node.MAX_LINKS = 12
            self.net.add(kind, node, w["server_ctx"][kind])
        self.nodes = self.net.nodes

    def teardown(self) -> None:
        shutil.rmtree(self.users_dir, ignore_errors=True)

    @property
    def now(self) -> float:
        return self.net.now

    def end(self, link: tuple[str, int]) -> Any:
        """The peer's end of ``link``: a UserLink, a stranger's TlsSession, or None."""
        return self.net.ends[link[0]].peers.get(link[1])

    def pump(self) -> None:
        self.net.settle()

    def client_tls(self, kind: str) -> tls.TlsSession:
        return client_tls(self.world["client_ctx"], ADDR[kind])

    def open(self, kind: str, source: int) -> int:
        link = self.net.ids + 1
        return self.net.open(kind, source=f"192.0.2.{source}:{40000 + link}", link=link,
                             lazily=True)

    # ------------------------------------------------------------ peers
    @rule(target=links, kind=st.sampled_from(["server", "gateway"]),
          user=st.sampled_from(["alice", "alice", "bob", "carol"]),
          wrong_key=st.booleans(), source=st.integers(1, 3),
          odds=st.integers(0, 7))
    def a_user_connects(self, kind: str, user: str, wrong_key: bool, source: int,
                        odds: int) -> tuple[str, int]:
        link = self.open(kind, source)
        key = self.world["keys"]["carol" if wrong_key and odds == 0 else user]
        end = UserLink(self.client_tls(kind), user=user, uid=1001,
                       want=["10.9.0.0/24"] if kind == "server" else [],
                       signer=signer(key, user),
                       client_name="client", session=bytes([link]) * 16,
                       next_hop=None if kind == "server" else "10.0.3.1:4433")
        end.start(self.now)
        self.net.attach(kind, link, end)
        self.pump()
        return kind, link

    @rule(target=links, kind=st.sampled_from(["server", "gateway"]),
          stage=st.sampled_from(["idle", "partial", "tls"]), source=st.integers(1, 3))
    def a_stranger_stops_half_way(self, kind: str, stage: str, source: int) -> tuple[str, int]:
        link = self.open(kind, source)
        if stage != "idle":
            end = self.client_tls(kind)
            hello = end.data_to_send()
            self.nodes[kind].receive_data(link, hello[:30] if stage == "partial" else hello,
                                          self.now)
            if stage == "tls":
                self.net.attach(kind, link, end)
        self.pump()
        return kind, link

    @rule(link=links, count=st.integers(1, 4), seed=st.integers(0, 255))
    def valid_traffic(self, link: tuple[str, int], count: int, seed: int) -> None:
        end = self.end(link)
        if not isinstance(end, UserLink):
            return
        if link[0] == "gateway":
            end.send_data(bytes([seed]) * (count * 100))
        else:
            end.send_packets([
                bytes(IP(src="10.0.0.2", dst="10.9.0.5") / UDP(sport=4000 + seed, dport=7)),
                bytes(IP(src="10.0.0.2", dst="10.9.0.5") / TCP(sport=5000 + seed, dport=80)),
                bytes(IP(src="10.0.0.2", dst="10.8.0.5") / ICMP()),  # not allowed
                bytes([seed]) * 7,  # not a packet
            ][:count])
        self.pump()

    @rule(link=links, data=st.binary(max_size=200))
    def corrupt_tls_record(self, link: tuple[str, int], data: bytes) -> None:
        self.nodes[link[0]].receive_data(link[1], data or CORRUPT_RECORD, self.now)
        self.pump()

    @rule(link=links, mtype=st.sampled_from(list(MsgType)), body=st.binary(max_size=80))
    def forged_envelope(self, link: tuple[str, int], mtype: MsgType, body: bytes) -> None:
        end = self.end(link)
        if isinstance(end, UserLink):
            end._pending.append(encode_envelope(mtype, end.session, end.uid, end._seq.take(),
                                                body))
            self.pump()

    @rule(link=links, slow=st.booleans())
    def slow_reader(self, link: tuple[str, int], slow: bool) -> None:
        self.nodes[link[0]].link_congested(link[1], slow)
        unread = self.net.ends[link[0]].unread
        (unread.add if slow else unread.discard)(link[1])
        self.pump()

    @rule(link=links)
    def connection_lost(self, link: tuple[str, int]) -> None:
        self.nodes[link[0]].link_lost(link[1], self.now, "connection reset")
        self.net.ends[link[0]].peers.pop(link[1], None)
        self.pump()

    def reply(self, data: st.DataObject) -> None:
        server = self.nodes["server"]
        injected = self.net.injected[-20:]  # the latest ones: replies that may still be due
        if injected and data.draw(st.booleans()):
            sent = IP(data.draw(st.sampled_from(injected)))
            layer = sent.payload
            reply = IP(src=sent.dst, dst=sent.src) / type(layer)(
                sport=layer.dport, dport=layer.sport) if hasattr(layer, "dport") else sent
            server.receive_reply(bytes(reply), self.now)
        else:
            server.receive_reply(data.draw(st.binary(max_size=60)), self.now)

    @rule(data=st.data())
    def replies_and_strays(self, data: st.DataObject) -> None:
        self.reply(data)
        self.pump()

    def next_hop(self, data: st.DataObject, event: str) -> None:
        gateway = self.nodes["gateway"]
        opening = [command.link for _, command in self.net.held]
        link = data.draw(st.sampled_from(opening)) if opening and \
            data.draw(st.booleans()) else data.draw(st.integers(0, 40))
        if event == "opened":
            gateway.next_opened(link, self.now)
        elif event == "failed":
            gateway.next_failed(link, "connection refused", self.now)
        elif event == "lost":
            gateway.next_lost(link, "reset", self.now)
        else:
            gateway.next_data(link, data.draw(st.binary(max_size=300)), self.now)

    @rule(data=st.data(), event=st.sampled_from(["opened", "failed", "lost", "data"]))
    def the_next_hop(self, data: st.DataObject, event: str) -> None:
        self.next_hop(data, event)
        self.pump()

    @rule(link=links, data=st.data(), first=st.sampled_from(["reply", "next hop"]))
    def output_waits_then_the_tls_fails(self, link: tuple[str, int], data: st.DataObject,
                                        first: str) -> None:
        """Inputs that queue output for a link, its TLS failing, more inputs, then the flush
        (a reader that does not read lets output wait like this)."""
        if first == "reply":
            self.reply(data)
        else:
            self.next_hop(data, data.draw(st.sampled_from(["opened", "failed", "data"])))
        self.nodes[link[0]].receive_data(link[1], CORRUPT_RECORD, self.now)
        self.reply(data)
        self.next_hop(data, data.draw(st.sampled_from(["opened", "failed", "lost", "data"])))
        self.pump()

    @rule(change=st.sampled_from(["remove bob's key", "replace bob's key", "restore bob's key",
                                  "drop bob's policy", "restore the policies"]))
    def reload(self, change: str) -> None:
        bob = self.users_dir / "bob.pub"
        if change == "remove bob's key":
            bob.unlink(missing_ok=True)
        elif change == "replace bob's key":
            bob.unlink(missing_ok=True)
            auth.save_public_key(self.world["keys"]["carol"], bob, "not bob's")
        elif change == "restore bob's key":
            bob.unlink(missing_ok=True)
            auth.save_public_key(self.world["keys"]["bob"], bob, "bob")
        server, gateway = self.nodes["server"], self.nodes["gateway"]
        server_users, gateway_users = dict(server.config.users), dict(gateway.config.users)
        if change == "drop bob's policy":
            server_users.pop("bob", None)
            gateway_users.pop("bob", None)
        elif change == "restore the policies":
            server_users, gateway_users = dict(self.server_policy), dict(self.gateway_policy)
        # What the daemons do on SIGHUP: the policies reach live sessions, then the keys.
        server.apply_policy(server_users, self.now)
        gateway.apply_policy(gateway_users, self.now)
        for node in (server, gateway):
            node.reauthenticate(self.now)
        self.pump()

    @rule(seconds=st.sampled_from([0.5, 5, 11, 16, 40, 61]))
    def time_passes(self, seconds: float) -> None:
        self.net.pass_time(seconds)

    @rule(kind=st.sampled_from(["server", "gateway"]))
    def shutdown(self, kind: str) -> None:
        self.nodes[kind].close_all("shutting down")
        self.pump()

    # ------------------------------------------------------------ the books
    @invariant()
    def books_balance(self) -> None:
        for node in self.nodes.values():
            node.flush(self.now)
            for cmd in node.commands:
                self.net.carry_out("server" if node is self.nodes["server"] else "gateway", cmd)
            node.commands.clear()
            assert not node._dirty
            links = node.links.values()
            assert all(not link.pending for link in links if link.closed)
            preauth = [link for link in links if link.preauth]
            assert len(preauth) == node._preauth_count == sum(map(len, node._preauth.values()))
            assert node._preauth_count <= node.limits.preauth_max
            assert all(not link.closed for link in preauth)


def test_no_exception_leaves_a_node_whatever_its_peers_do(world: dict[str, Any]) -> None:
    NodeMachine.world = world
    run_state_machine_as_test(NodeMachine, settings=settings(
        max_examples=30, stateful_step_count=25, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
