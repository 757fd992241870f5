"""pvpn-client's control path with the kernel faked (iptables, conntrack, TUN, NFQUEUE): what
an orderly stop leaves, who may connect, what a registration may carry, when sessions end.
Scripted like a conversation: envelopes in over a fake unix connection, envelopes out."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pvpn import firewall
from pvpn.client import daemon as dm
from pvpn.envelope import EnvelopeDecoder, MsgType, decode_control, encode_control, encode_envelope
from pvpn.io import conntrack, sessiondevices

from net import SID, FakeQueues, client_config, fake_tun


class Kernel:
    """What the daemon asked of iptables and conntrack, and what they hold."""

    def __init__(self) -> None:
        self.applied: list[firewall.RuleSet] = []
        self.removed: list[list[list[str]]] = []
        self.instance_removed = 0
        self.marked: dict[int, int] = {}  # mark -> connections carrying it
        self.forgotten: list[int] = []
        self.saved = ["", ""]


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    k = Kernel()
    pipes: list[int] = []
    queues = FakeQueues()
    DAEMONS.clear()
    monkeypatch.setattr(dm.rules, "apply", k.applied.append)
    monkeypatch.setattr(dm.rules, "remove", lambda cmds: k.removed.append(cmds) or [])
    monkeypatch.setattr(dm.rules, "saved", lambda version: k.saved[version // 6])
    monkeypatch.setattr(dm.rules, "ensure_jump", lambda *a: None)
    monkeypatch.setattr(dm.rules, "remove_chains", lambda *a: [])

    def remove_instance(instance: str) -> list[str]:
        k.instance_removed += 1
        return []

    monkeypatch.setattr(dm.rules, "remove_instance", remove_instance)
    monkeypatch.setattr(conntrack, "count_marked", lambda mark, mask: k.marked.get(mark, 0))

    def forget(mark: int, mask: int) -> int:
        k.forgotten.append(mark)
        return k.marked.pop(mark, 0)

    monkeypatch.setattr(conntrack, "forget_marked", forget)
    monkeypatch.setattr(sessiondevices, "open_tun", lambda name: fake_tun(pipes))
    monkeypatch.setattr(sessiondevices, "BatchedQueue", queues)
    monkeypatch.setattr(dm.rules, "ensure_rule", lambda *a: None)
    try:
        yield k
    finally:
        queues.close_all()
        for fd in pipes:
            os.close(fd)
        for daemon in DAEMONS:  # the TUN devices of the sessions still open
            for fd in daemon.tun_fds.values():
                os.close(fd)


class Transport(asyncio.Transport):
    def __init__(self, protocol: dm.LocalLink, uid: int, pid: int) -> None:
        super().__init__()
        self.protocol, self.uid, self.pid = protocol, uid, pid
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            creds = struct.pack("3i", self.pid, self.uid, self.uid)

            class Sock:
                def getsockopt(self, *args: Any) -> bytes:
                    return creds
            return Sock()
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


class Process:
    """One local process on pvpn-client's socket, as the kernel names it (uid, pid)."""

    def __init__(self, daemon: dm.ClientDaemon, uid: int, pid: int = 4242) -> None:
        self.link = dm.LocalLink(daemon)
        self.transport = Transport(self.link, uid, pid)
        self.link.connection_made(self.transport)
        self.seq = 0
        self.decoder = EnvelopeDecoder()
        self.read = 0

    def send(self, mtype: MsgType, fields: dict[str, Any], session: bytes = b"") -> None:
        self.send_envelope(mtype, encode_control(fields), session)

    def send_envelope(self, mtype: MsgType, body: bytes, session: bytes = b"") -> None:
        self.link.data_received(encode_envelope(mtype, session, self.transport.uid, self.seq,
                                                body))
        self.seq += 1

    def hand_back(self, packet: Any) -> None:
        """A packet (bytes or scapy's) as the tunnel process hands it back from the tunnel."""
        self.send_envelope(MsgType.PACKET, bytes(packet), SID)

    def replies(self) -> list[tuple[MsgType, dict[str, Any]]]:
        data = bytes(self.transport.written[self.read:])
        self.read = len(self.transport.written)
        return [(e.type, decode_control(e)) for e in self.decoder.feed(data)]

    def register(self, prefixes: list[str], server: str = "vpn.example:4433",
                 **chain: Any) -> tuple[MsgType, dict[str, Any]]:
        self.send(MsgType.REGISTER, {"prefixes": prefixes, "server": server, **chain})
        (reply,) = self.replies()
        return reply

    def bring_up(self, prefixes: tuple[str, ...] = ("10.77.1.0/24",)) -> None:
        """Its session up: registered for ``prefixes`` and attached with SID."""
        self.register(list(prefixes))
        self.send(MsgType.ATTACH, {"session": SID})


DAEMONS: list[dm.ClientDaemon] = []


def make_daemon(tmp_path: Path, **settings: Any) -> dm.ClientDaemon:
    daemon = dm.ClientDaemon(client_config(tmp_path, socket=str(tmp_path / "c.sock"),
                                           **settings))
    daemon.log.stream = io.StringIO()
    DAEMONS.append(daemon)
    return daemon


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def alice_up(daemon: dm.ClientDaemon) -> Process:
    """alice's session up on ``daemon``: registered for 10.77.1.0/24, attached with SID."""
    alice = Process(daemon, 1001)
    alice.bring_up()
    return alice


