"""Tests of pvpn.packet: scapy builds and re-dissects, Hypothesis fuzzes.

Checksums are judged by scapy: a rewritten packet must be byte-identical to itself with every
checksum field cleared and recomputed by scapy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.packet import Packet

from pvpn.errors import LocalProtocolError, MalformedPacket
from pvpn.packet import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    FlowKey,
    destination_address,
    icmp_error_inner_flow,
    parse_flow,
    rewrite_destination,
    rewrite_source,
    tcp_flags,
)

# Addresses of the NAT scenario: a client host behind the tunnel, the server's NAT address, the
# remote target and a router between server and target.
ADDR = {
    4: {"client": "10.77.0.1", "nat": "10.77.2.1", "remote": "10.77.3.2", "router": "10.77.2.2"},
    6: {"client": "fd77::1", "nat": "fd77:0:0:2::1", "remote": "fd77:0:0:3::2", "router": "fd77:0:0:2::2"},
}


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def ip_layer(version: int, src: str, dst: str, options: bool = False) -> Packet:
    if version == 4:
        return IP(src=src, dst=dst, options=[IPOption_Router_Alert()] if options else [])
    return IPv6(src=src, dst=dst)


def echo(version: int, ident: int, seq: int = 1, reply: bool = False) -> Packet:
    if version == 4:
        return ICMP(type=0 if reply else 8, id=ident, seq=seq)
    return (ICMPv6EchoReply if reply else ICMPv6EchoRequest)(id=ident, seq=seq)


def l4_layer(kind: str, version: int, sport: int, dport: int) -> Packet:
    if kind == "tcp":
        return TCP(sport=sport, dport=dport, flags="PA", seq=1000, ack=2000)
    if kind == "udp":
        return UDP(sport=sport, dport=dport)
    return echo(version, sport)


def build(
    version: int,
    kind: str,
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"payload",
    options: bool = False,
) -> bytes:
    """A TCP, UDP or ICMP echo ("echo": sport is the identifier) packet with valid checksums."""
    return bytes(ip_layer(version, src, dst, options) / l4_layer(kind, version, sport, dport) / payload)


def icmp_error(version: int, src: str, dst: str, quote: bytes, kind: str = "unreach") -> bytes:
    """An ICMP/ICMPv6 error from ``src`` to ``dst`` quoting ``quote``."""
    if version == 4:
        header = {"unreach": ICMP(type=3, code=3), "toobig": ICMP(type=3, code=4, nexthopmtu=1280),
                  "ttl": ICMP(type=11, code=0)}[kind]
        return bytes(IP(src=src, dst=dst) / header / quote)
    header6 = {"unreach": ICMPv6DestUnreach(code=4), "toobig": ICMPv6PacketTooBig(mtu=1280),
               "ttl": ICMPv6TimeExceeded()}[kind]
    return bytes(IPv6(src=src, dst=dst) / header6 / quote)


def dissect(raw: bytes) -> Packet:
    return IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)


def layers(pkt: Packet) -> Iterator[Packet]:
    layer = pkt
    while layer:
        yield layer
        layer = layer.payload


def recomputed(raw: bytes, skip_quoted_l4: bool = False, skip_l4: bool = False) -> bytes:
    """``raw`` rebuilt by scapy with every checksum cleared (so recomputed by scapy).

    ``skip_quoted_l4`` keeps the quoted L4 checksum of a truncated quote, which nobody can
    recompute (it covers bytes that were not quoted); ``skip_l4`` keeps the outer L4 checksum
    (a UDP checksum of 0, "none").
    """
    pkt = dissect(raw)
    seen_ip = 0
    for layer in layers(pkt):
        is_ip = isinstance(layer, (IP, IPv6))
        seen_ip += is_ip
        keep = (seen_ip == 1 and skip_l4) or (seen_ip == 2 and skip_quoted_l4)
        if keep and not is_ip:
            continue
        for name in ("chksum", "cksum"):
            if name in layer.fields:
                setattr(layer, name, None)
    return bytes(pkt)


def assert_checksums(raw: bytes, skip_quoted_l4: bool = False, skip_l4: bool = False) -> None:
    assert recomputed(raw, skip_quoted_l4, skip_l4).hex() == raw.hex()


KINDS = ["tcp", "udp", "echo"]
PROTO = {("tcp", 4): PROTO_TCP, ("tcp", 6): PROTO_TCP, ("udp", 4): PROTO_UDP,
         ("udp", 6): PROTO_UDP, ("echo", 4): PROTO_ICMP, ("echo", 6): PROTO_ICMPV6}


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_parse_flow(version: int, kind: str) -> None:
    a = ADDR[version]
    raw = build(version, kind, a["client"], a["remote"], 40000, 80)
    flow = parse_flow(raw)
    dport = 40000 if kind == "echo" else 80
    assert flow == FlowKey(PROTO[kind, version], packed(a["client"]), 40000, packed(a["remote"]), dport)
    assert flow.reversed() == FlowKey(flow.proto, flow.dst, dport, flow.src, 40000)
    assert flow.reversed().reversed() == flow
    assert destination_address(raw) == packed(a["remote"])
    assert not classify(raw)[2]


def test_parse_flow_ipv4_options() -> None:
    raw = build(4, "udp", "10.0.0.1", "10.0.0.2", 1234, 53, options=True)
    assert raw[0] == 0x46
    assert parse_flow(raw) == FlowKey(PROTO_UDP, packed("10.0.0.1"), 1234, packed("10.0.0.2"), 53)


def test_echo_reply_flow_uses_identifier() -> None:
    raw = bytes(IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0, id=7, seq=3))
    assert parse_flow(raw) == FlowKey(PROTO_ICMP, packed("10.0.0.2"), 7, packed("10.0.0.1"), 7)


def test_describe() -> None:
    assert FlowKey(PROTO_TCP, packed("10.0.0.1"), 1234, packed("10.0.0.2"), 80).describe() == (
        "tcp 10.0.0.1:1234 > 10.0.0.2:80"
    )
    assert FlowKey(PROTO_UDP, packed("fd77::1"), 5353, packed("fd77::2"), 53).describe() == (
        "udp [fd77::1]:5353 > [fd77::2]:53"
    )
    assert FlowKey(PROTO_ICMP, packed("10.0.0.1"), 7, packed("10.0.0.2"), 7).describe() == (
        "icmp 10.0.0.1 > 10.0.0.2 id 7"
    )
    assert FlowKey(PROTO_ICMPV6, packed("fd77::1"), 7, packed("fd77::2"), 7).describe() == (
        "icmpv6 fd77::1 > fd77::2 id 7"
    )


def test_tcp_flags() -> None:
    syn = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="S"))
    fin = bytes(IPv6(src="fd::1", dst="fd::2") / TCP(flags="FA"))
    assert tcp_flags(syn) == TCP_SYN
    assert tcp_flags(fin) == TCP_FIN | TCP_ACK
    assert tcp_flags(build(4, "udp", "10.0.0.1", "10.0.0.2", 1, 2)) == 0
    assert tcp_flags(build(6, "echo", "fd::1", "fd::2", 1, 1)) == 0


# -- NAT rewrites ------------------------------------------------------------------------------


def assert_rewrite(rewrite: Callable[[bytes, bytes, int], bytes], raw: bytes,
                   to: tuple[str, int], back: tuple[str, int], src: str, dst: str,
                   ports: tuple[int, int]) -> None:
    """``raw`` rewritten ``to`` an address and port: checksums right, the packet from ``src``
    to ``dst`` with these (source, destination) ports; rewritten ``back``, ``raw`` again."""
    out = rewrite(raw, packed(to[0]), to[1])
    assert_checksums(out)
    pkt = dissect(out)
    assert pkt.src == src and pkt.dst == dst
    flow = parse_flow(out)
    assert (flow.sport, flow.dport) == ports
    assert rewrite(out, packed(back[0]), back[1]) == raw


@pytest.mark.parametrize(("version", "options"), [(4, False), (4, True), (6, False)])
@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_source_and_back(version: int, kind: str, options: bool) -> None:
    a = ADDR[version]
    raw = build(version, kind, a["client"], a["remote"], 40000, 443, options=options)
    assert_rewrite(rewrite_source, raw, (a["nat"], 61001), (a["client"], 40000),
                   a["nat"], a["remote"], (61001, 61001 if kind == "echo" else 443))


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_destination_of_reply(version: int, kind: str) -> None:
    a = ADDR[version]
    if kind == "echo":
        reply = bytes(ip_layer(version, a["remote"], a["nat"]) / echo(version, 61001, 9, reply=True) / b"ping")
    else:
        reply = build(version, kind, a["remote"], a["nat"], 443, 61001)
    assert_rewrite(rewrite_destination, reply, (a["client"], 40000), (a["nat"], 61001),
                   a["remote"], a["client"], (40000 if kind == "echo" else 443, 40000))


def test_udp_zero_checksum_stays_zero() -> None:
    raw = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0) / b"abc")
    out = rewrite_source(raw, packed("10.9.9.9"), 61000)
    assert out[26:28] == b"\x00\x00"
    assert IP(out)[UDP].sport == 61000
    assert rewrite_destination(out, packed("10.0.0.2"), 7)[26:28] == b"\x00\x00"


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff() -> None:
    raw = build(4, "udp", "10.0.0.1", "10.0.0.2", 1, 2)
    hits = []
    for port in range(65536):
        out = rewrite_source(raw, packed("10.9.9.9"), port)
        if out[26:28] == b"\xff\xff":
            hits.append(out)
        assert out[26:28] != b"\x00\x00"
    assert hits, "some port must make the sum come out as zero"
    for out in hits:
        assert_checksums(out)  # scapy also sends a computed 0 as 0xFFFF
        assert rewrite_source(out, packed("10.0.0.1"), 1) == raw


def test_icmp_echo_all_zero_reply_checksum() -> None:
    # Echo reply with id 0, seq 0 and no data sums to +0: its checksum must be 0xFFFF.
    zero = bytes(IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0, id=0, seq=0))
    assert zero[22:24] == b"\xff\xff"
    other = rewrite_destination(zero, packed("10.0.0.1"), 5)
    assert_checksums(other)
    assert rewrite_destination(other, packed("10.0.0.1"), 0) == zero


def test_rewrite_keeps_trailing_padding() -> None:
    raw = build(4, "udp", "10.0.0.1", "10.0.0.2", 1, 2) + b"\x00" * 6  # link-layer padding
    out = rewrite_source(raw, packed("10.9.9.9"), 3)
    assert out.endswith(b"\x00" * 6) and len(out) == len(raw)
    assert_checksums(out[:-6])


def test_bad_arguments_are_local_errors() -> None:
    raw4 = build(4, "tcp", "10.0.0.1", "10.0.0.2", 1, 2)
    raw6 = build(6, "tcp", "fd::1", "fd::2", 1, 2)
    with pytest.raises(LocalProtocolError):
        rewrite_source(raw4, packed("fd::9"), 1)
    with pytest.raises(LocalProtocolError):
        rewrite_destination(raw6, packed("10.0.0.9"), 1)
    with pytest.raises(LocalProtocolError):
        rewrite_source(raw4, packed("10.0.0.9"), 65536)
    with pytest.raises(LocalProtocolError):
        rewrite_source(raw4, packed("10.0.0.9"), -1)


# -- ICMP errors -------------------------------------------------------------------------------


def nat_error_case(version: int, kind: str, quote_len: int | None, error_kind: str = "unreach") -> tuple[bytes, bytes, bytes]:
    """(client's packet, the NATed packet, an error from the router quoting the NATed packet)."""
    a = ADDR[version]
    original = build(version, kind, a["client"], a["remote"], 40000, 443, payload=b"x" * 40)
    nated = rewrite_source(original, packed(a["nat"]), 61005)
    quote = nated if quote_len is None else nated[:quote_len]
    return original, nated, icmp_error(version, a["router"], a["nat"], quote, error_kind)


@pytest.mark.parametrize("error_kind", ["unreach", "toobig", "ttl"])
@pytest.mark.parametrize("truncated", [False, True])
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_icmp_error_back_to_client(version: int, kind: str, truncated: bool, error_kind: str) -> None:
    a = ADDR[version]
    header = 20 if version == 4 else 40
    # Truncated: only the guaranteed IP header + 8 bytes (RFC 792), which leaves out the TCP
    # checksum; otherwise the whole packet, as Linux quotes short packets.
    original, nated, error = nat_error_case(version, kind, header + 8 if truncated else None, error_kind)
    assert classify(error)[2]
    with pytest.raises(MalformedPacket):
        parse_flow(error)
    inner = icmp_error_inner_flow(error)
    assert inner == parse_flow(nated)
    assert inner.src == packed(a["nat"]) and inner.sport == 61005
    assert destination_address(error) == packed(a["nat"])

    back = rewrite_destination(error, packed(a["client"]), 40000)
    quoted_at = header + 8
    quoted = back[quoted_at:]
    # The quote now reads exactly as the client sent it (inner L4 checksum fixed when present).
    assert quoted == original[: len(quoted)]
    assert icmp_error_inner_flow(back) == parse_flow(original)
    pkt = dissect(back)
    assert pkt.src == a["router"] and pkt.dst == a["client"]
    assert_checksums(back, skip_quoted_l4=truncated)
    # And back again: exactly the error the router sent.
    assert rewrite_destination(back, packed(a["nat"]), 61005) == error


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_quote_without_checksum_leaves_it(version: int) -> None:
    header = 20 if version == 4 else 40
    _, nated, error = nat_error_case(version, "tcp", header + 17)  # half of the checksum quoted
    back = rewrite_destination(error, packed(ADDR[version]["client"]), 40000)
    assert back[header + 8 + header + 16 :] == error[header + 8 + header + 16 :]
    assert_checksums(back, skip_quoted_l4=True)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_icmp_error_from_client_mirror(version: int, kind: str) -> None:
    # The client host answers a reply with port unreachable: the error quotes the reply it got
    # (remote -> client). rewrite_source NATs the outer source and the quoted destination.
    a = ADDR[version]
    reply = build(version, kind, a["remote"], a["client"], 443, 40000)
    error = icmp_error(version, a["client"], a["remote"], reply)
    out = rewrite_source(error, packed(a["nat"]), 61005)
    assert_checksums(out)
    inner = icmp_error_inner_flow(out)
    assert inner.dst == packed(a["nat"]) and inner.dport == 61005
    assert dissect(out).src == a["nat"]
    assert rewrite_source(out, packed(a["client"]), icmp_error_inner_flow(error).dport) == error


def test_icmp_error_with_ipv4_options_inside_and_out() -> None:
    inner = build(4, "udp", "10.77.2.1", "10.77.3.2", 61005, 53, options=True)
    error = bytes(IP(src="10.77.2.2", dst="10.77.2.1", options=[IPOption_Router_Alert()])
                  / ICMP(type=11) / inner)
    assert icmp_error_inner_flow(error) == FlowKey(PROTO_UDP, packed("10.77.2.1"), 61005, packed("10.77.3.2"), 53)
    back = rewrite_destination(error, packed("10.77.0.1"), 40000)
    assert_checksums(back)
    assert icmp_error_inner_flow(back).src == packed("10.77.0.1")


def test_icmp_error_quoting_zero_udp_checksum() -> None:
    inner = bytes(IP(src="10.77.2.1", dst="10.77.3.2") / UDP(sport=61005, dport=53, chksum=0) / b"q")
    error = icmp_error(4, "10.77.2.2", "10.77.2.1", inner)
    back = rewrite_destination(error, packed("10.77.0.1"), 40000)
    assert back[28 + 20 + 6 : 28 + 20 + 8] == b"\x00\x00"
    assert_checksums(back, skip_quoted_l4=True)


# -- malformed input ---------------------------------------------------------------------------


def _set(raw: bytes, at: int, value: bytes) -> bytes:
    return raw[:at] + value + raw[at + len(value) :]


V4_UDP = build(4, "udp", "10.0.0.1", "10.0.0.2", 1, 2)
V6_UDP = build(6, "udp", "fd::1", "fd::2", 1, 2)
_, NATED4, V4_ERROR = nat_error_case(4, "udp", None)

MALFORMED = {
    "empty": b"",
    "one byte": b"\x45",
    "version 5": _set(V4_UDP, 0, b"\x55"),
    "ihl 4": _set(V4_UDP, 0, b"\x44"),
    "ihl beyond packet": _set(V4_UDP, 0, b"\x4f"),
    "total length long": _set(V4_UDP, 2, b"\x01\x00"),
    "total length short": _set(V4_UDP, 2, b"\x00\x10"),
    "more fragments": _set(V4_UDP, 6, b"\x20\x00"),
    "fragment offset": _set(V4_UDP, 6, b"\x00\x10"),
    "ipv4 gre": _set(V4_UDP, 9, b"\x2f"),
    "ipv4 carrying icmpv6": _set(V4_UDP, 9, b"\x3a"),
    "udp length": _set(V4_UDP, 24, b"\x00\x04"),
    "udp truncated": _set(V4_UDP[:24], 2, b"\x00\x18"),
    "tcp truncated": _set(build(4, "tcp", "10.0.0.1", "10.0.0.2", 1, 2, payload=b"")[:36], 2, b"\x00\x24"),
    "tcp data offset": _set(build(4, "tcp", "10.0.0.1", "10.0.0.2", 1, 2), 32, b"\x40"),
    "ipv6 short": V6_UDP[:39],
    "ipv6 payload length": _set(V6_UDP, 4, b"\x10\x00"),
    "ipv6 hop-by-hop": _set(V6_UDP, 6, b"\x00"),
    "ipv6 fragment header": _set(V6_UDP, 6, b"\x2c"),
    "ipv6 carrying icmpv4": _set(V6_UDP, 6, b"\x01"),
}

UNSUPPORTED_ICMP = {
    "icmp timestamp": bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=13)),
    "icmpv6 neighbour solicitation": _set(build(6, "echo", "fd::1", "fd::2", 1, 1, b"\x00" * 16), 40, b"\x87"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_ICMP))
