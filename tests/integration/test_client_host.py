"""The client host under attack and under its administrator (issue 9), in a real lab with one
gateway: restarts of every node keep the VPN held and it resumes, rules of the previous
version are converted without a gap, a freed slot carries nothing of its last holder, the
users' processes trust only a root daemon, and the node's logs are root's."""

from __future__ import annotations

import contextlib
import json
import re
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import pytest
from vpnlib import (
    capture, clear_packets, client_rules, connect, curl, disconnect, sh, tunnel_pids,
)

from pvpn import firewall
from pvpn.cli.lab.lab import exec_argv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab1(lab_factory: Callable[..., ContextManager[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    with lab_factory(nodes=True, gateways=1) as info:
        yield info


def supervisorctl(info: dict[str, Any], host: str, *args: str) -> str:
    conf = info["hosts"][host]["supervisord"]
    return subprocess.run(["ip", "netns", "exec", info["hosts"][host]["namespace"],
                           str(Path(sys.executable).parent / "supervisorctl"), "-c", conf, *args],
                          capture_output=True, text=True, timeout=60).stdout


def program_pid(info: dict[str, Any], host: str, program: str) -> int:
    out = supervisorctl(info, host, "pid", program).strip()
    return int(out) if out.isdigit() else 0


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"not within {seconds} s: {what}")


def reaches(info: dict[str, Any], user: str = "alice") -> bool:
    return curl(info, user, info["files"]["1k"]["url4"], 3).returncode == 0


def session_state(info: dict[str, Any], user: str) -> list[dict[str, Any]]:
    proc = sh(info, "client", user, "pvpn", "status", "--json", "--socket", info["client_socket"])
    return list(json.loads(proc.stdout or b"[]"))


def client_log(info: dict[str, Any]) -> str:
    return Path(info["logs"]["client"]["pvpn-client"]).read_text()


def shared_log(info: dict[str, Any], name: str) -> Path:
    log = Path(tempfile.gettempdir()) / f"pvpn-{name}-{info['name']}.log"
    log.touch()
    shutil.chown(log, "alice")
    return log


def saved_rules(info: dict[str, Any]) -> list[str]:
    ns = info["hosts"]["client"]["namespace"]
    return [subprocess.run(["ip", "netns", "exec", ns, tool, "-t", "mangle"], capture_output=True,
                           text=True, check=True).stdout
            for tool in ("iptables-save", "ip6tables-save")]


def as_previous_version(info: dict[str, Any]) -> None:
    """Rewrite the client's session rules into what pvpn-client at 34c7490 installed (an
    unconditional jump into each session's chain, no record of the session id), in one
    transaction per family, as an upgrade from that version finds them."""
    ns = info["hosts"]["client"]["namespace"]
    sessions, _ = firewall.parse_installed_sessions("pvpnc", saved_rules(info))
    assert sessions
    lines = []
    for s in sessions:
        out_chain, in_chain = firewall.session_chains("pvpnc", s.slot)
        lines += [f"-D {j}" for j in firewall.session_jumps("pvpnc", s.slot, s.uid, s.mark,
                                                             0xFF0000)]
        lines.append(f"-A PVPNC-OUT -j {out_chain}")
        if s.session_id:
            lines.append(f"-D {in_chain} -m comment --comment "
                         f"{firewall.SESSION_COMMENT}{s.session_id.hex()}")
    text = "\n".join(["*mangle", *lines, "COMMIT", ""])
    for tool in ("iptables-restore", "ip6tables-restore"):
        subprocess.run(["ip", "netns", "exec", ns, tool, "--noflush"], input=text, text=True,
                       check=True)
    legacy, _ = firewall.parse_installed_sessions("pvpnc", saved_rules(info))
    assert all(s.legacy for s in legacy)


def test_restarts_of_every_node_keep_the_vpn_held_and_it_comes_back(
        lab1: dict[str, Any]) -> None:
    """`supervisorctl restart pvpn-client` ended every VPN: rules removed, `pvpn connect`
    exited 0, the protected traffic left in clear. Now each node restarts (and pvpn-client is
    upgraded from 34c7490's rules) under the same tunnel process, with nothing in clear."""
    log = shared_log(lab1, "restarts")
    session = connect(lab1, "alice", "--keepalive", "1", "--log", str(log))
    try:
        (pid,) = tunnel_pids(lab1, "alice")
        assert reaches(lab1)
        before = [line for line in client_rules(lab1).splitlines() if "PVPNC" in line]
        with capture(lab1) as pcap:
            # An orderly restart of pvpn-client: SIGTERM, then a new process.
            old = program_pid(lab1, "client", "pvpn-client")
            supervisorctl(lab1, "client", "stop", "pvpn-client")
            assert "PVPNC-S0" in client_rules(lab1), "SIGTERM keeps the session's rules"
            assert not reaches(lab1), "held: the kernel drops while nobody reads the queue"
            supervisorctl(lab1, "client", "start", "pvpn-client")
            assert program_pid(lab1, "client", "pvpn-client") not in (0, old)
            wait_until(lambda: reaches(lab1), 30, "alice's VPN back after the restart")
            assert tunnel_pids(lab1, "alice") == [pid], "the same tunnel process, held"
            (mine,) = session_state(lab1, "alice")
            assert mine["session"] == session and mine["state"] == "up"
            after = [line for line in client_rules(lab1).splitlines() if "PVPNC" in line]
            strip = lambda lines: sorted(l.split("]", 1)[-1] for l in lines)  # noqa: E731
            assert strip(after) == strip(before), "the same rules, none added or lost"

            # An upgrade from 34c7490: its rules, then the new pvpn-client (it died, as that
            # version's SIGTERM would have removed everything).
            # Stopped first: the running pvpn-client's rules check (every 5 s) would put the
            # old rules right before the kill, and nothing would be left to convert.
            old = program_pid(lab1, "client", "pvpn-client")
            os.kill(old, signal.SIGSTOP)
            as_previous_version(lab1)
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: program_pid(lab1, "client", "pvpn-client") not in (0, old), 30,
                       "pvpn-client restarted by supervisord")
            wait_until(lambda: reaches(lab1), 30, "alice's VPN back after the upgrade")
            (converted,), _ = firewall.parse_installed_sessions("pvpnc", saved_rules(lab1))
            assert not converted.legacy and converted.session_id.hex() == session
            assert firewall.client_jumps_repair("pvpnc", converted, 0xFF0000) is None
            assert '"converted":"legacy"' in client_log(lab1)

            # The gateway, then the server: the tunnel process holds and resumes.
            for host, program in (("gw1", "pvpn-gateway"), ("server", "pvpn-server")):
                supervisorctl(lab1, host, "restart", program)
                wait_until(lambda: reaches(lab1), 40, f"alice's VPN back after {program}")
                assert tunnel_pids(lab1, "alice") == [pid], f"held across {program}'s restart"
        assert clear_packets(pcap, lab1) == []
        said = log.read_text()
        assert "lost pvpn-client" in said and "re-registered" in said
        assert "tunnel down" in said
    finally:
        for host, program in (("client", "pvpn-client"), ("gw1", "pvpn-gateway"),
                              ("server", "pvpn-server")):
            supervisorctl(lab1, host, "start", program)  # whatever a failure left stopped
        wait_until(lambda: Path(lab1["client_socket"]).exists(), 30, "pvpn-client back")
        disconnect(lab1, "alice")
        log.unlink(missing_ok=True)
    assert tunnel_pids(lab1, "alice") == [] and "PVPNC-S" not in client_rules(lab1)


def test_only_an_administrator_command_that_names_them_removes_sessions(
        lab1: dict[str, Any]) -> None:
    """Protection ends by the user, or by root naming what goes: `pvpn disconnect --all`
    with pvpn-client running, `pvpn-client --remove-sessions` with it stopped."""
    ns = lab1["hosts"]["client"]["namespace"]
    config = lab1["configs"]["client"]
    pvpn_client = str(Path(sys.executable).parent / "pvpn-client")

    def remove_sessions() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, pvpn_client, "--config", config,
                               "--remove-sessions"], capture_output=True, text=True, timeout=60)

    alice = connect(lab1, "alice")
    bob = connect(lab1, "bob")
    try:
        refused = remove_sessions()
        assert refused.returncode == 1 and "pvpn disconnect --all" in refused.stdout
        assert len(session_state(lab1, "root")) == 2
        ended = sh(lab1, "client", "root", "pvpn", "disconnect", "--all", "--socket",
                   lab1["client_socket"])
        out = ended.stdout.decode()
        assert ended.returncode == 0, ended.stderr
        assert f"{alice} of alice" in out and f"{bob} of bob" in out
        wait_until(lambda: not tunnel_pids(lab1, "alice") and not tunnel_pids(lab1, "bob"), 15,
                   "the tunnel processes told and gone")
        assert "PVPNC-S" not in client_rules(lab1)

        alice = connect(lab1, "alice")
        for pid in tunnel_pids(lab1, "alice"):
            os.kill(pid, signal.SIGKILL)  # held, with nobody to come back for it
        supervisorctl(lab1, "client", "stop", "pvpn-client")
        assert "PVPNC-S0" in client_rules(lab1)
        removed = remove_sessions()
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert f"removing session {alice} of alice" in removed.stdout
        assert "PVPNC" not in client_rules(lab1)
    finally:
        supervisorctl(lab1, "client", "start", "pvpn-client")
        wait_until(lambda: Path(lab1["client_socket"]).exists(), 30, "pvpn-client back")
        disconnect(lab1, "alice")
        disconnect(lab1, "bob")
    assert session_state(lab1, "root") == []


