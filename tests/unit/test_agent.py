"""pvpn-client holds the chain, the user's `pvpn connect` is its agent (issue 12): the agent's
signing (pvpn.user.SigningAgent, UserAgent), what a REGISTER may ask pvpn-client to build
(pvpn.hosted.parse_chain_spec, ClientHost._register) and a whole chain held by pvpn-client
(pvpn.hosted.HostedTunnel) over real nested TLS in memory, as an attacker would try them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from scapy.layers.inet import IP, UDP

from pvpn import auth, pki, tls
from pvpn.envelope import MsgType
from pvpn.errors import ConfigError, RemoteProtocolError
from pvpn.hosted import CloseHop, HostedEvents, HostedTunnel, OpenHop, RetryIn, parse_chain_spec
from pvpn.user import (
    AGENT_BURST, CloseLocalLink, Say, SigningAgent, UserAgent,
)

from net import SID, LocalEnd, LocalProcess, host_and_kernel, limits
import test_chain
from test_chain import ADDR, HOPS, MARKER, Net

world = test_chain.world  # the same PKI, nodes and users as the chain tests

ALICE, BOB = 1001, 1002
CHALLENGE, BINDING = os.urandom(32), os.urandom(32)


def agent_of(key: rsa.RSAPrivateKey, user: str = "alice") -> SigningAgent:
    return SigningAgent(user, lambda c, b, u, n: auth.sign_challenge(key, c, b, u, n))


def sign_request(user: str = "alice", **changed: Any) -> dict[str, Any]:
    return {"id": 1, "challenge": CHALLENGE, "binding": BINDING, "node": "server",
            "user": user, **changed}


# ---------------------------------------------------------------- the agent's signing


def test_the_agent_signs_for_its_own_user_only_and_the_signature_is_a_pvpn_auth_one(
        world: dict[str, Any]) -> None:
    key = world["keys"]["alice"]
    agent = agent_of(key)
    answer = agent.answer(sign_request(), 0.0)
    assert answer["refused"] == ""
    auth.verify_signature([key.public_key()], answer["signature"], CHALLENGE, BINDING,
                          "alice", "server")
    refused = agent.answer(sign_request("bob"), 0.0)
    assert refused["signature"] == b"" and "bob" in refused["refused"]
    assert agent.signed == 1 and agent.refused == 1


@pytest.mark.parametrize("changed", [
    {"challenge": b""}, {"challenge": b"x" * 65}, {"binding": b"y" * 4},
    {"binding": b"y" * 4096}, {"node": "no such\nnode"}, {"node": ""},
])
def test_garbage_to_sign_is_refused(world: dict[str, Any], changed: dict[str, Any]) -> None:
    agent = agent_of(world["keys"]["alice"])
    answer = agent.answer(sign_request(**changed), 0.0)
    assert answer["signature"] == b"" and answer["refused"]


def test_many_sign_requests_cannot_make_the_agent_sign_without_bound(
        world: dict[str, Any]) -> None:
    agent = agent_of(world["keys"]["alice"])
    answers = [agent.answer(sign_request(id=i), 5.0) for i in range(AGENT_BURST + 50)]
    assert sum(1 for a in answers if a["signature"]) == AGENT_BURST
    assert "faster" in answers[-1]["refused"]
    # One more a second after that, not a burst again.
    later = [agent.answer(sign_request(id=i), 7.0) for i in range(10)]
    assert sum(1 for a in later if a["signature"]) == 2


def test_the_user_agent_answers_sign_refuses_another_user_and_says_so(
        world: dict[str, Any]) -> None:
    agent = UserAgent(ALICE, SID, {"prefixes": ["10.9.0.0/24"], "server": "s:1"},
                      agent_of(world["keys"]["alice"]))
    daemon = LocalEnd(ALICE)
    agent.local_opening()
    agent.local_opened()
    daemon.read(agent.local_to_send())
    agent.receive_local(daemon.control(MsgType.REGISTERED, {"slot": 0, "queue": 3000,
                                                            "uid": ALICE, "user": "alice"}), 0.0)
    agent.receive_local(daemon.control(MsgType.SIGN, sign_request()), 0.0)
    agent.receive_local(daemon.control(MsgType.SIGN, sign_request("bob", id=2)), 0.0)
    (good_type, good), (bad_type, bad) = daemon.read(agent.local_to_send())
    assert good_type is bad_type is MsgType.SIGNED
    assert good["signature"] and not good["refused"]
    assert bad["id"] == 2 and not bad["signature"] and "bob" in bad["refused"]
    assert any(isinstance(c, Say) and "refused to sign" in c.text for c in agent.commands)
    # A SIGN that is not one (a field missing) is garbage: the connection goes, nothing signed.
    agent.commands.clear()
    agent.receive_local(daemon.control(MsgType.SIGN, {"id": 3, "challenge": CHALLENGE}), 0.0)
    assert any(isinstance(c, CloseLocalLink) for c in agent.commands)
    assert agent.local_to_send() == b""


# ---------------------------------------------------------------- what a REGISTER may ask


def spec_fields(world: dict[str, Any], **changed: Any) -> dict[str, Any]:
    return {"prefixes": ["10.9.0.0/24"], "server": f"{ADDR['server']}:4433",
            "hops": [[h, 4433] for h in HOPS], "ca_pem": Path(world["ca"]).read_bytes(),
            "trust_name": world["ca"], "user": "alice", "client": "c", "session": SID,
            **changed}


@pytest.mark.parametrize("changed, said", [
    ({"ca_pem": b"-----BEGIN CERTIFICATE-----\n" + b"A" * (tls.MAX_PEM + 1)}, "at most"),
    ({"ca_pem": b"not a pem at all"}, "not a PEM certificate"),
    ({"hops": []}, "hops"),
    ({"hops": [["h", 4433]] * 17}, "hops"),
    ({"hops": [["h", 0]]}, "port"),
    ({"hops": [["h\n", 1]]}, "printable"),
    ({"user": "../etc"}, "user name"),
    ({"keepalive": 0.01}, "keepalive"),
    ({"pin_pem": b"x"}, "exactly one"),
])
def test_a_register_asking_the_impossible_is_refused_clearly(
        world: dict[str, Any], changed: dict[str, Any], said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        parse_chain_spec(spec_fields(world, **changed))


def test_an_oversize_or_malformed_register_costs_nothing_else(
        world: dict[str, Any], tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    alice = LocalProcess(host, ALICE)
    fields = spec_fields(world, ca_pem=b"-----BEGIN CERTIFICATE-----\nnope\n")
    del fields["prefixes"], fields["server"]
    mtype, answer = alice.register(["10.9.0.0/24"], **fields)
    assert mtype is MsgType.ERROR and "not a PEM certificate" in answer["reason"]
    assert host.registry.sessions == {} and not any(c[0] == "install" for c in kernel.calls)
    assert not any(isinstance(c, OpenHop) for c in host.commands)


def test_bob_cannot_sign_for_or_attach_to_alices_held_chain(
        world: dict[str, Any], tmp_path: Path) -> None:
    host, _ = host_and_kernel(tmp_path)
    alice, bob = LocalProcess(host, ALICE, id=1), LocalProcess(host, BOB, id=2)
    fields = spec_fields(world)
    del fields["prefixes"], fields["server"]
    mtype, _ = alice.register(["10.9.0.0/24"], **fields)
    assert mtype is MsgType.REGISTERED and alice.peer.tunnel is not None
    # bob's process holds no chain: a SIGNED from it is garbage, and alice's chain is not his.
    with pytest.raises(RemoteProtocolError):
        bob.ask(MsgType.SIGNED, {"id": 1, "signature": b"x", "refused": ""})
    mtype, _ = bob.register(["10.9.0.0/24"], **fields)
    assert mtype is MsgType.REGISTERED
    assert bob.peer.session is not alice.peer.session and bob.peer.session is not None
    assert bob.peer.session.uid == BOB and alice.peer.tunnel is not bob.peer.tunnel


# ---------------------------------------------------------------- a chain pvpn-client holds


class Held:
    """A HostedTunnel as pvpn-client drives it, its agent answering every SIGN at once: the
    far end of the first hop's link in the in-memory network."""

    def __init__(self, tunnel: HostedTunnel, agent: SigningAgent) -> None:
        self.tunnel, self.agent = tunnel, agent
        self.heard: list[tuple[MsgType, dict[str, Any]]] = []

    def answer(self, now: float) -> None:
        while self.tunnel.to_agent:
            mtype, fields = self.tunnel.to_agent.pop(0)
            self.heard.append((mtype, fields))
            if mtype is MsgType.SIGN:
                self.tunnel.signed(self.agent.answer(fields, now), now)

    def receive_data(self, data: bytes, now: float) -> list[HostedEvents]:
        out = self.tunnel.receive_data(data, now)
        self.answer(now)
        return [out]

    def data_to_send(self, now: float) -> bytes:
        return self.tunnel.data_to_send(now)

    def notices(self) -> list[dict[str, Any]]:
        return [f for t, f in self.heard if t is MsgType.NOTICE]


