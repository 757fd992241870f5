"""pvpn.io.pcap: the pcap files of inner packets, read back with scapy; and the server node's
CapturePacket commands (only with ``capture`` on, before NAT and after un-NAT)."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from pvpn.addresses import Destinations
from pvpn.commands import CapturePacket, InjectPacket, LogRecord, SessionClosed
from pvpn.config import ServerConfig, UserPolicy, parse_prefix
from pvpn.errors import ConfigError
from pvpn.io.pcap import (
    GLOBAL_HEADER_SIZE, LINKTYPE_RAW, RECORD_HEADER_SIZE, PcapWriter, SessionCaptures,
    encode_global_header,
)
from pvpn.nodes.base import NodeLink, NodeLinkState, Session
from pvpn.nodes.server import ServerNode
from pvpn.records import Record

V4 = bytes(IP(src="10.77.0.1", dst="10.77.1.2") / TCP(sport=40000, dport=80, flags="S"))
V6 = bytes(IPv6(src="fd77::1", dst="fd77:0:0:1::2") / UDP(sport=5353, dport=7) / b"hello")
PING = bytes(IP(src="10.77.0.1", dst="10.77.1.2") / ICMP() / (b"x" * 1000))


def read(path: Path) -> list[Any]:
    return list(rdpcap(str(path)))


def test_packets_read_back_with_scapy_ipv4_and_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "s.pcap"
    with PcapWriter(path) as writer:
        writer.write(V4, 1_700_000_000.25)
        writer.write_packets([V6, PING], 1_700_000_001.999999)
    packets = read(path)
    assert [bytes(p) for p in packets] == [V4, V6, PING]
    assert packets[0].haslayer(TCP) and packets[0][IP].dst == "10.77.1.2"
    assert packets[1].haslayer(IPv6) and bytes(packets[1][UDP].payload) == b"hello"
    assert [float(p.time) for p in packets] == pytest.approx(
        [1_700_000_000.25, 1_700_000_001.999999, 1_700_000_001.999999])
    header = path.read_bytes()[:GLOBAL_HEADER_SIZE]
    assert header == encode_global_header()
    assert int.from_bytes(header[20:24], "little") == LINKTYPE_RAW


def test_file_is_0600_whatever_the_umask_and_an_old_file(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        fresh = tmp_path / "fresh.pcap"
        PcapWriter(fresh).close()
        existing = tmp_path / "existing.pcap"
        existing.write_bytes(b"old contents")
        existing.chmod(0o644)
        PcapWriter(existing).close()
    finally:
        os.umask(old)
    for path in (fresh, existing):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_uid == os.getuid()
        assert path.read_bytes() == encode_global_header()  # the old contents are gone
        assert read(path) == []


def test_no_writing_through_a_symlink_nor_into_a_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me")
    link = tmp_path / "link.pcap"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="cannot create the pcap file"):
        PcapWriter(link)
    assert target.read_text() == "keep me"
    with pytest.raises(ConfigError, match="no-such-dir"):
        PcapWriter(tmp_path / "no-such-dir" / "s.pcap")
    with pytest.raises(ConfigError, match="too small"):
        PcapWriter(tmp_path / "tiny.pcap", max_bytes=10)


def test_max_bytes_is_honoured_and_said_once(tmp_path: Path) -> None:
    path = tmp_path / "bounded.pcap"
    said: list[str] = []
    record = RECORD_HEADER_SIZE + len(PING)
    limit = GLOBAL_HEADER_SIZE + 3 * record + record // 2  # room for three and a half
    writer = PcapWriter(path, max_bytes=limit, on_stop=said.append)
    for i in range(10):
        writer.write(PING, 1000.0 + i)
    writer.write_packets([V4, V6], 1011.0)  # stopped for good, even for small packets
    writer.close()
    assert path.stat().st_size <= limit
    assert [bytes(p) for p in read(path)] == [PING] * 3
    assert writer.packets == 3 and writer.stopped is not None
    assert len(said) == 1 and str(path) in said[0] and str(limit) in said[0]


def test_a_crash_leaves_a_readable_file(tmp_path: Path) -> None:
    """Whole records reach the file at every batch: without close(), it reads back."""
    path = tmp_path / "crash.pcap"
    writer = PcapWriter(path)
    writer.write_packets([V4, V6], 5.0)
    writer.write(PING, 5.1)  # buffered: not in the file until the next flush
    assert [bytes(p) for p in read(path)] == [V4, V6]
    writer.write(V4, 6.2)  # a second after the last flush: flushed with it
    assert [bytes(p) for p in read(path)] == [V4, V6, PING, V4]
    writer.close()
    writer.close()  # twice is harmless
    writer.write(V4, 7.0)  # after close: ignored
    assert len(read(path)) == 4


def test_session_captures_one_file_per_session_closed_with_the_session(tmp_path: Path) -> None:
    logged: list[Record] = []
    captures = SessionCaptures(tmp_path / "pcap", 1_000_000, logged.append)
    assert stat.S_IMODE((tmp_path / "pcap").stat().st_mode) == 0o700
    alice, bob = b"\xa1" * 16, b"\xb2" * 16
    captures.write(alice, V4, 1.0)
    captures.write(bob, V6, 1.0)
    captures.write(alice, PING, 1.1)
    captures.flush()
    assert [bytes(p) for p in read(captures.path_for(alice))] == [V4, PING]
    captures.close(alice)
    assert list(captures.writers) == [bob]
    captures.close_all()
    assert [bytes(p) for p in read(captures.path_for(bob))] == [V6]
    events = [(r.event, r.session) for r in logged]
    assert events == [("capture:opened", alice.hex()), ("capture:opened", bob.hex()),
                      ("capture:closed", alice.hex()), ("capture:closed", bob.hex())]
    assert logged[2].extra["packets"] == 2
    # The same id again (a server restarted under a resumed chain): a file of its own.
    captures.write(alice, V6, 2.0)
    captures.close_all()
    assert captures.writers == {}
    assert [bytes(p) for p in read(captures.path_for(alice))] == [V4, PING]
    assert captures.path_for(alice, 2).name == f"{alice.hex()}-2.pcap"
    assert [bytes(p) for p in read(captures.path_for(alice, 2))] == [V6]


def test_session_captures_bound_their_open_files(tmp_path: Path) -> None:
    logged: list[Record] = []
    captures = SessionCaptures(tmp_path, 1_000_000, logged.append)
    captures.MAX_OPEN = 2
    for i in range(4):
        captures.write(bytes([i]) * 16, V4, 1.0)
        captures.write(bytes([i]) * 16, V4, 1.1)
    assert len(captures.writers) == 2
    assert [r.event for r in logged].count("capture:skipped") == 2  # once per session
    captures.close_all()
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(ConfigError, match="pcap_dir"):
        SessionCaptures(tmp_path / "a-file" / "pcap", 1000, logged.append)


# ---------------------------------------------------------------- the server node's commands


class _NoTls:
    def data_to_send(self) -> bytes:
        return b""

    def send(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def server_with_session(capture: bool) -> tuple[ServerNode, Session]:
    allow = [parse_prefix("10.77.1.0/24")]
    config = ServerConfig(path=Path("server.toml"), name="server", listen=[],
                          certificate=Path("c"), private_key=Path("k"),
                          authorized_keys=Path("u"), queue=0, nat_ports=(61000, 61099),
                          instance="t", users={"alice": UserPolicy(list(allow))})
    nat = ipaddress.ip_address("10.77.1.1").packed
    node = ServerNode(config, keys=None, verify=lambda *a: None,  # type: ignore[arg-type]
                      source_for=lambda dst: nat)
    node.capture = capture
    link = NodeLink(7, _NoTls(), "10.77.0.1:5000", 0.0,  # type: ignore[arg-type]
                    state=NodeLinkState.ESTABLISHED)
    node.links[7] = link
    session = Session(id=b"\x42" * 16, token=b"t" * 16, user="alice", uid=1001, client="c",
                      peer=link.peer, allow=Destinations(allow, allow), opened=0.0, link=7)
    node.sessions[session.id] = session
    link.session = session
    return node, session


@pytest.mark.parametrize("capture", [False, True])
def test_server_captures_before_nat_and_after_un_nat_only_when_asked(capture: bool) -> None:
    node, session = server_with_session(capture)
    denied = bytes(IP(src="10.77.0.1", dst="192.0.2.9") / TCP(sport=40001, dport=80))
    node._packet_from_user(session, V4, 1.0)
    node._packet_from_user(session, denied, 1.0)
    (injected,) = [c.packet for c in node.commands if isinstance(c, InjectPacket)]
    assert IP(injected).src == "10.77.1.1"  # NATed on the way out
    reply = IP(src="10.77.1.2", dst="10.77.1.1") / TCP(sport=80, dport=IP(injected)[TCP].sport,
                                                        flags="SA")
    assert node.receive_reply(bytes(reply), 1.5)
    captured = [c for c in node.commands if isinstance(c, CapturePacket)]
    if not capture:
        assert captured == []
        return
    assert [c.session for c in captured] == [session.id] * 3
    assert captured[0].packet == V4  # as the user sent it
    assert captured[1].packet == denied  # what the user sent, even if it went no further
    back = IP(captured[2].packet)
    assert (back.dst, back[TCP].dport) == ("10.77.0.1", 40000)  # as the user gets it


@pytest.mark.parametrize("capture", [False, True])
def test_the_server_node_says_when_a_captured_session_closes(capture: bool) -> None:
    """The node's SessionClosed, after its session:closed record, closes the capture (no
    dispatcher reads the record to know)."""
    node, session = server_with_session(capture)
    node.close_all("server shutting down")
    said = [("closed" if isinstance(c, SessionClosed) else c.record.event, c)
            for c in node.commands if isinstance(c, (SessionClosed, LogRecord))]
    events = [event for event, _ in said]
    assert "session:closed" in events
    if not capture:
        assert "closed" not in events
        return
    assert events.index("closed") == events.index("session:closed") + 1
    assert [c for _, c in said if isinstance(c, SessionClosed)] == [SessionClosed(session.id)]


def test_the_servers_dispatcher_closes_the_capture_on_session_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import io
    import json

    from pvpn import pki
    from pvpn.server import daemon

    class Raw:
        def close(self) -> None:
            pass

    monkeypatch.setattr(daemon, "RawSender", Raw)
    pki.create_ca(tmp_path / "ca")
    crt, key = pki.issue_certificate(tmp_path / "ca", "server", tmp_path / "node",
                                     ips=["10.0.0.1"])
    (tmp_path / "users").mkdir()
    config = ServerConfig(Path("s.toml"), "server", [], crt, key, tmp_path / "users", 0,
                          (61000, 61999), "t", pcap_dir=tmp_path / "pcap")
    alice, bob = b"\xa1" * 16, b"\xb2" * 16

    async def scenario() -> list[dict[str, Any]]:
        server = daemon.Server(config)
        stream = io.StringIO()
        server.log.stream = stream
        server.node.commands += [CapturePacket(alice, V4), CapturePacket(bob, V6),
                                 SessionClosed(alice)]
        server.dispatch()
        assert server.captures is not None and list(server.captures.writers) == [bob]
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    logged = asyncio.run(scenario())
    assert [(r["event"], r["session"]) for r in logged] == [
        ("capture:opened", alice.hex()), ("capture:opened", bob.hex()),
        ("capture:closed", alice.hex())]
    assert [bytes(p) for p in read(tmp_path / "pcap" / f"{alice.hex()}.pcap")] == [V4]


def _server_config_base(tmp_path: Path) -> str:
    """The [server] section of a minimal server.toml, its files made in tmp_path."""
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "users").mkdir()
    return (f'[server]\nname = "server"\nlisten = ["127.0.0.1:4433"]\n'
            f'certificate = "{tmp_path}/server.crt"\nprivate_key = "{tmp_path}/server.key"\n'
            f'authorized_keys = "{tmp_path}/users"\n')


def test_server_config_pcap_settings(tmp_path: Path) -> None:
    from pvpn.config import load_server_config

    base = _server_config_base(tmp_path)
    path = tmp_path / "server.toml"
    path.write_text(base)
    config = load_server_config(path)
    assert config.pcap_dir is None and config.pcap_max_bytes == 100_000_000
    path.write_text(base + 'pcap_dir = "/var/lib/pvpn/pcap"\npcap_max_bytes = 5000\n')
    config = load_server_config(path)
    assert config.pcap_dir == Path("/var/lib/pvpn/pcap") and config.pcap_max_bytes == 5000
    path.write_text(base + 'pcap_dir = "pcap"\n')
    with pytest.raises(ConfigError, match=r"\[server\] pcap_dir must be an absolute"):
        load_server_config(path)
    path.write_text(base + 'pcap_dir = "/p"\npcap_max_bytes = 10\n')
    with pytest.raises(ConfigError, match=r"\[server\] pcap_max_bytes must be at least"):
        load_server_config(path)


def test_server_config_nat_share(tmp_path: Path) -> None:
    from pvpn.config import load_server_config

    base = _server_config_base(tmp_path)
    path = tmp_path / "server.toml"
    path.write_text(base)
    assert load_server_config(path).nat_share == 0.5
    path.write_text(base + "nat_share = 1\n")
    assert load_server_config(path).nat_share == 1.0
    for bad in ("0", "1.5", '"half"'):
        path.write_text(base + f"nat_share = {bad}\n")
        with pytest.raises(ConfigError, match=r"\[server\] nat_share"):
            load_server_config(path)


def test_a_user_reconnecting_endlessly_fills_neither_the_disk_nor_the_directory(
        tmp_path: Path) -> None:
    """Each new session opens a capture: the directory keeps at most pcap_max_files files and
    pcap_max_total_bytes bytes, deleting the captures closed longest ago (issue 9, point 5)."""
    logged: list[Record] = []
    old = tmp_path / ("ab" * 16 + ".pcap")  # a capture an earlier run left
    old.write_bytes(encode_global_header() + b"\x00" * 3000)
    (tmp_path / "notes.txt").write_text("not a capture: never touched")
    captures = SessionCaptures(tmp_path, 1_000_000, logged.append, max_total_bytes=20_000,
                               max_files=5)
    assert captures.total == old.stat().st_size
    for n in range(200):
        session = n.to_bytes(16, "big")
        for _ in range(10):
            captures.write(session, PING, float(n))  # 10 x ~1 KB per session
        captures.flush()
        captures.close(session)
        files = [p for p in tmp_path.iterdir() if p.suffix == ".pcap"]
        assert len(files) <= 5
        assert sum(p.stat().st_size for p in files) <= 20_000
    assert not old.exists() and (tmp_path / "notes.txt").exists()
    newest = read(captures.path_for((199).to_bytes(16, "big")))
    assert len(newest) == 10
    deleted = [r for r in logged if r.event == "capture:deleted"]
    assert deleted and all("pcap_max" in r.reason for r in deleted)
    captures.close_all()


def test_open_captures_stop_when_they_fill_the_directory(tmp_path: Path) -> None:
    logged: list[Record] = []
    captures = SessionCaptures(tmp_path, 1_000_000, logged.append, max_total_bytes=5_000)
    for n in range(3):  # three sessions up at once, each writing on
        for _ in range(4):
            captures.write(bytes([n]) * 16, PING, 1.0)
    captures.flush()
    sizes = [w.path.stat().st_size for w in captures.writers.values()]
    assert sum(sizes) <= 5_000
    assert any(r.event == "capture:stopped" and "pcap_max_total_bytes" in r.reason
               for r in logged)
    captures.close_all()


def test_server_config_caps_and_timeouts(tmp_path: Path) -> None:
    from pvpn.config import load_server_config

    base = _server_config_base(tmp_path)
    path = tmp_path / "server.toml"
    path.write_text(base)
    config = load_server_config(path)
    assert (config.nat_flows_per_user, config.nat_flows_per_session) == (16384, 8192)
    assert (config.nat_syn_timeout, config.nat_unreplied_timeout) == (120.0, 300.0)
    assert config.sessions_per_user == 10
    assert (config.pcap_max_total_bytes, config.pcap_max_files) == (1_000_000_000, 1000)
    path.write_text(base + "nat_flows_per_user = 4000\nsessions_per_user = 3\n"
                    "nat_syn_timeout = 60\npcap_max_files = 20\n")
    config = load_server_config(path)
    assert (config.nat_flows_per_user, config.nat_flows_per_session) == (4000, 4000)
    assert config.sessions_per_user == 3 and config.nat_syn_timeout == 60.0
    for bad, key in (("nat_flows_per_user = 0", "nat_flows_per_user"),
                     ("nat_flows_per_user = 70000", "nat_flows_per_user"),
                     ("nat_flows_per_user = 10\nnat_flows_per_session = 11",
                      "nat_flows_per_session"),
                     ("nat_unreplied_timeout = 0", "nat_unreplied_timeout"),
                     ("sessions_per_user = 0", "sessions_per_user"),
                     ('pcap_dir = "/p"\npcap_max_bytes = 5000\npcap_max_total_bytes = 4000',
                      "pcap_max_total_bytes"),
                     ("pcap_max_files = 0", "pcap_max_files")):
        path.write_text(base + bad + "\n")
        with pytest.raises(ConfigError, match=rf"\[server\] {key}"):
            load_server_config(path)
