"""The personal VPN over one hop, in a real lab: namespaces, veth links, real users, iptables,
NFQUEUE, TLS, supervisord, and real clients (curl, ping, iperf3, ssh, socat).

Each bullet of "What a user sees" (issue 2) is a test here; see the test names."""

from __future__ import annotations

import hashlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from vpnlib import (
    SESSION_RE, alice_packets_out, capture, clear_packets, client_rules, connect, connect_argv,
    curl, disconnect, fetch_ok, sh, status, tunnel_pids, udp_echo, vpn,
)

from pvpn.cli.lab.lab import exec_argv

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- what a user sees


def test_alice_reaches_the_target_through_her_vpn_tcp_udp_icmp_v4_v6(lab: dict[str, Any]) -> None:
    """curl, iperf3, ping, UDP and ssh, IPv4 and IPv6, to a host the client can't reach."""
    target4, target6 = lab["target"]["ipv4"], lab["target"]["ipv6"]
    # Without her VPN, the target is out of reach (no forwarding anywhere).
    assert curl(lab, "alice", lab["files"]["1k"]["url4"], 3).returncode != 0
    with vpn(lab, "alice"):
        fetch_ok(lab, "alice", "1k")
        fetch_ok(lab, "alice", "1k", "url6")
        fetch_ok(lab, "alice", "1m")
        for address in (target4, target6):
            ping = sh(lab, "client", "alice", "ping", "-c", "3", "-i", "0.2", "-W", "3", address)
            assert ping.returncode == 0, ping.stdout.decode()
            echo = udp_echo(lab, "alice", address, f"hello-{address}")
            assert echo.stdout.decode() == f"hello-{address}", echo.stderr.decode()
        perf = sh(lab, "client", "alice", "iperf3", "-c", target4, "-t", "2", "-J")
        assert perf.returncode == 0, perf.stdout.decode()[-500:]
        perf_r = sh(lab, "client", "alice", "iperf3", "-c", target6, "-t", "2", "-R")
        assert perf_r.returncode == 0, perf_r.stdout.decode()[-500:]
        ssh = sh(lab, "client", "alice", *shlex.split(lab["ssh"]["alice"]), "id", "-un")
        assert ssh.stdout.decode().strip() == "alice", ssh.stderr.decode()


def test_bob_gets_nothing_through_alices_vpn(lab: dict[str, Any]) -> None:
    """bob's packets take the normal route (and fail behind the firewall), never her tunnel."""
    with vpn(lab, "alice") as session, capture(lab) as pcap:
        fetch_ok(lab, "alice", "1k")
        sent_before = alice_packets_out(lab, session)
        assert curl(lab, "bob", lab["files"]["1k"]["url4"], 3).returncode != 0
        assert curl(lab, "bob", lab["files"]["1k"]["url6"], 3).returncode != 0
        ping = sh(lab, "client", "bob", "ping", "-c", "2", "-W", "1", lab["target"]["ipv4"])
        assert ping.returncode != 0
        assert alice_packets_out(lab, session) == sent_before, "bob's packets entered her tunnel"
    # bob's packets left by the normal route, in clear, as without any VPN (the thesis's
    # behaviour); beyond the server they go nowhere.
    assert clear_packets(pcap, lab), "bob's packets should be visible on the normal route"



def test_alice_and_bob_each_with_their_own_vpn_replies_never_cross(lab: dict[str, Any]) -> None:
    """Both users, same destination address and port, at once: each gets only their replies."""
    with vpn(lab, "alice") as s_alice, vpn(lab, "bob") as s_bob:
        assert s_alice != s_bob
        procs = []
        for user in ("alice", "bob"):
            for name in ("big", "1m", "100k"):
                meta = lab["files"][name]
                argv, cwd = exec_argv(lab["name"], "client", user,
                                      ["curl", "-sS", "--max-time", "120", meta["url4"]])
                procs.append((user, name, subprocess.Popen(argv, cwd=cwd,
                                                           stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE)))
        # UDP to the same echo port at the same time, each with its own payload.
        for user in ("alice", "bob"):
            for i in range(5):
                echo = udp_echo(lab, user, lab["target"]["ipv4"], f"{user}-{i}")
                assert echo.stdout.decode() == f"{user}-{i}", echo.stderr.decode()
        for user, name, proc in procs:
            out, err = proc.communicate(timeout=150)
            meta = lab["files"][name]
            assert proc.returncode == 0, (user, name, err.decode())
            assert hashlib.sha256(out).hexdigest() == meta["sha256"], (user, name, len(out))
        text = status(lab, "root")
        assert s_alice in text and s_bob in text


