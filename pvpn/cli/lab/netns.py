"""Network namespaces and veth links of a lab, through ``ip`` and ``sysctl``."""

from __future__ import annotations

import os
import signal
import time

from pvpn.cli.lab.commands import run, succeeds
from pvpn.cli.lab.topology import Link, Topology, is_lab_namespace

# How long processes in a namespace get between SIGTERM and SIGKILL, and after SIGKILL.
TERM_GRACE = 3.0
KILL_GRACE = 3.0


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list`` prints "name (id: N)")."""
    result = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.decode().splitlines() if line.strip()]


def lab_namespaces(name: str) -> list[str]:
    return [ns for ns in list_namespaces() if is_lab_namespace(name, ns)]


def ns_exec(namespace: str, *cmd: str) -> list[str]:
    """The argument list that runs ``cmd`` inside ``namespace``."""
    return ["ip", "netns", "exec", namespace, *cmd]


def create_namespace(namespace: str) -> None:
    run(["ip", "netns", "add", namespace])
    run(["ip", "-n", namespace, "link", "set", "lo", "up"])
    # The lab's point: no host forwards, so nothing passes a host except through pvpn.
    run(ns_exec(namespace, "sysctl", "-q", "-w",
                "net.ipv4.ip_forward=0",
                "net.ipv6.conf.all.forwarding=0",
                "net.ipv6.conf.default.forwarding=0"))


def create_link(link: Link) -> None:
    """Create the veth pair of ``link`` directly inside its two namespaces and address it."""
    left_ns, right_ns = link.left.namespace, link.right.namespace
    run(["ip", "link", "add", link.left_ifname, "netns", left_ns,
         "type", "veth", "peer", "name", link.right_ifname, "netns", right_ns])
    ends = (
        (left_ns, link.left_ifname, link.left4, link.left6),
        (right_ns, link.right_ifname, link.right4, link.right6),
    )
    for namespace, ifname, addr4, addr6 in ends:
        run(["ip", "-n", namespace, "addr", "add",
             f"{addr4}/{link.subnet4.prefixlen}", "dev", ifname])
        # nodad: the address is usable at once instead of after duplicate detection.
        run(["ip", "-n", namespace, "-6", "addr", "add",
             f"{addr6}/{link.subnet6.prefixlen}", "dev", ifname, "nodad"])
        run(["ip", "-n", namespace, "link", "set", ifname, "up"])


def add_default_routes(topology: Topology) -> None:
    """Every host but the target routes by default to its right-hand neighbour."""
    for host in topology.hosts:
        link = topology.right_link(host.role)
        if link is None:
            continue
        run(["ip", "-n", host.namespace, "route", "add", "default",
             "via", str(link.right4), "dev", link.left_ifname])
        run(["ip", "-n", host.namespace, "-6", "route", "add", "default",
             "via", str(link.right6), "dev", link.left_ifname])


def build(topology: Topology) -> None:
    for host in topology.hosts:
        create_namespace(host.namespace)
    for link in topology.links:
        create_link(link)
    add_default_routes(topology)


def namespace_pids(namespace: str) -> list[int]:
    result = run(["ip", "netns", "pids", namespace], check=False)
    pids: list[int] = []
    for token in result.stdout.decode().split():
        if token.isdigit() and int(token) != os.getpid():
            pids.append(int(token))
    return pids


def kill_namespace_processes(namespace: str) -> list[int]:
    """TERM, then KILL, every process in ``namespace``; returns the pids that survived."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, KILL_GRACE)):
        pids = namespace_pids(namespace)
        if not pids:
            return []
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while namespace_pids(namespace) and time.monotonic() < deadline:
            time.sleep(0.1)
    return namespace_pids(namespace)


def delete_namespace(namespace: str) -> list[str]:
    """Kill what runs in ``namespace`` and delete it; returns warnings, never raises."""
    warnings: list[str] = []
    survivors = kill_namespace_processes(namespace)
    if survivors:
        warnings.append(f"processes still in {namespace} after SIGKILL: {survivors}")
    if not succeeds(["ip", "netns", "del", namespace]) and namespace in list_namespaces():
        warnings.append(f"could not delete namespace {namespace}")
    return warnings
