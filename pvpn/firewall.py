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
from pvpn.errors import LocalProtocolError
from pvpn.text import quoted

TABLE = "mangle"
ANY_UID = "0-4294967294"  # every uid but the invalid (u32)-1

# Datagrams too large for an NFQUEUE message (the kernel copies at most 65,531 bytes of a
# packet: NFQNL_MAX_COPY_RANGE) go to pvpn as the kernel's copy instead (TEE), out of a TUN
# device that pvpn reads: the IPv4 total length, or the IPv6 payload length plus its 40-byte
# header, above 65,531 (u32 reads the header itself; the length match stops at 65,535).
BIG4 = '-m u32 --u32 "0&0xFFFF=65532:65535"'
BIG6 = '-m u32 --u32 "4>>16=65492:65535"'
# TEE sends its copy to a gateway through --oif: IPv4 takes any address as on the link (one
# of TEST-NET-1, RFC 5737, which nothing routes); IPv6 needs one in the device's fe80::/64.
# With the device gone the copy is not made (fail closed: the cut original is dropped).
TEE_GATEWAY4 = "192.0.2.1"
TEE_GATEWAY6 = "fe80::1"


def tee(version: int, device: str) -> str:
    """The rule target that copies a datagram out of ``device``."""
    gateway = TEE_GATEWAY4 if version == 4 else TEE_GATEWAY6
    return f"{BIG4 if version == 4 else BIG6} -j TEE --gateway {gateway} --oif {device}"


def tun_guard(chain: str, devices: str) -> str:
    """The rule (without ``-A``) that drops every packet a user's socket sends out of pvpn's
    TUN devices (``devices``, an iptables interface name or ``prefix+``): pvpn reads what
    leaves them as its users' datagrams, so only the kernel's copies (TEE's, which no socket
    owns) may leave there; a user binding a socket to another's device (SO_BINDTODEVICE,
    unprivileged since Linux 5.7) or sending to a link-local address on it gets EPERM."""
    return f"{chain} -o {devices} -m owner --uid-owner {ANY_UID} -j DROP"


def chain_prefix(instance: str) -> str:
    return instance.upper()


@dataclass(frozen=True, slots=True)
class RuleSet:
    """iptables-restore text for IPv4 and IPv6 (either may be empty)."""

    v4: str
    v6: str


def rule_text(args: Sequence[str]) -> str:
    """Arguments as one iptables-restore line: double quotes around an argument with spaces
    (as iptables-save writes a comment), nothing else quoted (shlex.join's ``'!'`` is not
    iptables-restore syntax)."""
    def one(arg: str) -> str:
        if arg and not any(c in arg for c in ' \t"\\\''):
            return arg
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join(one(arg) for arg in args)


def _restore(lines: Sequence[str]) -> str:
    for line in lines:
        if not line.isprintable():  # a line break would start a rule (or a table) of its own
            raise LocalProtocolError(f"a rule with a line break or control character: "
                                     f"{quoted(line, 120)}")
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
        f"-A {tun_guard(f'{p}-OUT', f'{instance}+')}",
        f"-I OUTPUT 1 -j {p}-OUT",
        f"-I PREROUTING 1 -j {p}-IN",
    ]
    return RuleSet(_restore(lines), _restore(lines))


def session_chains(instance: str, slot: int) -> tuple[str, str]:
    """The session's outbound chain (feeds its queue) and inbound chain (marks its flows)."""
    p = chain_prefix(instance)
    return f"{p}-S{slot}", f"{p}-S{slot}I"


def session_jumps(instance: str, slot: int, uid: int, mark: int, mask: int) -> list[str]:
    """The two rules of ``<P>-OUT`` that lead into one session's outbound chain (as
    iptables-save prints them, without ``-A``): one for the packets ``uid`` sent, one for the
    ownerless packets of connections carrying the session's mark. Every other packet passes
    the session by: another user's packets never cross its chain, so a session's prefixes
    cost nothing to the host's other users."""
    p = chain_prefix(instance)
    out_chain, _ = session_chains(instance, slot)
    return [
        f"{p}-OUT -m owner --uid-owner {uid} -j {out_chain}",
        f"{p}-OUT -m owner ! --uid-owner {ANY_UID} -m connmark --mark {mark:#x}/{mask:#x} "
        f"-j {out_chain}",
    ]