def test_unsupported_icmp_types(name: str) -> None:
    raw = UNSUPPORTED_ICMP[name]
    assert tcp_flags(raw) == 0
    for fn in (parse_flow, icmp_error_inner_flow):
        with pytest.raises(MalformedPacket):
            fn(raw)
    for rewrite in (rewrite_source, rewrite_destination):
        with pytest.raises(MalformedPacket):
            rewrite(raw, b"\x00" * _width(raw), 1)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_packets(name: str) -> None:
    raw = MALFORMED[name]
    for fn in (parse_flow, icmp_error_inner_flow, tcp_flags):
        with pytest.raises(MalformedPacket):
            fn(raw)
    with pytest.raises(MalformedPacket):
        rewrite_source(raw, b"\x00" * (16 if raw[:1] == b"\x60" else 4), 1)
    with pytest.raises(MalformedPacket):
        rewrite_destination(raw, b"\x00" * (16 if raw[:1] == b"\x60" else 4), 1)


ERRORS_MALFORMED = {
    "quote truncated in l4": icmp_error(4, "10.77.2.2", "10.77.2.1", NATED4[:27]),
    "quote truncated in ip": icmp_error(4, "10.77.2.2", "10.77.2.1", NATED4[:19]),
    "quote is ipv6": icmp_error(4, "10.0.0.1", "10.0.0.2", V6_UDP),
    "quote is a fragment": icmp_error(4, "10.0.0.1", "10.0.0.2", _set(V4_UDP, 6, b"\x00\x10")),
    "quote ihl": icmp_error(4, "10.0.0.1", "10.0.0.2", _set(V4_UDP, 0, b"\x43")),
    "quote is gre": icmp_error(4, "10.0.0.1", "10.0.0.2", _set(V4_UDP, 9, b"\x2f")),
    "error about an error": icmp_error(4, "10.0.0.1", "10.0.0.2", V4_ERROR),
    "icmpv6 quote is ipv4": icmp_error(6, "fd::1", "fd::2", V4_UDP),
    "icmpv6 quote truncated": icmp_error(6, "fd::1", "fd::2", V6_UDP[:47]),
}


