"""A session's captured packets, flow by flow: what ``pvpn trace --packets`` shows beside the
hop records.

The end nodes record a session's inner packets as pcap (``pvpn/io/pcap.py``): the user with
``pvpn connect --pcap FILE``, the server in ``[server] pcap_dir``.  This module reads such a
file with scapy and sums it up per flow, so a person sees why a connection stalled without
opening Wireshark: per flow, packets and bytes each way, TCP retransmissions, resets, zero
windows and duplicate ACKs, ICMP errors about the flow, the first and the last packet
decoded, and a word on how it ended (reset by whom, no answer to the SYN, closed, or open
and silent for the last seconds of the capture).

scapy decodes, off the packet path: it is imported only when a capture is read
(:func:`read_capture`), and its absence is a :class:`~pvpn.errors.ConfigError` that says how
to install it.  Everything else is pure: scapy's packets become :class:`PacketView` values
(:func:`decode`), and :class:`FlowAnalyser` takes views in and gives a
:class:`CaptureSummary` out, which the tests drive directly.

"Up" is from the side that opened the flow (its first packet, or the SYN without ACK), which
in a pvpn capture is always the user's side: the server forwards no packet the user's flows
did not ask for.  "Down" is the answering side.  Bytes are whole IP packets (headers
included), as the nodes' ``session:closed`` counters count them; ``payload`` is the TCP or
UDP payload.  What the capture holds came from the user or from anyone on the Internet, so
every string here is data: the terminal view escapes it, the page (``pvpn.cli.trace_html``)
escapes it for HTML.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pvpn.errors import ConfigError
from pvpn.text import printable

#: Flows a capture summary keeps apart; packets of any further flow are only counted.
MAX_FLOWS = 4096
#: Packets read from one capture; the rest of a larger file is left unread (and said so).
MAX_PACKETS = 2_000_000
#: Notable moments (retransmission, reset, zero window, ICMP error) kept per flow.
MAX_FLOW_EVENTS = 64
#: Flows the terminal view lists per capture (``--json`` has them all).
SHOWN_FLOWS = 20
#: A flow still open whose last packet is this long before the capture's end is "silent".
SILENT_AFTER = 1.0
#: The time resolution of the byte counts kept for the rate plot (seconds).
BUCKET = 0.01

# Link types whose packets start with the IP header (pcap-linktype(7)): LINKTYPE_RAW, and
# the per-family LINKTYPE_IPV4 / LINKTYPE_IPV6.  Others have a link header of this size.
LINK_HEADER = {101: 0, 228: 0, 229: 0, 12: 0, 14: 0, 1: 14, 113: 16, 276: 20}

ICMP_ERRORS_V4 = frozenset({3, 4, 5, 11, 12})  # unreachable, quench, redirect, time, param
ICMP_ERRORS_V6 = frozenset({1, 2, 3, 4})  # unreachable, too big, time exceeded, parameter

Endpoint = tuple[str, int]


def _seq_diff(a: int, b: int) -> int:
    """``a - b`` in TCP sequence space (RFC 9293 3.4: modulo 2**32), as a signed number."""
    d = (a - b) & 0xFFFFFFFF
    return d - (1 << 32) if d >= 1 << 31 else d


# ---------------------------------------------------------------- one packet


@dataclass(frozen=True, slots=True)
class Quoted:
    """The packet an ICMP error quotes (RFC 792, RFC 4443 2.4): whose flow it is about."""

    protocol: str
    src: Endpoint
    dst: Endpoint


@dataclass(frozen=True, slots=True)
class PacketView:
    """What the summary needs of one captured packet (decoded by :func:`decode`)."""

    time: float  # seconds since the epoch
    size: int  # the IP packet's bytes, headers included
    src: str
    dst: str
    protocol: str  # tcp, udp, icmp, icmp6, fragment, or "ip proto N"
    sport: int = 0  # TCP/UDP ports; ICMP echo: the identifier in both
    dport: int = 0
    flags: str = ""  # TCP flags as scapy writes them: F S R P A U E C
    seq: int = 0
    ack: int = 0
    window: int = 0
    payload: int = 0  # TCP/UDP payload bytes
    options: str = ""  # a SYN's options worth seeing (mss, wscale, sack)
    icmp: str = ""  # ICMP type and code, as names
    icmp_error: bool = False
    quoted: Quoted | None = None

    @property
    def source(self) -> Endpoint:
        return self.src, self.sport

    @property
    def destination(self) -> Endpoint:
        return self.dst, self.dport


def endpoint_text(endpoint: Endpoint, protocol: str = "tcp") -> str:
    host, port = endpoint
    if protocol not in ("tcp", "udp"):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- per flow


@dataclass(slots=True)
class Direction:
    """One direction of a flow: what went that way."""

    packets: int = 0
    bytes: int = 0
    payload: int = 0
    first: float | None = None
    last: float | None = None
    retransmissions: int = 0
    resets: int = 0
    syns: int = 0
    fins: int = 0
    zero_windows: int = 0  # advertisements of a zero receive window (the other side waits)
    dup_acks: int = 0
    gaps: int = 0  # segments past the next expected byte: one before them was not seen here

    def to_json(self, start: float) -> dict[str, Any]:
        return {
            "packets": self.packets, "bytes": self.bytes, "payload": self.payload,
            "first": _offset(self.first, start), "last": _offset(self.last, start),
            "retransmissions": self.retransmissions, "resets": self.resets,
            "syns": self.syns, "fins": self.fins, "zero_windows": self.zero_windows,
            "dup_acks": self.dup_acks, "gaps": self.gaps,
        }


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """A moment worth marking: ``retransmission``, ``reset``, ``zero window``, ``icmp``."""

    time: float
    direction: str  # up or down
    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PacketNote:
    """The first or last packet of a flow, decoded to one line."""

    time: float
    direction: str
    text: str


@dataclass(slots=True)
class FlowSummary:
    """One flow of a capture: a TCP connection, a UDP exchange, an ICMP echo series."""

    protocol: str
    client: Endpoint  # the side that opened it (up is from here)
    server: Endpoint
    up: Direction = field(default_factory=Direction)
    down: Direction = field(default_factory=Direction)
    first: PacketNote | None = None
    last: PacketNote | None = None
    events: list[FlowEvent] = field(default_factory=list)
    events_left_out: int = 0
    icmp_errors: dict[str, int] = field(default_factory=dict)  # "type code from X" -> count
    state: str = ""

    @property
    def name(self) -> str:
        return (f"{self.protocol} {endpoint_text(self.client, self.protocol)} > "
                f"{endpoint_text(self.server, self.protocol)}")

    @property
    def start(self) -> float:
        return min(t for t in (self.up.first, self.down.first) if t is not None)

    @property
    def end(self) -> float:
        return max(t for t in (self.up.last, self.down.last) if t is not None)

    @property
    def packets(self) -> int:
        return self.up.packets + self.down.packets

    def to_json(self, start: float) -> dict[str, Any]:
        return {
            "flow": self.name, "protocol": self.protocol,
            "client": endpoint_text(self.client, self.protocol),
            "server": endpoint_text(self.server, self.protocol),
            "first": _offset(self.start, start), "last": _offset(self.end, start),
            "state": self.state, "up": self.up.to_json(start), "down": self.down.to_json(start),
            "first_packet": _note_json(self.first, start),
            "last_packet": _note_json(self.last, start),
            "icmp_errors": dict(self.icmp_errors),
            "events": [{"offset": _offset(e.time, start), "direction": e.direction,
                        "kind": e.kind, "detail": e.detail} for e in self.events],
            "events_left_out": self.events_left_out,
        }


@dataclass(slots=True)
class CaptureSummary:
    """One capture file, summed up: its flows in order of their first packet."""

    path: str
    where: str  # who recorded it: a server node's name, or "file" for a path given
    packets: int = 0
    bytes: int = 0
    first: float | None = None
    last: float | None = None
    flows: list[FlowSummary] = field(default_factory=list)
    undecoded: int = 0  # records that were not IPv4 or IPv6
    other_flows: int = 0  # flows beyond MAX_FLOWS
    other_packets: int = 0  # and their packets
    error: str = ""  # why it could not be read (whole or to its end)
    truncated: bool = False  # stopped after MAX_PACKETS
    # bytes per BUCKET-second slot, by direction (the rate plot's data)
    buckets: dict[str, dict[int, int]] = field(
        default_factory=lambda: {"up": {}, "down": {}})

    def direction_totals(self, direction: str) -> tuple[int, int]:
        flows = [getattr(f, direction) for f in self.flows]
        return sum(d.packets for d in flows), sum(d.bytes for d in flows)


def _offset(value: float | None, start: float) -> float | None:
    return None if value is None else round(value - start, 6)


def _note_json(note: PacketNote | None, start: float) -> dict[str, Any] | None:
    if note is None:
        return None
    return {"offset": _offset(note.time, start), "direction": note.direction,
            "text": note.text}


# ---------------------------------------------------------------- the analysis


@dataclass(slots=True)
class _TcpSide:
    """What one direction of a TCP connection has sent so far."""

    isn: int | None = None  # its first sequence number seen
    next_seq: int | None = None  # the highest sequence number it has reached
    last_ack: tuple[int, int] | None = None  # (ack, window) of its last pure ACK
    zero: bool = False  # its last window was zero


@dataclass(slots=True)
class _Flow:
    summary: FlowSummary
    tcp: dict[str, _TcpSide] = field(
        default_factory=lambda: {"up": _TcpSide(), "down": _TcpSide()})
    last_view: PacketView | None = None
    last_direction: str = "up"
    last_retransmission: bool = False


def _flow_key(protocol: str, a: Endpoint, b: Endpoint) -> tuple[str, Endpoint, Endpoint]:
    return (protocol, a, b) if a <= b else (protocol, b, a)


class FlowAnalyser:
    """Flows out of packets: :meth:`add` each :class:`PacketView` in capture order, then
    :meth:`finish` for the summary.  At most :data:`MAX_FLOWS` flows are kept apart."""

    def __init__(self, path: str, where: str) -> None:
        self.capture = CaptureSummary(path=path, where=where)
        self._flows: dict[tuple[str, Endpoint, Endpoint], _Flow] = {}
        self._others: set[tuple[str, Endpoint, Endpoint]] = set()

    def add_undecoded(self, time: float, size: int) -> None:
        self._count(time, size)
        self.capture.undecoded += 1

    def _count(self, time: float, size: int) -> None:
        capture = self.capture
        capture.packets += 1
        capture.bytes += size
        capture.first = time if capture.first is None else min(capture.first, time)
        capture.last = time if capture.last is None else max(capture.last, time)

    def add(self, view: PacketView) -> None:
        self._count(view.time, view.size)
        flow: _Flow | None = None
        if view.icmp_error and view.quoted is not None:
            # An ICMP error about a flow of this capture is counted with that flow (coming
            # back to the side that sent the packet it quotes), not as a flow of its own.
            quoted = view.quoted
            flow = self._flows.get(_flow_key(quoted.protocol, quoted.src, quoted.dst))
            if flow is not None:
                direction = "down" if quoted.src == flow.summary.client else "up"
        if flow is None:
            key = _flow_key(view.protocol, view.source, view.destination)
            flow = self._flows.get(key)
            if flow is None:
                flow = self._new_flow(key, view)
                if flow is None:
                    return
            direction = "up" if view.source == flow.summary.client else "down"
        side = getattr(flow.summary, direction)
        side.packets += 1
        side.bytes += view.size
        side.payload += view.payload
        side.first = view.time if side.first is None else side.first
        side.last = view.time
        bucket = self.capture.buckets[direction]
        slot = math.floor(view.time / BUCKET)
        bucket[slot] = bucket.get(slot, 0) + view.size
        retransmission = False
        if view.icmp_error:
            text = f"{view.icmp} from {view.src}"
            flow.summary.icmp_errors[text] = flow.summary.icmp_errors.get(text, 0) + 1
            self._event(flow, FlowEvent(view.time, direction, "icmp", text))
        elif view.protocol == "tcp":
            retransmission = self._tcp(flow, direction, view)
        if flow.summary.first is None:
            flow.summary.first = PacketNote(view.time, direction,
                                            self._describe(flow, direction, view,
                                                           retransmission))
        flow.last_view, flow.last_direction = view, direction
        flow.last_retransmission = retransmission

    def _new_flow(self, key: tuple[str, Endpoint, Endpoint], view: PacketView
                  ) -> _Flow | None:
        """A flow for ``view``'s packet, or None past MAX_FLOWS (its packets are counted)."""
        if key in self._others or len(self._flows) >= MAX_FLOWS:
            if key not in self._others and len(self._others) < 4 * MAX_FLOWS:
                self._others.add(key)
                self.capture.other_flows += 1
            self.capture.other_packets += 1
            return None
        # The side that sent the first packet opened the flow, unless that packet is a
        # SYN-ACK: then the capture began in the middle of the handshake.
        answer = view.protocol == "tcp" and "S" in view.flags and "A" in view.flags
        client, server = ((view.destination, view.source) if answer
                          else (view.source, view.destination))
        flow = _Flow(FlowSummary(view.protocol, client, server))
        self._flows[key] = flow
        self.capture.flows.append(flow.summary)
        return flow

    def _event(self, flow: _Flow, event: FlowEvent) -> None:
        if len(flow.summary.events) < MAX_FLOW_EVENTS:
            flow.summary.events.append(event)
        else:
            flow.summary.events_left_out += 1

    def _tcp(self, flow: _Flow, direction: str, view: PacketView) -> bool:
        """Count what the segment tells; True if it is a retransmission."""
        side = getattr(flow.summary, direction)
        state = flow.tcp[direction]
        flags = view.flags
        syn, fin, rst = "S" in flags, "F" in flags, "R" in flags
        side.syns += syn
        side.fins += fin
        if rst:
            side.resets += 1
            self._event(flow, FlowEvent(view.time, direction, "reset"))
        if state.isn is None:
            state.isn = view.seq
        length = view.payload + syn + fin  # sequence space the segment takes (RFC 9293 3.4)
        end = (view.seq + length) & 0xFFFFFFFF
        retransmission = False
        if length and state.next_seq is not None:
            diff = _seq_diff(view.seq, state.next_seq)
            keepalive = (view.payload <= 1 and not syn and not fin and diff == -1)
            if diff < 0 and not keepalive:
                # It starts before bytes this side had already sent: sent again (or a
                # segment the network duplicated, which this capture cannot tell apart).
                retransmission = True
                side.retransmissions += 1
                self._event(flow, FlowEvent(view.time, direction, "retransmission",
                                            f"seq {self._relative(state, view.seq)}, "
                                            f"{view.payload} B"))
            elif diff > 0:
                side.gaps += 1
        if length and (state.next_seq is None or _seq_diff(end, state.next_seq) > 0):
            state.next_seq = end
        if "A" in flags and not (syn or fin or rst) and view.payload == 0:
            pair = (view.ack, view.window)
            if pair == state.last_ack:
                side.dup_acks += 1
            state.last_ack = pair
        elif view.payload:
            state.last_ack = None
        zero = view.window == 0 and not rst
        if zero and not state.zero:
            side.zero_windows += 1
            self._event(flow, FlowEvent(view.time, direction, "zero window",
                                        "its receive window is full"))
        state.zero = zero
        return retransmission

    @staticmethod
    def _relative(state: _TcpSide, number: int) -> int:
        return (number - state.isn) & 0xFFFFFFFF if state.isn is not None else number

    def _describe(self, flow: _Flow, direction: str, view: PacketView,
                  retransmission: bool) -> str:
        """One packet as a line: TCP flags, relative sequence and ack numbers (as Wireshark
        shows them), window, payload; UDP payload; ICMP type and code."""
        if view.protocol == "tcp":
            other = "down" if direction == "up" else "up"
            parts = [view.flags or "-",
                     f"seq={self._relative(flow.tcp[direction], view.seq)}"]
            if "A" in view.flags:
                parts.append(f"ack={self._relative(flow.tcp[other], view.ack)}")
            parts += [f"win={view.window}", f"len={view.payload}"]
            if view.options:
                parts.append(view.options)
            if retransmission:
                parts.append("(retransmission)")
            return " ".join(parts)
        if view.protocol == "udp":
            return f"len={view.payload}"
        if view.icmp:
            return view.icmp
        return f"{view.size} B"

    def finish(self) -> CaptureSummary:
        """The summary, with each flow's last packet and how it ended."""
        end = self.capture.last
        for flow in self._flows.values():
            summary = flow.summary
            if flow.last_view is not None:
                summary.last = PacketNote(
                    flow.last_view.time, flow.last_direction,
                    self._describe(flow, flow.last_direction, flow.last_view,
                                   flow.last_retransmission))
            summary.state = _state(summary, end)
        self.capture.flows.sort(key=lambda f: f.start)
        return self.capture


