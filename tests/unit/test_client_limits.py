"""The client host's bookkeeping under a hostile local user (issue 9, points 5, 8, 9): what one
uid may take, how long a session without its tunnel process is kept, which sessions
`pvpn disconnect` names, and what root's `pvpn status` prints. All sans-IO: the registry is
pure and the CLI talks to a stand-in for the daemon."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from pvpn.cli import main as cli
from pvpn.nodes import client as reg
from pvpn.envelope import MsgType
from pvpn.errors import ConfigError, PolicyError, PvpnError
from pvpn.packet import FlowKey

from net import client_config

NET4 = ipaddress.ip_network("10.77.1.0/24")
NET6 = ipaddress.ip_network("fd77:0:0:1::/64")


def net(i: int) -> Any:
    return ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24")


# ---------------------------------------------------------------- what one uid may take


def test_one_user_cannot_take_every_slot(tmp_path: Path) -> None:
    """bob (no account anywhere) registered 64 times and alice was refused; now bob stops at
    max_sessions_per_uid and the host's other users still get slots."""
    registry = reg.Registry(client_config(tmp_path))
    taken = 0
    with pytest.raises(PolicyError, match="max_sessions_per_uid"):
        for i in range(64):
            registry.allocate(1002, "bob", "nowhere:4433", [net(i)], 0.0)
            taken += 1
    assert taken == 8
    alice = registry.allocate(1001, "alice", "vpn:4433", [NET4], 0.0)
    assert alice.slot == 8


def test_prefixes_are_bounded_per_session_and_per_user(tmp_path: Path) -> None:
    registry = reg.Registry(client_config(tmp_path, max_prefixes_per_session=4,
                                          max_prefixes_per_uid=6))
    with pytest.raises(PolicyError, match="max_prefixes_per_session"):
        registry.allocate(1002, "bob", "s:1", [net(i) for i in range(5)], 0.0)
    registry.allocate(1002, "bob", "s:1", [net(i) for i in range(4)], 0.0)
    with pytest.raises(PolicyError, match="max_prefixes_per_uid"):
        registry.allocate(1002, "bob", "s:1", [net(i) for i in range(10, 13)], 0.0)
    # The same prefix twice is one prefix, not two rules.
    twice = registry.allocate(1001, "alice", "s:1", [NET4, NET4, NET6], 0.0)
    assert twice.networks == [NET4, NET6]
    assert registry.find_held(1001, [NET6, NET4, NET4]) is twice, "held: the same prefixes"


def test_a_session_never_up_expires_after_grace_time(tmp_path: Path) -> None:
    """A registration that never got ATTACH (bob's process towards a server that does not
    exist, then killed) was held for ever, and re-adopted after a restart."""
    registry = reg.Registry(client_config(tmp_path))
    session = registry.allocate(1002, "bob", "nowhere:4433", [NET4], 100.0)
    session.attached = False  # its process is gone
    assert registry.expired(100.0 + 120) == []
    ((gone, reason),) = registry.expired(100.0 + 121)
    assert gone is session and "grace_time" in reason
    # Recovered after a restart without the record of an id: the same grace from then on.
    found = registry.adopt(5, 1002, "bob", [NET6], 3005, 0x60000, "pvpnc5", 500.0)
    assert found not in [s for s, _ in registry.expired(600.0)]
    assert found in [s for s, _ in registry.expired(621.0)]


def test_a_session_that_was_up_is_held_for_held_timeout(tmp_path: Path) -> None:
    registry = reg.Registry(client_config(tmp_path, held_timeout=3600))
    session = registry.allocate(1001, "alice", "vpn:4433", [NET4], 0.0)
    session.attached, session.session_id, session.ever_up = True, b"\x01" * 16, True
    assert registry.expired(10_000.0) == [], "attached: never expires"
    session.attached, session.held_since = False, 10_000.0
    assert registry.expired(13_600.0) == []
    ((gone, reason),) = registry.expired(13_601.0)
    assert gone is session and "held_timeout" in reason
    # held_timeout = 0: held until `pvpn disconnect`.
    forever = reg.Registry(client_config(tmp_path, held_timeout=0))
    kept = forever.adopt(0, 1001, "alice", [NET4], 3000, 0x10000, "pvpnc0", 0.0,
                         session_id=b"\x02" * 16, ever_up=True)
    assert kept.state.startswith("held") and forever.expired(1e9) == []


