"""The client host's policy in memory (pvpn.nodes.client.ClientHost): no socket, no kernel.
Scripted as conversations: a queued packet or a tunnel process's reply in, commands out."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from pvpn import firewall
from pvpn.commands import LogRecord
from pvpn.drops import Drop
from pvpn.envelope import MsgType, decode_control
from pvpn.errors import PvpnError, RemoteProtocolError
from pvpn.local import LocalChannel
from pvpn.nodes.client import (
    PROBE_EVERY, ClientHost, CloseLocal, LocalPeer, SlotSession, WriteTun,
)

from net import (
    SID, FakeHostKernel, FakeOwners, LocalProcess, connect, host_and_kernel, make_host,
)

ALICE, BOB = 1001, 1002
NET = ipaddress.ip_network("10.77.1.0/24")


def attached(host: ClientHost[LocalPeer], uid: int = ALICE) -> tuple[SlotSession, LocalPeer]:
    """A session up: registered in a slot, its tunnel process attached with an id."""
    session = host.registry.allocate(uid, f"user{uid}", "vpn.example:4433", [NET], 0.0)
    peer = connect(host, uid)
    session.attached, session.session_id, session.ever_up = True, SID, True
    peer.session = session
    host.links[session.slot] = peer
    return session, peer


def with_its_id_recorded(tmp_path: Path) -> tuple[ClientHost[LocalPeer], FakeHostKernel,
                                                   SlotSession]:
    """alice's session up, its id in its rules (what a check of the kernel's rules expects)."""
    host, kernel = host_and_kernel(tmp_path)
    session, _ = attached(host)
    session.recorded = SID
    return host, kernel, session


def after_a_packet(tmp_path: Path) -> tuple[ClientHost[LocalPeer], FakeOwners, SlotSession,
                                             LocalPeer]:
    """alice's session up, and one packet of hers (``sent_by_alice``) out through it."""
    host, owners = make_host(tmp_path)
    session, peer = attached(host)
    host.queued(session, sent_by_alice(), 0.0)
    return host, owners, session, peer


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
    host, owners, session, peer = after_a_packet(tmp_path)
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
    host, _, session, peer = after_a_packet(tmp_path)
    host.reply(peer, forged, 1.0)
    assert not any(type(c) is WriteTun for c in host.commands)
    assert session.drops.as_dict() == {Drop.REPLY_NO_FLOW.value: 1}
    assert session.packets_in == 0


def test_a_reply_whose_port_changed_hands_or_whose_owner_is_unknown_is_dropped(
        tmp_path: Path) -> None:
    host, owners, session, peer = after_a_packet(tmp_path)
    (flow,) = session.flows
    owners.of[flow] = BOB
    host.reply(peer, reply(), 1.0)
    owners.broken = True  # the kernel cannot tell: fail closed
    host.reply(peer, reply(), 2.0)
    assert not any(type(c) is WriteTun for c in host.commands)
    assert session.drops.as_dict() == {Drop.REPLY_NOT_YOURS.value: 2}


def test_malformed_replies_and_redirects_are_dropped(tmp_path: Path) -> None:
    host, _, session, peer = after_a_packet(tmp_path)
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
    host, owners, session, peer = after_a_packet(tmp_path)
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


# ---------------------------------------------------------------- the local protocol