def _state(flow: FlowSummary, capture_end: float | None) -> str:
    """How a flow ended, as far as the capture tells."""
    up, down = flow.up, flow.down
    notes: list[str] = []
    if flow.icmp_errors:
        notes.append("ICMP " + ", ".join(sorted(flow.icmp_errors)))
    if flow.protocol == "tcp":
        resets = [e for e in flow.events if e.kind == "reset"]
        if resets or up.resets or down.resets:
            who = resets[0].direction if resets else ("up" if up.resets else "down")
            sender = flow.client if who == "up" else flow.server
            words = f"reset by {endpoint_text(sender)}"
        elif up.syns and not down.syns:
            words = "no answer to the SYN" + (f" (sent {up.syns} times)" if up.syns > 1 else "")
        elif up.fins and down.fins:
            words = "closed"
        elif up.fins or down.fins:
            closer = flow.client if up.fins else flow.server
            words = f"half closed by {endpoint_text(closer)}"
        else:
            words = "open"
    elif down.packets == 0:
        words = "no reply"
    else:
        words = ""
    if words == "open":
        silent = (capture_end - flow.end) if capture_end is not None else 0.0
        if silent >= SILENT_AFTER:
            words = f"open, nothing for the last {silent:.1f} s of the capture"
    return "; ".join(x for x in (words, *notes) if x)


