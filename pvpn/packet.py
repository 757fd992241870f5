"""Struct-level view of IPv4/IPv6 packets and the NAT rewrites of the server.

This runs for every tunnelled packet, so it works on raw ``bytes`` with precompiled
``struct.Struct`` objects and slicing; scapy is for tests and tools only. Nothing here reads a
clock, a file or a socket.

Supported: IPv4 (with options) and IPv6 (fixed header only; extension headers are refused),
carrying TCP, UDP, ICMP echo (RFC 792 types 8/0) and ICMP errors (3, 4, 5, 11, 12), or ICMPv6
echo (RFC 4443 types 128/129) and ICMPv6 errors (1, 2, 3, 4). IPv4 fragments are refused: the
NAT needs the ports, which only the first fragment carries. Anything else raises
:class:`~pvpn.errors.MalformedPacket` with a short reason; wrong arguments from our own code
(an address of the wrong length, a port out of range) raise
:class:`~pvpn.errors.LocalProtocolError`.

Packets the server re-sends or hands to a user are also held to what a host may send and
receive (:func:`classify` with ``strict``, :func:`sent_icmp_error_refusal`,
:func:`received_icmp_error_refusal`): no IPv4 options, no bytes past the IP length, and ICMP
errors only of the types, addresses and lengths RFC 1122, RFC 1812 and RFC 4443 give them.

Checksums are always updated incrementally (RFC 1624, eqn. 3: ``HC' = ~(~HC + ~m + m')``), never
recomputed, so a packet that arrived with a bad checksum leaves with a bad checksum and the end
host still drops it, and the cost does not depend on the payload length.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Final, NamedTuple

from pvpn.errors import LocalProtocolError, MalformedPacket

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58

# TCP flag bits (byte 13 of the TCP header), for callers of tcp_flags().
TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_ACK: Final = 0x10
TCP_CWR: Final = 0x80

# RFC 792: echo reply 0, echo request 8; errors: destination unreachable 3, source quench 4,
# redirect 5, time exceeded 11, parameter problem 12. Every error quotes the offending IP header
# plus at least the first 64 bits of its payload, starting right after the 8-byte ICMP header.
_ICMP4_ECHO: Final = frozenset((0, 8))
_ICMP4_ERRORS: Final = frozenset((3, 4, 5, 11, 12))
# RFC 4443: echo request 128, echo reply 129; errors: destination unreachable 1, packet too big 2,
# time exceeded 3, parameter problem 4. The invoking packet also starts at offset 8.
_ICMP6_ECHO: Final = frozenset((128, 129))
_ICMP6_ERRORS: Final = frozenset((1, 2, 3, 4))

# The ICMP errors a host sends about a datagram it received (the client host's kernel answering
# a reply it could not deliver), by type, with their codes. IPv4 (RFC 1122 3.2.2): destination
# unreachable 2 (protocol) and 3 (port), which a host SHOULD send (3.2.2.1), and 9, 10, 13
# (communication administratively prohibited, RFC 1122 3.2.2.1, RFC 1812 5.2.7.1), which host
# firewalls send (iptables/nftables REJECT, firewalld's icmp-host-prohibited); parameter problem
# 0, 1 and 2 (RFC 1122 3.2.2.5, RFC 1812 5.2.7.3). Codes 0, 1, 4 (fragmentation needed) and 5
# of type 3 are a gateway's (RFC 1122 3.2.2.1), as are redirects (type 5, RFC 1122 3.2.2.2) and
# time exceeded in transit (type 11 code 0, 3.2.2.4); a reassembly time-out (11/1) quotes a
# fragment, which the NAT never carries; source quench (4) is deprecated: hosts MUST NOT
# send it (RFC 6633 3). IPv6 (RFC 4443): destination unreachable 1 (administratively prohibited) and 4
# (port unreachable, 3.1), parameter problem 0, 1, 2 (3.4); packet too big (2) is a router's
# (3.2), as is time exceeded in transit (3.3), and unreachable codes 0, 3, 5, 6 are sent by
# the node that routes or resolves, not by the destination (3.1).
_HOST_SENDS4: Final = {3: frozenset((2, 3, 9, 10, 13)), 12: frozenset((0, 1, 2))}
_HOST_SENDS6: Final = {1: frozenset((1, 4)), 4: frozenset((0, 1, 2))}
# The ICMP errors a host may receive about a packet it sent, from the routers on the way or the
# destination: every defined code of destination unreachable (RFC 792, RFC 1122 3.2.2.1, RFC
# 1812 5.2.7.1: 0-15), time exceeded (0, 1) and parameter problem (0-2); for IPv6 destination
# unreachable 0-6, packet too big (its code is ignored by the receiver, RFC 4443 3.2), time
# exceeded 0-1, parameter problem 0-2. Not redirects (only the first-hop router on the host's
# own link may send one, RFC 1122 3.2.2.2; there is no such link through a tunnel) and not
# source quench (deprecated; TCP MUST ignore it, RFC 6633 3-5).
_HOST_RECEIVES4: Final = {3: frozenset(range(16)), 11: frozenset((0, 1)),
                          12: frozenset((0, 1, 2))}
_HOST_RECEIVES6: Final = {1: frozenset(range(7)), 2: frozenset(range(256)),
                          3: frozenset((0, 1)), 4: frozenset((0, 1, 2))}
# The largest ICMP error, IP header included: RFC 1812 4.3.2.3 (IPv4: the error SHOULD NOT
# exceed 576 bytes; RFC 1122 3.2.2 asks for only 8 bytes of the quoted payload) and RFC 4443
# 2.4 (c) (IPv6: not more than the minimum IPv6 MTU, 1280 bytes). Linux never sends more.
ICMP4_ERROR_MAX: Final = 576
ICMP6_ERROR_MAX: Final = 1280

# version/IHL, (TOS), total length, (identification), flags/fragment offset, (TTL), protocol
_IPV4: Final = struct.Struct("!BxH2xHxB")
# version/class byte, (class/flow label), payload length, next header
_IPV6: Final = struct.Struct("!B3xHB")
_PORTS: Final = struct.Struct("!HH")



class IpOptions(MalformedPacket):
    """An IPv4 packet (or the packet an ICMP error quotes) carries IP options.

    The NAT refuses them rather than pass them on: loose and strict source routes (RFC 791
    3.1) would let a user steer the server's packets, and a record-route or timestamp option
    collects addresses of the server's network for the user. Hosts ignore or refuse source
    routes too (RFC 1122 3.2.1.8, Linux's accept_source_route=0). No TCP, UDP or ICMP
    packet of an ordinary application carries options (``ping -R`` does)."""


_NAMES: Final = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMPV6: "icmpv6"}


class FlowKey(NamedTuple):
    """The 5-tuple of one direction of a flow, addresses packed (4 or 16 bytes).

    For ICMP/ICMPv6 echo both ``sport`` and ``dport`` hold the echo identifier: it is what the
    NAT rewrites in place of a port, and a reply carries the same identifier back.

    A NamedTuple, not a dataclass: it is built and looked up in dicts for every packet, and a
    tuple's hash and equality run in C (about 4 times faster than a frozen dataclass's).
    """

    proto: int
    src: bytes
    sport: int
    dst: bytes
    dport: int

    def reversed(self) -> FlowKey:
        """The key of the other direction (the replies)."""
        return FlowKey(self.proto, self.dst, self.dport, self.src, self.sport)

    def describe(self) -> str:
        """A short human form for logs, e.g. ``tcp 10.0.0.1:1234 > 10.0.0.2:80``."""
        name = _NAMES.get(self.proto, f"proto {self.proto}")
        src = _address_text(self.src)
        dst = _address_text(self.dst)
        if self.proto == PROTO_ICMP or self.proto == PROTO_ICMPV6:
            return f"{name} {src} > {dst} id {self.sport}"
        if len(self.src) == 16:
            src = f"[{src}]"
        if len(self.dst) == 16:
            dst = f"[{dst}]"
        return f"{name} {src}:{self.sport} > {dst}:{self.dport}"


def _address_text(packed: bytes) -> str:
    try:
        return str(ipaddress.ip_address(packed))
    except ValueError:
        return packed.hex()


def destination_address(packet: bytes) -> bytes:
    """The packed destination address, from the fixed header only (cheap, no L4 checks)."""
    if packet:
        version = packet[0] >> 4
        if version == 4 and len(packet) >= 20:
            return packet[16:20]
        if version == 6 and len(packet) >= 40:
            return packet[24:40]
    raise MalformedPacket("not an ip packet")


def _locate(packet: bytes, strict: bool = False) -> tuple[int, int, int, int]:
    """Check the IP and L4 headers; return (version, protocol, L4 offset, end of IP payload).

    The end comes from the IP length field: trailing bytes (link padding) are not ours.
    ``strict`` (a packet the server re-sends or hands on): IpOptions for IPv4 options, and
    MalformedPacket for bytes past the IP length (the raw socket would send them, and Linux
    rewrites the IPv4 total length to what it sends).
    """
    n = len(packet)
    if n < 20:
        raise MalformedPacket("too short")
    b0 = packet[0]
    version = b0 >> 4
    if version == 4:
        _, total, frag, proto = _IPV4.unpack_from(packet)
        l4 = (b0 & 0x0F) * 4
        if l4 < 20:
            raise MalformedPacket("ipv4 header length")
        if total > n or total < l4:
            raise MalformedPacket("ipv4 total length")
        if frag & 0x3FFF:  # MF set or offset != 0; DF (0x4000) is fine
            raise MalformedPacket("fragment")
        if strict and l4 != 20:
            raise IpOptions("ipv4 options")
        end = total
    elif version == 6:
        if n < 40:
            raise MalformedPacket("too short")
        _, plen, proto = _IPV6.unpack_from(packet)
        end = 40 + plen
        if end > n:
            raise MalformedPacket("ipv6 payload length")
        if proto != PROTO_TCP and proto != PROTO_UDP and proto != PROTO_ICMPV6:
            # Extension headers (hop-by-hop 0, routing 43, fragment 44, ...) are not walked.
            raise MalformedPacket(f"ipv6 next header {proto}")
        l4 = 40
    else:
        raise MalformedPacket("not an ip packet")
    if strict and end != n:
        raise MalformedPacket("bytes past the ip length")
    avail = end - l4
    if proto == PROTO_TCP:
        if avail < 20:
            raise MalformedPacket("tcp header truncated")
        doff = (packet[l4 + 12] >> 4) * 4
        if doff < 20 or doff > avail:
            raise MalformedPacket("tcp data offset")
    elif proto == PROTO_UDP:
        if avail < 8:
            raise MalformedPacket("udp header truncated")
        ulen = packet[l4 + 4] << 8 | packet[l4 + 5]
        if ulen < 8 or ulen > avail:
            raise MalformedPacket("udp length")
    elif (proto == PROTO_ICMP and version == 4) or (proto == PROTO_ICMPV6 and version == 6):
        if avail < 8:
            raise MalformedPacket("icmp header truncated")
    else:
        raise MalformedPacket(f"protocol {proto} unsupported")
    return version, proto, l4, end


def _embedded(packet: bytes, version: int, l4: int, end: int,
              strict: bool = False) -> tuple[int, int, int]:
    """Check the packet quoted in an ICMP error at ``l4``; return (protocol, IP offset, L4 offset).

    RFC 792 / RFC 4443 guarantee the quoted IP header and the first 8 bytes of its payload
    (enough for both ports or the echo identifier); its length fields describe the original
    packet, which is usually truncated here, so they are not checked against what is present.
    ``strict``: IpOptions if the quoted IPv4 header has options (no packet the NAT passes
    has them, so no error about one can be about a NAT flow).
    """
    ip = l4 + 8
    if version == 4:
        if end - ip < 20:
            raise MalformedPacket("icmp error: quoted header truncated")
        b0 = packet[ip]
        if b0 >> 4 != 4:
            raise MalformedPacket("icmp error: quoted packet not ipv4")
        ihl = (b0 & 0x0F) * 4
        if ihl < 20:
            raise MalformedPacket("icmp error: quoted ipv4 header length")
        if strict and ihl != 20:
            raise IpOptions("icmp error: quoted ipv4 options")
        _, _, frag, proto = _IPV4.unpack_from(packet, ip)
        if frag & 0x3FFF:
            raise MalformedPacket("icmp error: quoted fragment")
        inner_l4 = ip + ihl
        echo = _ICMP4_ECHO
        icmp = PROTO_ICMP
    else:
        if end - ip < 40:
            raise MalformedPacket("icmp error: quoted header truncated")
        if packet[ip] >> 4 != 6:
            raise MalformedPacket("icmp error: quoted packet not ipv6")
        proto = packet[ip + 6]
        inner_l4 = ip + 40
        echo = _ICMP6_ECHO
        icmp = PROTO_ICMPV6
    if end - inner_l4 < 8:
        raise MalformedPacket("icmp error: quoted l4 header truncated")
    if proto == icmp:
        # Errors are never sent about errors (RFC 1122 3.2.2, RFC 4443 2.4 e), so only an echo
        # can be quoted, and only an echo has an identifier to map back.
        if packet[inner_l4] not in echo:
            raise MalformedPacket("icmp error: quoted icmp is not an echo")
    elif proto != PROTO_TCP and proto != PROTO_UDP:
        raise MalformedPacket(f"icmp error: quoted protocol {proto} unsupported")
    return proto, ip, inner_l4


def _addresses(packet: bytes, version: int, base: int = 0) -> tuple[bytes, bytes]:
    if version == 4:
        return packet[base + 12 : base + 16], packet[base + 16 : base + 20]
    return packet[base + 8 : base + 24], packet[base + 24 : base + 40]


def parse_flow(packet: bytes) -> FlowKey:
    """The flow of a TCP, UDP or ICMP/ICMPv6 echo packet.

    An ICMP error has no flow of its own (use :func:`icmp_error_inner_flow`), so it raises
    MalformedPacket here, like any other ICMP type.
    """
    version, proto, l4, _ = _locate(packet)
    src, dst = _addresses(packet, version)
    if proto == PROTO_TCP or proto == PROTO_UDP:
        sport, dport = _PORTS.unpack_from(packet, l4)
        return FlowKey(proto, src, sport, dst, dport)
    kind = packet[l4]
    if kind in (_ICMP4_ECHO if version == 4 else _ICMP6_ECHO):
        ident = packet[l4 + 4] << 8 | packet[l4 + 5]
        return FlowKey(proto, src, ident, dst, ident)
    if kind in (_ICMP4_ERRORS if version == 4 else _ICMP6_ERRORS):
        raise MalformedPacket("icmp error has no flow of its own")
    raise MalformedPacket(f"icmp type {kind} unsupported")


def classify(packet: bytes, strict: bool = False) -> tuple[FlowKey, int, bool]:
    """One pass over the headers for the packet path: ``(flow, tcp_flags, is_error)``.

    For a TCP, UDP or echo packet the flow is :func:`parse_flow`'s; for an ICMP/ICMPv6 error it
    is the quoted packet's flow, as :func:`icmp_error_inner_flow` gives it. MalformedPacket for
    anything else. ``strict`` is for packets the server NATs (both ways): IpOptions for IPv4
    options, outer or quoted, and MalformedPacket for bytes past the IP length.
    """
    version, proto, l4, end = _locate(packet, strict)
    if proto == PROTO_TCP or proto == PROTO_UDP:
        src, dst = _addresses(packet, version)
        sport, dport = _PORTS.unpack_from(packet, l4)
        flags = packet[l4 + 13] if proto == PROTO_TCP else 0
        return FlowKey(proto, src, sport, dst, dport), flags, False
    kind = packet[l4]
    if kind in (_ICMP4_ECHO if version == 4 else _ICMP6_ECHO):
        src, dst = _addresses(packet, version)
        ident = packet[l4 + 4] << 8 | packet[l4 + 5]
        return FlowKey(proto, src, ident, dst, ident), 0, False
    if kind not in (_ICMP4_ERRORS if version == 4 else _ICMP6_ERRORS):
        raise MalformedPacket(f"icmp type {kind} unsupported")
    inner_proto, ip, inner_l4 = _embedded(packet, version, l4, end, strict)
    src, dst = _addresses(packet, version, ip)
    if inner_proto == PROTO_TCP or inner_proto == PROTO_UDP:
        sport, dport = _PORTS.unpack_from(packet, inner_l4)
        return FlowKey(inner_proto, src, sport, dst, dport), 0, True
    ident = packet[inner_l4 + 4] << 8 | packet[inner_l4 + 5]
    return FlowKey(inner_proto, src, ident, dst, ident), 0, True


#: Echo replies (RFC 792 type 0, RFC 4443 type 129): what answers an echo mapping.
ECHO_REPLIES: Final = frozenset((0, 129))


def icmp_type(packet: bytes) -> int:
    """The ICMP/ICMPv6 type of a packet :func:`classify` took as ICMP."""
    return packet[(packet[0] & 0x0F) * 4] if packet[0] >> 4 == 4 else packet[40]


def icmp_error_inner_flow(packet: bytes) -> FlowKey:
    """The flow of the packet quoted in an ICMP/ICMPv6 error, as that packet was sent.

    Its ``src``/``sport`` are the original sender's (on the server: the NAT address and port),
    its ``dst``/``dport`` the remote end's. MalformedPacket if ``packet`` is not an ICMP error or
    the quote lacks the IP header plus 8 bytes of L4 header.
    """
    version, proto, l4, end = _locate(packet)
    errors = _ICMP4_ERRORS if version == 4 else _ICMP6_ERRORS
    if proto == PROTO_TCP or proto == PROTO_UDP or packet[l4] not in errors:
        raise MalformedPacket("not an icmp error")
    inner_proto, ip, inner_l4 = _embedded(packet, version, l4, end)
    src, dst = _addresses(packet, version, ip)
    if inner_proto == PROTO_TCP or inner_proto == PROTO_UDP:
        sport, dport = _PORTS.unpack_from(packet, inner_l4)
        return FlowKey(inner_proto, src, sport, dst, dport)
    ident = packet[inner_l4 + 4] << 8 | packet[inner_l4 + 5]
    return FlowKey(inner_proto, src, ident, dst, ident)


def _icmp_error_view(packet: bytes) -> tuple[int, int, int, bytes, bytes, bytes, bytes]:
    """(version, type, code, source, destination, quoted source, quoted destination) of an
    ICMP/ICMPv6 error; MalformedPacket if ``packet`` is not a valid one."""
    version, proto, l4, end = _locate(packet)
    if proto != PROTO_ICMP and proto != PROTO_ICMPV6:
        raise MalformedPacket("not an icmp error")
    kind = packet[l4]
    if kind not in (_ICMP4_ERRORS if version == 4 else _ICMP6_ERRORS):
        raise MalformedPacket("not an icmp error")
    _, ip, _ = _embedded(packet, version, l4, end)
    src, dst = _addresses(packet, version)
    quoted_src, quoted_dst = _addresses(packet, version, ip)
    return version, kind, packet[l4 + 1], src, dst, quoted_src, quoted_dst


def _host_error_refusal(packet: bytes, allowed4: dict[int, frozenset[int]],
                        allowed6: dict[int, frozenset[int]], who: str,
                        from_quoted_destination: bool) -> str | None:
    """Why ``packet`` is not an ICMP error of an ``allowed`` type and code, within the length
    limit and addressed to the source of the packet it quotes (with
    ``from_quoted_destination``: and sent from that packet's destination); None if it is."""
    version, kind, code, src, dst, quoted_src, quoted_dst = _icmp_error_view(packet)
    codes = (allowed4 if version == 4 else allowed6).get(kind)
    name = "icmp" if version == 4 else "icmpv6"
    if codes is None or code not in codes:
        return f"{name} type {kind} code {code} is not an error {who}"
    limit = ICMP4_ERROR_MAX if version == 4 else ICMP6_ERROR_MAX
    if len(packet) > limit:
        return f"{name} error of {len(packet)} bytes, more than {limit}"
    if dst != quoted_src:
        return "not addressed to the source of the packet it quotes"
    if from_quoted_destination and src != quoted_dst:
        return "not sent from the destination of the packet it quotes"
    return None


def sent_icmp_error_refusal(packet: bytes) -> str | None:
    """Why ``packet`` is not an ICMP error a host sends about a packet it received; None if
    it is one.

    For the errors a user's client host sends back through its tunnel (its kernel answering
    a reply it could not deliver): only the types and codes a host sends (see _HOST_SENDS4/6),
    at most 576 (IPv4) or 1280 (IPv6) bytes as sent (trailing bytes included), addressed to
    the source of the packet it quotes (the remote end that sent the reply) and sent from
    that packet's destination (the host itself). MalformedPacket if it is no valid ICMP error.
    """
    return _host_error_refusal(packet, _HOST_SENDS4, _HOST_SENDS6, "a host sends", True)


def received_icmp_error_refusal(packet: bytes) -> str | None:
    """Why ``packet`` is not an ICMP error a host may receive about a packet it sent; None if
    it may.

    For errors on their way to a host: at the server, from the network to a NAT address; at
    pvpn-client, handed back by a user's tunnel on their way to a protected socket. Only the
    types and codes a host receives (see _HOST_RECEIVES4/6: no redirects, no source quench),
    at most 576 (IPv4) or 1280 (IPv6) bytes as delivered, and addressed to the source of the
    packet it quotes (the host that sent it: the NAT address at the server, the user's own
    address at the client). Its source may be any router on the way. MalformedPacket if it is
    no valid ICMP error.
    """
    return _host_error_refusal(packet, _HOST_RECEIVES4, _HOST_RECEIVES6, "a host receives",
                               False)


def tcp_flags(packet: bytes) -> int:
    """The TCP flag byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10, ...); 0 for non-TCP."""
    _, proto, l4, _ = _locate(packet)
    if proto == PROTO_TCP:
        return packet[l4 + 13]
    return 0


def rewrite_source(packet: bytes, new_src: bytes, new_sport: int) -> bytes:
    """A copy of ``packet`` with the source address and source port replaced (the NAT outbound).

    The port is the TCP/UDP source port, or the echo identifier of an ICMP/ICMPv6 echo. The IPv4
    header checksum and the L4 checksum (with its pseudo-header) are updated incrementally
    (RFC 1624). A UDP checksum of 0 means "none" (RFC 768) and stays 0; a UDP checksum that
    works out to 0 is sent as 0xFFFF.

    For an ICMP/ICMPv6 error this is the mirror image of :func:`rewrite_destination`: the outer
    source and the quoted packet's *destination* address and port are replaced (an error sent by
    the client host about a reply it received).
    """
    return _rewrite(packet, new_src, new_sport, False)


def rewrite_destination(packet: bytes, new_dst: bytes, new_dport: int) -> bytes:
    """A copy of ``packet`` with the destination address and port replaced (the NAT inbound).

    For an ICMP/ICMPv6 error (a reply about a packet the server sent for a session), ``new_dst``
    replaces the outer destination, and the quoted packet's *source* address and source port
    (echo identifier) become ``new_dst``/``new_dport``, so the client host recognises its own
    packet. Updated incrementally: the outer IPv4 header checksum, the quoted IPv4 header
    checksum, the quoted L4 checksum *when the quote contains it* (a UDP or ICMP checksum always
    is within the 8 guaranteed bytes; a TCP checksum at offset 16 only in a longer quote; a
    quoted UDP checksum of 0 stays 0), and the ICMP checksum over all of that (for ICMPv6 also
    over the pseudo-header, RFC 4443 2.3; ICMPv4 has none, RFC 792). Fixing the quoted L4
    checksum makes the quote byte-identical to what the client sent, as Linux conntrack does.
    """
    return _rewrite(packet, new_dst, new_dport, True)


def _fix(buf: bytearray, at: int, old: int, new: int) -> int:
    """Update the checksum at ``buf[at:at+2]`` for data words summing to ``old`` now ``new``.

    RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')``, in arithmetic modulo 0xFFFF, where one's
    complement negation is subtraction: ``HC' = HC + m - m'``. Any even-aligned field may be
    passed as one big integer (``int.from_bytes``), since 2**16 == 1 (mod 0xFFFF) makes its
    value congruent to the sum of its 16-bit words. The result is never 0xFFFF: a one's
    complement sum that is zero modulo 0xFFFF is -0 (0xFFFF) unless every word is zero, which
    the pseudo-header (and the IPv4 version nibble) rule out; so its checksum is 0x0000, the
    same as a full recomputation gives. Returns the new checksum.
    """
    checksum = ((buf[at] << 8 | buf[at + 1]) + old - new) % 0xFFFF
    buf[at] = checksum >> 8
    buf[at + 1] = checksum & 0xFF
    return checksum


def _fix_udp(buf: bytearray, at: int, old: int, new: int) -> int:
    """:func:`_fix` for a UDP checksum, which RFC 768 gives two special values."""
    if buf[at] == 0 and buf[at + 1] == 0:  # no checksum was computed; keep it that way
        return 0
    checksum = _fix(buf, at, old, new)
    if checksum == 0:  # a computed 0 is transmitted as all ones
        buf[at] = buf[at + 1] = 0xFF
        return 0xFFFF
    return checksum


def _check_args(address: bytes, port: int, version: int) -> None:
    if len(address) != (4 if version == 4 else 16):
        raise LocalProtocolError(f"address of {len(address)} bytes for an ipv{version} packet")
    if port < 0 or port > 0xFFFF:
        raise LocalProtocolError(f"port {port} out of range")


def _rewrite(packet: bytes, address: bytes, port: int, destination: bool) -> bytes:
    version, proto, l4, end = _locate(packet)
    _check_args(address, port, version)
    if version == 4:
        at = 16 if destination else 12
        width = 4
    else:
        at = 24 if destination else 8
        width = 16
    buf = bytearray(packet)
    old_addr = int.from_bytes(packet[at : at + width], "big")
    new_addr = int.from_bytes(address, "big")
    buf[at : at + width] = address
    if version == 4:
        _fix(buf, 10, old_addr, new_addr)
    if proto == PROTO_TCP or proto == PROTO_UDP:
        p = l4 + 2 if destination else l4
        old_port = packet[p] << 8 | packet[p + 1]
        buf[p] = port >> 8
        buf[p + 1] = port & 0xFF
        # The pseudo-header carries the addresses (RFC 793 3.1, RFC 768, RFC 8200 8.1).
        if proto == PROTO_TCP:
            _fix(buf, l4 + 16, old_addr + old_port, new_addr + port)
        else:
            _fix_udp(buf, l4 + 6, old_addr + old_port, new_addr + port)
        return bytes(buf)
    kind = packet[l4]
    if version == 4:
        if kind in _ICMP4_ECHO:
            old_id = packet[l4 + 4] << 8 | packet[l4 + 5]
            buf[l4 + 4] = port >> 8
            buf[l4 + 5] = port & 0xFF
            # ICMPv4 has no pseudo-header (RFC 792): only the identifier counts.
            if _fix(buf, l4 + 2, old_id, port) == 0 and buf.count(0, l4, end) == end - l4:
                # The one message whose words may all be zero (reply, id 0, seq 0, zero data):
                # its sum is +0, so its checksum is 0xFFFF, not 0 (RFC 1624 section 3).
                buf[l4 + 2] = buf[l4 + 3] = 0xFF
            return bytes(buf)
        if kind in _ICMP4_ERRORS:
            _rewrite_quote(buf, packet, 4, l4, end, new_addr, address, port, not destination, 0, 0)
            return bytes(buf)
    else:
        if kind in _ICMP6_ECHO:
            old_id = packet[l4 + 4] << 8 | packet[l4 + 5]
            buf[l4 + 4] = port >> 8
            buf[l4 + 5] = port & 0xFF
            # The ICMPv6 checksum covers a pseudo-header (RFC 4443 2.3).
            _fix(buf, l4 + 2, old_addr + old_id, new_addr + port)
            return bytes(buf)
        if kind in _ICMP6_ERRORS:
            _rewrite_quote(
                buf, packet, 6, l4, end, new_addr, address, port, not destination, old_addr, new_addr
            )
            return bytes(buf)
    raise MalformedPacket(f"icmp type {kind} unsupported")


def _rewrite_quote(
    buf: bytearray,
    packet: bytes,
    version: int,
    l4: int,
    end: int,
    new_addr: int,
    address: bytes,
    port: int,
    destination: bool,
    icmp_old: int,
    icmp_new: int,
) -> None:
    """Rewrite the packet quoted in the ICMP error at ``l4`` and fix every checksum it touches.

    ``destination`` picks the quoted packet's destination (else source) side. ``icmp_old`` /
    ``icmp_new`` start as the outer pseudo-header change (ICMPv6) and collect every word changed
    inside the ICMP message; all of them lie at even offsets from ``l4`` (the quote starts at 8,
    IPv4 header lengths are multiples of 4), so one RFC 1624 update of the ICMP checksum at the
    end accounts for them all.
    """
    proto, ip, inner_l4 = _embedded(packet, version, l4, end)
    if version == 4:
        at = ip + (16 if destination else 12)
        width = 4
    else:
        at = ip + (24 if destination else 8)
        width = 16
    old_addr = int.from_bytes(packet[at : at + width], "big")
    buf[at : at + width] = address
    icmp_old += old_addr
    icmp_new += new_addr
    if version == 4:
        icmp_old += packet[ip + 10] << 8 | packet[ip + 11]
        icmp_new += _fix(buf, ip + 10, old_addr, new_addr)
    if proto == PROTO_TCP or proto == PROTO_UDP:
        p = inner_l4 + 2 if destination else inner_l4
    else:
        p = inner_l4 + 4  # echo identifier
    old_port = packet[p] << 8 | packet[p + 1]
    buf[p] = port >> 8
    buf[p + 1] = port & 0xFF
    icmp_old += old_port
    icmp_new += port
    if proto == PROTO_TCP:
        ck = inner_l4 + 16
        if ck + 2 <= end:  # only present when more than the guaranteed 8 bytes were quoted
            icmp_old += packet[ck] << 8 | packet[ck + 1]
            icmp_new += _fix(buf, ck, old_addr + old_port, new_addr + port)
    elif proto == PROTO_UDP:
        ck = inner_l4 + 6
        icmp_old += packet[ck] << 8 | packet[ck + 1]
        icmp_new += _fix_udp(buf, ck, old_addr + old_port, new_addr + port)
    else:
        ck = inner_l4 + 2
        icmp_old += packet[ck] << 8 | packet[ck + 1]
        if version == 4:
            icmp_new += _fix(buf, ck, old_port, port)
        else:
            icmp_new += _fix(buf, ck, old_addr + old_port, new_addr + port)
    _fix(buf, l4 + 2, icmp_old, icmp_new)


# ---------------------------------------------------------------- super-packets (issue 12)
def _pseudo_sum(packet: bytes | bytearray, l4: int, proto: int) -> int:
    """The pseudo-header's words summed, modulo 0xFFFF (addresses, protocol, L4 length)."""
    if packet[0] >> 4 == 4:
        addresses = int.from_bytes(packet[12:20], "big")
    else:
        addresses = int.from_bytes(packet[8:40], "big")
    return (addresses + proto + len(packet) - l4) % 0xFFFF


#: NFQA_SKB_INFO's flags, as pvpn.io.nfqueue hands them over with a packet: its checksum
#: holds the pseudo-header's sum only (CHECKSUM_PARTIAL), it is a GSO super-packet, its
#: checksum was not verified.
SKB_CSUMNOTREADY: Final = 1
SKB_GSO: Final = 2
SKB_CSUM_NOTVERIFIED: Final = 4


def l4_offset(packet: bytes | bytearray) -> int:
    """Where the L4 header starts in a packet without IP options or extension headers."""
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


def tcp_headers_length(packet: bytes | bytearray) -> int:
    """The IP and TCP headers' length of a TCP packet :func:`classify` took."""
    l4 = l4_offset(packet)
    return l4 + (packet[l4 + 12] >> 4) * 4


def _l4(packet: bytes | bytearray) -> tuple[int, int]:
    """(L4 offset, protocol) of a packet without IP options or extension headers."""
    if packet[0] >> 4 == 4:
        return (packet[0] & 0x0F) * 4, packet[9]
    return 40, packet[6]


def plain_transport(packet: bytes | bytearray) -> int | None:
    """PROTO_TCP or PROTO_UDP for such a packet right after a plain IP header (IPv4 without
    options, IPv6 without extension headers: where the checksum helpers look), else None."""
    if len(packet) < 28:
        return None
    if packet[0] >> 4 == 4:
        l4, proto = 20, packet[9] if packet[0] & 0x0F == 5 else -1
    elif packet[0] >> 4 == 6:
        l4, proto = 40, packet[6]
    else:
        return None
    if proto == PROTO_TCP:
        return proto if len(packet) >= l4 + 20 else None
    return proto if proto == PROTO_UDP and len(packet) >= l4 + 8 else None


def partial_checksum(packet: bytes | bytearray) -> bytearray:
    """A copy of a TCP ``packet`` whose checksum field holds its pseudo-header's sum only,
    folded, not complemented: the kernel's CHECKSUM_PARTIAL (``~tcp_v4_check(len, s, d, 0)``),
    which whoever segments or delivers it completes (csum_start: the TCP header, csum_offset:
    16). Whatever the field held before (a GRO'd super-packet has its first segment's sum, a
    NAT rewrite updated it as a full checksum) does not count."""
    out = bytearray(packet)
    l4, proto = _l4(out)
    folded = _pseudo_sum(out, l4, proto) or 0xFFFF  # a sum of nonzero words is never +0
    out[l4 + 16] = folded >> 8
    out[l4 + 17] = folded & 0xFF
    return out


def to_forward(packet: bytes | bytearray) -> bytearray:
    """A copy of a TCP super-packet the server hands the kernel's forwarding (its TUN device,
    pvpn.forwarding): its checksum partial (:func:`partial_checksum`, the kernel completes
    each segment's), one hop more, which forwarding takes off again, so it leaves as the raw
    socket would have sent it (a hop limit of 255 leaves as 254; one of 0 must not come
    here: the kernel drops it), and an IPv4 header checksum computed afresh, as the raw socket
    computes it (an incremental update keeps a wrong one wrong, and the kernel drops that)."""
    out = partial_checksum(packet)
    if out[0] >> 4 == 6:
        out[7] = min(255, out[7] + 1)
        return out
    out[8] = min(255, out[8] + 1)
    ihl = (out[0] & 0x0F) * 4
    out[10] = out[11] = 0
    with memoryview(out) as view:
        words = int.from_bytes(view[:ihl], "big")
    checksum = (0xFFFF - words % 0xFFFF) % 0xFFFF  # never 0xFFFF: the version nibble
    out[10] = checksum >> 8
    out[11] = checksum & 0xFF
    return out


def complete_checksum(packet: bytes | bytearray) -> bytearray:
    """A copy of a TCP or UDP ``packet`` with its L4 checksum computed over all of it (the
    pseudo-header, the header and the data), whatever its field held: what the kernel's
    skb_checksum_help does for a CHECKSUM_PARTIAL packet. One ones'-complement sum at C
    speed: ``int.from_bytes`` of the whole segment modulo 0xFFFF."""
    out = bytearray(packet)
    l4, proto = _l4(out)
    at = l4 + (16 if proto == PROTO_TCP else 6)
    out[at] = out[at + 1] = 0
    with memoryview(out) as view:
        words = int.from_bytes(view[l4:], "big")
    if (len(out) - l4) & 1:
        words <<= 8  # the odd byte padded with a zero
    checksum = (0xFFFF - (_pseudo_sum(out, l4, proto) + words) % 0xFFFF) % 0xFFFF
    if checksum == 0 and proto == PROTO_UDP:
        checksum = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    out[at] = checksum >> 8
    out[at + 1] = checksum & 0xFF
    return out


def checksum_ok(packet: bytes | bytearray) -> bool:
    """Whether a TCP or UDP packet's L4 checksum is right (a UDP checksum of 0: none)."""
    l4, proto = _l4(packet)
    at = l4 + (16 if proto == PROTO_TCP else 6)
    if proto == PROTO_UDP and packet[at] == packet[at + 1] == 0:
        return True
    return complete_checksum(packet)[at:at + 2] == packet[at:at + 2]


def segment_tcp(packet: bytes | bytearray, mss: int) -> list[bytes]:
    """A TCP super-packet (one TCP header, up to 64 KB of data) as the segments of at most
    ``mss`` bytes of data it stands for, each with its own IP length, IPv4 id (counting up
    from the super-packet's) and header checksum, sequence number and TCP checksum, as the
    kernel's tcp_gso_segment makes them: CWR only on the first, FIN and PSH only on the last.
    A packet that fits comes back alone, its checksum completed.

    Each segment is its new header and a slice of the data (one copy); its checksum is the
    sum of the pseudo-header, the header and the data's sum (:func:`chunk_sums`, all the
    segments' data at once), never a sum over the segment again."""
    l4, _ = _l4(packet)
    header_len = l4 + (packet[l4 + 12] >> 4) * 4
    length = len(packet) - header_len
    if length <= mss:
        return [bytes(complete_checksum(packet))]
    source = bytes(packet)
    data = memoryview(source)[header_len:]
    sums = chunk_sums(data, mss)
    header = bytearray(source[:header_len])
    version = header[0] >> 4
    seq = int.from_bytes(header[l4 + 4:l4 + 8], "big")
    flags = header[l4 + 13]
    # What changes per segment is zeroed and summed apart: a 16-bit word at any even offset
    # adds itself to a sum modulo 0xFFFF (2**16 == 1), so each sum is the base and the
    # segment's own words, no pass over the header again.
    header[l4 + 4:l4 + 8] = bytes(4)
    header[l4 + 13] = header[l4 + 16] = header[l4 + 17] = 0
    tcp_base = int.from_bytes(header[l4:], "big")
    if version == 4:
        ident = int.from_bytes(header[4:6], "big")
        header[2] = header[3] = header[4] = header[5] = header[10] = header[11] = 0
        ip_base = int.from_bytes(header[:20], "big")
        pseudo = int.from_bytes(header[12:20], "big") + PROTO_TCP - l4
    else:
        ident = ip_base = 0
        pseudo = int.from_bytes(header[8:40], "big") + PROTO_TCP - l4
    pack_into = struct.pack_into
    out = []
    for index, start in enumerate(range(0, length, mss)):
        size = min(mss, length - start)
        total = header_len + size
        if version == 4:
            this_id = (ident + index) & 0xFFFF
            ip_sum = (ip_base + total + this_id) % 0xFFFF
            pack_into(">HH", header, 2, total, this_id)
            pack_into(">H", header, 10, (0xFFFF - ip_sum) % 0xFFFF)
        else:
            pack_into(">H", header, 4, total - 40)
        this_seq = (seq + start) & 0xFFFFFFFF
        this_flags = (flags & ~0x80 if start else flags) & (
            0xFF if start + size >= length else ~0x09)
        words = (pseudo + total + tcp_base + (this_seq >> 16) + (this_seq & 0xFFFF)
                 + this_flags + sums[index])
        pack_into(">I", header, l4 + 4, this_seq)
        header[l4 + 13] = this_flags
        pack_into(">H", header, l4 + 16, (0xFFFF - words % 0xFFFF) % 0xFFFF)
        out.append(bytes(header) + data[start:start + size])
    return out


_numpy: Any = None


def chunk_sums(data: bytes | memoryview, size: int) -> list[int]:
    """The ones'-complement sum (modulo 0xFFFF, an odd byte padded with a zero) of each
    ``size``-byte chunk of ``data``, the last one shorter. The whole chunks are summed in one
    numpy call (about 13 us for 64 KB, a tenth of a big-int sum per chunk); the last, or any
    chunk of an odd size, which starts off the 16-bit words, by the big int."""
    global _numpy
    if _numpy is None:
        import numpy  # here: the daemons need it for super-packets only, `pvpn connect` never

        _numpy = numpy
    whole = len(data) // size if size % 2 == 0 else 0
    sums: list[int] = []
    if whole:
        words = _numpy.frombuffer(data, dtype=">u2", count=whole * size // 2)
        sums = (words.reshape(whole, size // 2).sum(axis=1, dtype=_numpy.uint64)
                % 0xFFFF).tolist()
    for start in range(whole * size, len(data), size):
        piece = data[start:start + size]
        value = int.from_bytes(piece, "big")
        sums.append((value << 8 if len(piece) & 1 else value) % 0xFFFF)
    return sums