@pytest.mark.parametrize("name", sorted(ERRORS_MALFORMED))
def test_malformed_icmp_errors(name: str) -> None:
    raw = ERRORS_MALFORMED[name]
    width = 4 if raw[0] >> 4 == 4 else 16
    with pytest.raises(MalformedPacket):
        icmp_error_inner_flow(raw)
    with pytest.raises(MalformedPacket):
        rewrite_destination(raw, b"\x01" * width, 1)
    with pytest.raises(MalformedPacket):
        rewrite_source(raw, b"\x01" * width, 1)


def test_inner_flow_of_non_error() -> None:
    with pytest.raises(MalformedPacket):
        icmp_error_inner_flow(V4_UDP)
    with pytest.raises(MalformedPacket):
        icmp_error_inner_flow(build(6, "echo", "fd::1", "fd::2", 1, 1))


def test_cheap_header_functions() -> None:
    for raw in (b"", b"\x45" * 19, b"\x60" * 39, b"\x10" * 60):
        with pytest.raises(MalformedPacket):
            destination_address(raw)


# -- Hypothesis --------------------------------------------------------------------------------


def _corpus() -> list[bytes]:
    out = [*MALFORMED.values(), *ERRORS_MALFORMED.values(), *UNSUPPORTED_ICMP.values()]
    for version in (4, 6):
        for kind in KINDS:
            out.append(nat_error_case(version, kind, None)[1])
            out.append(nat_error_case(version, kind, None)[2])
            out.append(nat_error_case(version, kind, 48 if version == 4 else 88)[2])
    out.append(bytes(IP(src="1.2.3.4", dst="5.6.7.8", options=[IPOption_Router_Alert()]) / ICMP(type=12) / V4_UDP))
    return out


