"""pvpn-server with ``workers = 2`` in a real lab (one gateway) under supervisord: both
workers serve sessions, a resume that reaches the other worker is routed to the session's
own and resumes, a killed worker comes back (its parent starts it again, its sessions
restored from its own state file) with the rules as they were, so does a killed parent
(supervisord's), and a stop leaves the host as it was found."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import pytest
from vpnlib import connect, disconnect, fetch_ok, sh

from pvpn.cli.main import ask_daemon
from pvpn.config import load_server_config
from pvpn.envelope import MsgType
from pvpn.errors import PvpnError
from pvpn.workers import worker_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wlab(lab_factory: Callable[..., ContextManager[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    with lab_factory(nodes=True, gateways=1) as info:
        config = Path(info["configs"]["server"])
        text = config.read_text()
        config.write_text(text.replace("[server]\n", "[server]\nworkers = 2\n", 1))
        supervisorctl(info, "restart", "pvpn-server")
        wait_for(lambda: len(worker_pids(info)) == 2 and all(
            answers(info, i) for i in range(2)), 20, "two workers serving")
        yield info


def supervisorctl(info: dict[str, Any], *args: str) -> str:
    host = info["hosts"]["server"]
    proc = subprocess.run(["ip", "netns", "exec", host["namespace"],
                           str(Path(sys.executable).parent / "supervisorctl"), "-c",
                           host["supervisord"], *args], capture_output=True, text=True,
                          timeout=60)
    return proc.stdout


def parent_pid(info: dict[str, Any]) -> int:
    out = supervisorctl(info, "pid", "pvpn-server").strip()
    return int(out) if out.isdigit() else 0


def worker_pids(info: dict[str, Any]) -> list[int]:
    parent = parent_pid(info)
    if not parent:
        return []
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever inherited it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def controls(info: dict[str, Any]) -> list[Path]:
    control = load_server_config(Path(info["configs"]["server"])).control
    return [worker_path(control, i) for i in range(2)]


def answers(info: dict[str, Any], worker: int) -> bool:
    try:
        sessions(info, worker)
    except Exception:  # noqa: BLE001 - not serving yet
        return False
    return True


def sessions(info: dict[str, Any], worker: int, every: bool = False) -> list[str]:
    """The sessions up at ``worker`` (``every``: detached ones too)."""
    mtype, reply = ask_daemon(controls(info)[worker], MsgType.STATUS, {})
    assert mtype is not MsgType.ERROR, reply
    return [s["session"] for s in reply.get("sessions", [])
            if every or s.get("state") == "up"]


def owner(info: dict[str, Any], session: str) -> int | None:
    """The worker whose session it is and up, or None (also while a worker starts)."""
    for worker in range(2):
        try:
            if session in sessions(info, worker):
                return worker
        except (PvpnError, OSError):
            continue
    return None


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s: {what}")


def server_rules(info: dict[str, Any]) -> list[str]:
    ns = info["hosts"]["server"]["namespace"]
    lines: list[str] = []
    for tool in ("iptables-save", "ip6tables-save"):
        out = subprocess.run(["ip", "netns", "exec", ns, tool, "-t", "mangle"],
                             capture_output=True, text=True, timeout=30).stdout
        lines += [line for line in out.splitlines() if "PVPNS" in line]
    return lines


def server_log(info: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for line in Path(info["logs"]["server"]["pvpn-server"]).read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


# A UDP datagram to a port nobody listens on: the ICMP port unreachable comes back to the
# user's socket as ECONNREFUSED.
CLOSED_PORT = """
import socket, sys
address = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((address, 9))
for _ in range(3):
    s.send(b"x")
    try:
        s.recv(10)
    except ConnectionRefusedError:
        print("refused")
        break
    except socket.timeout:
        pass
