"""Firewall rules as data: the iptables-restore text each node installs and removes.

Every rule lives in chains named after the node's instance, so cleanup can always find them
(sshuttle's lesson), and everything goes through :func:`pvpn.io.rules.apply` in one
``iptables-restore --noflush`` call, so a rule set is installed whole or not at all.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from pvpn.config import Network

TABLE = "mangle"
ANY_UID = "0-4294967294"  # every uid but the invalid (u32)-1


def chain_prefix(instance: str) -> str:
    return instance.upper()


@dataclass(frozen=True, slots=True)
class RuleSet:
    """iptables-restore text for IPv4 and IPv6 (either may be empty)."""

    v4: str
    v6: str


def _restore(lines: Sequence[str]) -> str:
    return "" if not lines else "\n".join([f"*{TABLE}", *lines, "COMMIT", ""])


def _split(networks: Iterable[Network]) -> tuple[list[Network], list[Network]]:
    nets = list(networks)
    return [n for n in nets if n.version == 4], [n for n in nets if n.version == 6]


# ---------------------------------------------------------------- client host


def client_base(instance: str) -> RuleSet:
    """The instance's two hook chains: OUT (from OUTPUT) and IN (from PREROUTING)."""
    p = chain_prefix(instance)
    lines = [
        f":{p}-OUT - [0:0]",
        f":{p}-IN - [0:0]",
        f"-I OUTPUT 1 -j {p}-OUT",
        f"-I PREROUTING 1 -j {p}-IN",
    ]
    return RuleSet(_restore(lines), _restore(lines))


def session_chains(instance: str, slot: int) -> tuple[str, str]:
    """The session's outbound chain (feeds its queue) and inbound chain (marks its flows)."""
    p = chain_prefix(instance)
    return f"{p}-S{slot}", f"{p}-S{slot}I"


def client_session(
    instance: str, slot: int, uid: int, networks: Sequence[Network], queue: int,
    mark: int, mask: int, tun: str,
) -> RuleSet:
    """Rules that feed one user's session queue.

    * Packets the kernel says ``uid`` sent (owner match) to a protected prefix go to the queue.
    * Packets that no user owns (TIME_WAIT ACKs, RSTs and ICMP errors the kernel sends from
      its own sockets, FINs of orphaned sockets) of flows whose replies came in through this
      session's TUN device carry its connection mark and go to the same queue, so they never
      leave in clear. ``! --uid-owner 0-4294967294`` is "no socket opened by any user":
      ``! --socket-exists`` would miss the kernel's own sockets, which exist but have no file.
      A packet owned by another user never matches, even on a marked connection: nobody can
      reach this queue by sharing a port.
    * No ``--queue-bypass``: with nobody reading the queue the kernel drops (fail closed).
    """
    p = chain_prefix(instance)
    out_chain, in_chain = session_chains(instance, slot)
    result: list[list[str]] = [[], []]
    for version, nets in enumerate(_split(networks)):
        lines = result[version]
        lines += [f":{out_chain} - [0:0]", f":{in_chain} - [0:0]"]
        for net in nets:
            lines.append(f"-A {out_chain} -d {net} -m owner --uid-owner {uid} "
                         f"-j NFQUEUE --queue-num {queue}")
            lines.append(f"-A {out_chain} -d {net} -m owner ! --uid-owner {ANY_UID} "
                         f"-m connmark --mark {mark:#x}/{mask:#x} -j NFQUEUE --queue-num {queue}")
        lines.append(f"-A {in_chain} -j CONNMARK --set-xmark {mark:#x}/{mask:#x}")
        lines.append(f"-A {p}-OUT -j {out_chain}")
        lines.append(f"-A {p}-IN -i {tun} -j {in_chain}")
    return RuleSet(_restore(result[0]), _restore(result[1]))


def client_session_removal(instance: str, slot: int, tun: str) -> list[list[str]]:
    """iptables arguments (each run on its own, for both families) that undo one session."""
    p = chain_prefix(instance)
    out_chain, in_chain = session_chains(instance, slot)
    return [
        ["-D", f"{p}-OUT", "-j", out_chain],
        ["-D", f"{p}-IN", "-i", tun, "-j", in_chain],
        ["-F", out_chain], ["-X", out_chain],
        ["-F", in_chain], ["-X", in_chain],
    ]