def test_flow_memory_is_bounded_and_forgets_the_flow_idle_longest(tmp_path: Path) -> None:
    registry = reg.Registry(client_config(tmp_path, max_flows_per_session=64))
    session = registry.allocate(1001, "alice", "vpn:4433", [NET4], 0.0)

    def key(port: int) -> FlowKey:
        return FlowKey(6, b"\x0a\x4d\x00\x01", port, b"\x0a\x4d\x01\x02", 80)

    for port in range(100):
        session.note_flow(key(port), float(port))
    session.note_flow(key(40), 200.0)  # used again: now the most recent
    session.note_flow(key(1000), 201.0)
    assert len(session.flows) == 64 and session.flows_evicted == 37
    assert key(40) in session.flows and key(36) not in session.flows
    assert key(37) in session.flows
    session.prune_flows(reg.FLOW_IDLE + 150.5)
    assert key(40) in session.flows and key(99) not in session.flows


def test_drops_are_counted_by_a_fixed_code_and_their_logs_are_bounded(tmp_path: Path) -> None:
    registry = reg.Registry(client_config(tmp_path))
    session = registry.allocate(1001, "alice", "vpn:4433", [NET4], 0.0)
    from pvpn.drops import Drop

    logged = [session.drop(Drop.REPLY_NO_FLOW, 0.0) for _ in range(10_000)]
    assert session.describe(0.0)["drops"] == {"reply-no-flow": 10_000}
    assert 1 <= sum(1 for n in logged if n) <= 11


# ---------------------------------------------------------------- a freed slot


def test_a_slot_whose_mark_is_still_carried_is_not_given_out(tmp_path: Path) -> None:
    registry = reg.Registry(client_config(tmp_path))
    alice = registry.allocate(1001, "alice", "vpn:4433", [NET4], 0.0)
    registry.release(alice.slot)
    carried = {alice.slot}
    bob = registry.allocate(1002, "bob", "vpn:4433", [NET4], 1.0,
                            usable=lambda slot: slot not in carried)
    assert bob.slot != alice.slot and bob.mark != alice.mark
    carried |= set(range(64))
    with pytest.raises(PolicyError, match="quarantined"):
        registry.allocate(1003, "carol", "vpn:4433", [NET4], 2.0,
                          usable=lambda slot: slot not in carried)


@pytest.mark.parametrize("mask", ["0x00ff00ff", "0x0f0f0000", "0x80000001", "0x5"])
def test_a_mark_mask_with_a_gap_is_refused(tmp_path: Path, mask: str) -> None:
    """0x00ff00ff gave slot 254 the mark 0 (an unmarked connection) and others marks outside
    the low byte's run."""
    with pytest.raises(ConfigError, match="one run of set bits"):
        client_config(tmp_path, mark_mask=mask, max_sessions=2)


@pytest.mark.parametrize("mask", ["0x00ff0000", "0xff", "0xffff0000", "0x0003f000"])
def test_every_slot_of_a_contiguous_mask_has_its_own_non_zero_mark(
        tmp_path: Path, mask: str) -> None:
    config = client_config(tmp_path, mark_mask=mask, max_sessions=16)
    registry = reg.Registry(config)
    marks = [registry.mark_for(slot) for slot in range(config.max_sessions)]
    assert 0 not in marks and len(set(marks)) == len(marks)
    assert all(m & ~config.mark_mask == 0 for m in marks)


