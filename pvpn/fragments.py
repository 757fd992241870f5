"""Datagrams larger than a link: fragmentation, bounded reassembly, path MTU errors.

pvpn carries whole IP datagrams through its tunnels, up to the largest the protocols allow
(IPv4: 65,535 bytes; IPv6: a 65,535-byte payload, 65,575 bytes in all; no jumbograms). The
client host intercepts them before its kernel fragments them, so the server is where they
meet a link MTU: it sends what does not fit as fragments it makes itself (a raw socket with
the header included does not fragment), or answers with the ICMP error of path MTU discovery
where the sender asked not to be fragmented. Where a datagram reaches pvpn in pieces (the
kernel's copies of the few datagrams too large for an NFQUEUE message), it is put together
again here, within fixed bounds.

Pure functions and classes on bytes: nothing here reads a clock, a file or a socket; time is
passed in. References: RFC 791 (IPv4 fragmentation), RFC 815 (reassembly), RFC 1191 (IPv4 path
MTU discovery), RFC 8200 4.5 and 5 (IPv6 fragment header, minimum MTU 1280), RFC 8201 (IPv6
path MTU discovery), RFC 4443 3.2 (Packet Too Big), RFC 5722 (overlapping fragments), RFC
6946 (atomic fragments), RFC 7739 (fragment identifiers).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from pvpn.errors import LocalProtocolError, MalformedPacket
from pvpn.packet import PROTO_ICMP, PROTO_ICMPV6

#: The largest IPv4 datagram (its 16-bit total length).
MAX_IPV4: Final = 65535
#: Every IPv6 link carries 1280 bytes (RFC 8200 5); IPv4 hosts may assume 68 (RFC 791).
IPV6_MIN_MTU: Final = 1280
IPV4_MIN_MTU: Final = 68
#: The MTU a client host's kernel is taken to fragment at, for the IPv6 choice between a
#: Packet Too Big and fragmenting (see :meth:`PacketTooBigReports.must_report`): Ethernet's.
CLIENT_LINK_MTU: Final = 1500
#: An NFQUEUE message carries at most this much of a packet (the kernel's 16-bit attribute
#: length: NFQNL_MAX_COPY_RANGE, 0xffff minus the 4-byte attribute header).
NFQUEUE_MAX_COPY: Final = 0xFFFF - 4

_FRAGMENT_HEADER: Final = 44
_IP_DF: Final = 0x4000
_IP_MF: Final = 0x2000
_OFFSET_MASK: Final = 0x1FFF

_IPV4_HEADER: Final = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER: Final = struct.Struct("!IHBB16s16s")
_IPV6_FRAGMENT: Final = struct.Struct("!BxHI")
_U16: Final = struct.Struct("!H")


def checksum(data: bytes) -> int:
    """The Internet checksum of ``data`` (RFC 1071), as stored in a header.

    The value of the whole buffer taken as one big-endian integer is congruent, modulo 0xFFFF,
    to the sum of its 16-bit words (2**16 == 1 mod 0xFFFF), so one C-level conversion does
    the summing. A sum congruent to 0 is 0xFFFF (-0) unless every word is zero."""
    if len(data) & 1:
        data += b"\x00"
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and any(data):
        total = 0xFFFF
    return 0xFFFF - total if total else 0xFFFF


def is_fragment(packet: bytes) -> bool:
    """Whether ``packet`` is an IPv4 fragment (MF set or an offset) or carries an IPv6
    fragment header right after the fixed header (the only place pvpn's packets have one)."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return bool(_U16.unpack_from(packet, 6)[0] & 0x3FFF)
    return len(packet) >= 48 and packet[0] >> 4 == 6 and packet[6] == _FRAGMENT_HEADER


def dont_fragment(packet: bytes) -> bool:
    """The IPv4 DF bit (RFC 791); IPv6 datagrams have none (only their source fragments)."""
    return packet[0] >> 4 == 4 and bool(packet[6] & 0x40)


def is_path_mtu_error(packet: bytes) -> bool:
    """Whether an ICMP error (as :func:`pvpn.packet.classify` took it) is one of path MTU
    discovery: IPv4 fragmentation needed (3/4), IPv6 Packet Too Big (2)."""
    if packet[0] >> 4 == 4:
        at = (packet[0] & 0x0F) * 4
        return packet[at] == 3 and packet[at + 1] == 4
    return packet[40] == 2


# ---------------------------------------------------------------- fragmenting


def fragment(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """``packet`` as fragments of at most ``mtu`` bytes each, identified by ``ident``.

    IPv4 (RFC 791 3.2): the 20-byte header (pvpn sends no options) is repeated in every
    fragment with its total length, MF and offset (in 8-byte units) and checksum set, and the
    identification ``ident`` (16 bits, not 0). The caller only fragments a datagram without DF.
    IPv6 (RFC 8200 4.5): a fragment header after the fixed header (pvpn's packets have no
    extension headers) with the 32-bit ``ident``; its next header is the datagram's. A packet
    that fits is returned whole. LocalProtocolError for an MTU below the family's minimum or
    a packet that is already a fragment.
    """
    version = packet[0] >> 4
    if version == 4:
        if mtu < IPV4_MIN_MTU:
            raise LocalProtocolError(f"ipv4 mtu {mtu} below {IPV4_MIN_MTU}")
        if len(packet) <= mtu:
            return [packet]
        if (packet[0] & 0x0F) != 5 or is_fragment(packet):
            raise LocalProtocolError("only whole ipv4 datagrams without options are fragmented")
        return _fragment4(packet, mtu, ident & 0xFFFF)
    if mtu < IPV6_MIN_MTU:
        raise LocalProtocolError(f"ipv6 mtu {mtu} below {IPV6_MIN_MTU}")
    if len(packet) <= mtu:
        return [packet]
    if is_fragment(packet):
        raise LocalProtocolError("an ipv6 fragment is not fragmented again")
    return _fragment6(packet, mtu, ident & 0xFFFFFFFF)


def _fragment4(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    b0, tos, _, _, frag, ttl, proto, _, src, dst = _IPV4_HEADER.unpack_from(packet)
    if ident == 0:
        raise LocalProtocolError("ipv4 fragments need a non-zero identification")
    flags = frag & ~(_IP_MF | _OFFSET_MASK) & ~_IP_DF
    step = (mtu - 20) & ~7
    data = memoryview(packet)[20:]
    out = []
    for start in range(0, len(data), step):
        chunk = data[start:start + step]
        more = _IP_MF if start + step < len(data) else 0
        header = bytearray(_IPV4_HEADER.pack(b0, tos, 20 + len(chunk), ident,
                                             flags | more | (start >> 3), ttl, proto, 0,
                                             src, dst))
        header[10:12] = _U16.pack(checksum(bytes(header)))
        out.append(bytes(header) + chunk)
    return out


def _fragment6(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    first, _, next_header, hops, src, dst = _IPV6_HEADER.unpack_from(packet)
    step = (mtu - 48) & ~7
    data = memoryview(packet)[40:]
    out = []
    for start in range(0, len(data), step):
        chunk = data[start:start + step]
        more = 1 if start + step < len(data) else 0
        out.append(_IPV6_HEADER.pack(first, 8 + len(chunk), _FRAGMENT_HEADER, hops, src, dst)
                   + _IPV6_FRAGMENT.pack(next_header, start | more, ident) + chunk)
    return out


# ---------------------------------------------------------------- reassembly


@dataclass(slots=True)
class _Partial:
    started: float
    header: bytes = b""  # from the first fragment: what the whole datagram starts with
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset -> data
    received: int = 0
    total: int = -1  # the payload's length, once the last fragment came


class Reassembler:
    """Puts fragments together again, within bounds: at most ``max_datagrams`` in progress
    and ``max_bytes`` held (the one begun longest ago goes first), each for at most
    ``timeout`` seconds, and no datagram beyond the family's largest.

    :meth:`feed` takes any packet: a whole one comes back at once, a fragment returns None
    until its datagram is complete. Overlapping fragments discard their datagram (RFC 5722,
    and Linux does so for IPv4 too); so does a length past the largest datagram. Fragments
    are keyed as RFC 791 and RFC 8200 key them: addresses, identification (and for IPv4 the
    protocol). The kernel's own reassembly (nf_defrag, ``net.ipv4.ipfrag_*``) uses the same
    kind of bounds: 4 MB per namespace, 30 s.
    """

    def __init__(self, max_datagrams: int = 16, max_bytes: int = 1 << 20,
                 timeout: float = 5.0) -> None:
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._partial: OrderedDict[tuple[object, ...], _Partial] = OrderedDict()
        self._held = 0
        self.discarded = 0  # datagrams given up: overlaps, timeouts, evictions, bad lengths

    def __len__(self) -> int:
        return len(self._partial)

    @property
    def held(self) -> int:
        """Bytes of fragment data held now."""
        return self._held

    def feed(self, packet: bytes, now: float) -> bytes | None:
        """The whole datagram, if ``packet`` is one or completes one; else None. Raises
        MalformedPacket for a packet that is not IPv4 or IPv6."""
        self.expire(now)
        if len(packet) >= 20 and packet[0] >> 4 == 4:
            return self._feed4(packet, now)
        if len(packet) >= 40 and packet[0] >> 4 == 6:
            return self._feed6(packet, now)
        raise MalformedPacket("not an ip packet")

    def expire(self, now: float) -> None:
        while self._partial:
            key, partial = next(iter(self._partial.items()))
            if now - partial.started < self.timeout:
                break
            self._drop(key)

    def _feed4(self, packet: bytes, now: float) -> bytes | None:
        b0, _, total, ident, frag, _, proto, _, src, dst = _IPV4_HEADER.unpack_from(packet)
        hlen = (b0 & 0x0F) * 4
        if hlen < 20 or total > len(packet) or total < hlen:
            raise MalformedPacket("ipv4 lengths")
        if not frag & 0x3FFF:
            return packet
        offset = (frag & _OFFSET_MASK) * 8
        more = bool(frag & _IP_MF)
        data = packet[hlen:total]
        header = b""
        if offset == 0:
            header = packet[:hlen]
        return self._add((4, src, dst, proto, ident), offset, data, more, header, now,
                         MAX_IPV4 - hlen if hlen else MAX_IPV4)

    def _feed6(self, packet: bytes, now: float) -> bytes | None:
        _, plen, next_header, _, src, dst = _IPV6_HEADER.unpack_from(packet)
        if 40 + plen > len(packet):
            raise MalformedPacket("ipv6 payload length")
        if next_header != _FRAGMENT_HEADER:
            return packet
        if plen < 8:
            raise MalformedPacket("ipv6 fragment header truncated")
        inner, offset_field, ident = _IPV6_FRAGMENT.unpack_from(packet, 40)
        offset = offset_field & ~7
        more = bool(offset_field & 1)
        data = packet[48:40 + plen]
        header = b""
        if offset == 0:
            # The whole datagram's fixed header: the fragment header's next header instead.
            header = packet[:6] + bytes((inner,)) + packet[7:40]
        if offset == 0 and not more:  # an atomic fragment (RFC 6946): it stands alone
            return _join6(header, [data])
        return self._add((6, src, dst, ident), offset, data, more, header, now, 65535)

    def _add(self, key: tuple[object, ...], offset: int, data: bytes, more: bool,
             header: bytes, now: float, largest: int) -> bytes | None:
        end = offset + len(data)
        partial = self._partial.get(key)
        if partial is None:
            while len(self._partial) >= self.max_datagrams or (
                    self._partial and self._held + len(data) > self.max_bytes):
                self._drop(next(iter(self._partial)))
            partial = _Partial(now)
            self._partial[key] = partial
        if end > largest or (more and len(data) % 8) or (
                not more and partial.total >= 0 and end != partial.total) or (
                partial.total >= 0 and end > partial.total) or len(data) > self.max_bytes:
            self._drop(key)
            return None
        for start, piece in partial.pieces.items():
            if start < end and offset < start + len(piece):  # overlap (RFC 5722)
                self._drop(key)
                return None
        if not more:
            if any(start + len(piece) > end for start, piece in partial.pieces.items()):
                self._drop(key)
                return None
            partial.total = end
        partial.pieces[offset] = data
        partial.received += len(data)
        self._held += len(data)
        if header:
            partial.header = header
        while self._held > self.max_bytes and self._partial:
            oldest = next(iter(self._partial))
            self._drop(oldest)
            if oldest == key:
                return None
        if partial.total < 0 or partial.received != partial.total or not partial.header:
            return None
        del self._partial[key]
        self._held -= partial.received
        pieces = [partial.pieces[start] for start in sorted(partial.pieces)]
        if key[0] == 4:
            return _join4(partial.header, pieces)
        return _join6(partial.header, pieces)

    def _drop(self, key: tuple[object, ...]) -> None:
        partial = self._partial.pop(key)
        self._held -= partial.received
        self.discarded += 1


def _join4(header: bytes, pieces: list[bytes]) -> bytes:
    buf = bytearray(header)
    total = len(header) + sum(len(p) for p in pieces)
    buf[2:4] = _U16.pack(total)
    buf[6:8] = _U16.pack(_U16.unpack_from(header, 6)[0] & _IP_DF)  # no MF, no offset
    buf[10:12] = b"\x00\x00"
    buf[10:12] = _U16.pack(checksum(bytes(buf)))
    return bytes(buf) + b"".join(pieces)


def _join6(header: bytes, pieces: list[bytes]) -> bytes:
    payload = b"".join(pieces)
    return header[:4] + _U16.pack(len(payload)) + header[6:40] + payload


# ---------------------------------------------------------------- the kernel's copies


def undo_copy(packet: bytes, hop: int, clear_df: bool) -> bytes:
    """A datagram the kernel duplicated for pvpn (the TEE target, ``nf_dup_ipv4/6``) as it
    was before: ``hop`` added back to its TTL or hop limit (the copy of a packet arriving
    from the network lost one, as if forwarded), and for IPv4 the DF bit the copy was given
    cleared again (``clear_df``; no sender can set DF on a datagram larger than its link)."""
    buf = bytearray(packet)
    if packet[0] >> 4 == 4:
        if clear_df:
            buf[6] &= ~0x40 & 0xFF
        buf[8] = min(255, buf[8] + hop)
        buf[10:12] = b"\x00\x00"
        buf[10:12] = _U16.pack(checksum(bytes(buf[:(buf[0] & 0x0F) * 4])))
    else:
        buf[7] = min(255, buf[7] + hop)
    return bytes(buf)


# ---------------------------------------------------------------- path MTU discovery


def too_big(packet: bytes, mtu: int, source: bytes) -> bytes:
    """The ICMP error that tells the sender of ``packet`` it does not fit the next link:
    IPv4 destination unreachable, fragmentation needed and DF set (type 3 code 4, the
    next-hop MTU in its second word, RFC 1191 4); IPv6 Packet Too Big (type 2, the MTU,
    RFC 4443 3.2). It comes from ``source`` (the router where the MTU drops: here the server's
    own address towards the destination), goes to the packet's source, and quotes as much of
    the packet as the error may hold: 576 bytes in all for IPv4 (RFC 1812 4.3.2.3), 1280 for
    IPv6 (RFC 4443 2.4 (c)), so that pvpn-client's check (``received_icmp_error_refusal``)
    and the client host's kernel take it."""
    if packet[0] >> 4 == 4:
        quote = packet[:576 - 28]
        body = bytearray(b"\x03\x04\x00\x00\x00\x00" + _U16.pack(min(mtu, 0xFFFF)) + quote)
        body[2:4] = _U16.pack(checksum(bytes(body)))
        header = bytearray(_IPV4_HEADER.pack(0x45, 0xC0, 20 + len(body), 0, 0, 64,
                                             PROTO_ICMP, 0, source, packet[12:16]))
        header[10:12] = _U16.pack(checksum(bytes(header)))
        return bytes(header) + bytes(body)
    quote = packet[:1280 - 48]
    destination = packet[8:24]
    body = bytearray(b"\x02\x00\x00\x00" + struct.pack("!I", mtu) + quote)
    pseudo = source + destination + struct.pack("!I3xB", len(body), PROTO_ICMPV6)
    body[2:4] = _U16.pack(checksum(pseudo + bytes(body)))
    return _IPV6_HEADER.pack(0x60000000, len(body), PROTO_ICMPV6, 64, source,
                             destination) + bytes(body)


class PacketTooBigReports:
    """Which IPv6 senders the server has told of a smaller MTU, as their kernels remember it.

    An IPv6 datagram carries no DF bit; its source fragments it or not. pvpn takes datagrams
    off the client host before its kernel fragments them, so a datagram bigger than the next
    link reaches the server whole either way. The server answers one that its sender's kernel
    would have sent whole (at most ``CLIENT_LINK_MTU``) with a Packet Too Big, as the router
    with the smaller link would, and remembers it for ``lifetime`` (600 s, Linux's
    ``net.ipv6.route.mtu_expires``): from then on that sender's kernel knows the MTU, so what
    still comes bigger is a datagram it would fragment, and the server fragments it. A
    datagram bigger than ``CLIENT_LINK_MTU`` the kernel would have fragmented anyway: it is
    fragmented without a report. At most ``limit`` senders are remembered (the oldest report
    goes first; forgetting one costs at most one more Packet Too Big)."""

    def __init__(self, limit: int = 4096, lifetime: float = 600.0) -> None:
        self.limit = limit
        self.lifetime = lifetime
        self._told: OrderedDict[tuple[bytes, bytes, bytes], tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._told)

    def must_report(self, key: tuple[bytes, bytes, bytes], size: int, mtu: int,
                    now: float) -> bool:
        """Whether a datagram of ``size`` bytes over a link of ``mtu`` gets a Packet Too Big
        (then it is dropped) rather than being fragmented. ``key``: session, source and
        destination address. Records the report it asks for."""
        if size <= mtu or mtu >= min(size, CLIENT_LINK_MTU):
            return False
        told = self._told.get(key)
        if told is not None and told[0] <= mtu and now - told[1] < self.lifetime:
            return False
        self._told.pop(key, None)
        self._told[key] = (mtu, now)
        while len(self._told) > self.limit:
            self._told.popitem(last=False)
        return True