def test_fail_closed_when_the_tunnel_process_is_gone(lab: dict[str, Any]) -> None:
    """Killed tunnel process: packets dropped, never in clear, until `pvpn disconnect`."""
    session = connect(lab, "alice")
    try:
        with capture(lab) as pcap:
            for pid in tunnel_pids(lab, "alice"):
                subprocess.run(["kill", "-9", str(pid)], check=True)
            time.sleep(0.5)
            assert curl(lab, "alice", lab["files"]["1k"]["url4"], 3).returncode != 0
            assert curl(lab, "alice", lab["files"]["1k"]["url6"], 3).returncode != 0
            ping = sh(lab, "client", "alice", "ping", "-c", "2", "-W", "1", lab["target"]["ipv4"])
            assert ping.returncode != 0
            assert "held" in status(lab, "alice")
        assert clear_packets(pcap, lab) == []
        # Reconnecting picks the held session up again.
        connect(lab, "alice")
        fetch_ok(lab, "alice", "1k")
    finally:
        disconnect(lab, "alice")
    # Only the explicit disconnect removed the protection: now alice's packets take the
    # normal route again (and are visible there).
    assert session not in status(lab, "alice")
    with capture(lab) as pcap:
        curl(lab, "alice", lab["files"]["1k"]["url4"], 2)
    assert clear_packets(pcap, lab)


def test_kill_9_of_the_agent_mid_transfer_holds_the_session_and_nothing_leaks(
        lab: dict[str, Any]) -> None:
    """pvpn-client holds the chain, alice's `pvpn connect` is only its agent: killed with -9
    in the middle of a download, the chain goes with it (pvpn-client drops it at once), the
    download stalls (its packets dropped), the session is held, and not one packet of the
    target's leaves or arrives in clear."""
    words = shlex.split(lab["connect"]["alice"])
    hop = words[words.index("--to") - 1]
    host = hop.rsplit(":", 1)[0] if hop.count(":") == 1 else hop
    ns = lab["hosts"]["client"]["namespace"]

    def to_first_hop() -> str:
        return subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htn", "state", "established",
                               "dst", host], capture_output=True, text=True).stdout.strip()

    connect(lab, "alice")
    try:
        with capture(lab) as pcap:
            # 64 MB, more than any socket buffer holds: with super-packets a 1 MB file was
            # all in alice's receive buffer before the kill, and the download finished.
            argv, cwd = exec_argv(lab["name"], "client", "alice", [
                "curl", "-sS", "--limit-rate", "100k", "--max-time", "6", "-o", "/dev/null",
                "-w", "%{size_download}", lab["files"]["big"]["url4"]])
            download = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
            time.sleep(1.5)
            assert to_first_hop(), "the chain's connection, made by pvpn-client"
            pids = tunnel_pids(lab, "alice")
            assert pids
            for pid in pids:
                subprocess.run(["kill", "-9", str(pid)], check=True)
            # pvpn-client drops the chain with its agent: no connection to the first hop left.
            deadline = time.monotonic() + 3
            while to_first_hop() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert to_first_hop() == "", "the chain outlived its agent"
            out, _ = download.communicate(timeout=30)
            assert download.returncode != 0, "the download finished without its tunnel"
            assert 0 < int(out or b"0") < lab["files"]["big"]["size"], out
            assert "held" in status(lab, "alice")
            assert curl(lab, "alice", lab["files"]["1k"]["url4"], 2).returncode != 0
        assert clear_packets(pcap, lab) == []
        connect(lab, "alice")  # the held session picked up again
        fetch_ok(lab, "alice", "1k")
    finally:
        disconnect(lab, "alice")