CORPUS = _corpus()


def _width(raw: bytes) -> int:
    return 16 if raw[:1] and raw[0] >> 4 == 6 else 4


def _all_functions(raw: bytes) -> None:
    """Call every parser; each must return or raise MalformedPacket, nothing else."""
    calls: list[Callable[[], object]] = [
        lambda: destination_address(raw),
        lambda: parse_flow(raw),
        lambda: icmp_error_inner_flow(raw),
        lambda: tcp_flags(raw),
        lambda: rewrite_source(raw, b"\x0a" * _width(raw), 61000),
        lambda: rewrite_destination(raw, b"\x0b" * _width(raw), 0),
    ]
    for call in calls:
        try:
            call()
        except MalformedPacket:
            pass


@given(st.binary(max_size=120))
@settings(max_examples=500)
def test_any_bytes_parse_or_raise(raw: bytes) -> None:
    _all_functions(raw)


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(CORPUS)))
    if base:
        for _ in range(draw(st.integers(0, 4))):
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        return bytes(base[: draw(st.integers(0, len(base)))])
    return bytes(base)


@given(mutated_packets())
@settings(max_examples=1500)
def test_mutated_packets_parse_or_raise(raw: bytes) -> None:
    _all_functions(raw)


def test_every_prefix_parses_or_raises() -> None:
    for raw in CORPUS:
        for cut in range(len(raw) + 1):
            _all_functions(raw[:cut])