def _marking(in_chain: str, mark: int, mask: int, session_id: bytes) -> list[str]:
    lines = [f"-A {in_chain} -j CONNMARK --set-xmark {mark:#x}/{mask:#x}"]
    if session_id:
        # A rule without a target, read back by parse_installed_sessions: the session was up
        # (attached) with this id, so a restarted pvpn-client holds it as a session that was up.
        lines.append(f"-A {in_chain} -m comment --comment {SESSION_COMMENT}{session_id.hex()}")
    return lines


SESSION_COMMENT = "pvpn-session="


def client_session(
    instance: str, slot: int, uid: int, networks: Sequence[Network], queue: int,
    mark: int, mask: int, tun: str, session_id: bytes = b"",
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
    * The session's chain is entered only by those two kinds of packet (:func:`session_jumps`);
      its rules check the owner again, so the chain is right whichever way it is entered (the
      format before the jumps matched, see :func:`parse_installed_sessions`).
    * No ``--queue-bypass``: with nobody reading the queue the kernel drops (fail closed).
    * A datagram larger than an NFQUEUE message can carry is copied out of the session's TUN
      device (:func:`tee`), where pvpn-client reads it; :func:`client_base` keeps every
      user's own packets from leaving by a TUN device.
    """
    v4, v6 = _client_session_lines(instance, slot, uid, networks, queue, mark, mask, tun,
                                   session_id)
    return RuleSet(_restore(v4), _restore(v6))


def _client_session_lines(
    instance: str, slot: int, uid: int, networks: Sequence[Network], queue: int,
    mark: int, mask: int, tun: str, session_id: bytes,
) -> tuple[list[str], list[str]]:
    """:func:`client_session`'s lines of each family (none for a family it has no prefix
    of), the two chain declarations first."""
    p = chain_prefix(instance)
    out_chain, in_chain = session_chains(instance, slot)
    result: list[list[str]] = [[], []]
    for version, nets in enumerate(_split(networks)):
        lines = result[version]
        lines += [f":{out_chain} - [0:0]", f":{in_chain} - [0:0]"]
        for net in nets:
            # A datagram too large for the queue: the kernel's copy of it leaves by the TUN
            # device, which pvpn-client reads; the cut original goes on to the queue, which
            # drops it.
            lines.append(f"-A {out_chain} -d {net} -m owner --uid-owner {uid} "
                         f"{tee(net.version, tun)}")
            lines.append(f"-A {out_chain} -d {net} -m owner --uid-owner {uid} "
                         f"-j NFQUEUE --queue-num {queue}")
            lines.append(f"-A {out_chain} -d {net} -m owner ! --uid-owner {ANY_UID} "
                         f"-m connmark --mark {mark:#x}/{mask:#x} -j NFQUEUE --queue-num {queue}")
        lines += _marking(in_chain, mark, mask, session_id)
        lines += [f"-A {jump}" for jump in session_jumps(instance, slot, uid, mark, mask)]
        lines.append(f"-A {p}-IN -i {tun} -j {in_chain}")
    return result[0], result[1]


def client_session_repair(instance: str, session: "InstalledSession", mask: int,
                          version: int, saved: str) -> str:
    """One transaction that makes a session's rules of one family (4 or 6) whole again,
    whatever is left of them in ``saved`` (that family's iptables-save): its chains declared
    (made, or emptied), every jump into them that ``saved`` shows deleted, then all of them
    added as :func:`client_session` makes them. In one iptables-restore, so no moment has
    the session's packets leave in clear, and a pvpn-client killed while it repairs leaves
    the rules as they were or whole, never half of them (the next pvpn-client would recover
    the session with the prefixes it finds). Should a rule of ``saved`` be gone by then, the
    whole transaction fails and nothing changes."""
    p = chain_prefix(instance)
    chains = session_chains(instance, session.slot)
    stale = []
    for line in saved.splitlines():
        if line.startswith((f"-A {p}-OUT ", f"-A {p}-IN ")):
            try:
                target = _after(shlex.split(line), "-j")
            except ValueError:
                continue  # not a rule of ours (an unbalanced quote in someone's comment)
            if target in chains:
                stale.append(f"-D {line[3:]}")
    lines = _client_session_lines(instance, session.slot, session.uid, session.networks,
                                  session.queue, session.mark, mask, session.tun,
                                  session.session_id)[0 if version == 4 else 1]
    return _restore([*lines[:2], *stale, *lines[2:]])


def client_session_attached(instance: str, slot: int, mark: int, mask: int,
                            session_id: bytes) -> RuleSet:
    """Record in the kernel that the session in ``slot`` is up as ``session_id``: its inbound
    chain rewritten in one transaction (the marking rule never lapses)."""
    _, in_chain = session_chains(instance, slot)
    lines = [f"-F {in_chain}", *_marking(in_chain, mark, mask, session_id)]
    return RuleSet(_restore(lines), _restore(lines))


def client_session_removal(instance: str, slot: int, uid: int, mark: int, mask: int,
                           tun: str) -> list[list[str]]:
    """iptables arguments (each run on its own, for both families) that undo one session."""
    p = chain_prefix(instance)
    out_chain, in_chain = session_chains(instance, slot)
    return [
        *(["-D", *shlex.split(jump)] for jump in session_jumps(instance, slot, uid, mark, mask)),
        ["-D", f"{p}-IN", "-i", tun, "-j", in_chain],
        ["-F", out_chain], ["-X", out_chain],
        ["-F", in_chain], ["-X", in_chain],
    ]


def client_jumps_repair(instance: str, session: "InstalledSession", mask: int) -> RuleSet | None:
    """The transaction that turns the jumps found into a recovered session's chain into the
    ones :func:`session_jumps` makes: the unconditional jump of the format up to 34c7490
    (every packet of every user crossed every session's chain), a jump lost or doubled. Old
    and new jumps change in one iptables-restore per family, so the session's packets are
    queued all along. None if the jumps are already right."""
    wanted = [shlex.split(j) for j in session_jumps(instance, session.slot, session.uid,
                                                   session.mark, mask)]
    texts = []
    for found in session.jumps:
        if found == wanted:
            texts.append("")
            continue
        lines = [f"-D {rule_text(args)}" for args in found]
        lines += [f"-A {rule_text(args)}" for args in wanted]
        texts.append(_restore(lines))
    if not any(texts):
        return None
    return RuleSet(*texts)


@dataclass(slots=True)
class RulesCheck:
    """What the kernel's rules lack of the sessions pvpn-client holds, per family (4, 6): the
    families whose hook chains are gone (``unbased``) or no longer hooked into OUTPUT and
    PREROUTING (``unhooked``), and the sessions whose rules are not whole there (``broken``:
    family -> slots)."""

    unbased: list[int] = field(default_factory=list)
    unhooked: list[int] = field(default_factory=list)
    broken: dict[int, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.unbased or self.unhooked or self.broken)


def check_rules(instance: str, saved: Sequence[str], held: Iterable[InstalledSession],
                mask: int) -> RulesCheck:
    """Compare ``iptables-save`` of each family (``saved``: the IPv4 text, then the IPv6 one)
    with the sessions pvpn-client holds (``held``, as it would install them). A family a session
    protects no prefix of needs nothing of it. Someone else's firewall reload or a typo
    (``iptables -t mangle -F``) takes rules away; this says which to put back."""
    p = chain_prefix(instance)
    result = RulesCheck()
    held = list(held)
    for family, (version, text) in enumerate(zip((4, 6), saved)):
        lines = set(text.splitlines())
        declared = {line.split()[0] for line in lines if line.startswith(f":{p}-")}
        if f":{p}-OUT" not in declared or f":{p}-IN" not in declared:
            result.unbased.append(version)
        elif (f"-A OUTPUT -j {p}-OUT" not in lines
              or f"-A PREROUTING -j {p}-IN" not in lines):
            result.unhooked.append(version)
        texts = [text, ""] if family == 0 else ["", text]
        found = {s.slot: s for s in parse_installed_sessions(instance, texts)[0]}
        for want in held:
            nets = {n for n in want.networks if n.version == version}
            if not nets:
                continue
            have = found.get(want.slot)
            wanted = [shlex.split(j) for j in session_jumps(instance, want.slot, want.uid,
                                                           want.mark, mask)]
            if (have is None or version in result.unbased or have.uid != want.uid
                    or have.queue != want.queue or have.mark != want.mark
                    or have.tun != want.tun or set(have.networks) != nets
                    or have.jumps[family] != wanted):
                result.broken.setdefault(version, []).append(want.slot)
    return result


# ---------------------------------------------------------------- server host


def server_tun(instance: str, worker: int | None = None) -> str:
    """The TUN device the server (or its worker ``worker``) reads the kernel's copies of the
    largest replies from."""
    return f"{instance}-big" if worker is None else f"{instance}-big{worker}"


# Where an IPv4 ICMP message's identifier (echo) and its quoted packet's source port (errors:
# the NAT port the server sent from) or echo identifier are, with the quoted protocol (u32:
# ``A@B`` reads at offset B past the sum of the values so far; no IP options, which the
# server refuses to send); IPv6 without extension headers, as the server sends.
U32_ECHO4 = "0>>22&0x3C@4>>16"
U32_QUOTE_PORT4 = "0>>22&0x3C@16>>16&0xFF=6:17&&0>>22&0x3C@8>>22&0x3C@8>>16"
U32_QUOTE_ECHO4 = "0>>22&0x3C@16>>16&0xFF=1&&0>>22&0x3C@8>>22&0x3C@12>>16"
U32_ECHO6 = "44>>16"
U32_QUOTE_PORT6 = "52>>8&0xFF=6:17&&88>>16"
U32_QUOTE_ECHO6 = "52>>8&0xFF=58&&92>>16"
ICMP4_ERRORS = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMP6_ERRORS = ("destination-unreachable", "packet-too-big", "time-exceeded",
                "parameter-problem")


def _server_chains(p: str, devices: str) -> list[str]:
    """The server's chains, declared (emptied), with the defragmenting match and the guard
    of its TUN devices."""
    return [f":{p}-IN - [0:0]", f":{p}-OUT - [0:0]", f":{p}-DEFRAG - [0:0]",
            f":{p}-FWD - [0:0]",
            f"-A {p}-DEFRAG -m socket -m comment --comment \"never entered: makes the "
            f"kernel reassemble fragments before {p}-IN\" -j RETURN",
            f"-A {tun_guard(f'{p}-OUT', devices)}"]


def forward_count(instance: str, ports: tuple[int, int]) -> str:
    """The rule (without ``-A``) that counts, as they leave, the super-packets the kernel
    forwarded for the server (or the worker) of NAT ports ``ports``: what it wrote into its TUN
    device (pvpn.forwarding). Forwarded packets have no socket; what the raw socket sends has
    one, so only the forwarded ones count. It decides nothing (RETURN): an administrator's
    FORWARD rules, which run before it, are what it finds out about (what the host forwards
    for others is not from its own address, so it does not count)."""
    low, high = ports
    span = str(low) if low == high else f"{low}:{high}"  # as iptables-save prints it
    # From the host's own address: what the host forwards for others is none of it.
    return (f"{chain_prefix(instance)}-FWD -p tcp -m tcp --sport {span} -m addrtype "
            f"--src-type LOCAL -m owner ! --socket-exists -m comment --comment "
            f"\"super-packets forwarded\" -j RETURN")


def server_worker_rules(instance: str, slices: Sequence[tuple[int, tuple[int, int]]],
                        icmp: bool = True) -> RuleSet:
    """:func:`server_rules` for a server of several workers (pvpn.workers): worker ``i``'s
    queue and ``(low, high)`` NAT ports in ``slices[i]``. Each slice's replies go to its own
    worker's queue and TUN device (``server_tun(instance, i)``): TCP and UDP by destination
    port, ICMP echo replies by identifier, ICMP errors by the port (or identifier) of the
    packet they quote; ICMP of no slice is the host's own and never queued."""
    p = chain_prefix(instance)
    common = _server_chains(p, f"{instance}-big+")
    v4, v6 = list(common), list(common)
    for worker, (queue, (low, high)) in enumerate(slices):
        tun = server_tun(instance, worker)
        q = f"-j NFQUEUE --queue-num {queue}"
        span = f"{low}:{high}"
        v4.append(f"-A {forward_count(instance, (low, high))}")
        v6.append(f"-A {forward_count(instance, (low, high))}")
        echo4 = f'-p icmp --icmp-type echo-reply -m u32 --u32 "{U32_ECHO4}={span}"'
        echo6 = f'-p ipv6-icmp --icmpv6-type echo-reply -m u32 --u32 "{U32_ECHO6}={span}"'
        for out, version, echo in ((v4, 4, echo4), (v6, 6, echo6)):
            out += [f"-A {p}-IN -p tcp --dport {span} {tee(version, tun)}",
                    f"-A {p}-IN -p udp --dport {span} {tee(version, tun)}",
                    f"-A {p}-IN {echo} {tee(version, tun)}",
                    f"-A {p}-IN -p tcp --dport {span} {q}",
                    f"-A {p}-IN -p udp --dport {span} {q}"]
        if not icmp:
            continue
        v4.append(f"-A {p}-IN {echo4} {q}")
        v6.append(f"-A {p}-IN {echo6} {q}")
        for kind in ICMP4_ERRORS:
            v4 += [f'-A {p}-IN -p icmp --icmp-type {kind} -m u32 --u32 "{u32}={span}" {q}'
                   for u32 in (U32_QUOTE_PORT4, U32_QUOTE_ECHO4)]
        for kind in ICMP6_ERRORS:
            v6 += [f'-A {p}-IN -p ipv6-icmp --icmpv6-type {kind} -m u32 --u32 "{u32}={span}" '
                   f'{q}' for u32 in (U32_QUOTE_PORT6, U32_QUOTE_ECHO6)]
    return RuleSet(_restore(v4), _restore(v6))


def server_rules(instance: str, queue: int, ports: tuple[int, int],
                 icmp: bool = True) -> RuleSet:
    """Capture replies to the NAT port range (and ICMP that may answer a NAT flow), in the
    instance's chains; :func:`server_jumps` lead into them.

    Only packets addressed to this host (addrtype LOCAL) are queued; ICMP that turns out not
    to be ours is accepted again by the server, so the host's own pings keep working. The
    chains are declared, so one iptables-restore replaces what an earlier run left in them,
    atomically: no packet of a NAT flow ever meets the host's own stack (which would answer
    it with a reset, ending the connection) while the server restarts. ``icmp=False``: the
    NAT ports only, what a stopped server leaves so its sessions' connections survive the
    restart (their packets are dropped, as nobody reads the queue), without taking the
    host's own ICMP while it is stopped.

    Fragments are reassembled by the kernel before they reach the queue: the chain
    ``<P>-DEFRAG`` is never entered, but its socket match makes the kernel reassemble in this
    namespace (nf_defrag_ipv4/6, as conntrack would, without tracking connections), so a
    fragment flood costs the kernel's bounded reassembly memory, never pvpn-server's. A
    reassembled datagram too large for a queue message is copied out of
    :func:`server_tun` (TEE), which pvpn-server reads; nothing a local user sends may leave
    by that device.
    """
    p = chain_prefix(instance)
    low, high = ports
    tun = server_tun(instance)
    common = _server_chains(p, tun)
    q = f"-j NFQUEUE --queue-num {queue}"
    v4 = common + [
        f"-A {forward_count(instance, ports)}",
        f"-A {p}-IN {tee(4, tun)}",
        f"-A {p}-IN -p tcp --dport {low}:{high} {q}",
        f"-A {p}-IN -p udp --dport {low}:{high} {q}",
        *(f"-A {p}-IN -p icmp --icmp-type {t} {q}"
          for t in ("echo-reply", "destination-unreachable", "time-exceeded",
                    "parameter-problem") if icmp),
    ]
    v6 = common + [
        f"-A {forward_count(instance, ports)}",
        f"-A {p}-IN {tee(6, tun)}",
        f"-A {p}-IN -p tcp --dport {low}:{high} {q}",
        f"-A {p}-IN -p udp --dport {low}:{high} {q}",
        *(f"-A {p}-IN -p ipv6-icmp --icmpv6-type {t} {q}"
          for t in ("echo-reply", "destination-unreachable", "packet-too-big", "time-exceeded",
                    "parameter-problem") if icmp),
    ]
    return RuleSet(_restore(v4), _restore(v6))


def server_jumps(instance: str) -> list[list[str]]:
    """The rules of built-in chains that lead into the server's chains (as iptables-save shows
    them, without ``-A``): PREROUTING's into the queue rules, OUTPUT's into the guard of the
    copies' TUN device, POSTROUTING's into the count of forwarded super-packets."""
    p = chain_prefix(instance)
    return [["PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", f"{p}-IN"],
            ["OUTPUT", "-j", f"{p}-OUT"], ["POSTROUTING", "-j", f"{p}-FWD"]]


@dataclass(slots=True)
class InstalledSession:
    """A session's rules as found in the kernel (after pvpn-client stopped or died).

    ``session_id`` is the id it was up with (empty if it never was, or if the rules predate
    the record of it: then ``legacy`` is set, and nothing says whether it ever was up).
    ``jumps`` holds, per family, the rules of ``<P>-OUT`` that lead into its chain, as
    argument lists without ``-A``."""

    slot: int
    uid: int
    networks: list[Network]
    queue: int
    mark: int
    tun: str
    session_id: bytes = b""
    legacy: bool = False
    jumps: list[list[list[str]]] = field(default_factory=list)


@dataclass(slots=True)
class _Found:
    uid: int | None = None
    queue: int | None = None
    mark: int | None = None
    tun: str | None = None
    session_id: bytes = b""
    networks: list[Network] = field(default_factory=list)
    jumps: list[list[list[str]]] = field(default_factory=lambda: [[], []])


def parse_installed_sessions(instance: str, saved: Iterable[str]) -> tuple[
        list[InstalledSession], list[str]]:
    """Read the per-session chains of ``instance`` out of ``iptables-save`` output (the IPv4
    text, then the IPv6 one). Returns the sessions that are whole, and the chains that are not.

    Both formats are read: this one, whose jumps into a session's chain match its owner
    (:func:`session_jumps`), and the one before it (34c7490), which jumped into every
    session's chain unconditionally; the chains themselves are the same in both. A whole
    session needs its owner rules (uid, queue, prefixes), its marking rule and its TUN jump;
    its jumps from ``<P>-OUT`` may be missing or old (:func:`client_jumps_repair`)."""
    p = chain_prefix(instance)
    out_re = re.compile(rf"^{re.escape(p)}-S(\d+)$")
    in_re = re.compile(rf"^{re.escape(p)}-S(\d+)I$")
    found: dict[int, _Found] = {}
    chains: set[str] = set()
    for family, text in enumerate(saved):
        for line in text.splitlines():
            if line.startswith(f":{p}-S"):
                chains.add(line[1:].split()[0])
            if not line.startswith("-A "):
                continue
            try:
                args = shlex.split(line)
            except ValueError:
                continue  # not a rule of ours (an unbalanced quote in someone's comment)
            chain, target = args[1], _after(args, "-j")
            if ((m := out_re.match(chain)) and "--uid-owner" in args and "!" not in args
                    and target == "NFQUEUE"):
                entry = found.setdefault(int(m[1]), _Found())
                entry.uid = _int(_after(args, "--uid-owner"))
                entry.queue = _int(_after(args, "--queue-num"))
                net = _network(_after(args, "-d"))
                if net is not None:
                    entry.networks.append(net)
            elif chain == f"{p}-OUT" and (m := out_re.match(target)) and family < 2:
                found.setdefault(int(m[1]), _Found()).jumps[family].append(args[1:])
            elif chain == f"{p}-IN" and (m := in_re.match(target)):
                found.setdefault(int(m[1]), _Found()).tun = _after(args, "-i")
            elif (m := in_re.match(chain)) and "--set-xmark" in args:
                mark = _after(args, "--set-xmark").split("/")[0]
                found.setdefault(int(m[1]), _Found()).mark = _int(mark, 16)
            elif (m := in_re.match(chain)) and _after(args, "--comment").startswith(
                    SESSION_COMMENT):
                sid = _after(args, "--comment")[len(SESSION_COMMENT):]
                if re.fullmatch(r"[0-9a-f]{32}", sid):
                    found.setdefault(int(m[1]), _Found()).session_id = bytes.fromhex(sid)
    sessions = []
    for slot, f in sorted(found.items()):
        if (f.uid is None or f.queue is None or f.mark is None or f.tun is None
                or not f.networks):
            continue
        owner_jumps = [j for fam in f.jumps for j in fam if "owner" in j]
        legacy = not f.session_id and bool(f.jumps[0] or f.jumps[1]) and not owner_jumps
        sessions.append(InstalledSession(slot, f.uid, f.networks, f.queue, f.mark, f.tun,
                                         f.session_id, legacy, f.jumps))
    whole = {name for s in sessions for name in session_chains(instance, s.slot)}
    return sessions, sorted(chains - whole)


def _int(text: str, base: int = 10) -> int | None:
    try:
        return int(text, base)
    except ValueError:
        return None


def _network(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        return None


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else ""
