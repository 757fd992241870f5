"""Faults that must not lose data (issue 4), each measured in a real lab with the nodes under
supervisord: a gateway killed mid-download, the server killed, a link cut for 45 s,
pvpn-client killed, and 200 quick connect/disconnect cycles."""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import pytest
from vpnlib import (
    capture, clear_packets, connect, connect_argv, curl, disconnect, fetch_ok, sh, status,
)

from pvpn.lab.lab import exec_argv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab2(lab_factory: Callable[..., ContextManager[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    with lab_factory(nodes=True, gateways=2) as info:
        yield info


def supervisorctl(info: dict[str, Any], host: str, *args: str) -> str:
    conf = info["hosts"][host]["supervisord"]
    proc = subprocess.run(["ip", "netns", "exec", info["hosts"][host]["namespace"],
                           str(Path(sys.executable).parent / "supervisorctl"), "-c", conf, *args],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout


def program_pid(info: dict[str, Any], host: str, program: str) -> int:
    out = supervisorctl(info, host, "pid", program).strip()
    assert out.isdigit() and int(out) > 0, f"{program} on {host} is not running: {out!r}"
    return int(out)


def kill_and_wait_restart(info: dict[str, Any], host: str, program: str) -> float:
    """SIGKILL the program; return the seconds supervisord took to have it RUNNING again."""
    old = program_pid(info, host, program)
    subprocess.run(["kill", "-9", str(old)], check=True)
    start = time.monotonic()
    while time.monotonic() - start < 30:
        out = supervisorctl(info, host, "status", program)
        pid = supervisorctl(info, host, "pid", program).strip()
        if "RUNNING" in out and pid.isdigit() and int(pid) not in (0, old):
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"supervisord did not restart {program} on {host}: {out}")


@contextlib.contextmanager
def download(info: dict[str, Any], user: str, name: str, rate: str) -> Iterator[
        subprocess.Popen[bytes]]:
    """A slow download (one TCP connection) running during the block."""
    argv, cwd = exec_argv(info["name"], "client", user,
                          ["curl", "-sS", "--max-time", "120", "--limit-rate", rate,
                           info["files"][name]["url4"]])
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_until(check: Callable[[], bool], seconds: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"not within {seconds} s")


def test_gateway_killed_mid_download_the_same_tcp_connection_completes(
        lab2: dict[str, Any]) -> None:
    session = connect(lab2, "alice", "--keepalive", "1")
    try:
        with capture(lab2) as pcap, download(lab2, "alice", "big", "8M") as proc:
            time.sleep(3)  # well into the 64 MiB
            kill_and_wait_restart(lab2, "gw1", "pvpn-gateway")
            out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err.decode()
        assert hashlib.sha256(out).hexdigest() == lab2["files"]["big"]["sha256"]
        assert clear_packets(pcap, lab2) == [], "nothing of alice's in clear during the gap"
        server_log = Path(lab2["logs"]["server"]["pvpn-server"]).read_text()
        assert re.search(rf'"event":"session:resumed","session":"{session}"', server_log)
    finally:
        disconnect(lab2, "alice")


def test_server_killed_open_connections_intact_or_failed_new_ones_work_again(
        lab: dict[str, Any]) -> None:
    connect(lab, "alice", "--keepalive", "1")
    try:
        with download(lab, "alice", "big", "8M") as proc:
            time.sleep(2)
            kill_and_wait_restart(lab, "server", "pvpn-server")
            back = time.monotonic()
            took = wait_until(lambda: curl(lab, "alice", lab["files"]["1k"]["url4"], 3)
                              .returncode == 0, 30)
            out, err = proc.communicate(timeout=150)
        # Never corrupted: either the download failed explicitly, or it is whole.
        if proc.returncode == 0:
            assert hashlib.sha256(out).hexdigest() == lab["files"]["big"]["sha256"]
        else:
            assert err, "a failed download says why"
        assert took < 20, f"new connections took {took:.1f} s after the server came back"
        assert time.monotonic() - back < 60
        fetch_ok(lab, "alice", "100k")
    finally:
        disconnect(lab, "alice")


def test_link_cut_for_45_s_then_healed(lab: dict[str, Any]) -> None:
    server_ns = lab["hosts"]["server"]["namespace"]
    (iface,) = [i for i, m in lab["hosts"]["server"]["addresses"].items() if m["peer"] == "client"]
    cut = [["INPUT", "-i", iface, "-j", "DROP"], ["OUTPUT", "-o", iface, "-j", "DROP"]]
    log = Path(f"/tmp/pvpn-cut-{lab['name']}.log")
    log.touch()
    subprocess.run(["chown", "alice", str(log)], check=True)
    session = connect(lab, "alice", "--keepalive", "2", "--log", str(log))
    server_log = Path(lab["logs"]["server"]["pvpn-server"])
    try:
        fetch_ok(lab, "alice", "1k")
        mark = len(server_log.read_text())
        with capture(lab) as pcap:
            for rule in cut:
                for tool in ("iptables", "ip6tables"):
                    subprocess.run(["ip", "netns", "exec", server_ns, tool, "-I", *rule],
                                   check=True)
            try:
                cut_at = time.monotonic()
                wait_until(lambda: "tunnel down" in log.read_text(), 10)
                client_noticed = time.monotonic() - cut_at
                wait_until(lambda: '"event":"link:dead"' in server_log.read_text()[mark:], 25)
                server_noticed = time.monotonic() - cut_at
                assert curl(lab, "alice", lab["files"]["1k"]["url4"], 3).returncode != 0
                time.sleep(max(0.0, 45 - (time.monotonic() - cut_at)))
                # The server reaped the session it could not resume within its grace.
                assert f'"event":"session:closed","session":"{session}"' in \
                    server_log.read_text()[mark:]
            finally:
                for rule in cut:
                    for tool in ("iptables", "ip6tables"):
                        subprocess.run(["ip", "netns", "exec", server_ns, tool, "-D", *rule],
                                       check=True)
        assert clear_packets(pcap, lab) == []
        assert client_noticed <= 2 * 3 + 2, client_noticed   # dead after 3 keepalives of 2 s
        assert server_noticed <= 15 + 5 + 2, server_noticed  # lab: dead after 15 s, 5 s ticks
        # The tunnel comes back by itself once the link heals.
        wait_until(lambda: curl(lab, "alice", lab["files"]["1k"]["url4"], 3).returncode == 0, 40)
        fetch_ok(lab, "alice", "100k")
    finally:
        disconnect(lab, "alice")
        log.unlink(missing_ok=True)


def client_rules(info: dict[str, Any]) -> str:
    ns = info["hosts"]["client"]["namespace"]
    return "".join(subprocess.run(["ip", "netns", "exec", ns, tool, "-t", "mangle"],
                                  capture_output=True, text=True).stdout
                   for tool in ("iptables-save", "ip6tables-save"))


def test_pvpn_client_killed_protection_stays_tunnels_reregister(lab: dict[str, Any]) -> None:
    connect(lab, "alice")
    try:
        fetch_ok(lab, "alice", "1k")
        before = client_rules(lab)
        with capture(lab) as pcap:
            pid = program_pid(lab, "client", "pvpn-client")
            subprocess.run(["kill", "-9", str(pid)], check=True)
            # While it is gone: the rules stay, the kernel drops (no queue reader).
            assert curl(lab, "alice", lab["files"]["1k"]["url4"], 2).returncode != 0
            wait_until(lambda: "RUNNING" in supervisorctl(lab, "client", "status", "pvpn-client")
                       and program_pid(lab, "client", "pvpn-client") != pid, 30)
            wait_until(lambda: curl(lab, "alice", lab["files"]["1k"]["url4"], 3)
                       .returncode == 0, 40)
        assert clear_packets(pcap, lab) == []
        fetch_ok(lab, "alice", "100k")
        after = client_rules(lab)
        # No duplicate rules piled up: the same rule set as before the kill.
        strip = re.compile(r"^#.*$|\[\d+:\d+\]", re.M)
        assert strip.sub("", after) == strip.sub("", before)
        assert after.count("-j PVPNC-OUT") == 2  # one jump per family
        assert "up" in status(lab, "alice")
        client_log = Path(lab["logs"]["client"]["pvpn-client"]).read_text()
        assert "session:recovered" in client_log and "session:reattached" in client_log
    finally:
        disconnect(lab, "alice")


def resources(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"rules": {}}
    strip = re.compile(r"^#.*$|\[\d+:\d+\]", re.M)
    for host, program in (("client", "pvpn-client"), ("server", "pvpn-server")):
        ns = info["hosts"][host]["namespace"]
        out["rules"][host] = strip.sub("", "".join(
            subprocess.run(["ip", "netns", "exec", ns, tool], capture_output=True,
                           text=True).stdout for tool in ("iptables-save", "ip6tables-save")))
        pid = program_pid(info, host, program)
        out[f"{host}-fds"] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        out[f"{host}-threads"] = len(list(Path(f"/proc/{pid}/task").iterdir()))
        out[f"{host}-pids"] = len(subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                 text=True).stdout.split())
    return out


def test_200_quick_connect_disconnect_cycles_leave_nothing_behind(lab: dict[str, Any]) -> None:
    start = resources(lab)
    argv = connect_argv(lab, "alice", "--background")
    for cycle in range(200):
        proc = sh(lab, "client", "alice", *argv, timeout=60)
        assert proc.returncode == 0, (cycle, proc.stderr.decode())
        gone = sh(lab, "client", "alice", "pvpn", "disconnect", "--socket", lab["client_socket"])
        assert gone.returncode == 0, (cycle, gone.stdout.decode(), gone.stderr.decode())
    time.sleep(2)  # the last tunnel process exits once pvpn-client confirmed
    end = resources(lab)
    assert end == start
    with_vpn = connect(lab, "alice")  # and the VPN still works afterwards
    try:
        fetch_ok(lab, "alice", "1k")
    finally:
        disconnect(lab, "alice")
    assert with_vpn not in status(lab, "alice")
