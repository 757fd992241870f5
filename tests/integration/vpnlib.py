"""Helpers for the integration tests: run commands on lab hosts as lab users, open and
close VPNs, capture a link with tcpdump and look for what must never be there."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from pvpn.cli.lab.lab import run_as

SESSION_RE = re.compile(r"session ([0-9a-f]{32}) is up")


def sh(info: dict[str, Any], host: str, user: str, *cmd: str, timeout: float = 60,
       input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return run_as(info["name"], host, user, list(cmd), timeout=timeout, input=input)


def connect_argv(info: dict[str, Any], user: str, *extra: str) -> list[str]:
    return shlex.split(info["connect"][user]) + list(extra)


def connect(info: dict[str, Any], user: str, *extra: str) -> str:
    """`pvpn connect --background` as the user; returns the session id it printed."""
    proc = sh(info, "client", user, *connect_argv(info, user, "--background", *extra))
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    match = SESSION_RE.search(out)
    assert match, out
    return match[1]


def disconnect(info: dict[str, Any], user: str) -> None:
    sh(info, "client", user, "pvpn", "disconnect", "--socket", info["client_socket"])


@contextlib.contextmanager
def vpn(info: dict[str, Any], user: str, *extra: str) -> Iterator[str]:
    session = connect(info, user, *extra)
    try:
        yield session
    finally:
        disconnect(info, user)


def curl(info: dict[str, Any], user: str, url: str, timeout: float = 10,
         host: str = "client", *extra: str) -> subprocess.CompletedProcess[bytes]:
    return sh(info, host, user, "curl", "-sS", "--max-time", str(timeout), *extra, url,
              timeout=timeout + 10)


def fetch_ok(info: dict[str, Any], user: str, name: str, family: str = "url4") -> None:
    meta = info["files"][name]
    proc = curl(info, user, meta[family], 60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout) == meta["size"]
    assert hashlib.sha256(proc.stdout).hexdigest() == meta["sha256"]


def client_iface(info: dict[str, Any]) -> str:
    (iface,) = info["hosts"]["client"]["addresses"]
    return str(iface)


def target_networks(info: dict[str, Any]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(s) for s in info["target"]["subnets"]]


@contextlib.contextmanager
def capture(info: dict[str, Any], host: str = "client",
            iface: str | None = None) -> Iterator[Path]:
    """tcpdump on a lab link for the duration of the block; yields the pcap path."""
    import select

    iface = iface or client_iface(info)
    directory = Path(tempfile.mkdtemp(prefix="pvpncap"))
    pcap = directory / "wire.pcap"
    ns = info["hosts"][host]["namespace"]
    # -Z root: keep writing as root into our private directory (tcpdump would otherwise
    # switch to its own user before opening the file). --immediate-mode: hand over every
    # packet at once; buffered ring blocks still waiting at SIGINT would be lost.
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-Z", "root",
                             "--immediate-mode", "-i", iface, "-n", "-U", "-s", "0",
                             "-w", str(pcap)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        # tcpdump says "listening on IFACE" once it captures; wait for that (bounded).
        ready, _, _ = select.select([proc.stderr], [], [], 10)
        line = proc.stderr.readline().decode() if ready else ""
        if "listening on" not in line:
            raise AssertionError(f"tcpdump on {host}/{iface} did not start: {line!r}")
        yield pcap
    finally:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def clear_packets(pcap: Path, info: dict[str, Any]) -> list[str]:
    """Packets on the wire to or from the protected target networks, in clear."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    nets = target_networks(info)
    leaks = []
    for pkt in rdpcap(str(pcap)):
        layer = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        if layer is None:
            continue
        for addr in (layer.src, layer.dst):
            if any(ipaddress.ip_address(addr) in n for n in nets):
                leaks.append(pkt.summary())
                break
    return leaks


def udp_echo(info: dict[str, Any], user: str, address: str, payload: str,
             timeout: float = 5) -> subprocess.CompletedProcess[bytes]:
    family = "UDP6" if ":" in address else "UDP4"
    target = f"[{address}]" if ":" in address else address
    return sh(info, "client", user, "socat", "-T", str(timeout), "-",
              f"{family}:{target}:{info['ports']['udp_echo']}",
              input=payload.encode(), timeout=timeout + 10)


def client_rules(info: dict[str, Any]) -> str:
    ns = info["hosts"]["client"]["namespace"]
    out = ""
    for tool in ("iptables-save", "ip6tables-save"):
        out += subprocess.run(["ip", "netns", "exec", ns, tool, "-t", "mangle", "-c"],
                              capture_output=True, text=True, check=True).stdout
    return out


def status(info: dict[str, Any], user: str) -> str:
    proc = sh(info, "client", user, "pvpn", "status", "--socket", info["client_socket"])
    return proc.stdout.decode() + proc.stderr.decode()


def tunnel_pids(info: dict[str, Any], user: str) -> list[int]:
    """The user's `pvpn connect` processes of *this* lab only (users are shared between labs,
    so match the lab's own client socket on the command line)."""
    uid = info["users"][user]["uid"]
    pattern = f"pvpn connect .*--socket {re.escape(info['client_socket'])}"
    out = subprocess.run(["pgrep", "-u", str(uid), "-f", pattern],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alice_packets_out(info: dict[str, Any], session: str) -> int:
    proc = sh(info, "client", "alice", "pvpn", "status", "--json", "--socket",
              info["client_socket"])
    (mine,) = [s for s in json.loads(proc.stdout) if s["session"] == session]
    return int(mine["packets_out"])