@pytest.mark.parametrize("settings, words", [
    ({"max_sessions_per_uid": 0}, "max_sessions_per_uid"),
    ({"max_sessions_per_uid": 65}, "max_sessions_per_uid"),
    ({"max_flows_per_session": 10}, "max_flows_per_session"),
    ({"grace_time": 1}, "grace_time"),
    ({"held_timeout": 30}, "held_timeout"),
    ({"max_local_connections": 4, "max_local_connections_per_uid": 8},
     "max_local_connections"),
])
def test_limits_out_of_range_are_refused(tmp_path: Path, settings: dict[str, Any],
                                         words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        client_config(tmp_path, **settings)


def test_the_defaults(tmp_path: Path) -> None:
    config = client_config(tmp_path)
    assert (config.max_sessions_per_uid, config.max_prefixes_per_session,
            config.max_prefixes_per_uid, config.max_flows_per_session,
            config.max_local_connections_per_uid, config.max_local_connections,
            config.grace_time, config.held_timeout, config.max_new_sessions_per_minute) == (
                8, 64, 256, 8192, 16, 512, 120.0, 86400.0, 120)


# ---------------------------------------------------------------- pvpn disconnect


@pytest.fixture
def two_users(tmp_path: Path) -> reg.Registry:
    registry = reg.Registry(client_config(tmp_path))
    for uid, user, sid, n in ((1001, "alice", "3f2a9c00" + "1" * 24, 1),
                              (1001, "alice", "3f2a9c00" + "2" * 24, 2),
                              (1002, "bob", "77" * 16, 3)):
        session = registry.allocate(uid, user, "vpn:4433", [net(n)], 0.0)
        session.session_id, session.attached, session.ever_up = bytes.fromhex(sid), True, True
    return registry


def test_a_short_prefix_never_means_all(two_users: reg.Registry) -> None:
    """`pvpn disconnect 3` as root sent an empty id and ended everyone's sessions."""
    for text in ("3", "3f2a9c0", "", "x" * 8):
        with pytest.raises(PolicyError):
            two_users.select_for_disconnect(0, text)
    assert len(two_users.sessions) == 3


def test_an_ambiguous_prefix_is_refused_with_the_candidates(two_users: reg.Registry) -> None:
    with pytest.raises(PolicyError) as refused:
        two_users.select_for_disconnect(0, "3f2a9c00")
    assert "3f2a9c00" + "1" * 24 in str(refused.value)
    assert "3f2a9c00" + "2" * 24 in str(refused.value) and "give more digits" in str(refused.value)
    (one,) = two_users.select_for_disconnect(0, "3F2A9C002")
    assert one.session_id.hex().startswith("3f2a9c002")


def test_users_name_only_their_own_and_all_is_explicit(two_users: reg.Registry) -> None:
    with pytest.raises(PolicyError, match="no session"):
        two_users.select_for_disconnect(1002, "3f2a9c001")  # alice's, asked by bob
    (bobs,) = two_users.select_for_disconnect(1002)  # his only one
    assert bobs.user == "bob"
    with pytest.raises(PolicyError, match="--all"):
        two_users.select_for_disconnect(1001)  # two of hers: name one
    assert len(two_users.select_for_disconnect(1001, everything=True)) == 2
    assert len(two_users.select_for_disconnect(0, everything=True)) == 3
    with pytest.raises(PolicyError, match="no session of yours"):
        two_users.select_for_disconnect(0)  # root's own: none, never everyone's
    (by_slot,) = two_users.select_for_disconnect(1002, slot=bobs.slot)
    assert by_slot is bobs


def test_the_cli_refuses_a_short_id_before_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Any] = []
    monkeypatch.setattr(cli, "ask_daemon", lambda *a, **k: asked.append(a) or (
        MsgType.STATUS_REPLY, {"sessions": []}))
    assert cli.main(["disconnect", "3"]) == 2
    assert asked == []
    assert cli.main(["disconnect", "--all", "3f2a9c00"]) == 2 and asked == []
    cli.main(["disconnect", "--all"])
    ((_, mtype, fields),) = asked
    assert mtype is MsgType.DISCONNECT and fields == {"session": "", "slot": None, "all": True}


