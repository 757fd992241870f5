"""TCP segments pvpn makes itself, so that a connection it can no longer carry ends at once
with a reset instead of hanging.

* :func:`tcp_reset`: pvpn-server's answer to a segment (not a SYN) of a connection it has no
  NAT mapping for (lost in a restart without its state, expired, ended with its session). A
  new mapping would give the connection a NAT port its remote end has never seen, and its
  segments would be dropped there or reset out of sight of the user; the server answers as a
  host answers a segment for a connection it does not have (RFC 9293 3.10.7.1, "If the
  connection does not exist (CLOSED)"), from the remote end's address, so the application's
  TCP takes it as its peer's reset.
* :func:`tcp_probe`: what pvpn-client writes, as if from the remote end, to each connected
  socket of a session whose server-side state is gone (the server answered a resume with a
  new session). The socket answers a SYN on a synchronized connection with a challenge ACK
  carrying its exact receive point (RFC 5961 4.2; Linux does, whatever the SYN's sequence
  number), that ACK goes through the tunnel to the server, which has no mapping for it and
  answers with :func:`tcp_reset`: the application gets ECONNRESET within a round trip
  instead of waiting for data that will never come (a download sends nothing by itself).

These are new packets, not rewrites: checksums are computed in full (both are 40 or 60 bytes).
The caller hands in a segment :func:`pvpn.packet.classify` has accepted.
"""

from __future__ import annotations

import struct
from typing import Final

from pvpn.packet import PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, FlowKey

_TTL: Final = 64
_TCP: Final = struct.Struct("!HHIIBBHHH")  # ports, seq, ack, offset, flags, window, sum, urg
_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
_IPV6: Final = struct.Struct("!IHBB16s16s")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
             flags: int) -> bytes:
    """A bare TCP segment (no options, no data, window 0) in an IPv4 or IPv6 packet."""
    header = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 0, 0, 0)
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, PROTO_TCP, len(header))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(header), PROTO_TCP)
    header = header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]
    if len(src) == 4:
        ip = _IPV4.pack(0x45, 0, 20 + len(header), 0, 0x4000, _TTL, PROTO_TCP, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        return ip + header
    return _IPV6.pack(6 << 28, len(header), PROTO_TCP, _TTL, src, dst) + header


def tcp_reset(segment: bytes) -> bytes | None:
    """The reset that answers ``segment`` (an IPv4 or IPv6 TCP packet), from its destination
    to its source; None if it gets none (it is a reset itself: RFC 9293 never answers one).

    RFC 9293 3.10.7.1: if the segment carries an ACK, the reset takes its sequence number
    from that ACK (the receiver's exact next sequence number, so RFC 5961's check takes it);
    else it has sequence number 0 and acknowledges the segment (its sequence number plus its
    length, SYN and FIN counted)."""
    version = segment[0] >> 4
    if version == 4:
        l4 = (segment[0] & 0x0F) * 4
        end = struct.unpack_from("!H", segment, 2)[0]
        src, dst = segment[12:16], segment[16:20]
    else:
        l4 = 40
        end = 40 + struct.unpack_from("!H", segment, 4)[0]
        src, dst = segment[8:24], segment[24:40]
    sport, dport, seq, ack, offset, flags, _, _, _ = _TCP.unpack_from(segment, l4)
    if flags & TCP_RST:
        return None
    if flags & TCP_ACK:
        return _segment(dst, src, dport, sport, ack, 0, TCP_RST)
    length = end - l4 - (offset >> 4) * 4 + (1 if flags & TCP_SYN else 0) \
        + (1 if flags & TCP_FIN else 0)
    return _segment(dst, src, dport, sport, 0, seq + length, TCP_RST | TCP_ACK)


def tcp_probe(flow: FlowKey, seq: int) -> bytes:
    """A SYN from the remote end of ``flow`` (a TCP flow as the local host sent it) to its
    local socket, with sequence number ``seq``: a synchronized socket answers it with a
    challenge ACK (RFC 5961 4.2). Send it only to such a socket (ESTABLISHED, FIN-WAIT,
    CLOSE-WAIT, CLOSING, LAST-ACK): a connecting one would take it for a simultaneous open,
    a listening one for a new connection."""
    return _segment(flow.dst, flow.src, flow.dport, flow.sport, seq, 0, TCP_SYN)


__all__ = ["tcp_probe", "tcp_reset"]
