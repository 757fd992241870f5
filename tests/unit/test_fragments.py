"""Fragmenting, reassembling and the ICMP errors of path MTU discovery (pvpn.fragments)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, defragment
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment

from pvpn import fragments as fr
from pvpn import packet as pk
from pvpn.errors import LocalProtocolError, MalformedPacket


def udp4(size: int, df: bool = False) -> bytes:
    return bytes(IP(src="10.0.0.2", dst="10.9.0.5", id=4321, flags="DF" if df else 0)
                 / UDP(sport=5000, dport=7) / os.urandom(size))


def udp6(size: int) -> bytes:
    return bytes(IPv6(src="fd00::2", dst="fd09::5") / UDP(sport=5000, dport=7) / os.urandom(size))


def fragments_of(datagram: bytes, mtu: int, ident: int) -> list[bytes]:
    """``datagram`` cut for ``mtu``: whole if it fits, else in pieces that each fit."""
    pieces = fr.fragment(datagram, mtu, ident)
    if len(datagram) <= mtu:
        assert pieces == [datagram]
    else:
        assert len(pieces) > 1 and all(len(p) <= mtu for p in pieces)
    return pieces


def test_the_checksum_is_rfc_1071s() -> None:
    header = bytes(IP(src="10.0.0.2", dst="10.9.0.5", ttl=7))
    assert fr.checksum(header[:10] + b"\0\0" + header[12:]) == int.from_bytes(header[10:12], "big")
    assert fr.checksum(b"") == 0xFFFF and fr.checksum(b"\xff\xff") == 0
    assert fr.checksum(b"\x01") == 0xFEFF  # an odd length is padded with a zero byte


@pytest.mark.parametrize("size", [1473, 3000, 8972, 65000, 65507])
@pytest.mark.parametrize("mtu", [576, 1280, 1500, 9000])
def test_ipv4_fragments_fit_the_mtu_and_rebuild_the_datagram(size: int, mtu: int) -> None:
    datagram = udp4(size)
    pieces = fragments_of(datagram, mtu, 77)
    if len(pieces) == 1:
        return
    parsed = [IP(p) for p in pieces]
    assert all(p.id == 77 and p.chksum == IP(bytes(p)).chksum for p in parsed)
    assert all(p.flags == "MF" for p in parsed[:-1]) and parsed[-1].flags == 0
    assert all(len(p[IP].payload) % 8 == 0 for p in parsed[:-1])
    # scapy (another implementation) and ours both put the datagram together again.
    (whole,) = defragment(parsed)
    assert bytes(whole[UDP]) == datagram[20:]
    reassembler = fr.Reassembler()
    shuffled = pieces[:]
    random.shuffle(shuffled)
    out = [reassembler.feed(p, 0.0) for p in shuffled]
    assert out[:-1] == [None] * (len(pieces) - 1)
    assert out[-1] is not None and out[-1][20:] == datagram[20:]
    assert IP(out[-1]).id == 77 and IP(out[-1]).len == len(datagram) and not len(reassembler)


@pytest.mark.parametrize("size", [1281, 3000, 65000, 65527])
@pytest.mark.parametrize("mtu", [1280, 1500, 9000])
def test_ipv6_fragments_carry_a_fragment_header_and_rebuild_the_datagram(size: int,
                                                                        mtu: int) -> None:
    datagram = udp6(size)
    pieces = fragments_of(datagram, mtu, 0xDEADBEEF)
    if len(pieces) == 1:
        return
    headers = [IPv6(p)[IPv6ExtHdrFragment] for p in pieces]
    assert all(h.id == 0xDEADBEEF and h.nh == 17 for h in headers)
    assert [h.m for h in headers] == [1] * (len(pieces) - 1) + [0]
    reassembler = fr.Reassembler()
    out = [reassembler.feed(p, 0.0) for p in reversed(pieces)]
    assert out[-1] == datagram and out[:-1] == [None] * (len(pieces) - 1)
    # The datagram parses as the one sent: pvpn.packet sees UDP again, its checksum intact.
    assert pk.parse_flow(out[-1]).dport == 7


def test_what_fits_is_not_fragmented_and_what_cannot_be_is_refused() -> None:
    small = udp4(100)
    assert fr.fragment(small, 1500, 1) == [small]
    with pytest.raises(LocalProtocolError):
        fr.fragment(udp4(3000), 1500, 0)  # an id of 0 is what the kernel would replace
    with pytest.raises(LocalProtocolError):
        fr.fragment(udp4(3000), 60, 1)
    with pytest.raises(LocalProtocolError):
        fr.fragment(udp6(3000), 1200, 1)  # IPv6 links carry 1280 (RFC 8200 5)
    with pytest.raises(LocalProtocolError):
        fr.fragment(fr.fragment(udp4(3000), 1500, 9)[0], 576, 1)  # not a fragment again


def test_a_whole_packet_passes_the_reassembler_and_an_atomic_fragment_stands_alone() -> None:
    reassembler = fr.Reassembler()
    datagram = udp6(100)
    assert reassembler.feed(datagram, 0.0) == datagram
    plain = IPv6(src="fd00::2", dst="fd09::5") / UDP(sport=5000, dport=7) / (b"x" * 100)
    atomic = IPv6(src="fd00::2", dst="fd09::5") / IPv6ExtHdrFragment(id=5, m=0, offset=0) / (
        UDP(sport=5000, dport=7, chksum=IPv6(bytes(plain))[UDP].chksum) / (b"x" * 100))
    assert reassembler.feed(bytes(atomic), 0.0) == bytes(plain)
    with pytest.raises(MalformedPacket):
        reassembler.feed(b"\x00" * 40, 0.0)


def test_overlapping_fragments_discard_their_datagram() -> None:
    pieces = fr.fragment(udp4(4000), 1500, 5)
    forged = IP(pieces[1])
    forged.frag -= 1  # starts 8 bytes inside the first fragment (RFC 5722's attack)
    del forged.chksum
    reassembler = fr.Reassembler()
    assert reassembler.feed(pieces[0], 0.0) is None
    assert reassembler.feed(bytes(forged), 0.0) is None
    assert reassembler.discarded == 1 and not len(reassembler)
    for piece in pieces[1:]:  # what is left never completes a datagram
        assert reassembler.feed(piece, 0.0) is None


def test_reassembly_is_bounded_in_datagrams_bytes_and_time() -> None:
    reassembler = fr.Reassembler(max_datagrams=4, max_bytes=20000, timeout=5.0)
    for ident in range(1, 100):  # a flood of first fragments that never complete
        first = fr.fragment(bytes(IP(src="10.0.0.2", dst="10.9.0.5", id=ident) / UDP()
                                  / (b"x" * 6000)), 1500, ident)[0]
        reassembler.feed(first, float(ident) / 100)
        assert len(reassembler) <= 4 and reassembler.held <= 20000
    assert reassembler.discarded >= 95
    reassembler.feed(udp4(10), 100.0)  # time passes: what is left expires
    assert not len(reassembler) and reassembler.held == 0
    # A datagram past the largest there is (the last fragment ends beyond 65,535 bytes).
    last = IP(fr.fragment(udp4(65000), 1500, 3)[-1])
    last.frag += 200
    del last.chksum
    assert reassembler.feed(bytes(last), 100.0) is None and not len(reassembler)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, 3))
def test_any_bytes_reassemble_raise_malformed_or_wait(data: bytes, version: int) -> None:
    packet = bytes((0x45, 0x60, 0x45, 0x60)[version:version + 1]) + data
    reassembler = fr.Reassembler(max_datagrams=2, max_bytes=1000)
    try:
        out = reassembler.feed(packet, 0.0)
    except MalformedPacket:
        return
    assert out is None or out[0] >> 4 in (4, 6)
    assert reassembler.held <= 1000


def test_undoing_the_kernels_copy_restores_ttl_and_df() -> None:
    original = udp4(100)
    copy = IP(original)
    copy.flags, copy.ttl = "DF", 63
    del copy.chksum
    restored = IP(fr.undo_copy(bytes(copy), 1, True))
    assert restored.ttl == IP(original).ttl and restored.flags == 0
    assert restored.chksum == IP(original).chksum
    six = IPv6(udp6(10))
    six.hlim = 63
    assert IPv6(fr.undo_copy(bytes(six), 1, True)).hlim == 64


def test_fragmentation_needed_is_what_a_host_receives_about_its_packet() -> None:
    sent = udp4(1400, df=True)
    error = fr.too_big(sent, 1280, bytes((10, 9, 0, 1)))
    parsed = IP(error)
    assert (parsed.src, parsed.dst) == ("10.9.0.1", "10.0.0.2")
    assert (parsed[ICMP].type, parsed[ICMP].code, parsed[ICMP].nexthopmtu) == (3, 4, 1280)
    assert parsed[ICMP].chksum == ICMP(bytes(parsed[ICMP])).chksum  # scapy agrees
    assert len(error) == 576 and bytes(parsed[ICMP].payload)[:20] == sent[:20]
    assert pk.received_icmp_error_refusal(error) is None  # pvpn-client lets it in
    assert pk.classify(error)[0] == pk.parse_flow(sent) and pk.classify(error)[2]
    assert fr.is_path_mtu_error(error)


def test_packet_too_big_is_what_a_host_receives_about_its_packet() -> None:
    sent = udp6(1400)
    error = fr.too_big(sent, 1280, bytes(15) + b"\x01")
    parsed = IPv6(error)
    assert parsed.dst == "fd00::2" and parsed[ICMPv6PacketTooBig].mtu == 1280
    rebuilt = IPv6(bytes(parsed))
    del rebuilt[ICMPv6PacketTooBig].cksum
    assert parsed[ICMPv6PacketTooBig].cksum == IPv6(bytes(rebuilt))[ICMPv6PacketTooBig].cksum
    assert len(error) == 1280
    assert pk.received_icmp_error_refusal(error) is None
    assert pk.classify(error)[0] == pk.parse_flow(sent) and fr.is_path_mtu_error(error)


def test_ipv6_senders_get_one_packet_too_big_then_their_datagrams_are_fragmented() -> None:
    reports = fr.PacketTooBigReports(limit=2, lifetime=600.0)
    key = (b"s" * 16, b"a" * 16, b"b" * 16)
    assert not reports.must_report(key, 1280, 1280, 0.0)  # it fits
    assert not reports.must_report(key, 60000, 1500, 0.0)  # the sender would fragment it
    assert reports.must_report(key, 1400, 1280, 0.0)  # it would not: a router's PTB
    assert not reports.must_report(key, 1400, 1280, 1.0)  # told: its kernel fragments now
    assert not reports.must_report(key, 60000, 1280, 2.0)
    assert reports.must_report(key, 1400, 1280, 601.0)  # its kernel forgot (mtu_expires)
    others = [(b"s" * 16, bytes([n]) * 16, b"b" * 16) for n in range(3)]
    for other in others:
        assert reports.must_report(other, 1400, 1280, 700.0)
    assert len(reports) == 2  # bounded: the oldest report goes first
    assert reports.must_report(key, 1400, 1280, 701.0)