def refused_as_unprintable(tmp_path: Path, server: str, **chain: Any) -> None:
    """A registration for ``server`` (through ``chain``) is refused as not printable, and no
    session is kept."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        mtype, reply = Process(daemon, 1002).register(["10.77.1.0/24"], server, **chain)
        assert mtype is MsgType.ERROR and "printable" in reply["reason"]
        assert daemon.registry.sessions == {}

    run(scenario())


def alice_with_flows(daemon: dm.ClientDaemon) -> tuple[Process, dict[int, Any]]:
    """alice's session up, and a packet of hers out through its queue to 10.77.1.2 from each
    of TCP ports 1 to 5 and UDP port 6: her process, and those flows by port."""
    from scapy.layers.inet import IP, TCP, UDP

    from pvpn.packet import parse_flow

    alice = alice_up(daemon)
    out = {sport: bytes(IP(src="10.77.0.1", dst="10.77.1.2")
                        / TCP(sport=sport, dport=80, flags="A")) for sport in range(1, 6)}
    out[6] = bytes(IP(src="10.77.0.1", dst="10.77.1.2") / UDP(sport=6, dport=53))
    for packet in out.values():
        assert daemon.queues[0].callback(packet)
    return alice, {sport: parse_flow(packet) for sport, packet in out.items()}



def test_an_orderly_stop_keeps_every_session_and_its_rules(kernel: Kernel,
                                                           tmp_path: Path) -> None:
    """SIGTERM removed every session's rules and told each `pvpn connect` to exit 0."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = Process(daemon, 1001)
        assert alice.register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
        alice.send(MsgType.ATTACH, {"session": SID})
        daemon.shutdown("pvpn-client stopping")
        await asyncio.sleep(0)
        assert alice.replies() == [], "no ERROR: the tunnel process treats it as a lost daemon"
        assert alice.transport.closed
        assert kernel.removed == [] and kernel.forgotten == []
        assert daemon.release_host() == [] and kernel.instance_removed == 0
        (session,) = daemon.registry.sessions.values()
        assert session.state.startswith("held")

    run(scenario())