def held_chain(world: dict[str, Any], net: Net, **changed: Any) -> Held:
    spec = parse_chain_spec(spec_fields(world, **changed))
    assert spec is not None
    tunnel = HostedTunnel(spec, SID, b"", ALICE)
    tunnel.start(net.now)
    (open_hop,) = [c for c in tunnel.commands if isinstance(c, OpenHop)]
    assert (open_hop.host, open_hop.port) == (HOPS[0], 4433)
    tunnel.commands.clear()
    held = Held(tunnel, agent_of(world["keys"]["alice"]))
    tunnel.connected(net.now)
    held.link = net.open(HOPS[0], held)  # type: ignore[attr-defined]
    net.pump()
    return held


def test_pvpn_client_builds_the_chain_and_only_the_agent_signs(world: dict[str, Any]) -> None:
    net = Net(world)
    held = held_chain(world, net)
    assert held.tunnel.up
    assert held.agent.signed == 3, "one signature per hop, each by the user's process"
    (up,) = held.notices()
    assert up["event"] == "up" and up["nodes"] == ["gw1", "gw2", "server"]
    assert up["session"] == held.tunnel.session and up["token"]
    assert [f["node"] for t, f in held.heard if t is MsgType.SIGN] == ["gw1", "gw2", "server"]
    # The queue's packets go straight into the chain; the gateways relay what they cannot read.
    held.tunnel.send_packets([bytes(IP(src="192.168.1.5", dst="10.9.0.7")
                                    / UDP(sport=5000, dport=53) / MARKER)])
    net.pump()
    assert len(net.injected) == 1 and MARKER in net.injected[0]
    assert not any(MARKER in data for data in net.seen_by_gateways)


