"""Per-hop inspection in real labs (issue 4): `pvpn connect --pcap` writes alice's inner
packets as her process sees them, the server writes them per session ([server] pcap_dir),
and `pvpn trace` follows her session through every node's log, with and without gateways."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager

import pytest
from vpnlib import connect, connect_argv, curl, disconnect, fetch_ok, sh

from pvpn.cli.lab import lab as lab_module
from pvpn.cli.lab import services
from pvpn.cli.lab.commands import find_program

pytestmark = pytest.mark.integration

TRACE_TIMEOUT = 20.0  # seconds for every hop to log the end of the session


@pytest.fixture(scope="module")
def lab2(lab_factory: Callable[..., ContextManager[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    with lab_factory(nodes=True, gateways=2) as info:
        yield info


@contextlib.contextmanager
def alice_dir() -> Iterator[Path]:
    """A directory under /tmp that alice (a user of the lab that is up) owns, mode 0755;
    removed afterwards."""
    account = pwd.getpwnam("alice")
    directory = Path(tempfile.mkdtemp(prefix="pvpninsp"))
    try:
        os.chown(directory, account.pw_uid, account.pw_gid)
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def pvpn(*args: str) -> subprocess.CompletedProcess[str]:
    """The `pvpn` command as root on the host (the lab's logs are root's)."""
    program = find_program("pvpn") or "pvpn"
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=60)


def lab_tunnels(info: dict[str, Any], user: str) -> list[int]:
    """``user``'s `pvpn connect` processes of this lab (other labs may share the users)."""
    uid = info["users"][user]["uid"]
    pattern = f"pvpn connect .*--socket {info['client_socket']}"
    out = subprocess.run(["pgrep", "-u", str(uid), "-f", "--", pattern],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def tcp_packets(path: Path) -> list[Any]:
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap

    return [p for p in rdpcap(str(path)) if p.haslayer(TCP)]


def endpoints(packet: Any) -> tuple[str, int, str, int]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    layer = packet.getlayer(IP) or packet.getlayer(IPv6)
    return layer.src, packet[TCP].sport, layer.dst, packet[TCP].dport


def closed_trace(info: dict[str, Any], session: str, hops: int) -> dict[str, Any]:
    """`pvpn trace SESSION --lab NAME --json`, once all ``hops`` logged the session's end."""
    deadline = time.monotonic() + TRACE_TIMEOUT
    while True:
        proc = pvpn("trace", session, "--lab", info["name"], "--json")
        assert proc.returncode in (0, 1), proc.stderr
        data: dict[str, Any] = json.loads(proc.stdout) if proc.returncode == 0 else {}
        done = [h for h in data.get("hops", []) if h["closed"]]
        if len(done) >= hops or time.monotonic() > deadline:
            return data
        time.sleep(0.5)


@pytest.mark.parametrize("which", ["lab", "lab2"])
def test_pcap_at_both_ends_and_the_trace_of_alices_session(
        which: str, request: pytest.FixtureRequest) -> None:
    info: dict[str, Any] = request.getfixturevalue(which)
    with alice_dir() as directory:
        pcap_and_trace(info, directory)


def pcap_and_trace(info: dict[str, Any], alice_dir: Path) -> None:
    from scapy.layers.inet import TCP

    gateways = [role for role in info["hosts"] if role.startswith("gw")]
    target4, target6 = info["target"]["ipv4"], info["target"]["ipv6"]
    client_pcap = alice_dir / "alice.pcap"

    session = connect(info, "alice", "--pcap", str(client_pcap))
    assert lab_tunnels(info, "alice")
    try:
        fetch_ok(info, "alice", "10k")
        fetch_ok(info, "alice", "1k", "url6")
        # A port nothing listens on: the target answers the SYN with a reset.
        refused = curl(info, "alice", f"http://{target4}:81/", 10)
        assert refused.returncode == 7, refused.stderr  # curl: connection refused
    finally:
        disconnect(info, "alice")
    deadline = time.monotonic() + 15
    while lab_tunnels(info, "alice") and time.monotonic() < deadline:
        time.sleep(0.2)

    # alice's pcap: hers alone to read, with her TCP to and from the target, both families.
    st = client_pcap.stat()
    assert st.st_uid == info["users"]["alice"]["uid"]
    assert stat.S_IMODE(st.st_mode) == 0o600
    mine = tcp_packets(client_pcap)
    ends = [endpoints(p) for p in mine]
    assert any(dst == target4 and dport == 80 for _s, _sp, dst, dport in ends), ends[:5]
    assert any(src == target4 and sport == 80 for src, sport, _d, _dp in ends), ends[:5]
    assert any(dst == target6 and dport == 80 for _s, _sp, dst, dport in ends), ends[:5]
    assert any(src == target6 and sport == 80 for src, sport, _d, _dp in ends), ends[:5]
    assert b"HTTP/1.1 200 OK" in b"".join(bytes(p) for p in mine)

    # The server's pcap of her session: the same packets, as she sent them (before NAT) and
    # as they came back to her (after un-NAT): byte for byte the ones in her own file.
    topology = lab_module.load_topology(info["name"])
    server_pcap = services.server_pcap_dir(topology) / f"{session}.pcap"
    assert server_pcap.is_file(), sorted(p.name for p in server_pcap.parent.iterdir())
    assert stat.S_IMODE(server_pcap.stat().st_mode) == 0o600
    at_server = {bytes(p) for p in tcp_packets(server_pcap)}
    syns = [bytes(p) for p in mine if str(p[TCP].flags) == "S"]
    requests = [bytes(p) for p in mine if b"GET /" in bytes(p)]
    assert len(syns) >= 2 and len(requests) == 2
    assert set(syns + requests) <= at_server
    replies = [bytes(p) for p in mine if b"HTTP/1.1 200 OK" in bytes(p)]
    assert replies and set(replies) <= at_server

    # pvpn trace, as root, finds the lab's logs and follows her session hop by hop.
    data = closed_trace(info, session, 2 + len(gateways))
    assert data["session"] == session and data["user"] == "alice"
    assert data["chain"] == ["client", *gateways, "server"]
    for hop in data["hops"]:
        assert hop["user"] == "alice", hop
        assert hop["uid"] == info["users"]["alice"]["uid"], hop
        assert hop["closed"], hop
        assert hop["up"]["bytes"] > 0 and hop["down"]["bytes"] > 10 * 1024, hop
        assert hop["last"] >= hop["first"] >= 0
    client, server = data["hops"][0], data["hops"][-1]
    assert client["up"]["packets"] > 0 and server["down"]["packets"] > 0
    for hop in data["hops"][1:-1]:
        assert hop["up"]["envelopes_in"] > 0 and hop["down"]["envelopes_out"] > 0
    assert [r["offset"] for r in data["timeline"]] == sorted(
        r["offset"] for r in data["timeline"])

    text = pvpn("trace", session[:10], "--lab", info["name"])
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"session {session}  user alice" in out
    assert f"chain: {' > '.join(['client', *gateways, 'server'])}" in out
    blocks = [line.split()[1] for line in out.splitlines() if line.startswith("[")]
    assert blocks == ["client", *gateways, "server"]
    assert "timeline:" in out and "session:closed" in out

    listing = pvpn("trace", "--user", "alice", "--lab", info["name"], "--json")
    assert listing.returncode == 0, listing.stderr
    assert session in [s["session"] for s in json.loads(listing.stdout)["sessions"]]

    packets_in_the_trace(info, session, client_pcap, server_pcap, alice_dir)


def packets_in_the_trace(info: dict[str, Any], session: str, client_pcap: Path,
                         server_pcap: Path, alice_dir: Path) -> None:
    """Issue 10 point 4: `pvpn trace --packets` finds the server's capture of her session by
    itself and reads hers with --pcap: both show her flows to the target each way, and the
    connection the target refused, reset by the target; --html draws the session."""
    target4, target6 = info["target"]["ipv4"], info["target"]["ipv6"]
    gateways = [role for role in info["hosts"] if role.startswith("gw")]
    proc = pvpn("trace", session, "--lab", info["name"], "--pcap", str(client_pcap), "--json")
    assert proc.returncode == 0, proc.stderr
    captures = json.loads(proc.stdout)["captures"]
    assert [(c["where"], c["path"]) for c in captures] == [
        ("file", str(client_pcap)), ("server", str(server_pcap))]
    for found in captures:
        flows = found["flows"]
        assert found["error"] == "" and found["packets"] == sum(
            f["up"]["packets"] + f["down"]["packets"] for f in flows), found["path"]
        web = [f for f in flows if f["server"] in (f"{target4}:80", f"[{target6}]:80")]
        assert len(web) == 2, [f["flow"] for f in flows]
        assert all(f["up"]["syns"] and f["down"]["syns"] and not f["down"]["resets"]
                   for f in web), web
        assert sum(f["down"]["payload"] for f in web) > 11 * 1024
        [refused] = [f for f in flows if f["server"] == f"{target4}:81"]
        assert refused["state"] == f"reset by {target4}:81", refused
        assert refused["down"]["resets"] == 1 and refused["first_packet"]["text"].startswith("S ")

    text = pvpn("trace", session[:12], "--lab", info["name"], "--packets", "--no-timeline")
    assert text.returncode == 0, text.stderr
    assert f"packets at server: {server_pcap}" in text.stdout
    assert f"> {target4}:80 " in text.stdout and f"reset by {target4}:81" in text.stdout

    page = alice_dir / "trace.html"
    proc = pvpn("trace", session, "--lab", info["name"], "--packets", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    html = page.read_text()
    assert re.findall(r'<g class="lane hop" data-hop="([^"]+)"', html) == [
        "client", *gateways, "server"]
    assert 'data-flow="tcp ' in html and 'data-source="pcap"' in html


def test_trace_says_what_to_pass_when_it_cannot_guess(lab: dict[str, Any]) -> None:
    proc = pvpn("trace", "0123", "--lab", "pvpnnosuchlab")
    assert proc.returncode != 0 and "pvpnnosuchlab" in proc.stderr
    proc = pvpn("trace", "0123", "--lab", lab["name"])
    assert proc.returncode == 1 and "no records of session 0123" in proc.stderr
    # Without --lab or --logs: the lab if it is the only one up, else a message that says
    # what to pass (other labs may be up on this host).
    proc = pvpn("trace", "0123")
    assert proc.returncode in (1, 2)
    assert "no records of session 0123" in proc.stderr or "--lab NAME" in proc.stderr


def test_a_user_process_can_not_capture_where_it_may_not_write(lab: dict[str, Any]) -> None:
    proc = sh(lab, "client", "alice",
              *connect_argv(lab, "alice", "--background", "--pcap", "/root/alice.pcap"))
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0 and "cannot create the pcap file /root/alice.pcap" in out
    assert not lab_tunnels(lab, "alice")
