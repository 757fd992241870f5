"""Every packet an application sends gets through (issue 10, section 1): IP datagrams larger
than the link MTU, up to the largest there are, both ways through alice's VPN, byte-exact;
ping of every size; path MTU discovery through the tunnel; a fragment flood at the server
costs the kernel's bounded reassembly memory, not pvpn-server's.

One lab for the module; each test sends many sizes through one connection."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from vpnlib import sh, vpn

pytestmark = pytest.mark.integration

# Around every boundary: the link (1472/1473 over IPv4), NetfilterQueue's old 4 KB buffer
# (4016/4017), socat's 8 KB, the largest a queue message carries (65,531 bytes: UDP payload
# 65,503 over IPv4, 65,483 over IPv6), and the largest datagram there is.
SIZES4 = [1, 2, 100, 548, 1000, 1400, 1472, 1473, 1500, 2000, 3000, 4016, 4017, 8000, 8192,
          8193, 16384, 30000, 32768, 60000, 65000, 65503, 65504, 65507]
SIZES6 = [1, 2, 100, 548, 1000, 1232, 1280, 1452, 1453, 2000, 3000, 4016, 4017, 8000, 8192,
          8193, 16384, 30000, 32768, 60000, 65000, 65483, 65484, 65527]

ECHO = r"""
import json, os, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.connect((sys.argv[1], int(sys.argv[2])))
sock.settimeout(3)
failed = []
for size in (int(s) for s in sys.argv[3].split(",")):
    data = os.urandom(size)
    for attempt in range(2):  # UDP: one retry before a size counts as failed
        sock.send(data)
        try:
            while sock.recv(70000) != data:
                pass  # a late echo of an earlier datagram
            break
        except socket.timeout:
            continue
    else:
        failed.append(size)
print(json.dumps(failed))
"""


@pytest.fixture(scope="module")
def alice(lab: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """alice's VPN, up for the whole module."""
    with vpn(lab, "alice"):
        yield lab


def test_udp_echoes_of_every_size_come_back_byte_exact(alice: dict[str, Any]) -> None:
    for address, sizes in ((alice["target"]["ipv4"], SIZES4), (alice["target"]["ipv6"], SIZES6)):
        run = sh(alice, "client", "alice", "python3", "-c", ECHO, address,
                 str(alice["ports"]["udp_echo"]), ",".join(map(str, sizes)), timeout=120)
        assert run.returncode == 0, run.stderr.decode()
        assert json.loads(run.stdout) == [], f"no byte-exact echo through the VPN ({address})"


BIND_TO = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
try:
    sock.sendto(b"b" * 65000, (sys.argv[2], 7))
except PermissionError:
    print("refused")
"""


def test_another_users_socket_cannot_send_out_of_alices_tun_device(alice: dict[str, Any]) -> None:
    """pvpn-client reads what leaves a session's TUN device as the session's datagrams (the
    kernel's copies of those too large for the queue): bob binding his socket to alice's
    device (SO_BINDTODEVICE needs no privilege) is refused there, not carried."""
    status = sh(alice, "client", "alice", "pvpn", "status", "--json", "--socket",
                alice["client_socket"])
    (session,) = json.loads(status.stdout)
    run = sh(alice, "client", "bob", "python3", "-c", BIND_TO, session["tun"],
             alice["target"]["ipv4"])
    assert run.stdout.decode().strip() == "refused", run.stderr.decode()


def test_ping_of_every_size(alice: dict[str, Any]) -> None:
    for address, sizes in ((alice["target"]["ipv4"], (64, 1472, 3000, 8972, 65000, 65507)),
                           (alice["target"]["ipv6"], (64, 1452, 3000, 8972, 65000, 65527))):
        for size in sizes:
            ping = sh(alice, "client", "alice", "ping", "-c", "1", "-W", "3", "-s", str(size),
                      address, timeout=20)
            assert ping.returncode == 0, (address, size, ping.stdout.decode()[-300:])


# ---------------------------------------------------------------- path MTU discovery

PMTU = r"""
import json, select, socket, struct, sys
# linux/in.h, in6.h, errqueue.h
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_RECVERR, IP_MTU = 10, 2, 11, 14
IPV6_RECVERR, IPV6_DONTFRAG, IPV6_MTU = 25, 62, 24
out = {}
for address in sys.argv[1:3]:
    v6 = ":" in address
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    sock.connect((address, int(sys.argv[3])))
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    error = None
    for attempt in range(2):  # as an application would: a lost datagram is sent again
        sock.send(b"x" * 1400)  # fits the client's own link, not the target's
        if poller.poll(2000):
            _, ancillary, _, _ = sock.recvmsg(2048, 1024, socket.MSG_ERRQUEUE)
            for _, _, data in ancillary:
                errno, origin, kind, code, info = struct.unpack_from("=IBBBxI", data)
                error = [errno, origin, kind, code, info]
            break
    mtu = sock.getsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP,
                          IPV6_MTU if v6 else IP_MTU)
    out[address] = {"error": error, "mtu": mtu}