def summarise(views: Iterable[PacketView], path: str = "", where: str = "file"
              ) -> CaptureSummary:
    """The summary of ``views`` (in capture order)."""
    analyser = FlowAnalyser(path, where)
    for view in views:
        analyser.add(view)
    return analyser.finish()


# ---------------------------------------------------------------- scapy: files -> views


@functools.cache
def scapy_classes() -> SimpleNamespace:
    """scapy's pcap reader and the layers it needs, imported on first use; a ConfigError that
    says how to install scapy when it is missing (no node needs it)."""
    # scapy warns on import about routes and interfaces it cannot see; none matter here.
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    try:
        from scapy.error import Scapy_Exception
        from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
        from scapy.layers.inet6 import IPerror6, IPv6, IPv6ExtHdrFragment
        from scapy.layers.l2 import CookedLinux, Ether  # binds their link types
        from scapy.packet import Padding
        from scapy.utils import PcapReader
    except ImportError:
        # scapy is pvpn's `trace` extra, no dependency of a node: say what to install.
        raise ConfigError(
            "pvpn trace reads the packet captures with scapy, which is not installed here: "
            "install pvpn with its trace extra (pip install 'pvpn[trace]' into "
            f"{sys.prefix}; from a checkout, bash scripts/run install), "
            "or trace without --packets and --pcap") from None
    return SimpleNamespace(
        PcapReader=PcapReader, Scapy_Exception=Scapy_Exception, IP=IP, IPv6=IPv6, TCP=TCP,
        UDP=UDP, ICMP=ICMP, IPerror=IPerror, IPerror6=IPerror6, TCPerror=TCPerror,
        UDPerror=UDPerror, IPv6ExtHdrFragment=IPv6ExtHdrFragment, Padding=Padding,
        link_layers=(Ether, CookedLinux))