def test_fail_closed_while_the_tunnel_reconnects(lab: dict[str, Any]) -> None:
    """Server unreachable for a while: nothing leaks; the tunnel resumes by itself."""
    server_ns = lab["hosts"]["server"]["namespace"]
    block = ["-p", "tcp", "--dport", str(lab["ports"]["pvpn"]), "-j", "DROP"]
    with vpn(lab, "alice", "--keepalive", "1"):
        fetch_ok(lab, "alice", "1k")
        with capture(lab) as pcap:
            subprocess.run(["ip", "netns", "exec", server_ns, "iptables", "-I", "INPUT", *block],
                           check=True)
            try:
                time.sleep(4.5)  # past 3 keepalives: the client notices and reconnects
                assert curl(lab, "alice", lab["files"]["1k"]["url4"], 3).returncode != 0
                assert udp_echo(lab, "alice", lab["target"]["ipv6"], "x", 2).stdout == b""
            finally:
                subprocess.run(["ip", "netns", "exec", server_ns, "iptables", "-D", "INPUT",
                                *block], check=True)
        assert clear_packets(pcap, lab) == []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if curl(lab, "alice", lab["files"]["1k"]["url4"], 3).returncode == 0:
                break
        fetch_ok(lab, "alice", "1k")


OWNERLESS = r"""
import socket, sys, time
target4, target6, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
# UDP sockets closed before the echo comes back: the kernel answers the echo with an ICMP
# port unreachable that no socket owns.
for addr, fam in ((target4, socket.AF_INET), (target6, socket.AF_INET6)):
    for i in range(5):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.sendto(b"orphan", (addr, port))
        s.close()
# A TCP connection dropped mid-download: FIN/RST from an orphaned socket.
s = socket.create_connection((target4, 80), timeout=5)
s.sendall(b"GET /big HTTP/1.0\r\n\r\n")
s.recv(65536)
s.close()
time.sleep(1.5)
"""


def test_ownerless_packets_of_tunnelled_flows_never_leak(lab: dict[str, Any]) -> None:
    """TIME_WAIT ACKs, RSTs of orphaned sockets and kernel ICMP errors go in the tunnel too."""
    with vpn(lab, "alice"):
        with capture(lab) as pcap:
            for _ in range(3):
                fetch_ok(lab, "alice", "10k")  # leaves TIME_WAIT sockets behind
            run = sh(lab, "client", "alice", "python3", "-c", OWNERLESS, lab["target"]["ipv4"],
                     lab["target"]["ipv6"], str(lab["ports"]["udp_echo"]))
            assert run.returncode == 0, run.stderr.decode()
            time.sleep(1)
        rules = client_rules(lab)
        assert clear_packets(pcap, lab) == []
    # The connection-mark rules did catch ownerless packets (not merely nothing to see).
    counted = [line for line in rules.splitlines()
               if "! --uid-owner" in line and not line.startswith("[0:")]
    assert counted, rules


def test_a_marker_alice_sends_never_appears_in_clear(lab: dict[str, Any]) -> None:
    marker = f"PVPN-MARKER-{time.time_ns()}"
    with vpn(lab, "alice"), capture(lab) as pcap:
        proc = curl(lab, "alice", f"http://{lab['target']['ipv4']}/{marker}", 10,
                    "client", "-d", marker * 20)
        assert proc.returncode == 0, proc.stderr.decode()
    assert marker.encode() not in pcap.read_bytes()
    access = Path(lab["logs"]["target"]["nginx-access"]).read_text()
    assert marker in access, "the request reached the target through the tunnel"


# ---------------------------------------------------------------- refusals and bad input


def refused(info: dict[str, Any], user: str, *argv: str) -> str:
    proc = sh(info, "client", user, *argv, timeout=60)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0, out
    assert "PVPNC-S" not in client_rules(info), "a refused VPN leaves no rules behind"
    return out