# A kept-alive HTTP connection: the reply that came in through the TUN device marked it.
HOLD_OPEN = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.sendall(b"GET /0 HTTP/1.1\r\nHost: target\r\n\r\n")
reply = b""
while b"\r\n\r\n" not in reply:
    reply += s.recv(4096)
print("connected", flush=True)
time.sleep(60)
"""


def marked(info: dict[str, Any], mark: int) -> int:
    ns = info["hosts"]["client"]["namespace"]
    out = subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L", "-m",
                          f"{mark:#x}/0xff0000"], capture_output=True, text=True).stdout
    return len(out.splitlines())


def test_a_freed_slot_carries_nothing_of_its_last_holder(lab1: dict[str, Any]) -> None:
    """alice's session ends while a connection of hers is open; bob gets the slot; her
    orphaned socket's retransmitted FINs (ownerless, with her slot's connection mark) went
    into bob's queue. Now her session's marks are gone with it."""
    connect(lab1, "alice")
    argv, cwd = exec_argv(lab1["name"], "client", "alice",
                          ["python3", "-c", HOLD_OPEN, lab1["target"]["ipv4"]])
    holder = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"connected\n", holder.stderr
        (hers,) = session_state(lab1, "alice")
        mark = (hers["slot"] + 1) << 16  # the lab's mark_mask 0x00ff0000
        assert marked(lab1, mark) >= 1, "her connection carries her slot's mark"
        disconnect(lab1, "alice")
        connect(lab1, "bob")
        (his,) = session_state(lab1, "bob")
        assert his["slot"] == hers["slot"], "the lowest free slot: hers"
        holder.kill()  # her socket is orphaned: the kernel sends and retransmits its FIN
        holder.wait(timeout=10)
        time.sleep(3)  # FIN retransmissions at about 0.2, 0.6, 1.4 and 3 s
        (his,) = session_state(lab1, "bob")
        assert his["packets_out"] == 0, "a packet of alice's reached bob's queue"
        assert marked(lab1, mark) == 0, "her session's end took its marks with it"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        disconnect(lab1, "alice")
        disconnect(lab1, "bob")


def test_the_nodes_logs_are_root_s_and_the_socket_is_everyone_s(lab1: dict[str, Any]) -> None:
    """Logs written under supervisord's default umask were readable by every user of the
    client host (every user's prefixes, servers and flows)."""
    logs = lab1["logs"]["client"]
    for path in (logs["pvpn-client"], logs["supervisord"]):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is {mode:o}"
        assert sh(lab1, "client", "carol", "cat", path).returncode != 0
    sock = os.stat(lab1["client_socket"])
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o666
    proc = sh(lab1, "client", "carol", "pvpn", "status", "--socket", lab1["client_socket"])
    assert proc.returncode == 0 and b"no pvpn sessions" in proc.stdout, proc.stderr


LISTENER = r"""
import os, socket, sys
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o666)
server.listen(8)
server.settimeout(30)
print("listening", flush=True)
got = 0
for _ in range(2):
    conn, _ = server.accept()
    conn.settimeout(2)
    try:
        while data := conn.recv(65536):
            got += len(data)
    except OSError:
        pass
    conn.close()
print(got, flush=True)
"""


@contextlib.contextmanager
def listener_as(user: str) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    directory = Path(tempfile.mkdtemp(prefix="pvpnpeer"))
    directory.chmod(0o777)
    path = directory / "client.sock"
    proc = subprocess.Popen(["setpriv", "--reuid", user, "--regid", "65534", "--clear-groups",
                             "--", sys.executable, "-c", LISTENER, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"listening\n", proc.stderr
        yield path, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        shutil.rmtree(directory, ignore_errors=True)


def test_the_users_processes_trust_only_a_root_daemon(lab_usable: None) -> None:
    """`pvpn connect` handed its packets, and `pvpn status` believed the answers, of whatever
    process listened on the socket path."""
    pvpn = str(Path(sys.executable).parent / "pvpn")
    work = Path(tempfile.mkdtemp(prefix="pvpnpeerkeys"))
    try:
        subprocess.run([pvpn, "keygen", "--bits", "2048", "--key", str(work / "id")],
                       check=True, capture_output=True)
        subprocess.run([pvpn, "ca", "init", str(work / "ca")], check=True, capture_output=True)
        with listener_as("nobody") as (path, proc):
            status = subprocess.run([pvpn, "status", "--socket", str(path)],
                                    capture_output=True, text=True, timeout=30)
            assert status.returncode == 1
            assert "not root" in status.stderr and "nobody" in status.stderr, status.stderr
            vpn = subprocess.run([pvpn, "connect", "127.0.0.1:9", "--to", "10.99.0.0/16",
                                  "--key", str(work / "id"), "--ca", str(work / "ca/ca.crt"),
                                  "--socket", str(path)],
                                 capture_output=True, text=True, timeout=60)
            assert vpn.returncode == 1 and "not root" in vpn.stderr, vpn.stderr
            out, _ = proc.communicate(timeout=30)
        assert out.split()[-1] == b"0", "nothing was sent to the impostor"
    finally:
        shutil.rmtree(work, ignore_errors=True)


BOB_TUNNEL = r"""
import json, os, socket, sys
from scapy.layers.inet import IP, UDP
from pvpn.envelope import EnvelopeDecoder, MsgType, decode_control, encode_control, encode_envelope
path, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
local = socket.socket(socket.AF_UNIX)
local.connect(path)
local.settimeout(10)
decoder, seq = EnvelopeDecoder(), 0

def send(mtype, body):
    global seq
    local.sendall(encode_envelope(mtype, b"", os.getuid(), seq, body))
    seq += 1

def receive(mtype):
    while True:
        for envelope in decoder.feed(local.recv(65536)):
            if envelope.type is mtype:
                return envelope

# bob's own "tunnel process": no server anywhere, any session id
send(MsgType.REGISTER, encode_control({"prefixes": [f"{target}/32"], "server": "nowhere:9"}))
receive(MsgType.REGISTERED)
send(MsgType.ATTACH, encode_control({"session": os.urandom(16)}))
mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
mine.bind(("0.0.0.0", port))
mine.sendto(b"query", (target, 53))
sent = IP(receive(MsgType.PACKET).body)  # in bob's queue: a flow of his session
mine.close()  # the port is free for anyone now
print("ready", flush=True)
sys.stdin.readline()
forged = bytes(IP(src=sent.dst, dst=sent.src) / UDP(sport=53, dport=port) / b"FORGED BY BOB")
for _ in range(5):
    send(MsgType.PACKET, forged)
send(MsgType.STATUS, encode_control({}))
status = decode_control(receive(MsgType.STATUS_REPLY))
print(json.dumps(status["sessions"][0]["drops"]), flush=True)
send(MsgType.UNREGISTER, encode_control({"reason": "done"}))
receive(MsgType.STATUS_REPLY)
"""

ALICE_SOCKET = r"""
import socket, sys
mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
mine.bind(("0.0.0.0", int(sys.argv[1])))
mine.settimeout(4)
print("bound", flush=True)
try:
    print(mine.recvfrom(2048)[0].decode(), flush=True)
except socket.timeout:
    print("nothing", flush=True)
"""


def test_a_port_that_changed_hands_gets_nothing_from_its_last_user_s_tunnel(
        lab1: dict[str, Any]) -> None:
    """bob (no account anywhere) registers a session from his own program, sends once from
    UDP port 40123 and closes the socket; alice's program takes port 40123; bob hands back a
    "reply" for his old flow. It reached alice's socket, from an address of bob's choosing,
    though alice had no VPN at all. Now pvpn-client asks the kernel whose socket it would
    reach, and drops it (reply-not-yours)."""
    port = "40123"
    bob_argv, cwd = exec_argv(lab1["name"], "client", "bob", [
        sys.executable, "-c", BOB_TUNNEL, lab1["client_socket"], lab1["target"]["ipv4"], port])
    bob = subprocess.Popen(bob_argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    alice: subprocess.Popen[bytes] | None = None
    try:
        assert bob.stdout is not None and bob.stdin is not None
        assert bob.stdout.readline() == b"ready\n", bob.stderr.read() if bob.stderr else ""
        alice_argv, cwd = exec_argv(lab1["name"], "client", "alice",
                                    [sys.executable, "-c", ALICE_SOCKET, port])
        alice = subprocess.Popen(alice_argv, cwd=cwd, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        assert alice.stdout is not None
        assert alice.stdout.readline() == b"bound\n"
        bob.stdin.write(b"go\n")
        bob.stdin.flush()
        drops = json.loads(bob.stdout.readline())
        got = alice.stdout.readline()
        assert got == b"nothing\n", f"alice's socket got {got!r} from bob's tunnel"
        assert drops.get("reply-not-yours") == 5, drops
        assert bob.wait(timeout=20) == 0
    finally:
        for proc in (bob, alice):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        disconnect(lab1, "bob")


def test_rules_someone_else_flushes_are_put_back_within_seconds(lab1: dict[str, Any]) -> None:
    """A firewall reload (`iptables-restore` of a file with a *mangle section, `iptables -t
    mangle -F`) took every session's rules while pvpn-client and `pvpn status` said "up", and
    alice's protected traffic left in clear for good. pvpn-client now compares the kernel's
    rules with its sessions every few seconds: in steady state it finds nothing to put back
    (no false alarm from iptables-save's own spelling), after a flush it puts everything back,
    and from then on nothing of hers leaves in clear."""
    ns = lab1["hosts"]["client"]["namespace"]
    session = connect(lab1, "alice")
    try:
        assert reaches(lab1)
        time.sleep(6)  # at least one check of whole rules
        assert "removed by someone else" not in client_log(lab1)
        before = saved_rules(lab1)
        for tool in ("iptables", "ip6tables"):
            for command in (["-F"], ["-X"]):
                subprocess.run(["ip", "netns", "exec", ns, tool, "-t", "mangle", *command],
                               check=True)
        wait_until(lambda: "removed by someone else" in client_log(lab1), 15,
                   "pvpn-client noticed the flush")
        strip = re.compile(r"^#.*$|\[\d+:\d+\]", re.M)
        assert [strip.sub("", t) for t in saved_rules(lab1)] == [strip.sub("", t)
                                                                  for t in before]
        with capture(lab1) as pcap:
            assert reaches(lab1)
        assert clear_packets(pcap, lab1) == []
        assert [s["session"] for s in session_state(lab1, "alice")] == [session]
    finally:
        disconnect(lab1, "alice")


BOB_AGAINST_AGENT = r"""
import json, os, socket, sys
from pvpn import tls
from pvpn.envelope import EnvelopeDecoder, MsgType, decode_control, encode_control, encode_envelope
path, target = sys.argv[1], sys.argv[2]

def ask(*messages):
    # One connection: these envelopes, then what pvpn-client answers (None: it closed).
    local = socket.socket(socket.AF_UNIX)
    local.connect(path)
    local.settimeout(10)
    for seq, (mtype, fields) in enumerate(messages):
        local.sendall(encode_envelope(mtype, b"", os.getuid(), seq, encode_control(fields)))
    decoder = EnvelopeDecoder()
    while True:
        data = local.recv(65536)
        if not data:
            return None
        for envelope in decoder.feed(data):
            return envelope.type.name, decode_control(envelope)

chain = {"prefixes": [f"{target}/32"], "server": "10.0.0.1:4433", "hops": [["10.0.0.1", 4433]],
         "user": "alice", "client": "c", "session": os.urandom(16), "trust_name": "mine"}
out = {
    "huge": ask((MsgType.REGISTER, dict(chain, ca_pem=b"-----BEGIN CERTIFICATE-----\n"
                                        + b"A" * (tls.MAX_PEM + 1)))),
    "bad": ask((MsgType.REGISTER, dict(chain, ca_pem=b"-----BEGIN CERTIFICATE-----\nx\n"))),
    "signed": ask((MsgType.SIGNED, {"id": 1, "signature": b"s" * 256, "refused": ""})),
    "status": ask((MsgType.STATUS, {})),
}
print(json.dumps(out), flush=True)
"""


def test_bob_cannot_register_as_sign_for_or_take_alices_agent_session(
        lab1: dict[str, Any]) -> None:
    """alice's VPN up (pvpn-client holds her chain, her `pvpn connect` is its agent). bob's
    own program on the socket: a REGISTER with a PEM over the bound, one with a PEM that is
    none (each a clear refusal, nothing installed), a SIGNED out of the blue (garbage: his
    connection closes), and STATUS shows him none of alice's. Her VPN never notices."""
    with contextlib.ExitStack() as stack:
        stack.callback(disconnect, lab1, "alice")
        session = connect(lab1, "alice")
        rules_before = client_rules(lab1)
        argv, cwd = exec_argv(lab1["name"], "client", "bob", [
            sys.executable, "-c", BOB_AGAINST_AGENT, lab1["client_socket"],
            lab1["target"]["ipv4"]])
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        out = json.loads(proc.stdout)
        assert out["huge"][0] == "ERROR" and "at most" in out["huge"][1]["reason"], out
        assert out["bad"][0] == "ERROR" and "not a PEM certificate" in out["bad"][1]["reason"]
        assert out["signed"] is None, "a SIGNED from a process that holds no chain is garbage"
        assert out["status"] == ["STATUS_REPLY", {"sessions": [], "more": False}]
        def rules(text: str) -> list[str]:  # without the counters
            return sorted(line.split("]", 1)[-1] for line in text.splitlines() if "PVPNC" in line)
        assert rules(client_rules(lab1)) == rules(rules_before), "bob's refusals installed nothing"
        (mine,) = session_state(lab1, "alice")
        assert mine["session"] == session and mine["state"] == "up" and mine["user"] == "alice"
        assert reaches(lab1), "alice's VPN carries on"