def _icmp_names(layer: Any) -> str:
    """``type code`` of an ICMP or ICMPv6 message, as scapy names them."""
    names = []
    for name in ("type", "code"):
        try:
            value = layer.getfieldval(name)
            names.append(str(layer.get_field(name).i2repr(layer, value)))
        except (AttributeError, KeyError, ValueError, TypeError):
            continue
    return " ".join(names)


def _quoted(sc: SimpleNamespace, layer: Any) -> Quoted | None:
    """The flow of the packet an ICMP error quotes, if scapy decoded its header."""
    inner = layer.getlayer(sc.IPerror) or layer.getlayer(sc.IPerror6)
    if inner is None:
        return None
    for cls, name in ((sc.TCPerror, "tcp"), (sc.UDPerror, "udp")):
        l4 = inner.getlayer(cls)
        if l4 is not None:
            return Quoted(name, (str(inner.src), int(l4.sport)), (str(inner.dst), int(l4.dport)))
    return None


def _payload_length(sc: SimpleNamespace, layer: Any) -> int:
    padding = layer.getlayer(sc.Padding)
    length = len(bytes(layer.payload))
    return max(0, length - (len(padding.load) if padding is not None else 0))


def _tcp_options(tcp: Any) -> str:
    wanted = {"MSS": "mss", "WScale": "wscale", "SAckOK": "sack"}
    shown = []
    for option in tcp.options or ():
        if isinstance(option, tuple) and option and option[0] in wanted:
            name = wanted[option[0]]
            value = option[1] if len(option) > 1 else None
            shown.append(f"{name}={value}" if isinstance(value, int) else name)
    return " ".join(shown)