def test_a_hop_whose_certificate_the_users_ca_did_not_sign_is_refused(
        world: dict[str, Any], tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "other")
    other = (tmp_path / "other" / "ca.crt").read_bytes()
    net = Net(world)
    held = held_chain(world, net, ca_pem=other, trust_name="alice's other CA")
    assert not held.tunnel.up and held.agent.signed == 0
    (failed,) = held.notices()
    assert failed["event"] == "failed" and failed["fatal"]
    assert "certificate" in failed["reason"] and "alice's other CA" in failed["reason"]
    assert any(isinstance(c, CloseHop) for c in held.tunnel.commands)
    assert not any(isinstance(c, RetryIn) for c in held.tunnel.commands)


def test_an_agent_that_will_not_sign_fails_the_chain_for_good(world: dict[str, Any]) -> None:
    net = Net(world)
    spec = parse_chain_spec(spec_fields(world))
    assert spec is not None
    tunnel = HostedTunnel(spec, SID, b"", ALICE)
    tunnel.start(net.now)
    held = Held(tunnel, agent_of(world["keys"]["alice"], user="mallory"))
    tunnel.connected(net.now)
    net.open(HOPS[0], held)
    net.pump()
    assert not tunnel.up and held.agent.refused == 1 and held.agent.signed == 0
    (failed,) = held.notices()
    assert failed["event"] == "failed" and "refused to sign" in failed["reason"]


def test_a_chain_that_was_up_is_rebuilt_with_backoff_and_the_agent_told(
        world: dict[str, Any]) -> None:
    net = Net(world)
    held = held_chain(world, net)
    tunnel = held.tunnel
    del net.ends[HOPS[0]].peers[held.link]  # type: ignore[attr-defined]  # its TCP is gone
    tunnel.connection_lost("the first hop closed the connection", net.now)
    held.answer(net.now)
    assert held.notices()[-1]["event"] == "down"
    retries = [c.delay for c in tunnel.commands if isinstance(c, RetryIn)]
    tunnel.commands.clear()
    tunnel.retry(net.now)
    tunnel.connect_failed("no route", net.now)
    held.answer(net.now)
    assert held.notices()[-1]["event"] == "retry" and "no route" in held.notices()[-1]["reason"]
    retries += [c.delay for c in tunnel.commands if isinstance(c, RetryIn)]
    assert retries == [0.5, 1.0]
    # Built again: it resumes the server's session with the token it kept.
    tunnel.commands.clear()
    tunnel.retry(net.now)
    tunnel.connected(net.now)
    net.open(HOPS[0], held)
    net.pump()
    assert tunnel.up and held.notices()[-1]["resumed"] is True


def test_a_chain_resumed_for_a_returning_agent_is_rebuilt_not_ended(
        world: dict[str, Any]) -> None:
    """pvpn-client restarted: the agent registers again with the server's token. If the
    first chain fails (the server restarting too), it is held and rebuilt, as any chain
    that was up; without a token the VPN never came up and `pvpn connect` is told it failed."""
    spec = parse_chain_spec(spec_fields(world))
    assert spec is not None
    for token, event in ((b"the server's token", "down"), (b"", "failed")):
        tunnel = HostedTunnel(spec, SID, token, ALICE)
        tunnel.start(0.0)
        tunnel.connect_failed("connection refused", 1.0)
        ((mtype, fields),) = tunnel.to_agent
        assert mtype is MsgType.NOTICE and fields["event"] == event
        assert any(isinstance(c, RetryIn) for c in tunnel.commands) is bool(token)


def test_a_nodes_re_authentication_is_signed_again_by_the_agent(world: dict[str, Any]) -> None:
    """The server challenges an established link again: pvpn-client asks the agent (SIGN on
    the same TLS session's binding), and the link stays up on the agent's signature only."""
    net = Net(world)
    net.server.limits = limits(reauth_interval=60)
    held = held_chain(world, net)
    assert held.agent.signed == 3
    net.pass_time(61, step=5)
    assert held.tunnel.up and net.server.sessions
    assert held.agent.signed == 4
    (again,) = [f for t, f in held.heard if t is MsgType.SIGN][3:]
    assert again["node"] == "server" and again["user"] == "alice"
    assert held.tunnel.chain is not None
    assert again["binding"] == held.tunnel.chain.links[-1].tls.binding()