print(json.dumps(out))
"""


def ns_run(info: dict[str, Any], host: str, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", info["hosts"][host]["namespace"], *cmd],
                   check=True, capture_output=True, timeout=30)


def target_link(info: dict[str, Any]) -> tuple[str, str, str, str]:
    """The server's and the target's interface on their link, and its two subnets."""
    (server_if,) = [name for name, a in info["hosts"]["server"]["addresses"].items()
                    if a["peer"] == "target"]
    (target_if,) = info["hosts"]["target"]["addresses"]
    subnet4, subnet6 = info["target"]["subnets"]
    return server_if, target_if, subnet4, subnet6


def set_target_link(info: dict[str, Any], mtu: int, advmss: bool) -> None:
    """The link between server and target at ``mtu``; with ``advmss`` the target announces
    the MSS of a 1500-byte link anyway (its 1280-byte hop is somewhere on its path, not its
    own interface), so the client's TCP finds the path MTU by discovery, not by the MSS."""
    server_if, target_if, subnet4, subnet6 = target_link(info)
    ns_run(info, "server", "ip", "link", "set", server_if, "mtu", str(mtu))
    ns_run(info, "target", "ip", "link", "set", target_if, "mtu", str(mtu))
    extra4 = ["advmss", "1460"] if advmss else []
    extra6 = ["advmss", "1440"] if advmss else []
    ns_run(info, "target", "ip", "route", "replace", subnet4, "dev", target_if, "proto",
           "kernel", "scope", "link", "src", info["target"]["ipv4"], *extra4)
    ns_run(info, "target", "ip", "-6", "route", "replace", subnet6, "dev", target_if, "proto",
           "kernel", *extra6)


def test_path_mtu_discovery_through_the_tunnel(alice: dict[str, Any]) -> None:
    """A target behind a 1,280-byte link: TCP both ways completes (the client's segments of
    1,500 bytes meet the link at the server, whose ICMP error makes the client's TCP send
    smaller ones), and a UDP send with DF gets its error back to the sending socket."""
    target4, target6 = alice["target"]["ipv4"], alice["target"]["ipv6"]
    set_target_link(alice, 1280, advmss=True)
    try:
        # First, while the client's kernel still takes its own link's MTU for the path.
        run = sh(alice, "client", "alice", "python3", "-c", PMTU, target4, target6,
                 str(alice["ports"]["udp_echo"]))
        assert run.returncode == 0, run.stderr.decode()
        got = json.loads(run.stdout)
        # EMSGSIZE from the ICMP (origin 2) fragmentation needed (3/4), next hop MTU 1280;
        # from the ICMPv6 (origin 3) Packet Too Big (2/0), MTU 1280; the socket's path MTU.
        assert got[target4] == {"error": [90, 2, 3, 4, 1280], "mtu": 1280}, got
        assert got[target6] == {"error": [90, 3, 2, 0, 1280], "mtu": 1280}, got
        forget_path_mtus(alice)
        for address in (target4, target6):
            for direction in ([], ["-R"]):
                perf = sh(alice, "client", "alice", "iperf3", "-c", address, "-n", "1M",
                          "--connect-timeout", "3000", *direction, timeout=30)
                assert perf.returncode == 0, (address, direction,
                                              perf.stdout.decode()[-400:])
    finally:
        set_target_link(alice, 1500, advmss=False)
        forget_path_mtus(alice)


def forget_path_mtus(info: dict[str, Any]) -> None:
    """What the client's kernel learned of the path (its route exceptions) goes."""
    for family in ("-4", "-6"):
        ns_run(info, "client", "ip", family, "route", "flush", "cache")


# ---------------------------------------------------------------- a fragment flood