def decode(packet: Any, time: float, size: int) -> PacketView | None:
    """A scapy packet as a :class:`PacketView`; None if it holds no IPv4 or IPv6 header."""
    sc = scapy_classes()
    ip = packet.getlayer(sc.IP)
    ip6 = packet.getlayer(sc.IPv6) if ip is None else None
    outer = ip if ip is not None else ip6
    if outer is None:
        return None
    src, dst = str(outer.src), str(outer.dst)
    if ip is not None and (ip.frag or ip.flags.MF) or (
            ip6 is not None and ip6.getlayer(sc.IPv6ExtHdrFragment) is not None):
        return PacketView(time, size, src, dst, "fragment")
    l4 = outer.payload
    # IPv6 extension headers (RFC 8200 4) come before the upper-layer header.
    for _ in range(8):
        if not type(l4).__name__.startswith("IPv6ExtHdr"):
            break
        l4 = l4.payload
    kind = type(l4)
    if kind is sc.TCP:
        flags = str(l4.flags)
        return PacketView(time, size, src, dst, "tcp", int(l4.sport), int(l4.dport),
                          flags, int(l4.seq), int(l4.ack), int(l4.window),
                          _payload_length(sc, l4), _tcp_options(l4) if "S" in flags else "")
    if kind is sc.UDP:
        return PacketView(time, size, src, dst, "udp", int(l4.sport), int(l4.dport),
                          payload=_payload_length(sc, l4))
    if kind is sc.ICMP or kind.__name__.startswith("ICMPv6"):
        number = int(getattr(l4, "type", 0) or 0)
        error = number in (ICMP_ERRORS_V4 if kind is sc.ICMP else ICMP_ERRORS_V6)
        # Echo requests and replies pair up by their identifier (RFC 792, RFC 4443 4).
        ident = 0 if error else int(getattr(l4, "id", 0) or 0)
        return PacketView(time, size, src, dst, "icmp" if kind is sc.ICMP else "icmp6",
                          ident, ident, icmp=_icmp_names(l4), icmp_error=error,
                          quoted=_quoted(sc, l4) if error else None)
    number = ip.proto if ip is not None else getattr(ip6, "nh", 0)
    return PacketView(time, size, src, dst, f"ip proto {int(number)}")


