"""Upload super-packets handed to the kernel's forwarding whole (pvpn.forwarding): what the
server node asks for, the packet it hands over, and the check that turns the path off when the
host's FORWARD rules drop what it wrote. The kernel's side is shown by
tests/integration/test_super_packets.py."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from pvpn import firewall
from pvpn import packet as pk
from pvpn.envelope import GSO_ECN, GSO_TCPV4, GSO_TCPV6, Offload, encode_offload
from pvpn.config import load_server_config
from pvpn.errors import ConfigError
from pvpn.forwarding import FIRST_INTERVAL, RETRY_FIRST, RETRY_MAX, SAMPLE, ForwardCheck

from test_offload import DATA
from test_workers import minimal_server_config
from test_protocol import Harness, pki_dir  # noqa: F401 - the fixture


def upload(version: int = 4, flags: str = "PA", ttl: int = 64, gso_size: int = 1448) -> bytes:
    """A user's TCP super-packet as pvpn-client sends it (offload header, partial sum)."""
    if version == 4:
        ip: Any = IP(src="10.0.0.2", dst="10.9.0.5", id=300, ttl=ttl)
    else:
        ip = IPv6(src="fd00::2", dst="fd09::5", hlim=ttl)
    packet = bytes(pk.partial_checksum(bytes(
        ip / TCP(sport=40000, dport=80, seq=5, flags=flags) / DATA)))
    headers = pk.tcp_headers_length(packet)
    return encode_offload(Offload(GSO_TCPV4 if version == 4 else GSO_TCPV6, gso_size,
                                  pk.l4_offset(packet), 16, headers), packet)


def uploading(pki: Any, versions: frozenset[int], version: int = 4, mtu: int = 1500,
              **kwargs: Any) -> Harness:
    h = Harness(pki, mtu_for=lambda destination: mtu)
    h.node.takes_offload = True
    h.node.forward_whole = versions
    h.connect(1, "alice", want=("10.9.0.0/24", "fd09::/64"))
    ip: Any = IP(src="10.0.0.2", dst="10.9.0.5") if version == 4 else IPv6(src="fd00::2",
                                                                          dst="fd09::5")
    syn = bytes(ip / TCP(sport=40000, dport=80, flags="S"))
    h.links[1].send_packets([syn, upload(version, **kwargs)])
    h.transfer()
    return h


@pytest.mark.parametrize("version", [4, 6])
def test_an_upload_super_packet_goes_whole_to_the_kernel_natted_and_one_hop_more(
        pki_dir: Any, version: int) -> None:  # noqa: F811
    """One InjectPacket with the offload the kernel segments it by: the same segment size
    pvpn-server would have cut at, its checksum the pseudo-header's sum of the NATed packet,
    and one hop more, which the kernel's forwarding takes off again."""
    h = uploading(pki_dir, frozenset({4, 6}), version)
    syn, whole = h.net.inject_commands
    assert syn.offload is None and whole.offload is not None
    packet = whole.packet
    headers = pk.tcp_headers_length(packet)
    assert whole.offload == Offload(GSO_TCPV4 if version == 4 else GSO_TCPV6,
                                    min(1448, 1500 - headers), pk.l4_offset(packet), 16,
                                    headers)
    assert len(packet) == headers + len(DATA)
    if version == 4:
        got = IP(packet)
        assert got.src == "10.9.0.1" and got.ttl == 65
        chk = got.chksum
        del got.chksum
        assert IP(bytes(got)).chksum == chk  # the IP header's own sum is right
    else:
        got = IPv6(packet)
        assert got.hlim == 65
    first = IP(syn.packet) if version == 4 else IPv6(syn.packet)
    assert got[TCP].sport == first[TCP].sport and got[TCP].dport == 80
    assert bytes(got[TCP].payload) == DATA
    assert packet == bytes(pk.partial_checksum(packet))  # the sum of the NATed addresses
    (session,) = h.node.sessions.values()
    assert session.super_out == 1


def test_the_segment_size_is_the_smaller_of_the_users_and_the_path_mtus(
        pki_dir: Any) -> None:  # noqa: F811
    h = uploading(pki_dir, frozenset({4}), mtu=1280)
    (_, whole) = h.net.inject_commands
    assert whole.offload is not None and whole.offload.gso_size == 1280 - 40