def test_wrong_server_certificate_is_refused_with_the_cause(lab: dict[str, Any]) -> None:
    argv = connect_argv(lab, "alice")
    ca = argv.index("--ca")
    # A pinned certificate that is not the server's.
    argv_pin = argv[:ca] + ["--pin", lab["ca"]] + argv[ca + 2:]
    assert "does not match the pinned certificate" in refused(lab, "alice", *argv_pin)
    # The right CA, but the wrong name for the server.
    out = refused(lab, "alice", *argv, "--server-name", "elsewhere.example")
    assert "not elsewhere.example" in out


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory the lab users can read (pytest's own tmp_path is root-only)."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix="pvpntest"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_wrong_ca_is_refused(lab: dict[str, Any], shared_tmp: Path) -> None:
    other = shared_tmp / "otherca"
    subprocess.run(["pvpn", "ca", "init", str(other)], check=True, capture_output=True)
    other.chmod(0o755)
    argv = connect_argv(lab, "alice")
    ca = argv.index("--ca")
    argv[ca + 1] = str(other / "ca.crt")
    assert "unknown authority" in refused(lab, "alice", *argv)


def test_unknown_user_and_wrong_key_are_refused(lab: dict[str, Any], shared_tmp: Path) -> None:
    # carol has a key, but it is authorised nowhere.
    carol = connect_argv(lab, "alice")
    carol[carol.index("--key") + 1] = lab["users"]["carol"]["pvpn_key"]
    assert "not authorised" in refused(lab, "carol", *carol)
    # alice with a key that is not hers.
    keydir = shared_tmp / "k"
    keydir.mkdir()
    subprocess.run(["chown", "alice", str(keydir)], check=True)
    sh(lab, "client", "alice", "pvpn", "keygen", "--bits", "2048", "--key", str(keydir / "id"))
    wrong = connect_argv(lab, "alice")
    wrong[wrong.index("--key") + 1] = str(keydir / "id")
    assert "not authorised" in refused(lab, "alice", *wrong)
    server_log = Path(lab["logs"]["server"]["pvpn-server"]).read_text()
    assert "auth:refused" in server_log


def test_destination_not_allowed_is_refused(lab: dict[str, Any]) -> None:
    argv = connect_argv(lab, "alice", "--to", "10.99.0.0/24")
    assert "not allowed" in refused(lab, "alice", *argv)


GARBAGE = r"""
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for payload in (os.urandom(5000), b"\x16\x03\x01\x02\x00" + os.urandom(600), b"GET / HTTP/1.0\r\n\r\n"):
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(payload)
    try:
        s.recv(100)
    except OSError:
        pass
    s.close()
"""


def test_garbage_on_the_server_port_does_not_disturb_others(lab: dict[str, Any]) -> None:
    with vpn(lab, "alice"):
        fetch_ok(lab, "alice", "1k")
        run = sh(lab, "client", "root", "python3", "-c", GARBAGE, lab["server"]["ipv4"],
                 str(lab["ports"]["pvpn"]))
        assert run.returncode == 0, run.stderr.decode()
        fetch_ok(lab, "alice", "100k")
    assert "link:error" in Path(lab["logs"]["server"]["pvpn-server"]).read_text()


# ---------------------------------------------------------------- the host left as found


def ns_state(info: dict[str, Any], host: str) -> dict[str, str]:
    ns = info["hosts"][host]["namespace"]

    def run(*cmd: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True,
                              text=True).stdout

    rules = "".join(re.sub(r"\[\d+:\d+\]", "", line) + "\n"
                    for tool in ("iptables-save", "ip6tables-save")
                    for line in run(tool).splitlines() if not line.startswith("#"))
    queues = run("cat", "/proc/net/netfilter/nfnetlink_queue")
    links = "\n".join(sorted(line.split(":")[1].strip().split("@")[0]
                             for line in run("ip", "-o", "link").splitlines()))
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return {"rules": rules, "queues": queues, "links": links, "pids": pids.strip()}


def supervisorctl(info: dict[str, Any], host: str, *args: str) -> str:
    conf = info["hosts"][host]["supervisord"]
    return subprocess.run(["ip", "netns", "exec", info["hosts"][host]["namespace"],
                           str(Path(sys.executable).parent / "supervisorctl"), "-c", conf,
                           *args],
                          capture_output=True, text=True, timeout=60).stdout


def test_everything_stopped_leaves_the_hosts_as_found(lab_factory: Any) -> None:
    with lab_factory(nodes=True) as info:
        program = {"client": "pvpn-client", "server": "pvpn-server"}
        for host, name in program.items():
            supervisorctl(info, host, "stop", name)
        before = {host: ns_state(info, host) for host in program}
        for host, name in program.items():
            supervisorctl(info, host, "start", name)
        time.sleep(1)
        # A foreground VPN ended with Ctrl-C, one ended with `pvpn disconnect`, one whose
        # tunnel process was killed and then disconnected.
        argv, cwd = exec_argv(info["name"], "client", "alice", connect_argv(info, "alice"))
        fg = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert fg.stdout is not None
        line = fg.stdout.readline().decode()
        assert SESSION_RE.search(line), line
        fetch_ok(info, "alice", "10k")
        fg.send_signal(signal.SIGINT)
        assert fg.wait(timeout=15) == 0
        assert "no pvpn sessions" in status(info, "alice")
        with vpn(info, "bob"):
            fetch_ok(info, "bob", "10k")
        connect(info, "alice")
        for pid in tunnel_pids(info, "alice"):
            subprocess.run(["kill", "-9", str(pid)], check=True)
        disconnect(info, "alice")
        for host, name in program.items():
            supervisorctl(info, host, "stop", name)
        # The server kept the session of alice's killed tunnel process for its resume (issue
        # 10), with the rules of its NAT ports; stopped for good, it forgets them when told.
        assert "PVPNS-IN" in ns_state(info, "server")["rules"]
        forget = subprocess.run(
            ["ip", "netns", "exec", info["hosts"]["server"]["namespace"],
             str(Path(sys.executable).parent / "pvpn-server"), "--config",
             info["configs"]["server"], "--remove-sessions"],
            capture_output=True, text=True, timeout=60)
        assert forget.returncode == 0 and "forgetting session" in forget.stdout, forget.stdout
        after = {host: ns_state(info, host) for host in program}
        assert after == before
        assert "PVPN" not in after["client"]["rules"] and "PVPN" not in after["server"]["rules"]


# ---------------------------------------------------------------- policy on what is sent (issue 9)


def server_log_records(info: dict[str, Any], event: str) -> list[dict[str, Any]]:
    import json

    text = Path(info["logs"]["server"]["pvpn-server"]).read_text()
    return [r for r in (json.loads(line) for line in text.splitlines() if line.startswith("{"))
            if r.get("event") == event]


def wait_for_record(info: dict[str, Any], event: str, session: str, seen: int,
                    timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [r for r in server_log_records(info, event) if r.get("session") == session]
        if len(records) > seen:
            return records[-1]
        time.sleep(0.2)
    raise AssertionError(f"no new {event} record for {session} within {timeout} s")


def test_the_servers_own_address_is_out_of_reach_and_a_reload_reaches_live_sessions(
        lab: dict[str, Any]) -> None:
    """The lab's allow list covers 10.77.1.0/24, where the server itself sits (10.77.1.1):
    the server reads its own addresses from its kernel and keeps them out of every allow list
    that does not name them. Then SIGHUP with a narrower [users.alice] narrows her live
    session, and with none ends it."""
    own = next(a["ipv4"].split("/")[0] for a in lab["hosts"]["server"]["addresses"].values()
               if a["peer"] == "target")
    target4 = lab["target"]["ipv4"]
    config = Path(lab["configs"]["server"])
    original = config.read_text()
    with vpn(lab, "alice") as session:
        ping = sh(lab, "client", "alice", "ping", "-c", "1", "-W", "3", target4)
        assert ping.returncode == 0, ping.stdout.decode()
        ping = sh(lab, "client", "alice", "ping", "-c", "2", "-i", "0.2", "-W", "1", own)
        assert ping.returncode != 0, f"{own} (the server) answered through the VPN"
        dropped = wait_for_record(lab, "packet:dropped", session, 0)
        assert dropped["reason"] == "destination-special" and own in dropped["flow"]
        narrowed_before = len([r for r in server_log_records(lab, "session:narrowed")
                               if r.get("session") == session])
        try:
            lines = original.splitlines()
            at = lines.index("[users.alice]")
            lines[at + 1] = f'allow = ["{target4}/32"]'
            config.write_text("\n".join(lines) + "\n")
            supervisorctl(lab, "server", "signal", "HUP", "pvpn-server")
            narrowed = wait_for_record(lab, "session:narrowed", session, narrowed_before)
            assert narrowed["allow"] == [f"{target4}/32"]
            fetch_ok(lab, "alice", "1k")  # what is left still works
            del lines[at:at + 2]
            config.write_text("\n".join(lines) + "\n")
            supervisorctl(lab, "server", "signal", "HUP", "pvpn-server")
            closed = wait_for_record(lab, "session:closed", session, 0)
            assert "policy of 'alice' at server was removed" in closed["reason"]
        finally:
            config.write_text(original)
            supervisorctl(lab, "server", "signal", "HUP", "pvpn-server")
    with vpn(lab, "alice"):  # the restored policy lets her in again
        fetch_ok(lab, "alice", "1k")