def read_capture(path: Path, where: str = "file", max_packets: int = MAX_PACKETS
                 ) -> CaptureSummary:
    """The summary of the pcap (or pcapng) file at ``path``.  A file that cannot be opened or
    read to its end gives a summary with ``error`` set (what was read before is kept)."""
    sc = scapy_classes()
    # What a short, cut or foreign file makes scapy raise.
    broken = (OSError, EOFError, ValueError, struct.error, sc.Scapy_Exception)
    analyser = FlowAnalyser(str(path), where)
    try:
        reader = sc.PcapReader(str(path))
    except PermissionError:
        analyser.capture.error = ("permission denied (the server's captures are root's: run "
                                  "pvpn trace as root)")
        return analyser.capture
    except FileNotFoundError:
        analyser.capture.error = "no such file (the server deletes its oldest captures)"
        return analyser.capture
    except broken as exc:
        analyser.capture.error = f"not a capture file scapy reads: {exc}"
        return analyser.capture
    link = LINK_HEADER.get(int(getattr(reader, "linktype", 101) or 0), 0)
    try:
        for count, packet in enumerate(reader):
            if count >= max_packets:
                analyser.capture.truncated = True
                break
            time = float(packet.time)
            wire = getattr(packet, "wirelen", None) or len(packet.original or b"")
            size = max(0, int(wire) - link)
            view = decode(packet, time, size)
            if view is None:
                analyser.add_undecoded(time, size)
            else:
                analyser.add(view)
    except broken as exc:
        analyser.capture.error = f"stopped reading after {analyser.capture.packets} " \
                                 f"packets: {exc}"
    finally:
        reader.close()
    return analyser.finish()