def test_cwr_asks_the_kernel_for_it_on_the_first_segment_only(pki_dir: Any) -> None:  # noqa: F811
    h = uploading(pki_dir, frozenset({4}), flags="PAC")
    (_, whole) = h.net.inject_commands
    assert whole.offload is not None and whole.offload.gso_type == GSO_TCPV4 | GSO_ECN


def test_a_hop_limit_of_255_leaves_as_254() -> None:
    packet = bytes(IP(src="10.9.0.1", dst="10.9.0.5", ttl=255) / TCP() / DATA)
    out = IP(bytes(pk.to_forward(packet)))
    assert out.ttl == 255
    chk = out.chksum
    del out.chksum
    assert IP(bytes(out)).chksum == chk


@pytest.mark.parametrize("whole,version", [(frozenset(), 4), (frozenset({6}), 4),
                                           (frozenset({4}), 6)])
def test_a_family_that_does_not_forward_is_segmented_by_the_server(
        pki_dir: Any, whole: frozenset[int], version: int) -> None:  # noqa: F811
    h = uploading(pki_dir, whole, version)
    commands = h.net.inject_commands[1:]
    assert len(commands) == -(-len(DATA) // 1448)
    assert all(c.offload is None and pk.checksum_ok(c.packet) for c in commands)


def test_the_servers_own_addresses_keep_the_raw_sockets_path(pki_dir: Any) -> None:  # noqa: F811
    """Forwarding would deliver a super-packet to one of them as arrived on the TUN device
    (the host's firewall sees another interface than the raw socket's loopback)."""
    h = Harness(pki_dir, mtu_for=lambda destination: 1500)
    h.node.forward_whole = frozenset({4, 6})
    h.node.set_local_addresses(frozenset(ipaddress.ip_network(n) for n in (
        "10.9.0.5/32", "127.0.0.0/8", "fd09::1/128")))
    forwards = h.node._forwards_whole
    assert not forwards(bytes([10, 9, 0, 5])) and not forwards(bytes([127, 0, 0, 9]))
    assert not forwards(ipaddress.ip_address("fd09::1").packed)
    assert forwards(bytes([10, 9, 0, 6])) and forwards(ipaddress.ip_address("fd09::2").packed)


@pytest.mark.parametrize("flags,ttl", [("S", 64), ("SA", 64), ("RA", 64), ("PA", 0)])
def test_a_syn_a_reset_or_a_hop_limit_of_0_is_segmented_by_the_server(
        pki_dir: Any, flags: str, ttl: int) -> None:  # noqa: F811
    """A SYN (with data) goes by the raw socket, so every connection is opened as before: the
    host's NAT rules, which only a connection's first packet meets, see it from OUTPUT, and no
    PREROUTING DNAT can send the connection to an address the user may not reach. A hop
    limit of 0 the kernel's forwarding would drop (and the check would blame the host's
    FORWARD rules, and segment everyone's uploads)."""
    h = uploading(pki_dir, frozenset({4, 6}), flags=flags, ttl=ttl)
    assert h.net.inject_commands and all(c.offload is None for c in h.net.inject_commands)


def test_a_wrong_ipv4_header_checksum_is_computed_afresh() -> None:
    """The NAT's incremental update keeps a user's wrong header checksum wrong, and the
    kernel drops such a packet as it arrives (the raw socket computes it itself)."""
    packet = bytearray(bytes(IP(src="10.9.0.1", dst="10.9.0.5", ttl=9) / TCP() / DATA))
    packet[10] ^= 0x55
    out = IP(bytes(pk.to_forward(bytes(packet))))
    assert out.ttl == 10
    chk = out.chksum
    del out.chksum
    assert IP(bytes(out)).chksum == chk


# ---------------------------------------------------------------- the check
def write(check: ForwardCheck, version: int, n: int) -> None:
    for _ in range(n):
        check.wrote(version)


def test_super_packets_that_leave_keep_going_whole() -> None:
    check = ForwardCheck({4, 6}, {4: 10, 6: 0})
    write(check, 4, SAMPLE)
    assert check.due(0.0)
    written = check.take(0.0)
    assert written == {4: SAMPLE}
    write(check, 4, 3)  # written while the count is read: the next check's
    assert check.judge(written, {4: 10 + SAMPLE + 3, 6: 0}, 0.0) == {}
    assert check.whole == {4, 6}
    write(check, 4, SAMPLE)
    assert not check.due(FIRST_INTERVAL / 2)  # not before its time
    assert check.due(FIRST_INTERVAL)
    assert check.take(FIRST_INTERVAL) == {4: SAMPLE + 3}


def test_super_packets_a_forward_rule_drops_turn_that_family_to_segments_for_a_while() -> None:
    """The administrator's FORWARD chain drops them: the count stays while they are written;
    that family goes back to pvpn-server's segments, saying why, and is tried again later,
    each time later while it keeps failing; the other family goes on."""
    check = ForwardCheck({4, 6}, {4: 5, 6: 5})
    write(check, 4, 20)
    write(check, 6, 20)
    off = check.judge(check.take(0.0), {4: 5 + 3, 6: 5 + 20}, 0.0)
    assert list(off) == [4] and "3 of the last 20" in off[4]
    assert check.whole == {6}
    assert check.retries(RETRY_FIRST - 1) == [] and check.retries(RETRY_FIRST) == [4]
    check.resume(4, 8)
    assert check.whole == {4, 6} and check.retries(1e9) == []
    write(check, 4, SAMPLE)
    assert list(check.judge(check.take(RETRY_FIRST), {4: 8, 6: 25}, RETRY_FIRST)) == [4]
    assert check.next_try(4) == RETRY_FIRST + 2 * RETRY_FIRST  # twice as long
    waits = []
    for _ in range(10):
        at = check.next_try(4)
        assert at is not None
        check.resume(4, 8)
        assert check.off(4, at)
        next_at = check.next_try(4)
        assert next_at is not None
        waits.append(next_at - at)
    assert max(waits) == RETRY_MAX


def test_a_check_with_too_few_written_judges_nothing() -> None:
    check = ForwardCheck({4}, {4: 0})
    write(check, 4, SAMPLE - 1)
    assert not check.due(100.0)
    assert check.judge(check.take(100.0), {4: 0}, 100.0) == {} and check.whole == {4}


def test_a_gone_counting_rule_turns_the_family_off_and_rules_put_back_start_again() -> None:
    check = ForwardCheck({4, 6}, {4: 100, 6: 100})
    write(check, 4, SAMPLE)
    write(check, 6, SAMPLE)
    # IPv4's rules were put back (counts from 0 again): not judged; IPv6's rule is gone.
    off = check.judge(check.take(0.0), {4: 2, 6: None}, 0.0)
    assert list(off) == [6] and "gone" in off[6]
    assert check.whole == {4}
    write(check, 4, SAMPLE)
    assert check.judge(check.take(5.0), {4: 2 + SAMPLE}, 5.0) == {}  # judged from the new count


def test_a_refused_write_turns_the_family_off_once() -> None:
    check = ForwardCheck({4}, {4: 0})
    assert check.off(4, 0.0) and not check.off(4, 0.0)
    assert check.whole == set() and check.next_try(4) == RETRY_FIRST


def test_the_counting_rule_is_in_every_servers_rules_and_postrouting_leads_to_it() -> None:
    rule = firewall.forward_count("pvpns", (20000, 29999))
    assert rule.startswith("PVPNS-FWD ") and "! --socket-exists" in rule
    assert "--sport 20000:29999 -m addrtype --src-type LOCAL " in rule  # not what it routes
    # One port is printed as one by iptables-save, which packets_counted compares with.
    assert " --sport 20000 " in firewall.forward_count("pvpns", (20000, 20000))
    single = firewall.server_rules("pvpns", 4000, (20000, 29999))
    assert f"-A {rule}" in single.v4 and f"-A {rule}" in single.v6
    both = firewall.server_worker_rules("pvpns", [(4000, (20000, 24999)),
                                                  (4001, (25000, 29999))])
    for ports in ((20000, 24999), (25000, 29999)):
        assert f"-A {firewall.forward_count('pvpns', ports)}" in both.v4
    assert ["POSTROUTING", "-j", "PVPNS-FWD"] in firewall.server_jumps("pvpns")


def test_the_forward_uploads_setting(tmp_path: Any) -> None:
    path, base = minimal_server_config(tmp_path)
    path.write_text(base)
    assert load_server_config(path).forward_uploads, "whole unless told otherwise"
    path.write_text(base + "forward_uploads = false\n")
    assert not load_server_config(path).forward_uploads
    for bad in ("forward_uploads = 0", 'forward_uploads = "no"'):
        path.write_text(base + bad + "\n")
        with pytest.raises(ConfigError, match="forward_uploads must be true or false"):
            load_server_config(path)
