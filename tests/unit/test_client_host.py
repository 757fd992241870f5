"""The client host's policy in memory (pvpn.nodes.client.ClientHost): no socket, no kernel.
Scripted as conversations: a queued packet or a tunnel process's reply in, commands out."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from pvpn.commands import LogRecord
from pvpn.config import load_client_config
from pvpn.drops import Drop
from pvpn.envelope import MsgType, decode_control
from pvpn.errors import PvpnError, RemoteProtocolError
from pvpn.local import LocalChannel
from pvpn.nodes.client import ClientHost, CloseLocal, LocalPeer, SlotSession, WriteTun
from pvpn.packet import FlowKey

SID = bytes(range(16))
ALICE, BOB = 1001, 1002
NET = ipaddress.ip_network("10.77.1.0/24")


class Owners:
    """Whose socket each flow reaches, as sock_diag would say (None: no process's)."""

    def __init__(self) -> None:
        self.of: dict[FlowKey, int | None] = {}
        self.broken = False

    def owner(self, flow: FlowKey) -> int | None:
        if self.broken:
            raise PvpnError("sock_diag: no answer")
        return self.of.get(flow)


def make_host(tmp_path: Path, **settings: Any) -> tuple[ClientHost[LocalPeer], Owners]:
    lines = ["[client]", 'name = "client"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    (tmp_path / "client.toml").write_text("\n".join(lines) + "\n")
    owners = Owners()
    return ClientHost(load_client_config(tmp_path / "client.toml"), owners,
                      lambda uid: f"user{uid}"), owners


def connect(host: ClientHost[LocalPeer], uid: int, now: float = 0.0,
            id: int = 1) -> LocalPeer:
    peer = LocalPeer(id)
    peer.uid, peer.pid = uid, 4000 + id
    host.admit(peer, now)
    return peer


def attached(host: ClientHost[LocalPeer], uid: int = ALICE) -> tuple[SlotSession, LocalPeer]:
    """A session up: registered in a slot, its tunnel process attached with an id."""
    session = host.registry.allocate(uid, f"user{uid}", "vpn.example:4433", [NET], 0.0)
    peer = connect(host, uid)
    session.attached, session.session_id, session.ever_up = True, SID, True
    peer.session = session
    host.links[session.slot] = peer
    return session, peer


def records(host: ClientHost[LocalPeer]) -> list[dict[str, Any]]:
    return [dict(c.record.extra, event=c.record.event, reason=c.record.reason)
            for c in host.commands if type(c) is LogRecord]


def sent_by_alice() -> bytes:
    return bytes(IP(src="192.168.1.5", dst="10.77.1.9") / TCP(sport=40000, dport=443))


def reply(src: str = "10.77.1.9", sport: int = 443, dport: int = 40000) -> bytes:
    return bytes(IP(src=src, dst="192.168.1.5") / TCP(sport=sport, dport=dport, flags="SA"))


def envelopes(peer: LocalPeer) -> list[Any]:
    theirs = LocalChannel()
    return list(theirs.receive(b"".join(peer.pending)))


# ---------------------------------------------------------------- queue input to commands


def test_a_queued_packet_goes_to_the_tunnel_process_numbered_and_its_flow_is_noted(
        tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    session, peer = attached(host)
    host.queued(session, sent_by_alice(), 5.0)
    host.queued(session, sent_by_alice(), 6.0)
    got = envelopes(peer)
    assert [(e.type, e.seq, e.session, e.uid) for e in got] == [
        (MsgType.PACKET, 0, SID, ALICE), (MsgType.PACKET, 1, SID, ALICE)]
    assert got[0].body == sent_by_alice()
    assert host.dirty == {peer} and host.commands == []
    assert list(session.flows.values()) == [6.0]
    assert (session.packets_out, session.bytes_out) == (2, 2 * len(sent_by_alice()))


def test_the_flow_memory_forgets_the_flow_idle_longest(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    session, _ = attached(host)
    session.max_flows = 2
    for port in (1, 2, 1, 3):
        host.queued(session, bytes(IP(src="192.168.1.5", dst="10.77.1.9")
                                   / UDP(sport=port, dport=53)), float(port))
    assert sorted(k.sport for k in session.flows) == [1, 3]
    assert session.flows_evicted == 1


# ---------------------------------------------------------------- fail closed


def test_a_packet_of_a_held_session_is_dropped_and_counted_and_none_goes_out(
        tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    session = host.registry.allocate(ALICE, "user1001", "s:1", [NET], 0.0)
    session.session_id, session.ever_up = SID, True  # was up; its tunnel process is gone
    for t in range(3):
        host.queued(session, sent_by_alice(), float(t))
    assert host.dirty == set() and not any(type(c) is WriteTun for c in host.commands)
    assert session.drops.as_dict() == {Drop.TUNNEL_DOWN.value: 3}
    assert session.packets_out == 0 and not session.flows
    (first, *_) = records(host)  # rate-limited: logged once, then counted
    assert first["event"] == "packet:dropped" and first["reason"] == Drop.TUNNEL_DOWN.value


def test_a_packet_before_attach_is_dropped_too(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    session, peer = attached(host)
    session.session_id = b""  # registered, not yet ATTACHed
    host.queued(session, sent_by_alice(), 0.0)
    assert peer.pending == [] and session.drops.as_dict() == {Drop.TUNNEL_DOWN.value: 1}


def test_a_congested_tunnel_process_gets_nothing_more(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    session, peer = attached(host)
    peer.congested = True
    host.queued(session, sent_by_alice(), 0.0)
    assert peer.pending == [] and session.drops.as_dict() == {Drop.TUNNEL_CONGESTED.value: 1}


# ---------------------------------------------------------------- anti-spoofing


def test_a_reply_to_a_flow_the_session_sent_is_written_to_its_tun(tmp_path: Path) -> None:
    host, owners = make_host(tmp_path)
    session, peer = attached(host)
    host.queued(session, sent_by_alice(), 0.0)
    (flow,) = session.flows
    owners.of[flow] = ALICE
    host.reply(peer, reply(), 1.0)
    assert host.commands == [WriteTun(session, reply(), flow)]
    assert (session.packets_in, session.bytes_in) == (1, len(reply()))


@pytest.mark.parametrize("forged", [
    reply(src="10.99.0.1"),  # outside the session's prefixes: no flow of it goes there
    reply(sport=22),  # another port of a protected address
    reply(dport=40001),  # another local socket
])
def test_a_reply_to_no_flow_of_the_session_never_reaches_the_tun(tmp_path: Path,
                                                                 forged: bytes) -> None:
    host, _ = make_host(tmp_path)
    session, peer = attached(host)
    host.queued(session, sent_by_alice(), 0.0)
    host.reply(peer, forged, 1.0)
    assert not any(type(c) is WriteTun for c in host.commands)
    assert session.drops.as_dict() == {Drop.REPLY_NO_FLOW.value: 1}
    assert session.packets_in == 0


def test_a_reply_whose_port_changed_hands_or_whose_owner_is_unknown_is_dropped(
        tmp_path: Path) -> None:
    host, owners = make_host(tmp_path)
    session, peer = attached(host)
    host.queued(session, sent_by_alice(), 0.0)
    (flow,) = session.flows
    owners.of[flow] = BOB
    host.reply(peer, reply(), 1.0)
    owners.broken = True  # the kernel cannot tell: fail closed
    host.reply(peer, reply(), 2.0)
    assert not any(type(c) is WriteTun for c in host.commands)
    assert session.drops.as_dict() == {Drop.REPLY_NOT_YOURS.value: 2}


def test_malformed_replies_and_redirects_are_dropped(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    session, peer = attached(host)
    host.queued(session, sent_by_alice(), 0.0)
    host.reply(peer, b"\x45\x00garbage", 1.0)
    redirect = bytes(IP(src="10.77.1.9", dst="192.168.1.5") / ICMP(type=5, code=1)
                     / bytes(IP(sent_by_alice()))[:28])
    host.reply(peer, redirect, 2.0)
    assert not any(type(c) is WriteTun for c in host.commands)
    assert session.drops.as_dict() == {Drop.MALFORMED_REPLY.value: 1,
                                       Drop.REPLY_ICMP_REFUSED.value: 1}


def test_a_packet_before_the_session_is_attached_is_the_remote_error(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    peer = connect(host, ALICE)
    with pytest.raises(RemoteProtocolError, match="before the session is attached"):
        host.reply(peer, reply(), 0.0)


def test_a_full_tun_uncounts_the_reply_and_counts_the_drop(tmp_path: Path) -> None:
    host, owners = make_host(tmp_path)
    session, peer = attached(host)
    host.queued(session, sent_by_alice(), 0.0)
    host.reply(peer, reply(), 1.0)
    (write,) = host.commands
    assert type(write) is WriteTun
    host.commands.clear()
    host.tun_refused(write, Drop.TUN_FULL, 1.0)
    assert session.packets_in == 0 and session.bytes_in == 0
    assert session.drops.as_dict() == {Drop.TUN_FULL.value: 1}


# ---------------------------------------------------------------- local connections


def test_local_connections_are_bounded_per_uid_and_root_is_never_refused(
        tmp_path: Path) -> None:
    host, _ = make_host(tmp_path, max_local_connections_per_uid=2)
    peers = [connect(host, ALICE, id=i) for i in range(3)]
    assert [p.admitted for p in peers] == [True, True, False]
    assert host.commands[-1] == CloseLocal(peers[2])
    ((mtype, fields),) = [(e.type, decode_control(e)) for e in envelopes(peers[2])]
    assert mtype is MsgType.ERROR and fields["code"] == "refused"
    assert "max_local_connections_per_uid" in fields["reason"]
    (refused,) = records(host)
    assert refused["event"] == "local:refused" and refused["suppressed"] == 0
    assert all(connect(host, 0, id=10 + i).admitted for i in range(4))
    host.forget_local(peers[0])
    assert connect(host, ALICE, id=20).admitted


def test_refusal_records_are_rate_limited_per_uid(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path, max_local_connections_per_uid=2)
    connect(host, ALICE)
    connect(host, ALICE, id=1)
    for i in range(3):
        connect(host, ALICE, now=1.0 + i, id=2 + i)
    connect(host, ALICE, now=20.0, id=9)
    assert [r["suppressed"] for r in records(host)] == [0, 2]