# ---------------------------------------------------------------- rates


@dataclass(frozen=True, slots=True)
class RateSeries:
    """Bytes per second in bins of ``bin`` seconds: ``(offset of the bin's start, B/s)``."""

    bin: float
    up: list[tuple[float, float]]
    down: list[tuple[float, float]]

    def to_json(self) -> dict[str, Any]:
        return {"bin": self.bin, "up": [list(p) for p in self.up],
                "down": [list(p) for p in self.down]}


def nice_step(span: float, count: int) -> float:
    """A round step (1, 2 or 5 times a power of ten) that cuts ``span`` into about
    ``count`` parts."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return float(factor * power)
    return float(10 * power)


def rate_series(capture: CaptureSummary, origin: float, end: float, bins: int = 100,
                begin: float | None = None) -> RateSeries:
    """The capture's bytes per second each way from ``begin`` (default: ``origin``) to
    ``end`` (epoch), in about ``bins`` bins of a round width (never finer than the BUCKET
    the counts are kept in); each point's time is an offset from ``origin``."""
    begin = origin if begin is None else begin
    width = max(BUCKET, nice_step(max(end - begin, BUCKET), bins))
    series: dict[str, list[tuple[float, float]]] = {}
    count = max(1, math.ceil((end - begin) / width - 1e-9))
    for direction in ("up", "down"):
        totals = [0] * count
        for slot, size in capture.buckets[direction].items():
            index = math.floor((slot * BUCKET - begin) / width + 1e-9)
            if 0 <= index < count:
                totals[index] += size
            elif index == count:
                totals[-1] += size  # the very last packet, on the end itself
        series[direction] = [(round(begin - origin + i * width, 6), total / width)
                             for i, total in enumerate(totals)]
    return RateSeries(width, series["up"], series["down"])


# ---------------------------------------------------------------- JSON and text


def capture_to_json(capture: CaptureSummary, start: float, end: float) -> dict[str, Any]:
    """The capture as JSON data: times as offsets from ``start`` (the trace's), flows in the
    order of their first packet, and the bytes per second each way (``rates``)."""
    up_packets, up_bytes = capture.direction_totals("up")
    down_packets, down_bytes = capture.direction_totals("down")
    return {
        "path": capture.path, "where": capture.where, "error": capture.error,
        "packets": capture.packets, "bytes": capture.bytes,
        "first": _offset(capture.first, start), "last": _offset(capture.last, start),
        "up": {"packets": up_packets, "bytes": up_bytes},
        "down": {"packets": down_packets, "bytes": down_bytes},
        "undecoded": capture.undecoded, "truncated": capture.truncated,
        "other_flows": capture.other_flows, "other_packets": capture.other_packets,
        "flows": [flow.to_json(start) for flow in capture.flows],
        "rates": rate_series(capture, start, max(end, capture.last or end),
                             begin=min(start, capture.first or start)).to_json(),
    }