# ---------------------------------------------------------------- server host


def server_rules(instance: str, queue: int, ports: tuple[int, int]) -> RuleSet:
    """Capture replies to the NAT port range (and ICMP that may answer a NAT flow).

    Only packets addressed to this host (addrtype LOCAL) are queued; ICMP that turns out not
    to be ours is accepted again by the server, so the host's own pings keep working.
    """
    p = chain_prefix(instance)
    low, high = ports
    common = [f":{p}-IN - [0:0]", f"-I PREROUTING 1 -m addrtype --dst-type LOCAL -j {p}-IN"]
    q = f"-j NFQUEUE --queue-num {queue}"
    v4 = common + [
        f"-A {p}-IN -p tcp --dport {low}:{high} {q}",
        f"-A {p}-IN -p udp --dport {low}:{high} {q}",
        *(f"-A {p}-IN -p icmp --icmp-type {t} {q}"
          for t in ("echo-reply", "destination-unreachable", "time-exceeded",
                    "parameter-problem")),
    ]
    v6 = common + [
        f"-A {p}-IN -p tcp --dport {low}:{high} {q}",
        f"-A {p}-IN -p udp --dport {low}:{high} {q}",
        *(f"-A {p}-IN -p ipv6-icmp --icmpv6-type {t} {q}"
          for t in ("echo-reply", "destination-unreachable", "packet-too-big", "time-exceeded",
                    "parameter-problem")),
    ]
    return RuleSet(_restore(v4), _restore(v6))




@dataclass(slots=True)
class InstalledSession:
    """A session's rules as found in the kernel (after pvpn-client died without cleanup)."""

    slot: int
    uid: int
    networks: list[Network]
    queue: int
    mark: int
    tun: str


@dataclass(slots=True)
class _Found:
    uid: int | None = None
    queue: int | None = None
    mark: int | None = None
    tun: str | None = None
    networks: list[Network] = field(default_factory=list)


def parse_installed_sessions(instance: str, saved: Iterable[str]) -> tuple[
        list[InstalledSession], list[str]]:
    """Read the per-session chains of ``instance`` out of ``iptables-save`` output (both
    families' texts). Returns the sessions that are whole, and the chains that are not."""
    p = chain_prefix(instance)
    out_re = re.compile(rf"^{re.escape(p)}-S(\d+)$")
    in_re = re.compile(rf"^{re.escape(p)}-S(\d+)I$")
    found: dict[int, _Found] = {}
    chains: set[str] = set()
    for text in saved:
        for line in text.splitlines():
            if line.startswith(f":{p}-S"):
                chains.add(line[1:].split()[0])
            if not line.startswith("-A "):
                continue
            args = shlex.split(line)
            chain, target = args[1], _after(args, "-j")
            if (m := out_re.match(chain)) and "--uid-owner" in args and "!" not in args:
                entry = found.setdefault(int(m[1]), _Found())
                entry.uid = int(_after(args, "--uid-owner"))
                entry.queue = int(_after(args, "--queue-num"))
                entry.networks.append(ipaddress.ip_network(_after(args, "-d")))
            elif chain == f"{p}-IN" and (m := in_re.match(target)):
                found.setdefault(int(m[1]), _Found()).tun = _after(args, "-i")
            elif (m := in_re.match(chain)) and "--set-xmark" in args:
                mark = _after(args, "--set-xmark").split("/")[0]
                found.setdefault(int(m[1]), _Found()).mark = int(mark, 16)
    sessions = [
        InstalledSession(slot, f.uid, f.networks, f.queue, f.mark, f.tun)
        for slot, f in sorted(found.items())
        if f.uid is not None and f.queue is not None and f.mark is not None
        and f.tun is not None and f.networks
    ]
    whole = {name for s in sessions for name in session_chains(instance, s.slot)}
    return sessions, sorted(chains - whole)


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else ""
