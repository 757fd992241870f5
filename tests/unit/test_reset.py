"""The TCP segments pvpn makes itself (pvpn.reset): the server's reset for a segment of no
mapping (RFC 9293 3.10.7.1) and pvpn-client's probe that makes a socket answer with a
challenge ACK (RFC 5961 4.2); checked field by field and with scapy's checksums."""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from pvpn.packet import PROTO_TCP, FlowKey, classify, parse_flow
from pvpn.reset import tcp_probe, tcp_reset


def checksums_right(packet: bytes) -> bool:
    layer: Any = IP if packet[0] >> 4 == 4 else IPv6
    got = layer(packet)
    again = layer(packet)
    del again[TCP].chksum
    if layer is IP:
        del again.chksum
    again = layer(bytes(again))
    return bool(got[TCP].chksum == again[TCP].chksum
                and (layer is IPv6 or got.chksum == again.chksum))


@pytest.mark.parametrize("outer", [IP(src="10.0.0.2", dst="10.9.0.5"),
                                   IPv6(src="fd00::2", dst="fd09::5")])
def test_a_segment_with_an_ack_is_reset_at_its_ack(outer: Any) -> None:
    segment = bytes(outer / TCP(sport=40000, dport=80, flags="PA", seq=1000, ack=777_000)
                    / b"GET /big")
    reset = tcp_reset(segment)
    assert reset is not None and checksums_right(reset)
    got = (IP if outer.version == 4 else IPv6)(reset)
    assert (got.src, got.dst) == (outer.dst, outer.src)  # from the remote end, to the user
    assert (got[TCP].sport, got[TCP].dport) == (80, 40000)
    # RFC 9293: <SEQ=SEG.ACK><CTL=RST>, the receiver's exact next sequence number.
    assert got[TCP].flags == "R" and got[TCP].seq == 777_000 and got[TCP].ack == 0
    assert not bytes(got[TCP].payload)
    flow, flags, error = classify(reset, True)  # a packet the client host takes
    assert flow == parse_flow(segment).reversed() and not error


def test_a_segment_without_an_ack_is_acknowledged_by_its_reset() -> None:
    for flags, data, length in (("F", b"abc", 4), ("S", b"", 1), ("", b"xy", 2)):
        segment = bytes(IP(src="10.0.0.2", dst="10.9.0.5")
                        / TCP(sport=1, dport=2, flags=flags, seq=0xFFFFFFFF) / data)
        got = IP(tcp_reset(segment))
        assert got[TCP].flags == "RA" and got[TCP].seq == 0
        assert got[TCP].ack == (0xFFFFFFFF + length) & 0xFFFFFFFF  # SYN and FIN count one


def test_a_reset_is_never_answered() -> None:
    assert tcp_reset(bytes(IP() / TCP(flags="R"))) is None
    assert tcp_reset(bytes(IPv6() / TCP(flags="RA"))) is None


def test_the_probe_is_a_syn_from_the_remote_end_to_the_local_socket() -> None:
    flow = FlowKey(PROTO_TCP, bytes([10, 0, 0, 2]), 40000, bytes([10, 9, 0, 5]), 80)
    probe = tcp_probe(flow, 123456)
    assert checksums_right(probe)
    got = IP(probe)
    assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == ("10.9.0.5", "10.0.0.2", 80,
                                                                   40000)
    assert got[TCP].flags == "S" and got[TCP].seq == 123456 and got.ttl == 64
    six = FlowKey(PROTO_TCP, bytes(15) + b"\x02", 5, bytes(15) + b"\x05", 6)
    assert checksums_right(tcp_probe(six, 1))