ports = st.integers(0, 65535)


@st.composite
def valid_packets(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid packet, and "all", "no-l4" or "no-quoted-l4": which checksums scapy can redo."""
    version = draw(st.sampled_from([4, 6]))
    if version == 4:
        addrs = st.integers(1, 2**32 - 2).map(lambda n: str(ipaddress.IPv4Address(n)))
    else:
        addrs = st.integers(1, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
    src, dst = draw(addrs), draw(addrs)
    kind = draw(st.sampled_from(["tcp", "udp", "udp0", "echo", "echo-reply", "error"]))
    payload = draw(st.binary(max_size=24))
    options = version == 4 and draw(st.booleans())
    sport, dport = draw(ports), draw(ports)
    seq = draw(ports)
    if kind == "tcp":
        l4: Packet = TCP(sport=sport, dport=dport, flags=draw(st.integers(0, 255)), seq=seq)
    elif kind == "udp":
        l4 = UDP(sport=sport, dport=dport)
    elif kind == "udp0":
        l4 = UDP(sport=sport, dport=dport, chksum=0) if version == 4 else UDP(sport=sport, dport=dport)
    elif kind in ("echo", "echo-reply"):
        l4 = echo(version, sport, seq, reply=kind == "echo-reply")
    else:
        # An error from the remote end about a packet dst sent it: consistent addresses, so
        # both rewrite directions can be undone exactly.
        inner_kind = draw(st.sampled_from(KINDS))
        quote = build(version, inner_kind, dst, src, dport, sport, payload, options)
        cut = draw(st.integers((20 + 4 * options if version == 4 else 40) + 8, len(quote)))
        error_kind = draw(st.sampled_from(["unreach", "toobig", "ttl"]))
        error = icmp_error(version, src, dst, quote[:cut], error_kind)
        return error, "all" if cut == len(quote) else "no-quoted-l4"
    raw = bytes(ip_layer(version, src, dst, options) / l4 / payload)
    return raw, "no-l4" if kind == "udp0" and version == 4 else "all"


def _swap_ends(raw: bytes, destination: bool) -> tuple[bytes, int]:
    """The address and port a rewrite of this side would replace (to undo it)."""
    pkt = dissect(raw)
    address = packed(pkt.dst if destination else pkt.src)
    if classify(raw)[2]:
        inner = icmp_error_inner_flow(raw)
        return address, inner.sport if destination else inner.dport
    flow = parse_flow(raw)
    return address, flow.dport if destination else flow.sport


@given(valid_packets(), st.integers(0, 2**128 - 1), ports, st.booleans())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_rewrite_round_trip(case: tuple[bytes, str], address: int, port: int, destination: bool) -> None:
    raw, checks = case
    width = _width(raw)
    new = (address % (2**(8 * width))).to_bytes(width, "big")
    old_address, old_port = _swap_ends(raw, destination)
    rewrite = rewrite_destination if destination else rewrite_source
    out = rewrite(raw, new, port)
    assert len(out) == len(raw)
    assert_checksums(out, skip_quoted_l4=checks == "no-quoted-l4", skip_l4=checks == "no-l4")
    assert _swap_ends(out, destination) == (new, port)
    assert rewrite(out, old_address, old_port) == raw


def test_classify_agrees_with_the_single_purpose_parsers() -> None:
    from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

    from pvpn import packet

    samples = [
        bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="SA")),
        bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=3, dport=4) / b"x"),
        bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5, dport=6)),
        bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(id=9)),
    ]
    for raw in samples:
        assert packet.classify(raw) == (packet.parse_flow(raw), packet.tcp_flags(raw), False)
    errors = [
        bytes(IP(src="10.0.0.9", dst="10.0.0.1") / ICMP(type=3, code=3)
              / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=3, dport=4)),
        bytes(IPv6(src="fd00::9", dst="fd00::1") / ICMPv6DestUnreach()
              / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5, dport=6)),
    ]
    for raw in errors:
        assert packet.classify(raw) == (packet.icmp_error_inner_flow(raw), 0, True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_classify_any_bytes_give_a_result_or_the_remote_error(data: bytes) -> None:
    from pvpn import packet

    try:
        packet.classify(data)
    except MalformedPacket:
        pass


# -- what the server may re-send and hand on (issue 9, point 4) ---------------------------------

from scapy.layers.inet import IPOption_LSRR, IPOption_RR, IPOption_SSRR  # noqa: E402
from scapy.layers.inet6 import ICMPv6ParamProblem  # noqa: E402

from pvpn.packet import (  # noqa: E402
    ICMP4_ERROR_MAX,
    ICMP6_ERROR_MAX,
    IpOptions,
    classify,
    received_icmp_error_refusal,
    sent_icmp_error_refusal,
)

SOURCE_ROUTES = {
    "loose source route": IPOption_LSRR(routers=["10.77.1.1"]),
    "strict source route": IPOption_SSRR(routers=["10.77.1.1"]),
    "record route": IPOption_RR(),
    "router alert": IPOption_Router_Alert(),
}


@pytest.mark.parametrize("name", sorted(SOURCE_ROUTES))
def test_strict_classify_refuses_ipv4_options_outside_and_quoted(name: str) -> None:
    option = SOURCE_ROUTES[name]
    plain = bytes(IP(src="10.77.0.1", dst="10.77.1.2") / UDP(sport=5000, dport=53) / b"q")
    routed = bytes(IP(src="10.77.0.1", dst="10.77.1.2", options=[option])
                   / UDP(sport=5000, dport=53) / b"q")
    assert classify(routed) == classify(plain)  # the lenient parse still reads it
    assert classify(plain, True) == classify(plain)
    with pytest.raises(IpOptions):
        classify(routed, True)
    # The quote of an ICMP error: no packet the NAT sent has options, so none is about one.
    quoting = bytes(IP(src="10.77.1.2", dst="10.77.1.1") / ICMP(type=3, code=3)
                    / IP(src="10.77.1.1", dst="10.77.1.2", options=[option]) / UDP(sport=1, dport=2))
    assert classify(quoting)[2]
    with pytest.raises(IpOptions):
        classify(quoting, True)
    assert issubclass(IpOptions, MalformedPacket)


def test_strict_classify_refuses_bytes_past_the_ip_length() -> None:
    # A raw socket sends the whole buffer (Linux even rewrites the IPv4 total length to it),
    # so what the length field says must be all there is.
    for raw in (V4_UDP, V6_UDP, V4_ERROR):
        assert classify(raw, True) == classify(raw)
        padded = raw + b"\x00" * 6
        assert classify(padded) == classify(raw)
        with pytest.raises(MalformedPacket, match="past the ip length"):
            classify(padded, True)


def _reply(version: int, size: int = 0) -> bytes:
    """A UDP reply from the remote end to the client, as the client host received it."""
    a = ADDR[version]
    return build(version, "udp", a["remote"], a["client"], 443, 40000, payload=b"r" * size)


def _error(version: int, kind: int, code: int, quote: bytes, src: str, dst: str) -> bytes:
    if version == 4:
        return bytes(IP(src=src, dst=dst) / ICMP(type=kind, code=code) / quote)
    header = {1: ICMPv6DestUnreach(code=code), 2: ICMPv6PacketTooBig(code=code, mtu=1280),
              3: ICMPv6TimeExceeded(code=code), 4: ICMPv6ParamProblem(code=code)}[kind]
    return bytes(IPv6(src=src, dst=dst) / header / quote)


HOST_SENDS = [(4, 3, 2), (4, 3, 3), (4, 3, 9), (4, 3, 10), (4, 3, 13), (4, 12, 0), (4, 12, 2),
              (6, 1, 1), (6, 1, 4), (6, 4, 0), (6, 4, 1), (6, 4, 2)]
# Redirects, source quench, time exceeded in transit, fragmentation needed / packet too big and
# the unreachable codes of routers: a host never sends these about a packet it received.
ROUTERS_ONLY = [(4, 5, 0), (4, 5, 1), (4, 4, 0), (4, 11, 0), (4, 11, 1), (4, 3, 0), (4, 3, 1),
                (4, 3, 4), (4, 3, 5), (4, 3, 99), (4, 12, 9),
                (6, 2, 0), (6, 3, 0), (6, 3, 1), (6, 1, 0), (6, 1, 3), (6, 1, 5), (6, 1, 6)]


@pytest.mark.parametrize(("version", "kind", "code"), HOST_SENDS)
def test_a_host_sends_these_errors(version: int, kind: int, code: int) -> None:
    a = ADDR[version]
    error = _error(version, kind, code, _reply(version), a["client"], a["remote"])
    assert sent_icmp_error_refusal(error) is None


@pytest.mark.parametrize(("version", "kind", "code"), ROUTERS_ONLY)
def test_a_host_does_not_send_these_errors(version: int, kind: int, code: int) -> None:
    a = ADDR[version]
    error = _error(version, kind, code, _reply(version), a["client"], a["remote"])
    refusal = sent_icmp_error_refusal(error)
    assert refusal is not None and f"type {kind} code {code}" in refusal


@pytest.mark.parametrize("version", [4, 6])
def test_a_sent_error_goes_to_the_flows_remote_from_the_hosts_own_address(version: int) -> None:
    a = ADDR[version]
    kind = 3 if version == 4 else 1
    code = 3 if version == 4 else 4
    reply = _reply(version)
    good = _error(version, kind, code, reply, a["client"], a["remote"])
    assert sent_icmp_error_refusal(good) is None
    # To anywhere else (the server itself, its loopback, a third host): refused.
    for dst in (a["nat"], a["router"], "127.0.0.1" if version == 4 else "::1"):
        refusal = sent_icmp_error_refusal(_error(version, kind, code, reply, a["client"], dst))
        assert refusal == "not addressed to the source of the packet it quotes"
    refusal = sent_icmp_error_refusal(_error(version, kind, code, reply, a["router"], a["remote"]))
    assert refusal == "not sent from the destination of the packet it quotes"


@pytest.mark.parametrize("version", [4, 6])
def test_error_length_is_capped_as_sent(version: int) -> None:
    a = ADDR[version]
    limit = ICMP4_ERROR_MAX if version == 4 else ICMP6_ERROR_MAX
    kind, code = (3, 3) if version == 4 else (1, 4)
    header = 20 if version == 4 else 40
    # outer header + 8 ICMP bytes + quoted header + 8 UDP bytes + payload = limit
    payload = limit - 2 * header - 16
    error = _error(version, kind, code, _reply(version, payload), a["client"], a["remote"])
    assert len(error) == limit
    assert sent_icmp_error_refusal(error) is None
    assert received_icmp_error_refusal(_error(version, kind, code, _reply(version, payload),
                                              a["remote"], a["remote"])) is None
    longer = _error(version, kind, code, _reply(version, payload + 1), a["client"], a["remote"])
    assert f"more than {limit}" in (sent_icmp_error_refusal(longer) or "")
    # Bytes past the IP length count too: they would be sent.
    assert f"more than {limit}" in (sent_icmp_error_refusal(error + b"\x00") or "")
    big = _error(version, kind, code, _reply(version, 60000), a["client"], a["remote"])
    assert sent_icmp_error_refusal(big) is not None


HOST_RECEIVES = [(4, 3, 0), (4, 3, 1), (4, 3, 3), (4, 3, 4), (4, 3, 13), (4, 3, 15), (4, 11, 0),
                 (4, 11, 1), (4, 12, 0), (6, 1, 0), (6, 1, 4), (6, 1, 6), (6, 2, 0), (6, 3, 0),
                 (6, 3, 1), (6, 4, 2)]
NEVER_RECEIVED = [(4, 5, 0), (4, 5, 1), (4, 4, 0), (4, 3, 16), (4, 11, 2), (4, 12, 3),
                  (6, 1, 7), (6, 3, 2), (6, 4, 3)]


@pytest.mark.parametrize(("version", "kind", "code"), HOST_RECEIVES + NEVER_RECEIVED)
def test_errors_a_host_may_receive(version: int, kind: int, code: int) -> None:
    # What pvpn-client checks on an error its user's tunnel hands back, and the server on an
    # error from the network: the quote is the packet the host sent (client -> remote).
    a = ADDR[version]
    sent = build(version, "tcp", a["client"], a["remote"], 40000, 443)
    error = _error(version, kind, code, sent, a["router"], a["client"])
    refusal = received_icmp_error_refusal(error)
    if (version, kind, code) in HOST_RECEIVES:
        assert refusal is None
    else:
        assert refusal is not None and f"type {kind} code {code}" in refusal


@pytest.mark.parametrize("version", [4, 6])
def test_a_received_error_must_be_addressed_to_the_sender_of_its_quote(version: int) -> None:
    a = ADDR[version]
    sent = build(version, "udp", a["client"], a["remote"], 40000, 53)
    kind = 3 if version == 4 else 1
    assert received_icmp_error_refusal(_error(version, kind, 3, sent, a["router"], a["client"])) is None
    # An error "about" the client's packet delivered to another local socket or address.
    for dst in (a["nat"], "127.0.0.1" if version == 4 else "::1"):
        refusal = received_icmp_error_refusal(_error(version, kind, 3, sent, a["router"], dst))
        assert refusal == "not addressed to the source of the packet it quotes"


def test_the_refusal_functions_only_judge_valid_icmp_errors() -> None:
    for raw in (V4_UDP, V6_UDP, build(4, "echo", "10.0.0.1", "10.0.0.2", 1, 1),
                *MALFORMED.values(), *ERRORS_MALFORMED.values()):
        for judge in (sent_icmp_error_refusal, received_icmp_error_refusal):
            with pytest.raises(MalformedPacket):
                judge(raw)


@given(mutated_packets())
@settings(max_examples=800)
def test_strict_parsing_and_the_judges_give_a_result_or_the_remote_error(raw: bytes) -> None:
    for call in (lambda: classify(raw, True), lambda: sent_icmp_error_refusal(raw),
                 lambda: received_icmp_error_refusal(raw)):
        try:
            result = call()
        except MalformedPacket:
            continue
        assert result is None or isinstance(result, (str, tuple))