def test_register_then_attach_brings_a_session_up_and_records_its_id(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    alice = LocalProcess(host, ALICE)
    mtype, fields = alice.register(["10.77.1.0/24"])
    assert mtype is MsgType.REGISTERED and fields["uid"] == ALICE
    (session,) = host.registry.sessions.values()
    assert kernel.calls == [("install", session.slot)] and host.links[session.slot] is alice.peer
    assert alice.ask(MsgType.ATTACH, {"session": SID, "nodes": ["server-1"]}) == []
    assert session.state == "up" and session.nodes == ["server-1"]
    assert kernel.calls[-1] == ("write_id", session.slot)
    assert [r["event"] for r in records(host)] == ["session:registered", "session:attached"]
    alice.ask(MsgType.ATTACH, {"session": bytes(16)})  # a new session at the server
    assert kernel.calls[-1] == ("reset_connections", session.slot)


@pytest.mark.parametrize("fields, reason", [
    ({"server": "x" * 301}, "server name must be printable"),
    ({"server": "evil\nname"}, "server name must be printable"),
    ({"via": ["g"] * 40}, "gateway endpoints must be at most"),
    ({"prefixes": [1]}, "prefixes must be strings"),
    ({"prefixes": ["not a prefix"]}, ""),
])
def test_register_refusals_say_why_and_install_nothing(tmp_path: Path, fields: dict[str, Any],
                                                       reason: str) -> None:
    host, kernel = host_and_kernel(tmp_path)
    alice = LocalProcess(host, ALICE)
    mtype, answer = alice.register(fields.pop("prefixes", ["10.77.1.0/24"]), **fields)
    assert mtype is MsgType.ERROR and answer["code"] == "refused" and reason in answer["reason"]
    assert kernel.calls == [] and not host.registry.sessions and alice.peer.session is None


def test_a_failed_install_is_undone_and_refused(tmp_path: Path) -> None:
    kernel = FakeHostKernel()
    kernel.install_fails = True
    host, _ = make_host(tmp_path, kernel)
    mtype, answer = LocalProcess(host, ALICE).register(["10.77.1.0/24"])
    assert mtype is MsgType.ERROR and "cannot bind NFQUEUE" in answer["reason"]
    assert kernel.calls == [("install", 0), ("uninstall", 0)] and not host.registry.sessions


def test_protocol_violations_are_the_remote_error(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    alice = LocalProcess(host, ALICE)
    alice.register(["10.77.1.0/24"])
    with pytest.raises(RemoteProtocolError, match="REGISTER twice"):
        alice.register(["10.77.2.0/24"])
    bob = LocalProcess(host, BOB, id=2)
    bob.register(["10.77.3.0/24"])
    with pytest.raises(RemoteProtocolError, match="16-byte session id"):
        bob.ask(MsgType.ATTACH, {"session": b"short"})
    with pytest.raises(RemoteProtocolError, match="unexpected ATTACH"):
        LocalProcess(host, BOB, id=3).ask(MsgType.ATTACH, {"session": SID})  # nothing registered
    with pytest.raises(RemoteProtocolError, match="unexpected REGISTERED"):
        LocalProcess(host, BOB, id=4).ask(MsgType.REGISTERED, {"slot": 0, "queue": 0,
                                                                "uid": 0, "user": "x"})


def test_an_attach_of_another_sessions_id_is_refused(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    alice, bob = LocalProcess(host, ALICE), LocalProcess(host, BOB, id=2)
    alice.register(["10.77.1.0/24"])
    bob.register(["10.77.2.0/24"])
    alice.ask(MsgType.ATTACH, {"session": SID})
    with pytest.raises(RemoteProtocolError, match="another session holds"):
        bob.ask(MsgType.ATTACH, {"session": SID})


def test_a_congested_asker_is_refused_questions_but_not_attach(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    alice = LocalProcess(host, ALICE)
    alice.register(["10.77.1.0/24"])
    alice.peer.congested = True
    alice.ask(MsgType.ATTACH, {"session": SID})
    with pytest.raises(RemoteProtocolError, match="faster than it reads"):
        alice.ask(MsgType.STATUS, {})


def test_status_shows_only_the_askers_own_sessions_unless_root(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    LocalProcess(host, ALICE).register(["10.77.1.0/24"])
    LocalProcess(host, BOB, id=2).register(["10.77.2.0/24"])

    def users(uid: int, id: int) -> list[str]:
        ((mtype, page),) = LocalProcess(host, uid, id=id).ask(MsgType.STATUS, {})
        assert mtype is MsgType.STATUS_REPLY and page["more"] is False
        return sorted(s["user"] for s in page["sessions"])

    assert users(ALICE, 3) == ["user1001"]
    assert users(BOB, 4) == ["user1002"]
    assert users(0, 5) == ["user1001", "user1002"]
    assert users(1003, 6) == []


def disconnect(p: LocalProcess, session: str = "", slot: int | None = None,
               everything: bool = False) -> list[tuple[MsgType, Any]]:
    return p.ask(MsgType.DISCONNECT, {"session": session, "slot": slot, "all": everything})


def test_disconnect_by_prefix_ends_the_session_and_tells_its_tunnel_process(
        tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    alice = LocalProcess(host, ALICE)
    alice.bring_up()
    ((mtype, answer),) = disconnect(LocalProcess(host, ALICE, id=2), SID.hex()[:8])
    assert mtype is MsgType.STATUS_REPLY and answer["sessions"][0]["session"] == SID.hex()
    assert alice.closed() and alice.peer.unregistered and alice.peer.session is None
    ((mtype, told),) = alice.answers()
    assert mtype is MsgType.ERROR and told["code"] == "disconnected"
    assert kernel.calls[-3:] == [("abort_connections", 0), ("uninstall", 0),
                                 ("forget_marks", 0)]
    assert not host.registry.sessions and records(host)[-1]["event"] == "session:closed"


def test_disconnect_by_slot_names_only_the_askers_own(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    LocalProcess(host, ALICE).register(["10.77.1.0/24"])
    LocalProcess(host, BOB, id=2).register(["10.77.2.0/24"])
    ((mtype, answer),) = disconnect(LocalProcess(host, BOB, id=3), slot=0)  # alice's slot
    assert mtype is MsgType.ERROR and answer["code"] == "not-found"
    ((mtype, answer),) = disconnect(LocalProcess(host, BOB, id=4), slot=1)
    assert mtype is MsgType.STATUS_REPLY and [s["slot"] for s in answer["sessions"]] == [1]
    assert sorted(host.registry.sessions) == [0]


def test_disconnect_all_as_root_ends_every_session(tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    LocalProcess(host, ALICE).register(["10.77.1.0/24"])
    LocalProcess(host, BOB, id=2).register(["10.77.2.0/24"])
    ((mtype, answer),) = disconnect(LocalProcess(host, ALICE, id=3), everything=True)
    assert len(answer["sessions"]) == 1  # a user's --all is all of their own
    ((mtype, answer),) = disconnect(LocalProcess(host, 0, id=4), everything=True)
    assert mtype is MsgType.STATUS_REPLY and len(answer["sessions"]) == 1
    assert not host.registry.sessions
    assert [r["reason"] for r in records(host) if r["event"] == "session:closed"][-1] == \
        "pvpn disconnect by user0 (uid 0) --all"


# ---------------------------------------------------------------- held sessions


def test_a_lost_tunnel_process_leaves_its_session_held_and_dropping(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    alice = LocalProcess(host, ALICE)
    alice.bring_up()
    (session,) = host.registry.sessions.values()
    host.lost(alice.peer, 5.0)
    assert session.state.startswith("held") and session.held_since == 5.0
    assert ("uninstall", 0) not in kernel.calls, "its rules stay: the kernel drops"
    host.queued(session, sent_by_alice(), 6.0)
    assert session.drops.as_dict() == {Drop.TUNNEL_DOWN.value: 1}
    # The user's next `pvpn connect` for the same prefixes picks it up.
    again = LocalProcess(host, ALICE, id=2)
    assert again.register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
    assert host.links[session.slot] is again.peer and session.held_since is None
    assert [c for c in kernel.calls if c[0] == "install"] == [("install", 0)]
    assert "session:reattached" in [r["event"] for r in records(host)]


def test_a_held_session_whose_devices_failed_gets_them_at_its_next_register(
        tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    session = host.registry.adopt(0, ALICE, "user1001", [NET], 1, 0x10000, "pvpnc0", 0.0,
                                  session_id=SID, ever_up=True)
    assert LocalProcess(host, ALICE).register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
    assert kernel.calls == [("attach_devices", session.slot)]


def test_unregister_of_a_picked_up_session_never_brought_up_keeps_it_held(
        tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    first = LocalProcess(host, ALICE)
    first.bring_up()
    host.lost(first.peer, 2.0)
    second = LocalProcess(host, ALICE, id=2)
    second.register(["10.77.1.0/24"])
    ((mtype, answer),) = second.ask(MsgType.UNREGISTER, {"reason": "server unreachable"})
    assert mtype is MsgType.STATUS_REPLY and answer["sessions"][0]["state"].startswith("held")
    assert second.closed() and host.registry.sessions, "the earlier protection stays"
    third = LocalProcess(host, ALICE, id=3)
    third.bring_up()
    third.ask(MsgType.UNREGISTER, {"reason": "done"})
    assert not host.registry.sessions and ("uninstall", 0) in kernel.calls


def test_the_timer_ends_sessions_past_their_time_and_closes_idle_askers(
        tmp_path: Path) -> None:
    host, _ = make_host(tmp_path)
    alice = LocalProcess(host, ALICE)
    alice.register(["10.77.1.0/24"])  # never attached: it expires after grace_time
    idle = LocalProcess(host, BOB, id=2)
    late = host.config.grace_time + 100
    host.tick(late)
    assert not host.registry.sessions and alice.closed() and idle.closed()
    ((mtype, told),) = alice.answers()
    assert mtype is MsgType.ERROR and told["code"] == "expired"


def test_the_timer_writes_ids_not_yet_recorded_and_forgets_idle_flows(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    session, _ = attached(host)
    host.queued(session, sent_by_alice(), 1.0)
    host.tick(2.0)
    assert ("write_id", session.slot) in kernel.calls and session.flows
    session.recorded = SID
    kernel.calls.clear()
    host.tick(10_000.0)  # past FLOW_IDLE and PRUNE_EVERY
    assert kernel.calls == [] and not session.flows


def test_an_orderly_stop_lets_every_process_go_and_keeps_every_session(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    alice, asker = LocalProcess(host, ALICE), LocalProcess(host, BOB, id=2)
    alice.bring_up()
    host.commands.clear()
    host.shutdown("pvpn-client stopping")
    assert alice.closed() and asker.closed() and alice.answers() == []
    (stopping,) = records(host)
    assert stopping["event"] == "node:stopping" and "1 session(s) stay" in stopping["reason"]
    assert len(host.registry.sessions) == 1 and ("uninstall", 0) not in kernel.calls


# ---------------------------------------------------------------- the kernel: restarts, rules, marks


def saved_with(*sessions: firewall.RuleSet, families: tuple[int, ...] = (4, 6)) -> list[str]:
    """iptables-save of each family holding the instance's chains and these sessions' rules
    (a family left out of ``families`` was flushed: nothing of the instance in it)."""
    base = firewall.client_base("pvpnc")
    texts = [(base.v4 + "".join(s.v4 for s in sessions)) if 4 in families else "",
             (base.v6 + "".join(s.v6 for s in sessions)) if 6 in families else ""]
    # As iptables-save shows the hooks that iptables-restore inserted.
    return [text.replace("-I OUTPUT 1 ", "-A OUTPUT ").replace("-I PREROUTING 1 ",
                                                               "-A PREROUTING ")
            for text in texts]


def alices_rules(slot: int = 0, session_id: bytes = SID,
                 networks: tuple[Any, ...] = (NET,)) -> firewall.RuleSet:
    return firewall.client_session("pvpnc", slot, ALICE, list(networks), 3000 + slot,
                                   (slot + 1) << 16, 0xFF0000, f"pvpnc{slot}",
                                   session_id=session_id)


def test_a_first_start_makes_the_instance_anew_and_recovers_nothing(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    host.recover(["", ""], 0.0)
    assert [what for what, _ in kernel.rules.ran] == ["remove_instance", "apply"]
    assert kernel.rules.ran[1][1] == firewall.client_base("pvpnc")
    assert not host.registry.sessions and records(host) == []


def test_a_restart_holds_the_sessions_the_kernel_kept_and_binds_their_devices(
        tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    host.recover(saved_with(alices_rules(), alices_rules(1, b"")), 5.0)
    up_before, never_up = host.registry.sessions[0], host.registry.sessions[1]
    assert up_before.session_id == SID and up_before.ever_up and up_before.held_since == 5.0
    assert not never_up.ever_up, "without a recorded id it is kept grace_time only"
    assert up_before.state.startswith("held") and up_before.user == f"user{ALICE}"
    assert kernel.calls == [("attach_devices", 0), ("attach_devices", 1)]
    assert [r["event"] for r in records(host)] == ["session:recovered"] * 2
    assert [what for what, _ in kernel.rules.ran] == ["ensure_jump", "ensure_jump",
                                                      "ensure_rule"]


def test_a_recovered_session_whose_devices_fail_stays_held_with_its_rules(
        tmp_path: Path) -> None:
    class Busy(FakeHostKernel):
        def attach_devices(self, session: SlotSession) -> None:
            raise PvpnError("cannot set up TUN device pvpnc0: busy")

    kernel = Busy()
    host, _ = make_host(tmp_path, kernel)
    host.recover(saved_with(alices_rules()), 0.0)
    (session,) = host.registry.sessions.values()
    assert session.state.startswith("held") and ("uninstall", 0) not in kernel.calls
    failed, recovered = records(host)
    assert failed["event"] == "node:recover-failed" and "busy" in failed["reason"]
    assert recovered["event"] == "session:recovered"


def test_a_restart_after_one_family_was_flushed_puts_back_only_that_family(
        tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    v6 = ipaddress.ip_network("fd77:1::/64")
    host.recover(saved_with(alices_rules(networks=(NET, v6)), families=(6,)), 0.0)
    assert len(host.registry.sessions) == 1
    whats = [what for what, _ in kernel.rules.ran]
    assert "remove_instance" not in whats
    assert kernel.rules.ran[0] == ("apply", firewall.RuleSet(firewall.client_base("pvpnc").v4,
                                                             ""))
    warning = records(host)[0]
    assert warning["event"] == "node:warning" and "missing in IPv4" in warning["reason"]


def test_incomplete_session_rules_found_at_a_restart_are_removed(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    saved = saved_with()
    saved = [text + ":PVPNC-S5 - [0:0]\n" for text in saved]  # a chain and nothing else
    host.recover(saved, 0.0)
    assert not host.registry.sessions
    (cleanup,) = records(host)
    assert cleanup["event"] == "node:cleanup" and cleanup["chains"] == ["PVPNC-S5"]
    removed = [detail for what, detail in kernel.rules.ran if what == "remove_chains"]
    assert removed == [(["PVPNC-S5"], "PVPNC-OUT"), (["PVPNC-S5"], "PVPNC-IN")]


def test_rules_someone_else_removed_are_put_back_unless_read_before_a_change(
        tmp_path: Path) -> None:
    host, kernel, session = with_its_id_recorded(tmp_path)
    flushed = ["*mangle\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"] * 2
    host.check_rules(flushed, kernel.rules.epoch - 1)  # read before pvpn-client's own change
    assert kernel.rules.ran == [] and records(host) == []
    host.check_rules(saved_with(alices_rules()), kernel.rules.epoch)  # all there
    assert kernel.rules.ran == [] and records(host) == []
    host.check_rules(flushed, kernel.rules.epoch)
    applied = [detail for what, detail in kernel.rules.ran if what == "apply"]
    base = firewall.client_base("pvpnc")
    assert applied[:2] == [firewall.RuleSet(base.v4, ""), firewall.RuleSet("", base.v6)]
    assert f"pvpn-session={SID.hex()}" in applied[2].v4 and not applied[2].v6, \
        "its IPv4 prefix needs nothing of IPv6"
    # Made whole in that one transaction: nothing removed on its own before it (a
    # pvpn-client killed in between left the next one half a session to recover).
    assert applied[2].v4.count("COMMIT") == 1 and ":PVPNC-S0 - [0:0]" in applied[2].v4
    assert [what for what, _ in kernel.rules.ran] == ["apply"] * 3
    (warning,) = records(host)
    assert warning["event"] == "node:warning" and "removed by someone else" in warning["reason"]
    assert warning["sessions"] == ["slot 0 (IPv4)"]


def test_half_a_session_is_made_whole_in_one_transaction_and_a_failed_one_waits(
        tmp_path: Path) -> None:
    host, kernel, session = with_its_id_recorded(tmp_path)
    whole = alices_rules()
    # Its IPv4 chain emptied and its jumps of the format before 34c7490: what a repair made of
    # remove-then-add leaves when pvpn-client is killed between the two.
    legacy_jump = "-A PVPNC-OUT -j PVPNC-S0\n"
    saved = saved_with(firewall.RuleSet(":PVPNC-S0 - [0:0]\n:PVPNC-S0I - [0:0]\n"
                                        + legacy_jump + "-A PVPNC-IN -i pvpnc0 -j PVPNC-S0I\n",
                                        ""))
    host.check_rules(saved, kernel.rules.epoch)
    ((what, repair),) = kernel.rules.ran
    assert what == "apply" and not repair.v6 and repair.v4.count("COMMIT") == 1
    lines = repair.v4.splitlines()
    assert lines.index(":PVPNC-S0 - [0:0]") < lines.index("-D PVPNC-OUT -j PVPNC-S0")
    assert "-D PVPNC-IN -i pvpnc0 -j PVPNC-S0I" in lines
    assert [l for l in lines if l.startswith("-A")] == [
        l for l in whole.v4.splitlines() if l.startswith("-A")]
    (warning,) = records(host)
    assert warning["sessions"] == ["slot 0 (IPv4)"]

    # The kernel refuses the transaction (a rule of `saved` went meanwhile): nothing changed,
    # said so, and the next check tries again.
    def refused(ruleset: Any) -> None:
        kernel.rules.change("apply", ruleset)
        raise PvpnError("iptables-restore: line 5 failed")

    kernel.rules.apply = refused  # type: ignore[method-assign]
    host.commands.clear()
    host.check_rules(saved, kernel.rules.epoch)
    refusal, summary = records(host)
    assert "not put back yet" in refusal["reason"] and "line 5 failed" in refusal["reason"]
    assert summary["sessions"] is None


def test_a_slot_whose_marks_outlive_its_last_holder_is_quarantined(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    mark = host.registry.mark_for(0)
    kernel.connections[mark] = 2
    assert host.slot_usable(0), "marks forgotten, then none left"
    assert kernel.calls == [("forget_marked", mark)] and records(host) == []
    kernel.connections[mark] = 1
    kernel.stuck.add(mark)
    alice = LocalProcess(host, ALICE)
    assert alice.register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
    assert 0 not in host.registry.sessions and 1 in host.registry.sessions
    (quarantined, _) = records(host)
    assert quarantined["event"] == "slot:quarantined" and quarantined["connections"] == 1

    class Deaf(FakeHostKernel):
        def marked(self, mark: int) -> int:
            raise PvpnError("conntrack: no answer")

    deaf, _ = make_host(tmp_path, Deaf())
    assert not deaf.slot_usable(0)
    (refused,) = records(deaf)
    assert refused["event"] == "slot:quarantined" and "cannot ask conntrack" in refused["reason"]


def test_a_new_server_session_resets_connections_at_most_once_a_probe_interval(
        tmp_path: Path) -> None:
    class Probing(FakeHostKernel):
        def reset_connections(self, session: SlotSession) -> int:
            super().reset_connections(session)
            return 2

    kernel = Probing()
    host, _ = make_host(tmp_path, kernel)
    session, _ = attached(host)
    host.reset_connections(session, 100.0)
    assert ("reset_connections", 0) not in kernel.calls, "no devices: nothing to probe"
    kernel.devices.add(0)
    host.reset_connections(session, 100.0)
    host.reset_connections(session, 100.0 + PROBE_EVERY - 1)
    assert kernel.calls.count(("reset_connections", 0)) == 1
    host.reset_connections(session, 100.0 + PROBE_EVERY)
    assert kernel.calls.count(("reset_connections", 0)) == 2
    reset = [r for r in records(host) if r["event"] == "session:connections-reset"]
    assert len(reset) == 2 and reset[0]["count"] == 2


def test_the_instance_s_rules_leave_the_host_only_with_no_session_left(tmp_path: Path) -> None:
    host, kernel = host_and_kernel(tmp_path)
    session, _ = attached(host)
    assert host.release_host() == [] and kernel.rules.ran == []
    host.registry.release(session.slot)
    host.release_host()
    assert kernel.rules.ran == [("remove_instance", None)]


# ---------------------------------------------------------------- the layering


@pytest.mark.parametrize("module", ["pvpn.nodes.client", "pvpn.local"])
def test_the_client_hosts_core_imports_no_io_and_no_program(module: str) -> None:
    import ast
    import importlib

    source = Path(importlib.import_module(module).__file__ or "").read_text()
    imported = {alias.name for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom)}
    forbidden = {name for name in imported
                 if name.split(".")[0] in {"asyncio", "socket", "os", "subprocess", "time",
                                           "pwd", "select"}
                 or name.startswith(("pvpn.io", "pvpn.client", "pvpn.server",
                                     "pvpn.gateway"))}
    assert forbidden == set()


def test_a_segmenting_queue_is_never_a_queue_another_sessions_rules_feed(
        tmp_path: Path) -> None:
    """The administrator lowers max_sessions (or moves queue_base) and restarts pvpn-client
    while sessions are held: slot 40's rules, made under the old config, feed queue 3040, which
    is slot 8's segmenting queue under the new one (3000 + 32 + 8). Bound first, it would have
    put bob's packets into alice's tunnel (found in review). Rules of another config about:
    no session gets a segmenting queue (its queue then has no F_GSO: the kernel segments
    everything first); with this config's rules only, each gets its own, apart from all."""
    def rules_of(uid: int, slot: int) -> firewall.RuleSet:
        return firewall.client_session("pvpnc", slot, uid, [NET], 3000 + slot,
                                       (slot + 1) << 16, 0xFF0000, f"pvpnc{slot}",
                                       session_id=SID)

    host, _ = make_host(tmp_path, max_sessions=32)
    host.recover(saved_with(rules_of(ALICE, 8), rules_of(ALICE + 1, 40)), 0.0)
    queues = {s.queue for s in host.registry.sessions.values()}
    assert queues == {3008, 3040}
    assert [s.segmenting_queue for s in host.registry.sessions.values()] == [-1, -1]
    later = host.registry.allocate(ALICE + 2, "carol", "vpn.example:4433", [NET], 1.0)
    assert later.segmenting_queue == -1
    # This config's own rules: every session's segmenting queue apart from every queue.
    (tmp_path / "again").mkdir()
    host, _ = make_host(tmp_path / "again", max_sessions=32)
    host.recover(saved_with(rules_of(ALICE, 8), rules_of(ALICE + 1, 20)), 0.0)
    later = host.registry.allocate(ALICE + 2, "carol", "vpn.example:4433", [NET], 1.0)
    sessions = list(host.registry.sessions.values())
    segmenting = {s.segmenting_queue for s in sessions}
    assert segmenting == {3000 + 32 + s.slot for s in sessions}
    assert not segmenting & {s.queue for s in sessions} and -1 not in segmenting