"""


def forwarded_by_worker(info: dict[str, Any]) -> list[int]:
    """Each worker's count of the IPv4 super-packets its kernel forwarded whole
    (firewall.forward_count: one rule per worker, in the workers' order)."""
    out = subprocess.run(["ip", "netns", "exec", info["hosts"]["server"]["namespace"],
                          "iptables-save", "-t", "mangle", "-c"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [int(line[1:].split(":")[0]) for line in out.splitlines()
            if "super-packets forwarded" in line]


def cut_links(info: dict[str, Any]) -> None:
    """Abort the client host's connections to the first hop (SOCK_DESTROY, a reset)."""
    subprocess.run(["ip", "netns", "exec", info["hosts"]["client"]["namespace"], "ss", "-K",
                    "-t", "dport", "=", "4433"], capture_output=True, timeout=30, check=True)


def test_two_workers_share_users_resume_across_workers_and_survive_a_kill(
        wlab: dict[str, Any]) -> None:
    rules = server_rules(wlab)
    assert any("--queue-num 4000" in r for r in rules) and any("--queue-num 4001" in r
                                                               for r in rules), rules
    seen: set[int] = set()
    try:
        # Several users at once; sessions land on both workers (the kernel's hash spreads
        # connections; bounded tries).
        for _ in range(12):
            alice, bob = connect(wlab, "alice"), connect(wlab, "bob")
            fetch_ok(wlab, "alice", "10k")
            fetch_ok(wlab, "bob", "10k")
            seen |= {owner(wlab, alice), owner(wlab, bob)} - {None}
            if seen == {0, 1}:
                break
            disconnect(wlab, "alice")
            disconnect(wlab, "bob")
        assert seen == {0, 1}, "both workers serve sessions"
        # Each user's bulk upload goes whole to the kernel's forwarding from the worker that
        # holds the session, counted by that worker's own rule (its slice of NAT ports).
        for user, session in (("alice", alice), ("bob", bob)):
            worker = owner(wlab, session)
            assert worker is not None
            before = forwarded_by_worker(wlab)
            iperf = sh(wlab, "client", user, "iperf3", "-c", wlab["target"]["ipv4"], "-t", "1",
                       timeout=60)
            assert iperf.returncode == 0, iperf.stdout.decode()[-2000:]
            after = forwarded_by_worker(wlab)
            assert after[worker] - before[worker] > 10, (user, worker, before, after)
        # Each worker's ICMP: echo replies by identifier (the largest by its own TUN
        # device), errors by the port of the packet they quote.
        for user in ("alice", "bob"):
            for address in (wlab["target"]["ipv4"], wlab["target"]["ipv6"]):
                for size in ("56", "65000"):
                    ping = sh(wlab, "client", user, "ping", "-c", "1", "-W", "3", "-s", size,
                              address, timeout=20)
                    assert ping.returncode == 0, (user, address, size, ping.stdout.decode())
                refused = sh(wlab, "client", user, "python3", "-c", CLOSED_PORT, address)
                assert refused.stdout.decode().strip() == "refused", (user, address, refused)
        disconnect(wlab, "bob")

        # A link cut: the reconnect reaches either worker; one that reaches the other is
        # routed to the session's own, and every cut resumes the same session.
        home = owner(wlab, alice)
        assert home is not None
        handed, start = 0, len(server_log(wlab))
        for cut in range(10):
            before = len(server_log(wlab))
            cut_links(wlab)
            wait_for(lambda: any(r.get("event") == "session:resumed" and
                                 r.get("session") == alice for r in server_log(wlab)[before:]),
                     20, f"cut {cut + 1}: session {alice} resumed")
            assert owner(wlab, alice) == home, "the session never moves"
            fetch_ok(wlab, "alice", "10k")
            if any(r.get("event") == "link:closed" and "handed to worker" in r.get("reason", "")
                   for r in server_log(wlab)[before:]):
                handed += 1
                break
        assert handed, "within 10 cuts one reconnect reached the other worker"
        assert not any(r.get("event") == "session:opened" and r.get("session") == alice
                       for r in server_log(wlab)[start:]), "no resume became a new session"

        # One worker killed: its parent starts it again, its sessions come back from its own
        # state file and resume; the rules are the same throughout.
        pids = worker_pids(wlab)
        victim = pids[home]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(wlab)) == 2 and victim not in worker_pids(wlab), 15,
                 "the killed worker started again")
        assert sorted(server_rules(wlab)) == sorted(rules), "no rule leaked or lost"
        wait_for(lambda: owner(wlab, alice) is not None, 30, "alice's session resumed")
        fetch_ok(wlab, "alice", "10k")

        # The parent killed: its workers go with it, supervisord starts it again, and the
        # new workers restore and resume the session (saved every 2 s) with the same rules.
        old_parent, old_workers = parent_pid(wlab), worker_pids(wlab)
        time.sleep(2.5)  # the last save of the restarted worker
        os.kill(old_parent, signal.SIGKILL)
        wait_for(lambda: parent_pid(wlab) not in (0, old_parent) and len(worker_pids(wlab)) == 2,
                 20, "a new parent with two workers")
        assert not any(alive(pid) for pid in old_workers), "the old workers died with their parent"
        assert sorted(server_rules(wlab)) == sorted(rules)
        wait_for(lambda: owner(wlab, alice) is not None, 30, "alice's session resumed again")
        fetch_ok(wlab, "alice", "10k")
    finally:
        disconnect(wlab, "alice")
        disconnect(wlab, "bob")
    # Stopped with no session to keep: the host as it was found.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(sessions(wlab, w, every=True) for w in range(2)):
        time.sleep(0.2)
    left = [(w, sessions(wlab, w, every=True)) for w in range(2)]
    assert not any(found for _, found in left), (left, [
        (r.get("event"), r.get("session"), r.get("reason")) for r in server_log(wlab)
        if str(r.get("event", "")).startswith("session:")][-30:])
    supervisorctl(wlab, "stop", "pvpn-server")
    # (a string, which pytest shows whole: the node records of the parent and its workers)
    assert server_rules(wlab) == [], "the parent removed every rule; the last records:\n" + \
        "\n".join(json.dumps(r) for r in server_log(wlab)
                  if str(r.get("event", "")).startswith("node:"))[-4000:] + "\n" + \
        supervisorctl(wlab, "status")
    state = load_server_config(Path(wlab["configs"]["server"])).state_file
    assert state is not None
    assert not any(worker_path(state, i).exists() for i in range(2)), "no state left"


def server_by_hand(wlab: dict[str, Any], workers: int) -> list[str]:
    """supervisord's pvpn-server stopped, its rules gone: the command that runs it by hand,
    with ``workers`` workers (1: one process)."""
    supervisorctl(wlab, "stop", "pvpn-server")
    wait_for(lambda: not server_rules(wlab), 20, "no pvpn-server rules before the test")
    config = Path(wlab["configs"]["server"])
    if workers == 1:
        one = config.with_name("server-one-process.toml")
        one.write_text(config.read_text().replace("workers = 2\n", "", 1))
        config = one
    return ["ip", "netns", "exec", wlab["hosts"]["server"]["namespace"],
            str(Path(sys.executable).parent / "pvpn-server"), "--config", str(config)]


@pytest.mark.parametrize("workers", [2, 1])
def test_a_sigterm_while_the_workers_start_still_removes_every_rule(
        wlab: dict[str, Any], workers: int) -> None:
    """supervisord stopping a server it has just started (or restarted): the SIGTERM comes
    while it starts (the parent: its workers; one process: its state, its listeners). The
    handler was installed only after that, so Python's default action ended it there and
    every rule stayed (seen once in CI)."""
    argv = server_by_hand(wlab, workers)
    for attempt in range(3):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not server_rules(wlab) and proc.poll() is None and \
                    time.monotonic() < deadline:
                pass  # as soon as the rules are there: the workers are being started
            assert server_rules(wlab), f"attempt {attempt + 1}: the parent made no rules"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert server_rules(wlab) == [], f"attempt {attempt + 1}: the rules stayed"


CHECKOUT = Path(__file__).resolve().parents[2]  # holds a pvpn/ of its own


@pytest.mark.parametrize("workers", [2, 1])
def test_a_sighup_while_the_server_starts_reloads_it_once_it_serves_and_never_ends_it(
        wlab: dict[str, Any], workers: int, tmp_path: Path) -> None:
    """An administrator's reload right after a restart: the SIGHUP came while the server
    started, before its handler, and its default action ended the server (the parent, or a
    worker still importing), rules and all. Started in a source checkout, whose pvpn/ the
    workers' `python -m` imported instead of the installed one: none could start."""
    argv = server_by_hand(wlab, workers)
    out = tmp_path / "server.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=CHECKOUT)

    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in out.read_text().splitlines()
                if line.startswith("{")]

    def started() -> int:
        return sum(r.get("event") == "node:started" for r in records())
    try:
        deadline = time.monotonic() + 15
        while not server_rules(wlab) and proc.poll() is None and time.monotonic() < deadline:
            pass  # as soon as the rules are there: it is starting
        assert server_rules(wlab), "the server made no rules"
        proc.send_signal(signal.SIGHUP)
        # Every process serves (the parent and each worker say so), none ended.
        wait_for(lambda: proc.poll() is not None or started() >= (1 if workers == 1 else 3),
                 20, "the server and its workers started")
        time.sleep(1.5)  # a worker that ended would be said by now
        assert proc.poll() is None, ("the SIGHUP ended the server", out.read_text()[-3000:])
        assert started() == (1 if workers == 1 else 3), out.read_text()[-3000:]
        assert not any("ended" in r.get("reason", "") for r in records()), out.read_text()[-3000:]
        if workers == 1:  # held while it started, the reload runs once it serves
            wait_for(lambda: any(r.get("event") == "node:reloaded" for r in records()), 10,
                     "the held reload")
    finally:
        stop_by_hand(proc)
    assert server_rules(wlab) == [], "the rules went with the stop"


def stop_by_hand(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (its clean-up), SIGKILL only if it does not end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


HOLD_QUEUE = """
import sys, time
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda p: p.drop())
print("bound", flush=True)
time.sleep(120)
"""


def test_a_worker_that_cannot_start_stops_the_server_with_its_reason_and_no_rule_left(
        wlab: dict[str, Any], tmp_path: Path) -> None:
    """Worker 1's queue held by another process: it fails at each start. It was started again
    each second for ever, its share of the new connections waiting in its socket unserved."""
    argv = server_by_hand(wlab, 2)
    ns = wlab["hosts"]["server"]["namespace"]
    holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", HOLD_QUEUE,
                               "4001"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"bound"
        out = tmp_path / "server.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=40)
        finally:
            stop_by_hand(proc)
        text = out.read_text()
        assert proc.returncode == 1, (proc.returncode, text[-3000:])
        assert "worker 1 ended 3 times in a row before it served" in text and "NFQUEUE 4001" in text, \
            text[-3000:]
        assert server_rules(wlab) == [], "the rules went with the stop"
    finally:
        holder.kill()
        holder.wait()
