"""pvpn.cli.trace_packets and `pvpn trace --packets` (issue 10 point 4): a session's capture read
with scapy and summed up per flow beside the hop records: bytes and packets each way,
retransmissions and resets, the first and last packet, and how each flow ended."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from pvpn.cli import trace_packets
from pvpn.cli.main import main as pvpn_main
from pvpn.errors import ConfigError
from pvpn.io.pcap import PcapWriter
from pvpn.cli.trace_packets import read_capture

S = "5e55" * 8
T0 = 1_700_000_000.0
USER, TARGET = "10.77.0.1", "10.77.4.2"
REQUEST = b"GET /10k HTTP/1.1\r\nHost: target\r\n\r\n"


def tcp_up(seq: int, ack: int, flags: str, load: bytes = b"", **kw: Any) -> Any:
    return IP(src=USER, dst=TARGET) / TCP(sport=40000, dport=80, seq=seq, ack=ack,
                                          flags=flags, **kw) / load


def tcp_down(seq: int, ack: int, flags: str, load: bytes = b"", **kw: Any) -> Any:
    return IP(src=TARGET, dst=USER) / TCP(sport=80, dport=40000, seq=seq, ack=ack,
                                          flags=flags, **kw) / load


def recorded_session() -> list[tuple[float, Any]]:
    """What a server records of a session (offsets from T0): a TCP connection whose request
    is sent twice (the first copy's ACK was lost), four segments of reply, then a reset from
    the target; a UDP echo; an ICMP port unreachable about a second UDP flow."""
    data = [tcp_down(5001 + i * 1000, 1001 + len(REQUEST), "A", b"r" * 1000)
            for i in range(4)]
    return [
        (1.000, tcp_up(1000, 0, "S", window=64240,
                       options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)])),
        (1.010, tcp_down(5000, 1001, "SA", window=65160)),
        (1.011, tcp_up(1001, 5001, "A")),
        (1.012, tcp_up(1001, 5001, "PA", REQUEST)),
        (1.050, IP(src=USER, dst=TARGET) / UDP(sport=5353, dport=7) / b"echo me"),
        (1.051, IP(src=TARGET, dst=USER) / UDP(sport=7, dport=5353) / b"echo me"),
        (1.240, tcp_up(1001, 5001, "PA", REQUEST)),  # the retransmission
        (1.250, tcp_down(5001, 1001 + len(REQUEST), "A")),
        *((1.260 + i * 0.001, segment) for i, segment in enumerate(data)),
        (1.300, IP(src=USER, dst=TARGET) / UDP(sport=5354, dport=9) / b"x"),
        (1.301, IP(src=TARGET, dst=USER) / ICMP(type=3, code=3)
         / bytes(IP(src=USER, dst=TARGET) / UDP(sport=5354, dport=9) / b"x")),
        (2.500, tcp_down(9001, 0, "R")),
    ]


def write_capture(path: Path, packets: list[tuple[float, Any]], base: float = T0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with PcapWriter(path) as writer:
        for offset, packet in packets:
            writer.write(bytes(packet), base + offset)
    return path


def sizes(packets: list[tuple[float, Any]], src: str, proto: type) -> tuple[int, int]:
    chosen = [bytes(p) for _t, p in packets if p[IP].src == src and p.haslayer(proto)
              and not p.haslayer(ICMP)]
    return len(chosen), sum(len(b) for b in chosen)


def test_a_recorded_session_with_a_retransmission_a_reset_and_udp(tmp_path: Path) -> None:
    packets = recorded_session()
    capture = read_capture(write_capture(tmp_path / f"{S}.pcap", packets), "server")
    assert capture.error == "" and capture.packets == len(packets)
    assert capture.bytes == sum(len(bytes(p)) for _t, p in packets)
    assert [f.name for f in capture.flows] == [
        "tcp 10.77.0.1:40000 > 10.77.4.2:80", "udp 10.77.0.1:5353 > 10.77.4.2:7",
        "udp 10.77.0.1:5354 > 10.77.4.2:9"]
    tcp, echo, refused = capture.flows

    assert (tcp.up.packets, tcp.up.bytes) == sizes(packets, USER, TCP)
    assert (tcp.down.packets, tcp.down.bytes) == sizes(packets, TARGET, TCP)
    assert (tcp.up.payload, tcp.down.payload) == (2 * len(REQUEST), 4000)
    assert (tcp.up.retransmissions, tcp.down.retransmissions) == (1, 0)
    assert (tcp.up.resets, tcp.down.resets) == (0, 1)
    assert tcp.state == "reset by 10.77.4.2:80"
    assert [(e.kind, e.direction, round(e.time - T0, 3)) for e in tcp.events] == [
        ("retransmission", "up", 1.24), ("reset", "down", 2.5)]
    assert tcp.events[0].detail == f"seq 1, {len(REQUEST)} B"
    assert tcp.first is not None and tcp.last is not None
    assert (tcp.first.time, tcp.first.direction) == (T0 + 1.0, "up")
    assert tcp.first.text == "S seq=0 win=64240 len=0 mss=1460 sack wscale=7"
    assert (tcp.last.time, tcp.last.direction) == (T0 + 2.5, "down")
    assert tcp.last.text == "R seq=4001 win=8192 len=0"

    assert (echo.up.packets, echo.down.packets, echo.up.payload, echo.down.payload) == (
        1, 1, 7, 7)
    assert echo.state == "" and echo.first is not None and echo.first.text == "len=7"
    # The ICMP error is about the second UDP flow: counted with it, coming back down.
    assert (refused.up.packets, refused.down.packets) == (1, 1)
    assert refused.icmp_errors == {"dest-unreach port-unreachable from 10.77.4.2": 1}
    assert refused.state == "ICMP dest-unreach port-unreachable from 10.77.4.2"

    data = trace_packets.capture_to_json(capture, T0, T0 + 3)
    assert data["flows"][0]["up"]["retransmissions"] == 1
    assert data["flows"][0]["down"]["resets"] == 1
    assert data["flows"][0]["last_packet"] == {"offset": 2.5, "direction": "down",
                                               "text": "R seq=4001 win=8192 len=0"}
    assert data["up"] == {"packets": tcp.up.packets + 2, "bytes": tcp.up.bytes + sum(
        len(bytes(p)) for _t, p in packets if p.haslayer(UDP) and p[IP].src == USER)}
    rates = data["rates"]
    assert rates["bin"] == 0.05  # about 100 bins over 3 s: 50 ms
    assert sum(r for _t, r in rates["down"]) * rates["bin"] == pytest.approx(
        data["down"]["bytes"])

    text = "\n".join(trace_packets.format_capture(capture, T0))
    assert text.splitlines()[:4] == [
        f"packets at server: {tmp_path / f'{S}.pcap'}",
        f"  {len(packets)} packets, {capture.bytes:,} B, 3 flows   +1.000s .. +2.500s",
        "  tcp 10.77.0.1:40000 > 10.77.4.2:80   +1.000s .. +2.500s   reset by 10.77.4.2:80",
        f"    up    4 packets, {tcp.up.bytes} B, {2 * len(REQUEST)} B payload, 1 "
        "retransmission   +1.000s .. +1.240s",
    ]
    assert "    down  7 packets, " in text and "4,000 B payload, 1 reset   +1.010s .. +2.500s" \
        in text
    assert "    last  +2.500s down R seq=4001 win=8192 len=0" in text


def test_stalls_are_named(tmp_path: Path) -> None:
    """A SYN sent twice and never answered, a receiver whose window is full, a keepalive
    (not a retransmission), a connection silent for the end of the capture, IPv6."""
    v6 = IPv6(src="fd77::1", dst="fd77:0:0:4::2")
    packets = [
        (0.0, IP(src=USER, dst=TARGET) / TCP(sport=41000, dport=22, flags="S", seq=7)),
        (1.0, IP(src=USER, dst=TARGET) / TCP(sport=41000, dport=22, flags="S", seq=7)),
        (0.1, v6 / TCP(sport=42000, dport=80, flags="S", seq=100)),
        (0.11, IPv6(src="fd77:0:0:4::2", dst="fd77::1")
         / TCP(sport=80, dport=42000, flags="SA", seq=900, ack=101)),
        (0.12, v6 / TCP(sport=42000, dport=80, flags="A", seq=101, ack=901, window=0)),
        (0.5, v6 / TCP(sport=42000, dport=80, flags="A", seq=100, ack=901, window=0)
         / b"\0"),  # a keepalive: one byte below the next
        (3.0, IP(src=USER, dst=TARGET) / UDP(sport=5000, dport=53) / b"q"),
    ]
    packets.sort(key=lambda item: item[0])
    capture = read_capture(write_capture(tmp_path / "c.pcap", packets))
    ssh, web, dns = capture.flows
    assert ssh.name == "tcp 10.77.0.1:41000 > 10.77.4.2:22"
    assert (ssh.up.syns, ssh.up.retransmissions) == (2, 1)
    assert ssh.state == "no answer to the SYN (sent 2 times)"
    assert web.name == "tcp [fd77::1]:42000 > [fd77:0:0:4::2]:80"
    assert (web.up.zero_windows, web.up.retransmissions) == (1, 0)
    assert [e.kind for e in web.events] == ["zero window"]
    assert web.state == "open, nothing for the last 2.5 s of the capture"
    assert dns.state == "no reply"
    assert capture.where == "file"
    assert trace_packets.format_capture(capture, T0)[0] == f"packets in c.pcap: {tmp_path}/c.pcap"


def test_what_cannot_be_read_is_said(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"not a capture at all" * 4)
    assert "not a capture file" in read_capture(junk).error
    gone = read_capture(tmp_path / "gone.pcap")
    assert gone.packets == 0 and "no such file" in gone.error
    assert "cannot read it: no such file" in "\n".join(trace_packets.format_capture(gone, 0))
    path = write_capture(tmp_path / "many.pcap", recorded_session())
    few = read_capture(path, max_packets=3)
    assert few.truncated and few.packets == 3
    assert trace_packets.format_captures([], 0).startswith(
        "packets: no capture of this session found")


# ---------------------------------------------------------------- pvpn trace --packets


def server_logs(tmp_path: Path, capture: Path | None) -> Path:
    """The server's log of session S, with the capture:opened record that names its file."""
    me = {"session": S, "user": "alice", "uid": 1001, "role": "server", "node": "server"}
    lines = [
        {"time": T0 + 0.5, "event": "session:opened", "peer": "10.77.0.1:50000", **me},
        {"time": T0 + 2.9, "event": "session:closed", "reason": "ended by the user",
         "packets_out": 7, "packets_in": 9, "bytes_out": 400, "bytes_in": 4500, **me},
    ]
    if capture is not None:
        lines.insert(1, {"time": T0 + 1.0, "event": "capture:opened", "path": str(capture),
                         **me})
    path = tmp_path / "logs" / "pvpn-server.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_trace_finds_the_servers_capture_from_its_records(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture = write_capture(tmp_path / "pcap" / f"{S}.pcap", recorded_session())
    logs = server_logs(tmp_path, capture)
    assert pvpn_main(["trace", S[:8], "--logs", str(logs), "--packets"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    packets_at = lines.index(f"packets at server: {capture}")
    hop = next(i for i, line in enumerate(lines) if line.startswith("[1] server"))
    assert lines.index("timeline:") > packets_at > hop
    assert lines[packets_at + 2] == ("  tcp 10.77.0.1:40000 > 10.77.4.2:80   +0.500s .. "
                                     "+2.000s   reset by 10.77.4.2:80")
    assert "1 retransmission" in lines[packets_at + 3]

    assert pvpn_main(["trace", S, "--logs", str(logs), "--packets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [found] = data["captures"]
    assert found["where"] == "server" and found["path"] == str(capture)
    assert [f["state"] for f in found["flows"]] == [
        "reset by 10.77.4.2:80", "", "ICMP dest-unreach port-unreachable from 10.77.4.2"]
    assert found["flows"][0]["first"] == 0.5  # offsets from the session's first record
    # Without --packets, nothing is read and the JSON has no captures.
    assert pvpn_main(["trace", S, "--logs", str(logs), "--json"]) == 0
    assert "captures" not in json.loads(capsys.readouterr().out)


def test_trace_reads_the_captures_it_is_given(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    logs = server_logs(tmp_path, None)
    mine = write_capture(tmp_path / "alice.pcap", recorded_session())
    directory = tmp_path / "pcap_dir"
    write_capture(directory / f"{S}.pcap", recorded_session()[:3])
    write_capture(directory / f"{S}-2.pcap", recorded_session()[3:5])
    write_capture(directory / f"{'0' * 32}.pcap", recorded_session())  # another session's
    assert pvpn_main(["trace", S, "--logs", str(logs), "--pcap", str(mine), "--pcap",
                      str(directory), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(c["path"], c["packets"]) for c in data["captures"]] == [
        (str(mine), len(recorded_session())), (str(directory / f"{S}.pcap"), 3),
        (str(directory / f"{S}-2.pcap"), 2)]
    assert pvpn_main(["trace", S, "--logs", str(logs), "--packets"]) == 0
    assert "packets: no capture of this session found" in capsys.readouterr().out
    assert pvpn_main(["trace", S, "--logs", str(logs), "--pcap", str(tmp_path / "no")]) == 2
    assert "--pcap" in capsys.readouterr().err


def test_without_scapy_it_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """scapy is no dependency of the nodes: pvpn trace imports it only for --packets, and
    says how to install it when it is missing."""
    logs = server_logs(tmp_path, None)
    monkeypatch.setitem(sys.modules, "scapy.utils", None)  # makes `import` fail
    trace_packets.scapy_classes.cache_clear()
    try:
        assert pvpn_main(["trace", S, "--logs", str(logs), "--packets"]) == 2
        err = capsys.readouterr().err
        assert "scapy, which is not installed" in err and "pip install 'pvpn[trace]'" in err
        assert err.count("\n") == 1 and "Traceback" not in err  # one line, no traceback
        with pytest.raises(ConfigError, match="scapy"):
            read_capture(tmp_path / "x.pcap")
        assert pvpn_main(["trace", S, "--logs", str(logs)]) == 0  # the rest needs no scapy
    finally:
        trace_packets.scapy_classes.cache_clear()
    # Nothing imports scapy before a capture is read (a node's programs never do).
    probe = ("import sys, pvpn.cli.main, pvpn.cli.trace, pvpn.cli.trace_packets, pvpn.cli.trace_html; "
             "sys.exit('scapy' in ' '.join(sys.modules))")
    # From a directory of its own: in a checkout, the current directory's pvpn/ would shadow
    # the installed package (whose pvpn.client lives in client/).
    assert subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, timeout=60,
                          ).returncode == 0


def test_the_rates_keep_packets_from_before_the_first_record(tmp_path: Path) -> None:
    """A user's capture on a client whose clock runs ahead begins before the session's
    first record (the server's): its bytes per second start there, not at 0."""
    capture = read_capture(write_capture(tmp_path / "early.pcap", recorded_session()))
    data = trace_packets.capture_to_json(capture, T0 + 1.5, T0 + 3)
    rates = data["rates"]
    assert rates["down"][0][0] == pytest.approx(-0.5)  # the first packet, at T0 + 1.0
    assert sum(r for _t, r in rates["down"]) * rates["bin"] == pytest.approx(
        data["down"]["bytes"])
    assert sum(r for _t, r in rates["up"]) * rates["bin"] == pytest.approx(
        data["up"]["bytes"])