def _p(value: object) -> str:
    return printable(str(value))


def _at(when: float | None, start: float) -> str:
    return "-" if when is None else f"+{when - start:.3f}s"


def _count(number: int, word: str) -> str:
    return f"{number:,} {word}{'' if number == 1 else 's'}"


def _direction_line(name: str, side: Direction, start: float) -> str:
    if not side.packets:
        return f"    {name:<5} nothing"
    parts = [_count(side.packets, "packet"), f"{side.bytes:,} B"]
    if side.payload:
        parts.append(f"{side.payload:,} B payload")
    for count, word in ((side.retransmissions, "retransmission"), (side.resets, "reset"),
                        (side.zero_windows, "zero window"), (side.dup_acks, "duplicate ACK"),
                        (side.gaps, "gap")):
        if count:
            parts.append(_count(count, word))
    return f"    {name:<5} {', '.join(parts)}   {_at(side.first, start)} .. {_at(side.last, start)}"


def capture_label(capture: CaptureSummary) -> str:
    """A short name for the capture: the node that recorded it, else the file's name."""
    return Path(capture.path).name if capture.where == "file" else capture.where


def where_text(capture: CaptureSummary) -> str:
    return f"in {capture_label(capture)}" if capture.where == "file" else f"at {capture.where}"


def format_capture(capture: CaptureSummary, start: float, shown: int = SHOWN_FLOWS
                   ) -> list[str]:
    """The terminal view of one capture: a header and a block per flow."""
    lines = [f"packets {_p(where_text(capture))}: {_p(capture.path)}"]
    if capture.error and not capture.packets:
        return [*lines, f"  cannot read it: {_p(capture.error)}"]
    flows = capture.flows
    head = f"  {_count(capture.packets, 'packet')}, {capture.bytes:,} B, " \
           f"{_count(len(flows), 'flow')}"
    if capture.packets:
        head += f"   {_at(capture.first, start)} .. {_at(capture.last, start)}"
    lines.append(head)
    if capture.error:
        lines.append(f"  warning: {_p(capture.error)}")
    if capture.truncated:
        lines.append(f"  warning: only the first {MAX_PACKETS:,} packets were read")
    if capture.undecoded:
        lines.append(f"  {capture.undecoded} packet(s) were neither IPv4 nor IPv6")
    if capture.other_flows:
        lines.append(f"  {capture.other_packets} packet(s) of {capture.other_flows} more "
                     f"flow(s) beyond the first {MAX_FLOWS} were only counted")
    for flow in flows[:shown]:
        state = f"   {_p(flow.state)}" if flow.state else ""
        lines.append(f"  {_p(flow.name)}   {_at(flow.start, start)} .. "
                     f"{_at(flow.end, start)}{state}")
        lines.append(_direction_line("up", flow.up, start))
        lines.append(_direction_line("down", flow.down, start))
        for label, note in (("first", flow.first), ("last", flow.last)):
            if note is not None and (label == "first" or flow.packets > 1):
                lines.append(f"    {label:<5} {_at(note.time, start)} {note.direction:<4} "
                             f"{_p(note.text)}")
    if len(flows) > shown:
        lines.append(f"  ... and {len(flows) - shown} more flows (--json lists them all)")
    return lines


def format_captures(captures: Sequence[CaptureSummary], start: float,
                    searched: str = "") -> str:
    """Every capture's view, or a line saying none was found (and where to look)."""
    if not captures:
        return ("packets: no capture of this session found" + (f" ({searched})" if searched
                                                              else "")
                + "; the server records them with [server] pcap_dir, the user with pvpn "
                  "connect --pcap FILE: give them with --pcap PATH")
    return "\n\n".join("\n".join(format_capture(c, start)) for c in captures)