def test_a_stop_with_no_session_leaves_the_host_as_found(kernel: Kernel, tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        daemon.shutdown("pvpn-client stopping")
        daemon.release_host()
        assert kernel.instance_removed == 1

    run(scenario())


def test_attach_is_recorded_in_the_rules_for_the_next_pvpn_client(kernel: Kernel,
                                                                 tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = alice_up(daemon)
        recorded = kernel.applied[-1]
        assert f"pvpn-session={SID.hex()}" in recorded.v4 + recorded.v6
        alice.send(MsgType.ATTACH, {"session": SID})
        assert kernel.applied[-1] is recorded, "the same id is not written twice"

    run(scenario())


def test_a_process_that_never_had_a_held_session_up_cannot_end_it(kernel: Kernel,
                                                                  tmp_path: Path) -> None:
    """`pvpn connect` picking up a held session, then failing to reach the server, sent
    UNREGISTER: the protection an earlier process set up ended with it."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        first = Process(daemon, 1001, pid=1)
        first.bring_up()
        first.transport.close()  # killed
        await asyncio.sleep(0)
        second = Process(daemon, 1001, pid=2)
        assert second.register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
        second.send(MsgType.UNREGISTER, {"reason": "could not connect: timed out"})
        ((mtype, reply),) = second.replies()
        assert mtype is MsgType.STATUS_REPLY and reply["sessions"][0]["state"].startswith("held")
        assert kernel.removed == [] and len(daemon.registry.sessions) == 1
        # The process that has it up ends it.
        third = Process(daemon, 1001, pid=3)
        third.bring_up()
        third.send(MsgType.UNREGISTER, {"reason": "ended by the user"})
        assert daemon.registry.sessions == {} and len(kernel.removed) == 1

    run(scenario())


def test_an_ended_session_leaves_no_mark_and_a_carried_mark_is_quarantined(
        kernel: Kernel, tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = alice_up(daemon)
        mark = daemon.registry.sessions[0].mark
        kernel.marked[mark] = 3  # her connections, marked by her TUN device
        alice.send(MsgType.UNREGISTER, {"reason": "ended by the user"})
        assert kernel.forgotten == [mark] and mark not in kernel.marked
        # Marks that outlived a clean-up (a crash between the two steps, say) and cannot be
        # forgotten keep the slot from the next user.
        kernel.marked[mark] = 1
        monkey_forget = conntrack.forget_marked
        conntrack.forget_marked = lambda m, mask: 0  # type: ignore[assignment]
        try:
            bob = Process(daemon, 1002)
            assert bob.register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
            assert daemon.registry.sessions[1].uid == 1002 and 0 not in daemon.registry.sessions
        finally:
            conntrack.forget_marked = monkey_forget  # type: ignore[assignment]

    run(scenario())


def test_local_connections_are_bounded_per_uid_and_root_is_never_refused(
        kernel: Kernel, tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path, max_local_connections_per_uid=3,
                             max_local_connections=4)
        bobs = [Process(daemon, 1002, pid=i) for i in range(4)]
        assert [p.transport.closed for p in bobs] == [False, False, False, True]
        ((mtype, reply),) = bobs[3].replies()
        assert mtype is MsgType.ERROR and "max_local_connections_per_uid" in reply["reason"]
        carol = Process(daemon, 1003)
        dave = Process(daemon, 1004)
        assert not carol.transport.closed and dave.transport.closed  # 4 in all
        roots = [Process(daemon, 0, pid=100 + i) for i in range(8)]
        assert not any(p.transport.closed for p in roots)
        bobs[0].transport.close()
        await asyncio.sleep(0)
        assert not Process(daemon, 1002).transport.closed, "a freed place can be taken again"

    run(scenario())


def test_an_idle_connection_without_a_session_is_closed_after_grace_time(
        kernel: Kernel, tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path, grace_time=10)
        idle = Process(daemon, 1002)
        busy = Process(daemon, 1001)
        busy.register(["10.77.1.0/24"])
        idle.link.last_active = busy.link.last_active = daemon.loop.time() - 11
        daemon.tick()
        assert idle.transport.closed and not busy.transport.closed

    run(scenario())


def test_a_session_never_up_is_ended_and_its_process_told(kernel: Kernel, tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path, grace_time=10)
        bob = Process(daemon, 1002)
        bob.register(["10.77.1.0/24"])
        daemon.registry.sessions[0].opened -= 11
        daemon.tick()
        ((mtype, reply),) = bob.replies()
        assert mtype is MsgType.ERROR and reply["code"] == "expired"
        assert daemon.registry.sessions == {} and bob.transport.closed

    run(scenario())


@pytest.mark.parametrize("server", ["x" * 4000, "vpn\x1b[2J:4433", "a\nb:1"])
def test_a_registration_with_an_unreasonable_server_string_is_refused(
        kernel: Kernel, tmp_path: Path, server: str) -> None:
    """About 16 registrations with 4 KB server strings blinded root's `pvpn status`; control
    characters reached root's terminal."""
    refused_as_unprintable(tmp_path, server)


def test_status_shows_the_chain_its_tunnel_process_named(kernel: Kernel, tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = Process(daemon, 1001)
        via = ["10.77.1.1:4433", "[fd77:2::1]:4433"]
        assert alice.register(["10.77.1.0/24"], "10.77.3.1:4433", via=via)[0] \
            is MsgType.REGISTERED
        alice.send(MsgType.ATTACH, {"session": SID, "nodes": ["gw1", "gw2", "server"]})
        alice.send(MsgType.STATUS, {})
        (_, reply), = alice.replies()
        (described,) = reply["sessions"]
        assert described["via"] == via and described["nodes"] == ["gw1", "gw2", "server"]
        assert described["server"] == "10.77.3.1:4433"

    run(scenario())


@pytest.mark.parametrize("via", [["gw\x1b[2J:4433"], ["x" * 400], ["g:1"] * 17, [""], [7]])
def test_a_registration_with_an_unreasonable_chain_is_refused(
        kernel: Kernel, tmp_path: Path, via: list[Any]) -> None:
    refused_as_unprintable(tmp_path, "s:4433", via=via)


def test_an_attach_with_unreasonable_node_names_is_refused(kernel: Kernel,
                                                           tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = Process(daemon, 1001)
        assert alice.register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
        alice.send(MsgType.ATTACH, {"session": SID, "nodes": ["server\x1b]0;owned\x07"]})
        await asyncio.sleep(0)
        assert alice.transport.closed
        (session,) = daemon.registry.sessions.values()
        assert session.nodes == [] and not session.attached  # held: its packets still dropped

    run(scenario())


def test_disconnect_as_root_with_all_ends_everything_and_names_it(kernel: Kernel,
                                                                 tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        users = [Process(daemon, uid) for uid in (1001, 1002)]
        for i, p in enumerate(users):
            p.register([f"10.{i}.0.0/16"])
            p.send(MsgType.ATTACH, {"session": bytes([i]) * 16})
        root = Process(daemon, 0)
        root.send(MsgType.DISCONNECT, {"session": "0", "slot": None, "all": False})
        ((mtype, _),) = root.replies()
        assert mtype is MsgType.ERROR and len(daemon.registry.sessions) == 2
        root.send(MsgType.DISCONNECT, {"session": "", "slot": None, "all": True})
        ((mtype, reply),) = root.replies()
        assert mtype is MsgType.STATUS_REPLY
        assert sorted(s["user"] for s in reply["sessions"]) == [
            dm.user_name(1001), dm.user_name(1002)]
        assert daemon.registry.sessions == {}
        for p in users:
            ((mtype, told),) = p.replies()
            assert mtype is MsgType.ERROR and told["code"] == "disconnected"

    run(scenario())


def test_recovery_converts_the_previous_versions_jumps(kernel: Kernel, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "firewall_tests", Path(__file__).with_name("test_firewall.py"))
    assert spec is not None and spec.loader is not None
    legacy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(legacy)
    kernel.saved = [legacy.LEGACY_V4, legacy.LEGACY_V6]

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        daemon.recover()
        (session,) = daemon.registry.sessions.values()
        assert session.slot == 2 and session.ever_up, "held as long as one that was up"
        (repair,) = kernel.applied
        assert "-D PVPNC-OUT -j PVPNC-S2" in repair.v4
        assert "-A PVPNC-OUT -m owner --uid-owner 1001 -j PVPNC-S2" in repair.v6

    run(scenario())


def test_recovered_networks_are_the_ones_in_the_rules(kernel: Kernel, tmp_path: Path) -> None:
    rules = firewall.client_session("pvpnc", 0, 1001, [ipaddress.ip_network("10.1.0.0/16")],
                                    3000, 0x10000, 0xFF0000, "pvpnc0", session_id=SID)
    kernel.saved = [firewall.client_base("pvpnc").v4 + rules.v4,
                    firewall.client_base("pvpnc").v6 + rules.v6]

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        daemon.recover()
        (session,) = daemon.registry.sessions.values()
        assert session.session_id == SID and session.ever_up and kernel.applied == []
        alice = Process(daemon, 1001)
        assert alice.register(["10.1.0.0/16"])[0] is MsgType.REGISTERED
        assert session.state == "up", "the tunnel process re-attaches at once"

    run(scenario())


def test_a_local_user_looping_over_garbage_cannot_flood_the_log(kernel: Kernel,
                                                                tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        for i in range(200):
            garbage = Process(daemon, 1002, pid=i)
            garbage.link.data_received(b"\xc1" * 10)  # not msgpack: the link is closed
            assert garbage.transport.closed
            await asyncio.sleep(0)
        log = daemon.log.stream.getvalue()  # type: ignore[attr-defined]
        assert log.count('"local:error"') == 1 and len(log) < 2000
        assert daemon.local == set(), "every closed connection is forgotten"

    run(scenario())


def test_icmp_errors_handed_back_enter_the_host_only_as_a_host_may_receive_them(
        kernel: Kernel, tmp_path: Path) -> None:
    """Issue 9 point 4: pvpn-client checked an ICMP error from a user's tunnel only by the flow
    it quotes; a redirect, an error addressed to another local address or one of 1,500 bytes
    about that flow entered the host. Now its type, outer destination and length are checked
    too (packet.received_icmp_error_refusal)."""
    from scapy.layers.inet import ICMP, IP, UDP

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = alice_up(daemon)
        session = daemon.registry.sessions[0]
        out = bytes(IP(src="10.77.0.1", dst="10.77.1.2") / UDP(sport=5000, dport=53) / b"q")
        assert daemon.queues[0].callback(out)  # hers, on its way out: now a flow of hers

        hand_back = alice.hand_back

        hand_back(IP(src="10.77.1.2", dst="10.77.0.1") / ICMP(type=5, code=1, gw="10.77.1.66")
                  / out)  # a redirect: would move the host's route
        hand_back(IP(src="10.77.1.2", dst="10.77.0.99") / ICMP(type=3, code=3) / out)
        hand_back(IP(src="10.77.1.2", dst="10.77.0.1") / ICMP(type=3, code=3) / out
                  / (b"x" * 1500))  # longer than any host sends (RFC 1812: 576)
        assert session.packets_in == 0
        assert session.drops.as_dict() == {"reply-icmp-refused": 3}
        # A router on the way saying the port is unreachable: a host takes that.
        hand_back(IP(src="10.77.1.254", dst="10.77.0.1") / ICMP(type=3, code=3) / out)
        assert session.packets_in == 1

    run(scenario())


def test_an_exception_in_one_connections_handling_closes_that_connection_only(
        kernel: Kernel, tmp_path: Path) -> None:
    """Issue 9 point 2 for pvpn-client: what escapes the handling of one local connection (a
    bug a local user found) is logged as node:error with the traceback and closes that
    connection; the daemon serves the others."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice, bob = Process(daemon, 1001), Process(daemon, 1002)
        alice.bring_up()

        def broken(link: Any, packet: bytes) -> None:
            raise KeyError("a bug")

        daemon.inject = broken  # type: ignore[method-assign]
        alice.link.data_received(encode_envelope(MsgType.PACKET, SID, 1001, alice.seq, b"x"))
        assert alice.transport.closed
        log = daemon.log.stream.getvalue()  # type: ignore[attr-defined]
        assert '"event":"node:error"' in log and "KeyError" in log and "Traceback" in log
        assert bob.register(["10.77.2.0/24"])[0] is MsgType.REGISTERED
        daemon.tick = lambda: 1 / 0  # type: ignore[method-assign,assignment,return-value]
        assert not daemon.guard.call("timer", daemon.tick)

    run(scenario())


#: An IPv6 zone (the text after ``%``) may be anything but ``%`` and ``/`` to Python's
#: ipaddress, line breaks included: as a --to prefix it wrote its own lines into the rules
#: pvpn-client installs as root (here: alice's IPv6 packets into bob's queue, and a rule in
#: the filter table). Checked on a live ip6tables-restore: every line was committed.
ZONE_INJECTION = ("fe80::1%lo -j RETURN\n"
                  "-I PVPNC-OUT 1 -m owner --uid-owner 1001 -j NFQUEUE --queue-num 3001\n"
                  "COMMIT\n*filter\n-I INPUT 1 -p tcp --dport 22 -j DROP\nCOMMIT\n*mangle\n"
                  "-A PVPNC-S0 -d ::1")


@pytest.mark.parametrize("prefix", [ZONE_INJECTION, "fe80::%eth0/64", "fe80::1%lo"])
def test_a_registered_prefix_cannot_write_rules_of_its_own(kernel: Kernel, tmp_path: Path,
                                                           prefix: str) -> None:
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        mtype, reply = Process(daemon, 1002).register(["10.77.1.0/24", prefix])
        assert mtype is MsgType.ERROR and "zone" in reply["reason"]
        assert kernel.applied == [] and daemon.registry.sessions == {}

    run(scenario())


class SlowReader(Transport):
    """A peer that never reads: like asyncio's, the transport tells its protocol to pause
    writing once more than WRITE_HIGH_WATER waits to be sent."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        if len(self.written) > dm.WRITE_HIGH_WATER and not self.protocol.congested:
            self.protocol.pause_writing()


@pytest.mark.parametrize("mtype, fields", [
    (MsgType.STATUS, {}),
    (MsgType.DISCONNECT, {"session": "0123456789abcdef", "slot": None, "all": False}),
])
def test_a_process_that_asks_and_never_reads_cannot_fill_pvpn_client_s_memory(
        kernel: Kernel, tmp_path: Path, mtype: MsgType, fields: dict[str, Any]) -> None:
    """Every answer was queued whether or not the asker read it: bob wrote 20,000 questions
    (260 KB) and read nothing, and pvpn-client (root) buffered 22 MB of answers for him, 84
    bytes for each byte he sent, without bound."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        bob = Process(daemon, 1002)
        bob.transport = SlowReader(bob.link, 1002, 4242)
        bob.link.transport = bob.transport
        bob.register([f"10.{i}.0.0/16" for i in range(64)])
        bob.send(MsgType.ATTACH, {"session": SID})
        burst = b"".join(encode_envelope(mtype, b"", 1002, bob.seq + i, encode_control(fields))
                         for i in range(20_000))
        bob.link.data_received(burst)
        assert len(bob.transport.written) < 2 * dm.WRITE_HIGH_WATER
        assert bob.transport.closed, "a process that asks faster than it reads is let go"

    run(scenario())


def test_attach_with_ever_new_ids_cannot_keep_pvpn_client_running_iptables(
        kernel: Kernel, tmp_path: Path) -> None:
    """Every ATTACH with another id rewrote the session's inbound chain, two iptables-restore
    runs inside the event loop (29 ms, measured): bob's one write of 8,000 ATTACHes (no server
    needed) froze every user's packets for nearly 4 minutes. The kernel's record of the id is
    written at once the first time (it says the session was up), later at most once a
    RECORD_EVERY."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        bob = Process(daemon, 1002)
        bob.register(["10.77.1.0/24"])
        installed = len(kernel.applied)
        ids = [bytes([i % 251]) * 16 for i in range(1000)]
        bob.link.data_received(b"".join(
            encode_envelope(MsgType.ATTACH, b"", 1002, bob.seq + i,
                            encode_control({"session": sid})) for i, sid in enumerate(ids)))
        bob.seq += len(ids)
        assert not bob.transport.closed
        session = daemon.registry.sessions[0]
        assert session.session_id == ids[-1], "the live id is the last one"
        assert len(kernel.applied) == installed + 1
        assert f"pvpn-session={ids[0].hex()}" in kernel.applied[-1].v4
        daemon.tick()
        assert len(kernel.applied) == installed + 1, "not yet due"
        session.recorded_at -= dm.RECORD_EVERY
        daemon.tick()
        assert f"pvpn-session={ids[-1].hex()}" in kernel.applied[-1].v4
        assert len(kernel.applied) == installed + 2

    run(scenario())


def test_registering_and_ending_sessions_in_a_loop_is_bounded_per_uid(kernel: Kernel,
                                                                     tmp_path: Path) -> None:
    """Each new registration installs rules and each end removes them and asks conntrack:
    bob's loop of REGISTER + UNREGISTER (pipelined, on fresh connections) kept pvpn-client
    running iptables for him alone. New sessions of one uid now come at most
    max_sessions_per_uid at once, then max_new_sessions_per_minute."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path, max_new_sessions_per_minute=6)
        refused = []
        for i in range(50):
            bob = Process(daemon, 1002, pid=i)
            mtype, reply = bob.register(["10.77.1.0/24"])
            if mtype is MsgType.ERROR:
                refused.append(reply["reason"])
            else:
                bob.send(MsgType.UNREGISTER, {"reason": "again"})
            bob.transport.close()
            await asyncio.sleep(0)
        assert len(kernel.applied) == 8 and len(refused) == 42
        assert "max_new_sessions_per_minute" in refused[0]
        assert Process(daemon, 1001).register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
        daemon.registry.rates[1002] = (0.0, daemon.loop.time() - 10.5)  # 10 s: one more
        assert Process(daemon, 1002).register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
        assert Process(daemon, 1002).register(["10.77.2.0/24"])[0] is MsgType.ERROR

    run(scenario())


def test_a_user_cycling_their_own_session_cannot_flood_root_s_log(kernel: Kernel,
                                                                  tmp_path: Path) -> None:
    """Picking up one's own held session and letting it go costs pvpn-client no rules, but
    each cycle wrote session:reattached and session:held, and each ATTACH session:attached:
    a loop of bob's rotated root's log history away (200 MB in minutes). Now at most one of
    each per session per LOCAL_LOG_EVERY, the next one saying how many were left out."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        bob = Process(daemon, 1002)
        bob.bring_up()
        bob.transport.close()
        await asyncio.sleep(0)
        for i in range(200):
            again = Process(daemon, 1002, pid=i)
            assert again.register(["10.77.1.0/24"])[0] is MsgType.REGISTERED
            for n in range(5):
                again.send(MsgType.ATTACH, {"session": bytes([n]) * 16})
            again.transport.close()
            await asyncio.sleep(0)
        log = daemon.log.stream.getvalue()  # type: ignore[attr-defined]
        assert len(log.splitlines()) < 12, log[-2000:]
        for key in list(daemon._session_logged):
            at, suppressed = daemon._session_logged[key]
            daemon._session_logged[key] = (at - dm.LOCAL_LOG_EVERY, suppressed)
        last = Process(daemon, 1002, pid=999)
        last.register(["10.77.1.0/24"])
        record = daemon.log.stream.getvalue().splitlines()[-1]  # type: ignore[attr-defined]
        assert '"session:reattached"' in record and '"suppressed":199' in record

    run(scenario())


@pytest.mark.skipif(os.geteuid() != 0, reason="directories of other owners: root makes them")
def test_the_socket_is_never_made_in_a_directory_another_user_may_change(tmp_path: Path) -> None:
    """pvpn-client makes its socket 0666 with chmod, which follows symlinks: in a directory a
    user can write (a socket set under /tmp/pvpn/, a directory bob made first), bob swaps the
    new socket for a link to /etc/shadow between bind and chmod and root makes that 0666. Such
    a directory, or one on the way to it, is refused (OpenSSH's StrictModes)."""
    from pvpn.errors import ConfigError

    os.chmod(tmp_path, 0o755)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match="writable"):
        dm.ensure_socket_dir(shared / "c.sock")
    with pytest.raises(ConfigError, match="writable"):
        dm.ensure_socket_dir(shared / "run" / "c.sock")  # made inside it: bob renames "run"
    bobs = tmp_path / "bobs"
    bobs.mkdir(mode=0o711)
    os.chown(bobs, 1002, 1002)
    with pytest.raises(ConfigError, match="owned by uid 1002"):
        dm.ensure_socket_dir(bobs / "c.sock")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: nobody renames what root made there
    assert dm.ensure_socket_dir(sticky / "c.sock") is None
    assert dm.ensure_socket_dir(tmp_path / "run" / "c.sock") is None
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o711


def test_a_session_whose_devices_fail_at_recovery_keeps_its_protection(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted pvpn-client that could not open a recovered session's TUN device (or bind
    its queue) ended the session: its rules went, and its user's protected traffic left in
    clear though nobody had said stop. The rules now stay (nobody reads the queue: the kernel
    drops), and the devices are tried again when the user's tunnel process registers."""
    from pvpn.errors import PvpnError

    rules = firewall.client_session("pvpnc", 0, 1001, [ipaddress.ip_network("10.1.0.0/16")],
                                    3000, 0x10000, 0xFF0000, "pvpnc0", session_id=SID)
    kernel.saved = [firewall.client_base("pvpnc").v4 + rules.v4,
                    firewall.client_base("pvpnc").v6 + rules.v6]
    failing = [True]

    def open_tun(name: str) -> int:
        if failing[0]:
            raise PvpnError(f"cannot set up TUN device {name}: busy")
        return fake_tun(others)

    others: list[int] = []
    monkeypatch.setattr(sessiondevices, "open_tun", open_tun)

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        daemon.recover()
        assert kernel.removed == [] and kernel.forgotten == []
        (session,) = daemon.registry.sessions.values()
        assert session.state.startswith("held")
        mtype, reply = Process(daemon, 1001, pid=1).register(["10.1.0.0/16"])
        assert mtype is MsgType.ERROR and "busy" in reply["reason"]
        assert kernel.removed == [] and session.state.startswith("held")
        failing[0] = False
        assert Process(daemon, 1001, pid=2).register(["10.1.0.0/16"])[0] is MsgType.REGISTERED
        assert session.state == "up" and 0 in daemon.queues and 0 in daemon.tun_fds

    run(scenario())


def test_a_restart_after_one_family_was_flushed_keeps_the_other_s_protection(
        kernel: Kernel, tmp_path: Path) -> None:
    """Someone flushed the IPv4 mangle table (a firewall reload, say), then pvpn-client was
    restarted: finding its chains in one family only, it removed every rule of the instance,
    the recovered sessions' IPv6 rules too, while holding those sessions as protected. Now
    the hook chains are put back where they are missing and nothing recovered is removed."""
    rules = firewall.client_session("pvpnc", 0, 1001, [ipaddress.ip_network("fd00:1::/64")],
                                    3000, 0x10000, 0xFF0000, "pvpnc0", session_id=SID)
    kernel.saved = ["", firewall.client_base("pvpnc").v6 + rules.v6]

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        daemon.recover()
        assert len(daemon.registry.sessions) == 1
        assert kernel.instance_removed == 0
        base = [r for r in kernel.applied if ":PVPNC-OUT" in r.v4 + r.v6]
        assert base == [firewall.RuleSet(firewall.client_base("pvpnc").v4, "")]

    run(scenario())


def test_a_reply_for_a_port_that_changed_hands_never_reaches_the_new_owner(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session remembers its flows by addresses and ports, and a local port changes hands:
    bob sent once from UDP port 40000 to 10.77.1.2:53 and closed the socket, alice's resolver
    took port 40000, and a "reply" bob's tunnel process handed back for his old flow was
    written to his TUN device and delivered to alice's socket (seen in a lab: a forged answer
    reached her, though she had no VPN at all). Now the kernel is asked whose socket would get
    it (sock_diag) and only the session user's, or no process's, does."""
    from scapy.layers.inet import IP, UDP

    owners: dict[Any, int | None] = {}
    asked: list[Any] = []

    class Owners:
        def owner(self, flow: Any) -> int | None:
            asked.append(flow)
            return owners.get(flow)

    monkeypatch.setattr(dm, "SocketOwners", Owners, raising=False)

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        bob = Process(daemon, 1002)
        bob.bring_up()
        session = daemon.registry.sessions[0]
        out = bytes(IP(src="10.77.0.1", dst="10.77.1.2") / UDP(sport=40000, dport=53) / b"q")
        assert daemon.queues[0].callback(out)
        reply = bytes(IP(src="10.77.1.2", dst="10.77.0.1") / UDP(sport=53, dport=40000)
                      / b"forged")

        hand_back = bob.hand_back

        hand_back(reply)  # nobody's socket there: the kernel answers it itself
        assert session.packets_in == 1
        (flow,) = asked
        owners[flow] = 1001  # alice's resolver now holds port 40000
        hand_back(reply)
        error = bytes(IP(src="10.77.1.2", dst="10.77.0.1") / ICMP_UNREACHABLE / out)
        hand_back(error)  # an error about the flow reaches the same socket
        assert session.packets_in == 1
        assert session.drops.as_dict() == {"reply-not-yours": 2}
        owners[flow] = 1002  # his own again
        hand_back(reply)
        assert session.packets_in == 2

    run(scenario())


def _icmp_unreachable() -> Any:
    from scapy.layers.inet import ICMP
    return ICMP(type=3, code=3)


ICMP_UNREACHABLE = _icmp_unreachable()


def test_a_session_id_another_session_holds_cannot_be_attached(kernel: Kernel,
                                                              tmp_path: Path) -> None:
    """bob's process could ATTACH alice's session id to his own slot, and his records then
    joined her `pvpn trace`. An id another session holds is refused (the link closes; alice's
    session and bob's registration are untouched)."""
    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice, bob = Process(daemon, 1001), Process(daemon, 1002)
        alice.bring_up()
        bob.bring_up()
        assert bob.transport.closed
        owners = {s.uid: s.session_id for s in daemon.registry.sessions.values()}
        assert owners == {1001: SID, 1002: b""}

    run(scenario())


def test_rules_someone_else_removed_are_put_back_by_the_next_check(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush of the mangle table (a firewall reload) took every session's rules while
    pvpn-client said "up". The watch puts back the hook chains and each session's rules of
    the family that lost them, and says so; a check taken while pvpn-client changed its own
    rules is not acted on."""
    ran: list[tuple[list[list[str]], tuple[int, ...]]] = []
    monkeypatch.setattr(dm.rules, "run_each", lambda cmds, versions=(4, 6): ran.append(
        (cmds, tuple(versions))) or [])

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = Process(daemon, 1001)
        alice.bring_up(("10.77.1.0/24", "fd77:0:0:1::/64"))
        flushed = ["*mangle\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"] * 2
        epoch = daemon.rules_epoch
        daemon.registry.sessions[0].recorded = SID
        applied = len(kernel.applied)
        daemon.check_rules(flushed, epoch - 1)  # taken before pvpn-client's own change
        assert len(kernel.applied) == applied
        daemon.check_rules(flushed, epoch)
        put_back = kernel.applied[applied:]
        assert [bool(r.v4) for r in put_back] == [True, False, True, False]
        assert ":PVPNC-OUT" in put_back[0].v4 and ":PVPNC-OUT" in put_back[1].v6
        assert "--uid-owner 1001" in put_back[2].v4 and "fd77:0:0:1::/64" in put_back[3].v6
        assert f"pvpn-session={SID.hex()}" in put_back[2].v4, "the record of its id too"
        # Each family's rules made whole in one transaction (its chains declared first),
        # nothing removed on its own before it: a pvpn-client killed in between left the next
        # one half a session to recover.
        assert ran == []
        assert ":PVPNC-S0 - [0:0]" in put_back[2].v4 and ":PVPNC-S0 - [0:0]" in put_back[3].v6
        log = daemon.log.stream.getvalue()  # type: ignore[attr-defined]
        assert "removed by someone else" in log and "slot 0 (IPv4)" in log

    run(scenario())


def test_a_new_server_session_makes_its_tcp_connections_answer_for_their_reset(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: the server lost alice's session (restarted without its state) and her tunnel
    process got a new one, which it says with a second ATTACH. Her download waits for data
    that will never come; pvpn-client makes each of her connected TCP sockets answer (a SYN
    from its remote end: a challenge ACK comes back, which the server resets), and no other
    socket: not a connecting one, not bob's, no UDP one, none when the session was resumed."""
    from scapy.layers.inet import IP, TCP

    sockets: dict[Any, tuple[int | None, int]] = {}

    class Owners:
        def owner(self, flow: Any) -> int | None:
            return sockets.get(flow, (None, 0))[0]

        def socket(self, flow: Any) -> tuple[int | None, int]:
            return sockets.get(flow, (None, 0))

    monkeypatch.setattr(dm, "SocketOwners", Owners, raising=False)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    monkeypatch.setattr(sessiondevices, "open_tun", lambda name: write_end)

    def probes() -> list[Any]:
        try:
            data = os.read(read_end, 65536)
        except BlockingIOError:
            return []
        return [IP(data[i:i + 40]) for i in range(0, len(data), 40)]

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice, flows = alice_with_flows(daemon)
        sockets[flows[1]] = (1001, 1)  # hers, ESTABLISHED
        sockets[flows[2]] = (1001, 8)  # hers, CLOSE_WAIT
        sockets[flows[3]] = (1001, 2)  # hers, SYN_SENT: a SYN would be a simultaneous open
        sockets[flows[4]] = (1002, 1)  # bob's now
        sockets[flows[6]] = (1001, 7)  # a UDP socket of hers
        assert probes() == [], "the first ATTACH of a registration probes nothing"
        alice.send(MsgType.ATTACH, {"session": SID})  # the server's session is a new one
        got = probes()
        assert sorted(p[TCP].dport for p in got) == [1, 2]
        assert all(p.src == "10.77.1.2" and p.dst == "10.77.0.1" and p[TCP].sport == 80
                   and p[TCP].flags == "S" for p in got)
        alice.send(MsgType.ATTACH, {"session": SID})  # again at once: not repeated
        assert probes() == []
        record = [line for line in daemon.log.stream.getvalue().splitlines()  # type: ignore[attr-defined]
                  if "session:connections-reset" in line]
        assert len(record) == 1 and '"count":2' in record[0]

    try:
        run(scenario())
    finally:
        for daemon in DAEMONS:  # the fixture closes what the daemons hold; these are ours
            for slot, fd in list(daemon.tun_fds.items()):
                if fd == write_end:
                    del daemon.tun_fds[slot]
        os.close(read_end)
        os.close(write_end)


class TableOwners:
    """sock_diag's answers from a table of flow -> Found; each abort is handed to
    ``on_abort``."""

    def __init__(self, sockets: dict[Any, Any], on_abort: Callable[[Any, bytes], object]
                 ) -> None:
        self.sockets, self.on_abort = sockets, on_abort

    def owner(self, flow: Any) -> int | None:
        return self.find(flow).uid

    def socket(self, flow: Any) -> tuple[int | None, int]:
        return self.find(flow)[:2]

    def find(self, flow: Any) -> Any:
        from pvpn.io.sockdiag import Found
        return self.sockets.get(flow, Found(None, 0, b""))

    def abort(self, flow: Any, cookie: bytes) -> None:
        self.on_abort(flow, cookie)


def test_an_ended_session_aborts_its_user_s_tcp_connections_before_its_rules_go(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: alice's key was revoked at the server, and her tunnel process ended her
    session. Her download through it would wait for data that never comes (no route but the
    tunnel); pvpn-client aborts each of her TCP connections the session carried (connected or
    connecting), by the cookie of exactly that socket, while the session's rules still hold
    (the kernel's reset goes into her queue, not out in clear), and no other socket: not her
    listener on the same port, not bob's, not a TIME_WAIT one, no UDP one."""
    from pvpn.io.sockdiag import Found

    sockets: dict[Any, Found] = {}
    aborted: list[tuple[Any, bytes, int]] = []
    monkeypatch.setattr(dm, "SocketOwners", lambda: TableOwners(
        sockets, lambda flow, cookie: aborted.append((flow, cookie, len(kernel.removed)))),
        raising=False)

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice, flows = alice_with_flows(daemon)
        sockets[flows[1]] = Found(1001, 1, b"cookie-1")  # hers, ESTABLISHED
        sockets[flows[2]] = Found(1001, 2, b"cookie-2")  # hers, SYN_SENT
        sockets[flows[3]] = Found(1001, 10, b"cookie-3")  # her listener now holds the port
        sockets[flows[4]] = Found(1002, 1, b"cookie-4")  # bob's now
        sockets[flows[5]] = Found(None, 6, b"cookie-5")  # TIME_WAIT: no process's
        sockets[flows[6]] = Found(1001, 7, b"cookie-6")  # a UDP socket of hers
        removed_before = len(kernel.removed)
        alice.send(MsgType.UNREGISTER, {"reason": "revoked: no key left"})
        assert sorted((flow.sport, cookie) for flow, cookie, _ in aborted) == [
            (1, b"cookie-1"), (2, b"cookie-2")]
        assert all(removed == removed_before for _, _, removed in aborted), \
            "aborted while the session's rules still hold"
        assert len(kernel.removed) > removed_before, "then its rules are removed"
        closed = [line for line in daemon.log.stream.getvalue().splitlines()  # type: ignore[attr-defined]
                  if "session:closed" in line]
        assert len(closed) == 1 and '"connections_aborted":2' in closed[0]

    run(scenario())


def test_an_ended_session_aborts_her_orphaned_sockets_too_and_not_bob_s(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket alice's program closed that still retransmits its FIN (an orphan: sock_diag
    says no process's, but the uid it was made with is hers) is aborted with the session
    while its rules hold. Before, only sockets with an owner were: the orphan's FIN went out
    in clear once the rules were gone (seen in the lab after a download was cut)."""
    from pvpn.io.sockdiag import Found

    sockets: dict[Any, Found] = {}
    aborted: list[bytes] = []
    monkeypatch.setattr(dm, "SocketOwners", lambda: TableOwners(
        sockets, lambda flow, cookie: aborted.append(cookie)), raising=False)

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice, flows = alice_with_flows(daemon)
        sockets[flows[1]] = Found(None, 4, b"orphan-1", 1001)  # hers, FIN_WAIT1
        sockets[flows[2]] = Found(None, 9, b"orphan-2", 1001)  # hers, LAST_ACK
        sockets[flows[3]] = Found(None, 4, b"orphan-3", 1002)  # bob's orphan on the ports
        sockets[flows[4]] = Found(None, 6, b"tw-4", 0)  # TIME_WAIT: no uid at all
        alice.send(MsgType.UNREGISTER, {"reason": "done"})
        assert sorted(aborted) == [b"orphan-1", b"orphan-2"]

    run(scenario())


def test_a_kernel_that_cannot_abort_still_ends_the_session_and_says_so(
        kernel: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without SOCK_DESTROY (or a sock_diag failure) must not keep the session's
    rules or slot: the session ends as before, and the record says what failed."""
    from scapy.layers.inet import IP, TCP

    from pvpn.errors import PvpnError
    from pvpn.io.sockdiag import Found

    class Owners:
        def owner(self, flow: Any) -> int | None:
            return 1001

        def find(self, flow: Any) -> Found:
            return Found(1001, 1, b"c" * 8)

        def abort(self, flow: Any, cookie: bytes) -> None:
            raise PvpnError("sock_diag refused: Operation not supported")

    monkeypatch.setattr(dm, "SocketOwners", Owners, raising=False)

    async def scenario() -> None:
        daemon = make_daemon(tmp_path)
        alice = alice_up(daemon)
        assert daemon.queues[0].callback(bytes(IP(src="10.77.0.1", dst="10.77.1.2")
                                               / TCP(sport=1, dport=80, flags="A")))
        alice.send(MsgType.UNREGISTER, {"reason": "done"})
        assert daemon.registry.sessions == {} and kernel.removed
        closed = [line for line in daemon.log.stream.getvalue().splitlines()  # type: ignore[attr-defined]
                  if "session:closed" in line]
        assert len(closed) == 1 and "failed after 0: sock_diag refused" in closed[0]

    run(scenario())