def test_disconnect_all_names_every_session_it_ends(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ended = [{"session": "ab" * 16, "user": "alice", "uid": 1001, "slot": 0,
              "prefixes": ["10.77.1.0/24"]},
             {"session": "", "user": "bob", "uid": 1002, "slot": 1, "prefixes": ["10.9.0.0/16"]}]
    monkeypatch.setattr(cli, "ask_daemon", lambda *a, **k: (MsgType.STATUS_REPLY,
                                                            {"sessions": ended}))
    assert cli.main(["disconnect", "--all"]) == 0
    out = capsys.readouterr().out
    assert f"{'ab' * 16} of alice (uid 1001, slot 0): 10.77.1.0/24" in out
    assert "(connecting) of bob (uid 1002, slot 1): 10.9.0.0/16" in out


# ---------------------------------------------------------------- root's view


def test_pvpn_status_escapes_what_users_chose(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    evil = {"session": "", "user": "bob", "uid": 1002, "slot": 0, "state": "connecting",
            "server": "x\x1b[2J\x1b]0;owned\x07:4433", "prefixes": ["10.0.0.0/8"], "age": 1.0,
            "packets_out": 0, "bytes_out": 0, "packets_in": 0, "bytes_in": 0,
            "drops": {"reply-no-flow\x1b[31m": 1}}
    monkeypatch.setattr(cli, "ask_daemon", lambda *a, **k: (MsgType.STATUS_REPLY,
                                                            {"sessions": [evil]}))
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "x\\x1b[2J\\x1b]0;owned\\x07:4433" in out


def test_the_shipped_supervisord_files_keep_logs_root_s() -> None:
    """Under supervisord's default umask (022) the nodes' logs were readable by every user."""
    import configparser

    conf = Path(__file__).resolve().parents[2] / "supervisord.d"
    main = configparser.ConfigParser(interpolation=None)
    main.read(conf / "supervisord.conf")
    assert main["supervisord"]["umask"] == "077"
    # The run directory is traversable (pvpn-client's socket); every log is in the 0700 one.
    assert main["supervisord"]["logfile"] == "/var/log/pvpn/supervisord.log"
    assert main["supervisord"]["childlogdir"] == "/var/log/pvpn"
    for program in ("pvpn-client", "pvpn-server", "pvpn-gateway"):
        section = configparser.ConfigParser(interpolation=None)
        section.read(conf / f"{program}.conf")
        assert section[f"program:{program}"]["umask"] == "077"


def test_ctnetlink_requests_and_replies() -> None:
    """The mark questions pvpn-client asks the kernel, and how it reads the answers."""
    import struct

    from pvpn.io import conntrack as ct

    request = ct.mark_request(ct.IPCTNL_MSG_CT_GET, ct.NLM_F_DUMP, 7, 0x30000, 0xFF0000)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", request)
    assert length == len(request) == 16 + 4 + 8 + 8
    assert kind == 1 << 8 | 1 and flags == 0x301 and seq == 7 and pid == 0
    assert request[16:20] == b"\0\0\0\0"  # AF_UNSPEC: both families
    assert request[20:28] == struct.pack("=HH", 8, 8) + b"\x00\x03\x00\x00"
    assert request[28:36] == struct.pack("=HH", 8, 21) + b"\x00\xff\x00\x00"

    def message(kind: int, seq: int, payload: bytes = b"") -> bytes:
        body = payload + b"\0" * (-len(payload) % 4)
        return struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, 0) + body

    entry = message(1 << 8 | 0, 7, b"x" * 21)
    replies = ct.Replies()
    ct.read_replies(entry * 3 + message(1 << 8, 99), 7, replies)  # another request's: not ours
    assert (replies.entries, replies.done, replies.error) == (3, False, 0)
    ct.read_replies(message(ct.NLMSG_DONE, 7, b"\0" * 4), 7, replies)
    assert replies.done and replies.entries == 3
    refused = ct.Replies()
    ct.read_replies(message(ct.NLMSG_ERROR, 7, struct.pack("=i", -1) + b"\0" * 16), 7, refused)
    assert refused.done and refused.error == 1
    broken = ct.Replies()
    ct.read_replies(struct.pack("=IHHII", 9999, 0, 0, 7, 0), 7, broken)
    assert broken.done and broken.error


def test_sock_diag_questions_and_answers() -> None:
    """Whose socket a reply would reach: the question pvpn-client asks the kernel (UDP by the
    arriving packet's source and destination, TCP by the socket's own), how it reads the
    answer, and the real kernel's answer about sockets of our own."""
    import errno
    import os
    import socket
    import struct

    from pvpn.io import sockdiag as sd

    local, remote = socket.inet_aton("10.77.0.1"), socket.inet_aton("10.77.1.2")
    udp = sd.lookup_request(FlowKey(17, local, 40000, remote, 53), 5)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", udp)
    assert (length, kind, flags, seq) == (len(udp), 20, 1, 5) == (72, 20, 1, 5)
    assert udp[16:20] == bytes([socket.AF_INET, 17, 0, 0])
    assert udp[24:28] == struct.pack(">HH", 53, 40000) and udp[28:32] == remote
    assert udp[44:48] == local
    tcp = sd.lookup_request(FlowKey(6, local, 40000, remote, 80), 6)
    assert tcp[24:28] == struct.pack(">HH", 40000, 80) and tcp[28:32] == local

    def answer(seq: int, uid: int, inode: int) -> bytes:
        body = b"\0" * 64 + struct.pack("=II", uid, inode)
        return struct.pack("=IHHII", 16 + len(body), 20, 2, seq, 0) + body

    def error(seq: int, code: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -code) + b"\0" * 16

    assert sd.read_owner(answer(5, 1001, 77), 5) == (True, 1001)
    assert sd.read_owner(answer(5, 0, 0), 5) == (True, None), "TIME_WAIT: no process's"
    assert sd.read_owner(error(5, errno.ENOENT), 5) == (True, None)
    assert sd.read_owner(answer(4, 1001, 77), 5) == (False, None), "a late answer"
    with pytest.raises(PvpnError):
        sd.read_owner(error(5, errno.EPERM), 5)
    with pytest.raises(PvpnError):
        sd.read_owner(b"\xff" * 20, 5)
    sd.check()  # this kernel's sock_diag finds our own sockets
    owners = sd.SocketOwners()
    mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        mine.bind(("127.0.0.1", 0))
        flow = FlowKey(17, socket.inet_aton("127.0.0.1"), mine.getsockname()[1], remote, 53)
        assert owners.owner(flow) == os.geteuid()
        assert owners.owner(flow._replace(sport=1)) is None
    finally:
        mine.close()
        owners.close()


def loopback_connection() -> tuple[Any, Any, Any, FlowKey]:
    """A listener, a TCP connection to it over loopback (both ends), and the connecting end's
    flow as it sends."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    loopback = socket.inet_aton("127.0.0.1")
    return listener, client, served, FlowKey(6, loopback, client.getsockname()[1], loopback,
                                             port)


def test_sock_diag_aborts_exactly_the_socket_it_found() -> None:
    """The abort pvpn-client sends for an ended session's connection: SOCK_DESTROY with an
    acknowledgement, naming the socket by its cookie; on this kernel (as root) the connection's
    next call fails with ECONNABORTED, and the listener on the same port lives on."""
    import errno
    import os
    import socket
    import struct

    from pvpn.io import sockdiag as sd

    local, remote = socket.inet_aton("10.77.0.1"), socket.inet_aton("10.77.1.2")
    flow = FlowKey(6, local, 40000, remote, 80)
    request = sd.destroy_request(flow, 9, b"ABCDEFGH")
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (72, 21, 5, 9)
    assert request[24:28] == struct.pack(">HH", 40000, 80) and request[64:72] == b"ABCDEFGH"
    with pytest.raises(ValueError):
        sd.destroy_request(flow._replace(proto=17), 9, b"ABCDEFGH")
    with pytest.raises(ValueError):
        sd.destroy_request(flow, 9, b"")
    ack = struct.pack("=IHHII", 36, 2, 0, 9, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert sd.read_socket(ack, 9) == (True, sd.Found(None, 0, b""))
    if os.geteuid() != 0:
        pytest.skip("aborting a socket needs CAP_NET_ADMIN")
    listener, client, served, mine = loopback_connection()
    port = mine.dport
    owners = sd.SocketOwners()
    try:
        found = owners.find(mine)
        assert found.uid == os.geteuid() and found.state == 1 and len(found.cookie) == 8
        # The server's end by the listener's port: the connection, not the listener.
        theirs = owners.find(FlowKey(6, socket.inet_aton("127.0.0.1"), port,
                                     socket.inet_aton("127.0.0.1"), client.getsockname()[1]))
        assert theirs.state == 1 and theirs.cookie != found.cookie
        owners.abort(mine, b"\0" * 8)  # a cookie that names another socket: none aborted
        assert owners.find(mine) == found
        owners.abort(mine, found.cookie)
        with pytest.raises(OSError) as failed:
            client.recv(1)
        assert failed.value.errno == errno.ECONNABORTED
        assert owners.find(mine).uid is None
        again = socket.create_connection(("127.0.0.1", port))  # the listener lives on
        again.close()
    finally:
        owners.close()
        for s in (client, served, listener):
            s.close()


def test_sock_diag_tells_a_connections_segment_size_as_the_socket_itself_does() -> None:
    """What pvpn-client puts in an upload super-packet's header as its segment size: the
    socket's tcpi_snd_mss, asked of the kernel by the flow, as getsockopt(TCP_INFO) says it."""
    import socket
    import struct

    from pvpn.io import sockdiag as sd

    listener, client, served, mine = loopback_connection()
    owners = sd.SocketOwners()
    try:
        info = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        expected = (struct.unpack_from("=I", info, 16)[0], bool(info[5] & 1))
        assert owners.send_mss(mine) == expected and expected[0] > 1000
        assert owners.send_mss(mine._replace(dport=1)) is None  # no such socket
        with pytest.raises(ValueError):
            sd.mss_request(mine._replace(proto=17), 1)
    finally:
        owners.close()
        for sock in (client, served, listener):
            sock.close()