FLOOD = r"""
import os, socket, struct, sys
dst4, dst6, src4, src6, port, count = sys.argv[1:7]
port, count = int(port), int(count)
data = os.urandom(1000)
udp = struct.pack("!HHHH", 40000, port, 60008, 0)  # claims a 60,000-byte datagram
s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
a4, b4 = socket.inet_aton(src4), socket.inet_aton(dst4)
a6, b6 = socket.inet_pton(socket.AF_INET6, src6), socket.inet_pton(socket.AF_INET6, dst6)
for i in range(1, count + 1):  # first fragments that no other fragment ever completes
    s4.sendto(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1028, i, 0x2000, 64, 17, 0, a4, b4)
              + udp + data, (dst4, 0))
    s6.sendto(struct.pack("!IHBB16s16s", 0x60000000, 1016, 44, 64, a6, b6)
              + struct.pack("!BxHI", 17, 1, i) + udp + data, (dst6, 0))
"""


FLOOD_EXPIRES = 4  # s, long enough to look at the kernel's reassembly memory on a busy machine


def server_rss(info: dict[str, Any]) -> int:
    """pvpn-server's resident memory, kB."""
    ns = info["hosts"]["server"]["namespace"]
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            if b"pvpn-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                status = Path(f"/proc/{pid}/status").read_text()
                return int(status.split("VmRSS:")[1].split()[0])
        except (OSError, IndexError):
            continue
    raise AssertionError("no pvpn-server in the server's namespace")


def sysctl(info: dict[str, Any], host: str, key: str, value: str | None = None) -> str:
    ns = info["hosts"][host]["namespace"]
    args = ["-w", f"{key}={value}"] if value is not None else ["-n", key]
    return subprocess.run(["ip", "netns", "exec", ns, "sysctl", *args], capture_output=True,
                          text=True, check=True, timeout=10).stdout.strip()


def test_a_fragment_flood_at_the_server_leaves_its_memory_bounded(alice: dict[str, Any]) -> None:
    """20,000 first fragments (IPv4 and IPv6, to the NAT ports) that never complete: the
    server's kernel holds them in its own reassembly queues, within their limits (4 MB per
    namespace), and pvpn-server never sees one; once they expire, large datagrams pass."""
    server_if, _, _, _ = target_link(alice)
    nat = alice["hosts"]["server"]["addresses"][server_if]
    timeouts = {"net.ipv4.ipfrag_time": "", "net.netfilter.nf_conntrack_frag6_timeout": ""}
    for key in timeouts:  # incomplete datagrams expire in 4 s instead of 30 and 60
        timeouts[key] = sysctl(alice, "server", key)
        sysctl(alice, "server", key, str(FLOOD_EXPIRES))
    try:
        before = server_rss(alice)
        flood = subprocess.run(
            ["ip", "netns", "exec", alice["hosts"]["target"]["namespace"], "python3", "-c",
             FLOOD, nat["ipv4"].split("/")[0], nat["ipv6"].split("/")[0],
             alice["target"]["ipv4"], alice["target"]["ipv6"], "61000", "10000"],
            capture_output=True, timeout=60)
        assert flood.returncode == 0, flood.stderr.decode()
        held = subprocess.run(["ip", "netns", "exec", alice["hosts"]["server"]["namespace"],
                               "cat", "/proc/net/sockstat"], capture_output=True, text=True,
                              check=True).stdout
        frag_memory = int(held.split("FRAG:")[1].split()[3])
        # At the kernel's limit, give or take the fragment that crossed it (it checks first).
        limit = int(sysctl(alice, "server", "net.ipv4.ipfrag_high_thresh"))
        assert limit // 2 < frag_memory <= limit + 65536, (frag_memory, limit)
        assert server_rss(alice) - before < 4096, "pvpn-server grew with the flood"
        time.sleep(FLOOD_EXPIRES + 0.5)  # the flood's queues expire
        run = sh(alice, "client", "alice", "python3", "-c", ECHO, alice["target"]["ipv4"],
                 str(alice["ports"]["udp_echo"]), "60000,65507", timeout=60)
        assert json.loads(run.stdout) == []
        run = sh(alice, "client", "alice", "python3", "-c", ECHO, alice["target"]["ipv6"],
                 str(alice["ports"]["udp_echo"]), "60000,65527", timeout=60)
        assert json.loads(run.stdout) == []
    finally:
        for key, value in timeouts.items():
            if value:
                sysctl(alice, "server", key, value)
