"""Tests of pvpn.flowtable: NAT mappings, reply routing, expiry with explicit ``now``."""

from __future__ import annotations

import ipaddress

import pytest

from pvpn.errors import ConfigError, FlowTableFull, LocalProtocolError
from pvpn.flowtable import Flow, FlowTable
from pvpn.packet import (
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, FlowKey,
)


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


CLIENT = ip("10.77.0.1")
REMOTE = ip("10.77.3.2")
OTHER_REMOTE = ip("10.77.3.3")
NAT = ip("10.77.2.1")
NAT6 = ip("fd77:0:0:2::1")
ALICE = b"session-alice"
BOB = b"session-bob"


def tcp(sport: int = 40000, dst: bytes = REMOTE, dport: int = 80) -> FlowKey:
    return FlowKey(PROTO_TCP, CLIENT, sport, dst, dport)


def udp(sport: int = 40000, dst: bytes = REMOTE, dport: int = 53) -> FlowKey:
    return FlowKey(PROTO_UDP, CLIENT, sport, dst, dport)


def reply_to(table: FlowTable, flow: Flow, now: float, flags: int = 0) -> Flow | None:
    """Look up the reply the remote end sends to this mapping."""
    key = flow.original
    return table.inbound(key.proto, key.dst, key.dport, flow.nat_src, flow.nat_port, now, flags)


def test_identical_flows_of_two_sessions_get_their_own_ports() -> None:
    # The 2002 thesis's bug: two users on one host, same 5-tuple, same destination.
    table = FlowTable((61000, 61999))
    alice = table.outbound(ALICE, tcp(), NAT, now=0.0)
    bob = table.outbound(BOB, tcp(), NAT, now=0.0)
    assert alice.nat_port != bob.nat_port
    assert (alice.session_id, bob.session_id) == (ALICE, BOB)
    assert reply_to(table, alice, 1.0) is alice
    assert reply_to(table, bob, 1.0) is bob
    assert table.inbound(PROTO_TCP, REMOTE, 80, NAT, alice.nat_port, 1.0).session_id == ALICE  # type: ignore[union-attr]
    assert table.inbound(PROTO_TCP, REMOTE, 80, NAT, bob.nat_port, 1.0).session_id == BOB  # type: ignore[union-attr]
    assert len(table) == 2
    assert table.sessions_flows(ALICE) == table.sessions_flows(BOB) == 1


def test_outbound_finds_existing_mapping_and_refreshes() -> None:
    table = FlowTable((61000, 61999))
    first = table.outbound(ALICE, udp(), NAT, now=0.0)
    again = table.outbound(ALICE, udp(), NAT, now=5.0)
    assert again is first
    assert first.last_seen == 5.0
    assert first.original == udp() and first.nat_src == NAT and not first.closing
    assert len(table) == 1


def test_inbound_needs_the_whole_endpoint() -> None:
    table = FlowTable((61000, 61999))
    flow = table.outbound(ALICE, udp(), NAT, now=0.0)
    assert table.inbound(PROTO_UDP, REMOTE, 53, NAT, flow.nat_port, 1.0) is flow
    assert table.inbound(PROTO_UDP, REMOTE, 54, NAT, flow.nat_port, 1.0) is None  # other port
    assert table.inbound(PROTO_UDP, OTHER_REMOTE, 53, NAT, flow.nat_port, 1.0) is None
    assert table.inbound(PROTO_TCP, REMOTE, 53, NAT, flow.nat_port, 1.0) is None
    assert table.inbound(PROTO_UDP, REMOTE, 53, ip("10.77.2.9"), flow.nat_port, 1.0) is None
    assert table.inbound(PROTO_UDP, REMOTE, 53, NAT, flow.nat_port + 1, 1.0) is None


def test_inbound_refreshes_last_seen() -> None:
    table = FlowTable((61000, 61999), udp_timeout=10.0)
    flow = table.outbound(ALICE, udp(), NAT, now=0.0)
    assert reply_to(table, flow, 8.0) is flow
    assert flow.last_seen == 8.0
    assert table.expire(17.0) == []
    assert table.expire(18.0) == [flow]


def test_icmp_echo_uses_identifier_and_ignores_remote_port() -> None:
    table = FlowTable((61000, 61999))
    ping = FlowKey(PROTO_ICMP, CLIENT, 7, REMOTE, 7)
    alice = table.outbound(ALICE, ping, NAT, now=0.0)
    bob = table.outbound(BOB, ping, NAT, now=0.0)
    assert alice.nat_port != bob.nat_port
    # The echo reply carries the NAT identifier in its (single) id field.
    assert table.inbound(PROTO_ICMP, REMOTE, alice.nat_port, NAT, alice.nat_port, 1.0) is alice
    assert table.inbound(PROTO_ICMP, REMOTE, 12345, NAT, bob.nat_port, 1.0) is bob
    assert table.inbound(PROTO_ICMP, OTHER_REMOTE, 0, NAT, bob.nat_port, 1.0) is None


def test_icmpv6_and_ipv6() -> None:
    table = FlowTable((61000, 61999))
    client6, remote6 = ip("fd77::1"), ip("fd77:0:0:3::2")
    ping = FlowKey(PROTO_ICMPV6, client6, 9, remote6, 9)
    flow = table.outbound(ALICE, ping, NAT6, now=0.0)
    assert table.inbound(PROTO_ICMPV6, remote6, 0, NAT6, flow.nat_port, 1.0) is flow
    with pytest.raises(LocalProtocolError):
        # An ipv4 NAT address for a new ipv6 flow is our own bug.
        table.outbound(ALICE, FlowKey(PROTO_ICMPV6, client6, 10, remote6, 10), NAT, now=1.0)


def test_icmp_error_lookup_by_quoted_flow() -> None:
    # What the server does with an ICMP error: the quoted packet is the NATed one as sent.
    table = FlowTable((61000, 61999))
    flow = table.outbound(ALICE, udp(), NAT, now=0.0)
    inner = FlowKey(PROTO_UDP, NAT, flow.nat_port, REMOTE, 53)
    assert table.inbound(inner.proto, inner.dst, inner.dport, inner.src, inner.sport, 1.0) is flow


def test_ports_are_unique_per_remote_endpoint_only() -> None:
    # Endpoint-dependent: a one-port range still serves many remote endpoints.
    table = FlowTable((61000, 61000))
    a = table.outbound(ALICE, udp(dst=REMOTE), NAT, now=0.0)
    b = table.outbound(ALICE, udp(dst=OTHER_REMOTE), NAT, now=0.0)
    c = table.outbound(ALICE, udp(dport=54), NAT, now=0.0)
    d = table.outbound(ALICE, tcp(dport=53), NAT, now=0.0)
    assert a.nat_port == b.nat_port == c.nat_port == d.nat_port == 61000
    assert reply_to(table, a, 1.0) is a and reply_to(table, b, 1.0) is b
    assert reply_to(table, c, 1.0) is c and reply_to(table, d, 1.0) is d
    with pytest.raises(FlowTableFull):
        table.outbound(BOB, udp(), NAT, now=0.0)  # same endpoint as a, no port left
    assert len(table) == 4 and table.sessions_flows(BOB) == 0


def test_round_robin_reuses_freed_port_last() -> None:
    table = FlowTable((100, 104))
    flows = [table.outbound(ALICE, udp(sport=s), NAT, now=0.0) for s in range(3)]
    assert [f.nat_port for f in flows] == [100, 101, 102]
    table.drop_session(ALICE)
    assert len(table) == 0
    # Freed ports are not reused at once: the cursor goes on, then wraps.
    more = [table.outbound(BOB, udp(sport=s), NAT, now=1.0) for s in range(5)]
    assert [f.nat_port for f in more] == [103, 104, 100, 101, 102]


def test_round_robin_skips_ports_in_use() -> None:
    table = FlowTable((100, 104), udp_timeout=10.0)
    old = [table.outbound(ALICE, udp(sport=s), NAT, now=0.0) for s in range(5)]
    assert [f.nat_port for f in old] == [100, 101, 102, 103, 104]
    table.outbound(ALICE, udp(sport=0), NAT, now=5.0)
    table.outbound(ALICE, udp(sport=3), NAT, now=5.0)
    assert {f.nat_port for f in table.expire(12.0)} == {101, 102, 104}
    # 100 and 103 are still taken: the wrapped cursor passes over them.
    new = [table.outbound(BOB, udp(sport=s), NAT, now=12.0) for s in range(3)]
    assert [f.nat_port for f in new] == [101, 102, 104]
    with pytest.raises(FlowTableFull):
        table.outbound(BOB, udp(sport=9), NAT, now=12.0)


def test_expiry_per_protocol_with_explicit_now() -> None:
    table = FlowTable((61000, 61999), tcp_timeout=100.0, udp_timeout=20.0, icmp_timeout=5.0)
    t = table.outbound(ALICE, tcp(), NAT, now=0.0)
    u = table.outbound(ALICE, udp(), NAT, now=0.0)
    i = table.outbound(ALICE, FlowKey(PROTO_ICMP, CLIENT, 1, REMOTE, 1), NAT, now=0.0)
    assert table.expire(4.9) == []
    assert table.expire(5.0) == [i]
    assert table.expire(19.0) == []
    assert table.expire(20.0) == [u]
    table.outbound(ALICE, tcp(), NAT, now=50.0)
    assert table.expire(149.0) == []
    assert table.expire(150.0) == [t]
    assert len(table) == 0 and table.sessions_flows(ALICE) == 0
    assert reply_to(table, t, 151.0) is None


def test_one_off_udp_exchanges_are_kept_briefly_and_streams_long() -> None:
    table = FlowTable((61000, 61999), udp_timeout=180.0, udp_single_timeout=30.0)
    query = table.outbound(ALICE, udp(sport=1), NAT, now=0.0)  # a DNS query and its answer
    assert reply_to(table, query, 0.1) is query
    unanswered = table.outbound(ALICE, udp(sport=2), NAT, now=0.0)
    stream = table.outbound(ALICE, udp(sport=3), NAT, now=0.0)
    reply_to(table, stream, 0.1)
    assert table.outbound(ALICE, udp(sport=3), NAT, now=0.2) is stream  # sent again: a stream
    assert not query.stream and stream.stream
    assert table.expire(29.9) == []
    assert {id(f) for f in table.expire(30.1)} == {id(query), id(unanswered)}
    assert table.expire(180.1) == []
    assert table.expire(180.2) == [stream]
    assert len(table) == 0 and not table._ports_used


def test_many_one_off_udp_queries_do_not_hold_the_range() -> None:
    # 1000 ports, a new source port for each of 20 000 queries at 30 per second to one
    # resolver: with every mapping held 180 s the range would run dry after 33 s.
    table = FlowTable((1000, 1999), udp_timeout=180.0, udp_single_timeout=30.0)
    now = 0.0
    for n in range(20_000):
        flow = table.outbound(ALICE, udp(sport=10_000 + n % 50_000), NAT, now=now)
        assert reply_to(table, flow, now + 0.01) is flow
        now += 1 / 30
        if n % 30 == 0:
            table.expire(now)
    assert len(table) <= 30 * 30 + 30  # 30 s of queries, plus one expire interval


def test_expire_returns_oldest_first_and_only_idle_ones() -> None:
    table = FlowTable((61000, 61999), udp_timeout=10.0)
    flows = [table.outbound(ALICE, udp(sport=s), NAT, now=float(s)) for s in range(5)]
    table.outbound(ALICE, udp(sport=1), NAT, now=6.0)  # refreshed: moves to the back
    assert table.expire(13.0) == [flows[0], flows[2], flows[3]]
    assert table.expire(13.9) == []
    assert table.expire(14.0) == [flows[4]]
    assert table.expire(15.9) == []
    assert table.expire(16.0) == [flows[1]]


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_one_fin_shortens_tcp_timeout(direction: str) -> None:
    table = FlowTable((61000, 61999), tcp_timeout=1000.0, tcp_closing_timeout=60.0)
    flow = table.outbound(ALICE, tcp(), NAT, now=0.0, tcp_flags=TCP_SYN)
    assert not flow.closing
    if direction == "outbound":
        table.outbound(ALICE, tcp(), NAT, now=10.0, tcp_flags=TCP_FIN | TCP_ACK)
    else:
        reply_to(table, flow, 10.0, TCP_FIN | TCP_ACK)
    assert flow.closing and not flow.closed  # half closed: the other side may still send
    assert table.expire(69.0) == []
    assert table.expire(70.0) == [flow]


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_an_rst_or_the_client_closing_first_frees_the_port_soon(direction: str) -> None:
    table = FlowTable((61000, 61999), tcp_timeout=1000.0, tcp_closing_timeout=60.0,
                      tcp_closed_timeout=10.0, tcp_time_wait=60.0)
    reset = table.outbound(ALICE, tcp(sport=1), NAT, now=0.0, tcp_flags=TCP_SYN)
    ended = table.outbound(ALICE, tcp(sport=2), NAT, now=0.0, tcp_flags=TCP_SYN)
    if direction == "outbound":
        table.outbound(ALICE, tcp(sport=1), NAT, now=5.0, tcp_flags=TCP_RST)
    else:
        reply_to(table, reset, 5.0, TCP_RST)
    # The client closes first: its own socket holds TIME-WAIT, the remote end's is gone.
    table.outbound(ALICE, tcp(sport=2), NAT, now=5.0, tcp_flags=TCP_FIN | TCP_ACK)
    reply_to(table, ended, 5.0, TCP_FIN | TCP_ACK)
    assert reset.closed and ended.closed and not reset.time_wait and not ended.time_wait
    # The last ACK still finds the mapping, and keeps it a little longer.
    assert table.outbound(ALICE, tcp(sport=2), NAT, now=6.0, tcp_flags=TCP_ACK) is ended
    assert table.expire(14.9) == []
    assert table.expire(15.0) == [reset]
    assert table.expire(15.9) == []
    assert table.expire(16.0) == [ended]
    assert len(table) == 0 and not table._closed_by_endpoint and not table._ports_used


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_a_fin_after_an_rst_keeps_the_mapping_closed(direction: str) -> None:
    # A FIN still in flight when the other side resets is ordinary traffic.
    table = FlowTable((61000, 61999), tcp_closed_timeout=10.0, tcp_time_wait=60.0)
    flow = table.outbound(ALICE, tcp(), NAT, now=0.0, tcp_flags=TCP_SYN)
    table.outbound(ALICE, tcp(), NAT, now=1.0, tcp_flags=TCP_RST)
    if direction == "outbound":
        assert table.outbound(ALICE, tcp(), NAT, now=2.0, tcp_flags=TCP_FIN | TCP_ACK) is flow
    else:
        assert reply_to(table, flow, 2.0, TCP_FIN | TCP_ACK) is flow
    reply_to(table, flow, 2.0, TCP_FIN | TCP_ACK)
    assert flow.closed and not flow.time_wait
    assert table.expire(11.9) == []
    assert table.expire(12.0) == [flow]
    assert not table._closed_by_endpoint and not table._held


def test_the_remote_closing_first_keeps_the_port_for_its_time_wait() -> None:
    # A new SYN to a 4-tuple the remote end holds in TIME-WAIT gets the old connection's ACK
    # (and costs an RST and a retransmitted SYN): the port is not handed out again for 60 s.
    table = FlowTable((61000, 61999), tcp_closed_timeout=10.0, tcp_time_wait=60.0)
    flow = table.outbound(ALICE, tcp(), NAT, now=0.0, tcp_flags=TCP_SYN)
    reply_to(table, flow, 1.0, TCP_FIN | TCP_ACK)
    table.outbound(ALICE, tcp(), NAT, now=1.0, tcp_flags=TCP_FIN | TCP_ACK)
    assert flow.closed and flow.time_wait
    assert table.expire(60.9) == []
    assert table.expire(61.0) == [flow]
    # An RST in the meantime ends the remote end's TIME-WAIT too.
    again = table.outbound(ALICE, tcp(), NAT, now=70.0, tcp_flags=TCP_SYN)
    reply_to(table, again, 71.0, TCP_FIN | TCP_ACK)
    table.outbound(ALICE, tcp(), NAT, now=71.0, tcp_flags=TCP_FIN | TCP_ACK)
    table.outbound(ALICE, tcp(), NAT, now=72.0, tcp_flags=TCP_RST)
    assert again.closed and not again.time_wait
    assert table.expire(82.0) == [again]
    assert not table._closed_by_endpoint


def test_a_full_range_reuses_the_port_closed_longest_ago() -> None:
    table = FlowTable((100, 102), tcp_closed_timeout=10.0, tcp_reuse_after=1.0)
    flows = [table.outbound(ALICE, tcp(sport=s), NAT, now=0.0, tcp_flags=TCP_SYN) for s in (1, 2, 3)]
    # Flows 2 and then 1 end; 3 stays open. The range towards REMOTE:80 is full.
    for when, flow in ((2.0, flows[1]), (3.0, flows[0])):
        table.outbound(ALICE, flow.original, NAT, now=when, tcp_flags=TCP_FIN | TCP_ACK)
        reply_to(table, flow, when, TCP_FIN | TCP_ACK)
    with pytest.raises(FlowTableFull):  # closed too recently to hand out again
        table.outbound(BOB, tcp(sport=9), NAT, now=2.5, tcp_flags=TCP_SYN)
    new = table.outbound(BOB, tcp(sport=9), NAT, now=3.5, tcp_flags=TCP_SYN)
    assert new.nat_port == flows[1].nat_port and new.session_id == BOB
    # The old mapping is gone: its replies now find Bob's flow, never Alice's.
    assert table.lookup(ALICE, flows[1].original) is None
    assert reply_to(table, new, 4.0) is new
    newer = table.outbound(BOB, tcp(sport=10), NAT, now=4.0, tcp_flags=TCP_SYN)
    assert newer.nat_port == flows[0].nat_port
    with pytest.raises(FlowTableFull):  # nothing closed is left: the open flows keep theirs
        table.outbound(BOB, tcp(sport=11), NAT, now=100.0, tcp_flags=TCP_SYN)
    # Other endpoints have their whole range.
    assert table.outbound(BOB, tcp(dport=443), NAT, now=100.0, tcp_flags=TCP_SYN).nat_port
    assert not table._closed_by_endpoint


def test_short_connections_never_run_the_range_dry() -> None:
    # 100 ports, 20 000 short connections to one endpoint at 80 per second: with ports held for
    # a minute after each close this would fail after 100 connections.
    table = FlowTable((1000, 1099), tcp_closing_timeout=60.0, tcp_closed_timeout=10.0)
    now = 0.0
    for n in range(20_000):
        key = tcp(sport=10_000 + n % 50_000)
        flow = table.outbound(ALICE, key, NAT, now=now, tcp_flags=TCP_SYN)
        assert reply_to(table, flow, now, TCP_SYN | TCP_ACK) is flow
        reply_to(table, flow, now, TCP_FIN | TCP_ACK)
        table.outbound(ALICE, key, NAT, now=now, tcp_flags=TCP_FIN | TCP_ACK)
        assert reply_to(table, flow, now, TCP_ACK) is flow
        now += 1 / 80
        if n % 100 == 0:
            table.expire(now)
    assert len(table) <= 100


def test_one_owner_holds_at_most_its_share_of_a_destinations_ports() -> None:
    table = FlowTable((100, 109), user_share=0.5)  # 5 of 10 ports per user (here: per session, no user given)
    alice = [table.outbound(ALICE, tcp(sport=s), NAT, now=0.0, tcp_flags=TCP_SYN)
             for s in range(5)]
    with pytest.raises(FlowTableFull, match="share"):
        table.outbound(ALICE, tcp(sport=5), NAT, now=0.0, tcp_flags=TCP_SYN)
    # Bob still gets the rest, and Alice gets other destinations.
    assert len({table.outbound(BOB, tcp(sport=s), NAT, now=0.0, tcp_flags=TCP_SYN).nat_port
                for s in range(5)}) == 5
    assert table.outbound(ALICE, tcp(dport=443), NAT, now=0.0, tcp_flags=TCP_SYN)
    # A closed mapping no longer counts: Alice may open another (the range being full, it
    # takes the port closed longest ago).
    table.outbound(ALICE, alice[0].original, NAT, now=1.0, tcp_flags=TCP_RST)
    again = table.outbound(ALICE, tcp(sport=5), NAT, now=2.5, tcp_flags=TCP_SYN)
    assert again.nat_port == alice[0].nat_port
    # Reopening a closed 4-tuple counts again; dropping the session releases everything.
    table.drop_session(ALICE)
    table.drop_session(BOB)
    assert not table._held and len(table) == 0


def test_share_counts_return_to_zero_under_churn() -> None:
    # Each session keeps ~17 one-off UDP mappings (5 s each) and a few TCP ones open: always
    # under its share of 50, so nothing is refused, and every count must end at zero.
    table = FlowTable((1000, 1099), user_share=0.5, tcp_closed_timeout=10.0,
                      udp_single_timeout=5.0)
    now = 0.0
    for n in range(5_000):
        session = ALICE if n % 2 else BOB
        key = tcp(sport=10_000 + n)
        flow = table.outbound(session, key, NAT, now=now, tcp_flags=TCP_SYN)
        if n % 3 == 0:
            table.outbound(session, key, NAT, now=now, tcp_flags=TCP_FIN | TCP_ACK)
            reply_to(table, flow, now, TCP_FIN | TCP_ACK)
        elif n % 3 == 1:
            reply_to(table, flow, now, TCP_RST)
            table.outbound(session, key, NAT, now=now + 0.1, tcp_flags=TCP_SYN)  # reopened
            table.outbound(session, key, NAT, now=now + 0.1, tcp_flags=TCP_RST)
        else:
            table.outbound(session, udp(sport=n), NAT, now=now)
            table.outbound(session, key, NAT, now=now, tcp_flags=TCP_RST)
        now += 0.05
        if n % 50 == 0:
            table.expire(now)
    table.expire(now + 10_000.0)
    assert len(table) == 0 and not table._held and not table._ports_used


def test_a_closed_mapping_reopens_on_a_new_syn() -> None:
    table = FlowTable((61000, 61999), tcp_timeout=1000.0, tcp_closed_timeout=10.0)
    flow = table.outbound(ALICE, tcp(), NAT, now=0.0, tcp_flags=TCP_SYN)
    table.outbound(ALICE, tcp(), NAT, now=1.0, tcp_flags=TCP_RST)
    assert flow.closed
    assert table.outbound(ALICE, tcp(), NAT, now=2.0, tcp_flags=TCP_SYN) is flow
    assert not flow.closed and not flow.closing and not table._closed_by_endpoint
    # A new connection: unreplied (SYN_SENT) until the remote end answers, then open.
    assert not flow.replied
    reply_to(table, flow, 2.0, TCP_SYN | TCP_ACK)
    assert table.expire(1001.9) == []
    assert table.expire(1002.0) == [flow]


def test_closing_flow_keeps_closing_on_more_packets_and_reopens_on_syn() -> None:
    table = FlowTable((61000, 61999), tcp_timeout=1000.0, tcp_closing_timeout=60.0)
    flow = table.outbound(ALICE, tcp(), NAT, now=0.0, tcp_flags=TCP_FIN | TCP_ACK)
    assert flow.closing  # a mapping may be created by a FIN (a flow seen mid-way)
    reply_to(table, flow, 30.0, TCP_ACK)
    assert flow.closing
    assert table.expire(89.0) == []
    # The client reuses the 4-tuple for a new connection: long timeout again, same port.
    port = flow.nat_port
    assert table.outbound(ALICE, tcp(), NAT, now=89.0, tcp_flags=TCP_SYN) is flow
    assert not flow.closing and flow.nat_port == port
    reply_to(table, flow, 89.0, TCP_SYN | TCP_ACK)  # answered: the long timeout
    assert table.expire(1088.0) == []
    assert table.expire(1089.0) == [flow]


def test_syn_ack_from_remote_does_not_reopen() -> None:
    table = FlowTable((61000, 61999), tcp_closing_timeout=60.0, tcp_closed_timeout=10.0)
    flow = table.outbound(ALICE, tcp(), NAT, now=0.0, tcp_flags=TCP_RST)
    reply_to(table, flow, 1.0, TCP_SYN)
    assert flow.closing and flow.closed
    assert table.expire(10.9) == []
    assert table.expire(11.0) == [flow]


def test_flow_table_full_at_max_flows() -> None:
    # Full of answered mappings (unreplied or closed ones would make room: see below).
    table = FlowTable((61000, 61999), max_flows=3)
    for s in range(3):
        assert reply_to(table, table.outbound(ALICE, udp(sport=s), NAT, now=0.0), 0.0)
    with pytest.raises(FlowTableFull):
        table.outbound(BOB, udp(sport=99), NAT, now=0.0)
    # An existing mapping still works when full.
    assert table.outbound(ALICE, udp(sport=1), NAT, now=1.0).original.sport == 1
    assert len(table) == 3
    table.drop_session(ALICE)
    assert table.outbound(BOB, udp(sport=99), NAT, now=2.0).session_id == BOB


def test_drop_session_frees_ports_and_leaves_others() -> None:
    table = FlowTable((100, 101))
    a1 = table.outbound(ALICE, udp(sport=1), NAT, now=0.0)
    a2 = table.outbound(ALICE, udp(sport=2), NAT, now=0.0)
    with pytest.raises(FlowTableFull):
        table.outbound(BOB, udp(sport=1), NAT, now=0.0)
    b = table.outbound(BOB, udp(dst=OTHER_REMOTE), NAT, now=0.0)
    dropped = table.drop_session(ALICE)
    assert set(map(id, dropped)) == {id(a1), id(a2)}
    assert table.sessions_flows(ALICE) == 0 and len(table) == 1
    assert reply_to(table, a1, 1.0) is None and reply_to(table, b, 1.0) is b
    assert table.drop_session(ALICE) == []
    assert table.drop_session(b"never-seen") == []
    # Both ports towards REMOTE are free again.
    again = [table.outbound(BOB, udp(sport=s), NAT, now=1.0) for s in (1, 2)]
    assert {f.nat_port for f in again} == {100, 101}
    # The dropped flows are gone from the idle queues too: only Bob's expire.
    assert {id(f) for f in table.expire(10_000.0)} == {id(b), id(again[0]), id(again[1])}


def test_drop_session_then_expire_leaves_nothing_behind() -> None:
    table = FlowTable((61000, 61999), udp_timeout=10.0)
    for s in range(50):
        table.outbound(ALICE if s % 2 else BOB, udp(sport=s), NAT, now=float(s))
    table.drop_session(ALICE)
    expired = table.expire(1000.0)
    assert len(expired) == 25 and all(f.session_id == BOB for f in expired)
    assert len(table) == 0
    # No per-endpoint, per-session or queue entry lingers.
    assert not table._ports_used and not table._by_session and not table._by_reply
    assert all(not queue for queue, _ in table._queues)


def test_many_flows_stay_bounded_under_churn() -> None:
    table = FlowTable((1000, 1099), max_flows=100, udp_timeout=1.0)
    now = 0.0
    for round_ in range(50):
        for s in range(100):
            table.outbound(round_.to_bytes(2, "big"), udp(sport=s), NAT, now=now)
        now += 2.0
        assert len(table.expire(now)) == 100
    assert len(table) == 0 and not table._ports_used


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port_range": (0, 10)},
        {"port_range": (10, 9)},
        {"port_range": (1, 65536)},
        {"port_range": (1, 2), "max_flows": 0},
        {"port_range": (1, 2), "udp_timeout": 0.0},
        {"port_range": (1, 2), "tcp_closed_timeout": 0.0},
        {"port_range": (1, 2), "tcp_reuse_after": -1.0},
        {"port_range": (1, 2), "udp_single_timeout": 0.0},
        {"port_range": (1, 2), "user_share": 0.0},
        {"port_range": (1, 2), "user_share": 1.5},
    ],
)
def test_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        FlowTable(**kwargs)  # type: ignore[arg-type]


def test_unsupported_protocol_is_local_error() -> None:
    table = FlowTable((1, 2))
    with pytest.raises(LocalProtocolError):
        table.outbound(ALICE, FlowKey(47, CLIENT, 0, REMOTE, 0), NAT, now=0.0)


# -- one user cannot take the table from the others (issue 9, point 5) -------------------------

from pvpn.drops import Drop  # noqa: E402
from pvpn.flowtable import FlowRefused  # noqa: E402

MALLORY = b"session-mallory"


def assert_empty(table: FlowTable) -> None:
    """Nothing of any mapping lingers in any structure."""
    assert len(table) == 0 and not table._by_reply and not table._ports_used
    assert not table._by_session and not table._user_flows and not table._held
    assert not table._unreplied and not table._unreplied_by_user
    assert not table._unreplied_by_session and not table._closed
    assert not table._closed_by_user and not table._closed_by_session
    assert not table._closed_by_endpoint and all(not q for q, _ in table._queues)


def test_unreplied_mappings_expire_as_conntracks_do() -> None:
    table = FlowTable((61000, 61999))
    syn = table.outbound(ALICE, tcp(sport=1), NAT, now=0.0, tcp_flags=TCP_SYN)
    ack = table.outbound(ALICE, tcp(sport=2), NAT, now=0.0, tcp_flags=TCP_ACK)  # mid-stream
    query = table.outbound(ALICE, udp(sport=3), NAT, now=0.0)
    answered = table.outbound(ALICE, tcp(sport=4), NAT, now=0.0, tcp_flags=TCP_SYN)
    reply_to(table, answered, 0.5, TCP_SYN | TCP_ACK)
    picked_up = table.outbound(ALICE, tcp(sport=5), NAT, now=0.0, tcp_flags=TCP_ACK)
    reply_to(table, picked_up, 0.5, TCP_ACK)
    assert table.expire(29.9) == []
    assert table.expire(30.0) == [query]  # UDP without a reply: 30 s
    assert table.expire(119.9) == []
    assert table.expire(120.0) == [syn]  # an unanswered SYN: conntrack's SYN_SENT, 120 s
    assert table.expire(299.9) == []
    assert table.expire(300.0) == [ack]  # ESTABLISHED without a reply: 300 s
    assert table.expire(7440.4) == []  # answered: RFC 5382's 2 h 4 min
    assert {id(f) for f in table.expire(7440.5)} == {id(answered), id(picked_up)}
    assert_empty(table)


def test_retransmitted_syns_keep_an_unanswered_mapping_but_not_beyond_its_timeout() -> None:
    table = FlowTable((61000, 61999))
    syn = table.outbound(ALICE, tcp(), NAT, now=0.0, tcp_flags=TCP_SYN)
    for when in (1.0, 3.0, 7.0, 15.0, 31.0, 63.0):  # Linux's SYN retransmissions
        table.outbound(ALICE, tcp(), NAT, now=when, tcp_flags=TCP_SYN)
    assert table.expire(182.9) == [] and table.expire(183.0) == [syn]


def test_a_flood_of_bare_acks_displaces_only_its_own_junk() -> None:
    """The issue's attack: ~66,000 bare ACKs used to fill the table for 2 h 4 min. Now they
    take at most the user's cap, each new one replacing the oldest, and go within 300 s."""
    table = FlowTable((1024, 65535), max_flows_per_user=1000, max_flows_per_session=1000)
    alice = [table.outbound(ALICE, tcp(sport=s), NAT, now=0.0, tcp_flags=TCP_SYN, user="alice")
             for s in range(50)]
    for flow in alice:
        reply_to(table, flow, 0.0, TCP_SYN | TCP_ACK)
    for n in range(66_000):
        table.outbound(MALLORY, tcp(sport=n % 60_000, dport=1 + n // 60_000), NAT, now=1.0,
                       tcp_flags=TCP_ACK, user="mallory")
    assert table.user_flows("mallory") == 1000 and table.evicted == 65_000
    assert all(table.lookup(ALICE, f.original) is f for f in alice)
    assert table.outbound(ALICE, tcp(sport=999), NAT, now=1.0, tcp_flags=TCP_SYN, user="alice")
    table.expire(301.0)
    assert table.user_flows("mallory") == 0 and table.user_flows("alice") == 50


def test_a_full_table_drops_the_oldest_unreplied_mapping_first() -> None:
    table = FlowTable((61000, 61999), max_flows=10)
    answered = [table.outbound(ALICE, udp(sport=s), NAT, now=0.0, user="alice") for s in range(6)]
    for flow in answered:
        reply_to(table, flow, 0.0)
    junk = [table.outbound(MALLORY, udp(sport=s), NAT, now=float(s), user="mallory")
            for s in range(4)]
    new = table.outbound(BOB, udp(sport=1), NAT, now=5.0, user="bob")
    assert table.lookup(MALLORY, junk[0].original) is None, "the oldest unreplied went first"
    assert all(table.lookup(MALLORY, f.original) is f for f in junk[1:])
    assert len(table) == 10 and table.evicted == 1
    reply_to(table, new, 5.0)
    for flow in junk[1:]:
        reply_to(table, flow, 5.0)
    # Every mapping answered and open: nothing may go; the new one is refused.
    with pytest.raises(FlowRefused) as refused:
        table.outbound(BOB, udp(sport=2), NAT, now=6.0, user="bob")
    assert refused.value.drop is Drop.FLOW_TABLE_FULL


def test_closed_mappings_make_room_when_no_unreplied_one_is_left() -> None:
    table = FlowTable((61000, 61999), max_flows_per_user=4, max_flows_per_session=4)
    flows = []
    for s in range(4):
        flow = table.outbound(ALICE, tcp(sport=s), NAT, now=float(s), tcp_flags=TCP_SYN)
        reply_to(table, flow, float(s), TCP_SYN | TCP_ACK)
        flows.append(flow)
    for flow in (flows[2], flows[1]):  # 2 closes, then 1 (the remote first: TIME-WAIT)
        reply_to(table, flow, 10.0, TCP_FIN | TCP_ACK)
        table.outbound(ALICE, flow.original, NAT, now=10.0, tcp_flags=TCP_FIN | TCP_ACK)
    assert flows[1].time_wait and flows[2].time_wait
    table.outbound(ALICE, tcp(sport=9), NAT, now=11.0, tcp_flags=TCP_SYN)
    assert table.lookup(ALICE, flows[2].original) is None, "closed longest ago went first"
    assert table.lookup(ALICE, flows[1].original) is flows[1]


@pytest.mark.parametrize("scope", ["session", "user"])
def test_the_session_and_user_caps_say_which_was_reached(scope: str) -> None:
    table = FlowTable((61000, 61999), max_flows_per_user=6, max_flows_per_session=4)
    sessions = [ALICE] if scope == "session" else [ALICE, b"session-alice-2"]
    for n in range(4 if scope == "session" else 6):
        flow = table.outbound(sessions[n % len(sessions)], udp(sport=n), NAT, now=0.0,
                              user="alice")
        reply_to(table, flow, 0.0)
    with pytest.raises(FlowRefused) as refused:
        table.outbound(ALICE, udp(sport=99), NAT, now=0.0, user="alice")
    assert refused.value.drop is (Drop.FLOW_CAP_SESSION if scope == "session"
                                  else Drop.FLOW_CAP_USER)
    assert isinstance(refused.value, FlowTableFull)
    assert table.outbound(BOB, udp(sport=99), NAT, now=0.0, user="bob")  # others are served


def test_the_share_of_a_destination_counts_per_user_not_per_session() -> None:
    """Two sessions of one user used to take a destination's whole range between them."""
    table = FlowTable((100, 109), user_share=0.5)  # 5 of 10 ports per user
    second = b"session-alice-2"
    for n in range(5):
        table.outbound(ALICE if n % 2 else second, tcp(sport=n), NAT, now=0.0,
                       tcp_flags=TCP_SYN, user="alice")
    for session in (ALICE, second):
        with pytest.raises(FlowRefused, match="share") as refused:
            table.outbound(session, tcp(sport=50), NAT, now=0.0, tcp_flags=TCP_SYN, user="alice")
        assert refused.value.drop is Drop.NAT_SHARE
    assert len({table.outbound(BOB, tcp(sport=n), NAT, now=0.0, tcp_flags=TCP_SYN,
                               user="bob").nat_port for n in range(5)}) == 5
    table.drop_session(ALICE)
    table.drop_session(second)
    table.drop_session(BOB)
    assert_empty(table)


@pytest.mark.parametrize("remote_closes_first", [True, False])
def test_the_benchs_400_connections_a_second_never_reach_a_cap(remote_closes_first: bool) -> None:
    """`pvpn bench`: one user, ~400 new connections a second to one web server, nat_ports
    10000-32767, the default caps. Each connection lives 50 ms; a mapping whose remote end
    closed first stays 60 s (its TIME-WAIT), more than the session's cap holds at this rate:
    closed mappings count for memory but make room, so nothing is refused."""
    table = FlowTable((10000, 32767), user_share=0.5)
    now, n, opened = 0.0, 0, []
    while now < 150.0:
        key = tcp(sport=10_000 + n % 50_000)
        flow = table.outbound(ALICE, key, NAT, now=now, tcp_flags=TCP_SYN, user="alice")
        reply_to(table, flow, now, TCP_SYN | TCP_ACK)
        opened.append((now + 0.05, flow))
        while opened and opened[0][0] <= now:
            _, done = opened.pop(0)
            first_fin = (lambda: reply_to(table, done, now, TCP_FIN | TCP_ACK),
                         lambda: table.outbound(ALICE, done.original, NAT, now=now,
                                                tcp_flags=TCP_FIN | TCP_ACK))
            for step in (first_fin if remote_closes_first else first_fin[::-1]):
                step()
            table.outbound(ALICE, done.original, NAT, now=now, tcp_flags=TCP_ACK)
        n += 1
        now += 1 / 400
        if n % 400 == 0:
            table.expire(now)
    assert n >= 59_000
    assert len(table) <= 8192  # the session's cap bounds the memory
    if not remote_closes_first:
        assert table.evicted == 0  # 10 s each: ~4000 mappings, under every cap


def test_caps_and_evictions_leave_nothing_behind_under_churn() -> None:
    table = FlowTable((1000, 1999), max_flows=300, max_flows_per_user=200,
                      max_flows_per_session=120, tcp_closed_timeout=10.0, udp_single_timeout=5.0)
    now = 0.0
    for n in range(6_000):
        session = (ALICE, BOB, MALLORY, b"session-alice-2")[n % 4]
        user = {ALICE: "alice", b"session-alice-2": "alice", BOB: "bob"}.get(session, "mallory")
        key = tcp(sport=10_000 + n % 20_000, dport=80 + n % 3)
        try:
            flow = table.outbound(session, key, NAT, now=now, tcp_flags=TCP_SYN, user=user)
        except FlowRefused:
            continue
        if user != "mallory":
            reply_to(table, flow, now, TCP_SYN | TCP_ACK)
            if n % 3:
                table.outbound(session, key, NAT, now=now, tcp_flags=TCP_RST)
        if n % 5 == 0:
            table.outbound(session, udp(sport=n), NAT, now=now, user=user)
        assert table.sessions_flows(session) <= 120 and table.user_flows(user) <= 200
        assert len(table) <= 300
        now += 0.01
        if n % 50 == 0:
            table.expire(now)
    assert table.evicted > 0
    table.expire(now + 10_000.0)
    assert_empty(table)


# -- pvpn-server's table: no mid-stream pickups; mappings across a restart (issue 10) --------


def test_a_table_without_pickups_refuses_a_segment_of_no_mapping_and_maps_a_syn() -> None:
    table = FlowTable((61000, 61999), tcp_pickup=False)
    for flags in (TCP_ACK, TCP_ACK | TCP_FIN, TCP_RST, 0):
        with pytest.raises(FlowRefused) as refused:
            table.outbound(ALICE, tcp(sport=1), NAT, now=0.0, tcp_flags=flags)
        assert refused.value.drop is Drop.TCP_NO_MAPPING
    assert len(table) == 0
    flow = table.outbound(ALICE, tcp(sport=1), NAT, now=0.0, tcp_flags=TCP_SYN)
    # Once mapped, the connection's segments go on; UDP and ICMP are never refused so.
    assert table.outbound(ALICE, tcp(sport=1), NAT, now=1.0, tcp_flags=TCP_ACK) is flow
    table.outbound(ALICE, udp(sport=2), NAT, now=1.0)
    table.outbound(ALICE, FlowKey(PROTO_ICMP, CLIENT, 3, REMOTE, 3), NAT, now=1.0)
    assert len(table) == 3


def _every_kind_of_mapping(table: FlowTable) -> list[Flow]:
    """Open, answered, closing, closed by both FINs (remote first: TIME-WAIT), reset, a UDP
    one-off and stream, echo v4 and v6, an IPv6 TCP one; some of bob's."""
    flows = []
    opened = table.outbound(ALICE, tcp(sport=1), NAT, now=0.0, tcp_flags=TCP_SYN, user="alice")
    reply_to(table, opened, 0.5, TCP_SYN | TCP_ACK)
    flows.append(opened)
    flows.append(table.outbound(ALICE, tcp(sport=2), NAT, now=1.0, tcp_flags=TCP_SYN,
                                user="alice"))  # unanswered SYN
    closing = table.outbound(ALICE, tcp(sport=3), NAT, now=1.0, tcp_flags=TCP_SYN, user="alice")
    reply_to(table, closing, 1.5, TCP_SYN | TCP_ACK)
    table.outbound(ALICE, tcp(sport=3), NAT, now=2.0, tcp_flags=TCP_FIN | TCP_ACK)
    flows.append(closing)
    waiting = table.outbound(ALICE, tcp(sport=4), NAT, now=2.0, tcp_flags=TCP_SYN, user="alice")
    reply_to(table, waiting, 2.5, TCP_FIN | TCP_ACK)
    table.outbound(ALICE, tcp(sport=4), NAT, now=3.0, tcp_flags=TCP_FIN | TCP_ACK)
    assert waiting.closed and waiting.time_wait
    flows.append(waiting)
    reset = table.outbound(ALICE, tcp(sport=5), NAT, now=3.0, tcp_flags=TCP_SYN, user="alice")
    reply_to(table, reset, 3.5, TCP_RST)
    flows.append(reset)
    flows.append(table.outbound(ALICE, udp(sport=6), NAT, now=4.0, user="alice"))
    stream = table.outbound(ALICE, udp(sport=7), NAT, now=4.0, user="alice")
    reply_to(table, stream, 4.5)
    table.outbound(ALICE, udp(sport=7), NAT, now=5.0)
    assert stream.stream
    flows.append(stream)
    flows.append(table.outbound(ALICE, FlowKey(PROTO_ICMP, CLIENT, 8, REMOTE, 8), NAT, now=5.0,
                                user="alice"))
    client6, remote6 = ip("fd77::1"), ip("fd77:0:0:3::2")
    flows.append(table.outbound(ALICE, FlowKey(PROTO_ICMPV6, client6, 9, remote6, 9), NAT6,
                                now=5.0, user="alice"))
    flows.append(table.outbound(ALICE, FlowKey(PROTO_TCP, client6, 10, remote6, 443), NAT6,
                                now=5.0, tcp_flags=TCP_SYN, user="alice"))
    flows.append(table.outbound(BOB, tcp(sport=1), NAT, now=6.0, tcp_flags=TCP_SYN, user="bob"))
    return flows


def _fields(flow: Flow) -> tuple[object, ...]:
    return (flow.session_id, flow.original, flow.nat_src, flow.nat_port, flow.last_seen,
            flow.closing, flow.fins, flow.closed, flow.closed_at, flow.remote_closed_first,
            flow.time_wait, flow.replied, flow.stream, flow.user, flow.syn)


def test_mappings_come_back_with_their_ports_states_and_timeouts() -> None:
    """What a restarted server puts back is the same table: the same ports and states, and
    every mapping expires when it would have (the ages are those of the snapshot)."""
    before = FlowTable((61000, 61999), tcp_pickup=False)
    flows = _every_kind_of_mapping(before)
    saved = {s: before.saved_flows(s, 10.0) for s in (ALICE, BOB)}
    after = FlowTable((61000, 61999), tcp_pickup=False)
    after.restore_cursor(before.cursor)
    everything = sorted(((f, s, u) for s, u in ((ALICE, "alice"), (BOB, "bob"))
                         for f in saved[s]), key=lambda item: -item[0].idle)
    for flow, session, user in everything:  # later clock: 110 s is the old 10 s
        after.restore_flow(session, user, flow, 110.0)
    shifted = sorted(_fields(f)[:4] + (f.last_seen + 100.0,) + _fields(f)[5:8]
                     + ((f.closed_at + 100.0) if f.closed else 0.0,) + _fields(f)[9:]
                     for f in flows)
    assert sorted(_fields(f) for s in (ALICE, BOB) for f in after.session_flows(s)) == shifted
    for flow in flows:  # replies find the same mappings
        key = flow.original
        assert after.find_reply(key.proto, key.dst, key.dport, flow.nat_src, flow.nat_port)
    assert (after.user_flows("alice"), after.user_flows("bob")) == (10, 1)
    assert after.cursor == before.cursor
    # A new flow gets a port after the old ones, not one of theirs.
    new = after.outbound(BOB, tcp(sport=99), NAT, now=110.0, tcp_flags=TCP_SYN, user="bob")
    assert new.nat_port not in {f.nat_port for f in flows if f.original.dst == REMOTE}
    for moment in (130.0, 139.9, 140.0, 170.0, 300.0, 400.0, 10_000.0):
        expected = sorted(_fields(f)[:4] for f in before.expire(moment - 100.0))
        assert sorted(_fields(f)[:4] for f in after.expire(moment)
                      if f is not new) == expected, moment
    after.expire(20_000.0)
    assert_empty(after)


def test_a_restored_mapping_is_checked_as_the_table_checks_its_own() -> None:
    from pvpn.flowtable import STATE_CLOSED, STATE_STREAM, STATE_TIME_WAIT, SavedFlow

    table = FlowTable((61000, 61009), max_flows=6, max_flows_per_user=4,
                      max_flows_per_session=3, user_share=0.2)
    good = SavedFlow(tcp(sport=1), NAT, 61000, 1.0, 0, 0.0)
    table.restore_flow(ALICE, "alice", good, 10.0)
    bad = [
        good._replace(key=FlowKey(47, CLIENT, 1, REMOTE, 1)),  # GRE: no NAT
        good._replace(nat_src=NAT6),  # mixed families
        good._replace(key=FlowKey(PROTO_ICMPV6, CLIENT, 2, REMOTE, 2)),  # ICMPv6 over IPv4
        good._replace(key=FlowKey(PROTO_ICMP, CLIENT, 2, REMOTE, 3)),  # two echo ids
        good._replace(key=tcp(sport=2), state=STATE_TIME_WAIT),  # TIME-WAIT, not closed
        good._replace(key=udp(sport=2), state=STATE_CLOSED),  # a TCP state on UDP
        good._replace(key=tcp(sport=2), state=STATE_STREAM),  # a UDP state on TCP
        good._replace(key=tcp(sport=2), state=1 << 12),  # unknown bits
        good._replace(key=tcp(sport=2), idle=-1.0),
        good._replace(key=tcp(sport=2), idle=float("nan")),
        good,  # the same flow twice
        good._replace(key=tcp(sport=2)),  # its port towards that endpoint, taken
    ]
    for saved in bad:
        with pytest.raises(ValueError):
            table.restore_flow(ALICE, "alice", saved, 10.0)
    with pytest.raises(FlowRefused):  # the range may have changed since
        table.restore_flow(ALICE, "alice", good._replace(key=tcp(sport=2), nat_port=62000), 10.0)
    # The caps and the share hold as for mappings the table makes, and nothing is evicted.
    table.restore_flow(ALICE, "alice", good._replace(key=tcp(sport=2), nat_port=61001), 10.0)
    with pytest.raises(FlowRefused) as share:  # 2 of 10 ports to one destination
        table.restore_flow(ALICE, "alice", good._replace(key=tcp(sport=3), nat_port=61002),
                           10.0)
    assert share.value.drop is Drop.NAT_SHARE
    table.restore_flow(ALICE, "alice", good._replace(key=udp(sport=3), nat_port=61002), 10.0)
    with pytest.raises(FlowRefused) as cap:
        table.restore_flow(ALICE, "alice", good._replace(key=udp(sport=4), nat_port=61003),
                           10.0)
    assert cap.value.drop is Drop.FLOW_CAP_SESSION
    table.restore_flow(b"session-alice-2", "alice", good._replace(key=udp(sport=4),
                                                                  nat_port=61003), 10.0)
    with pytest.raises(FlowRefused) as user_cap:
        table.restore_flow(b"session-alice-2", "alice", good._replace(
            key=udp(sport=5), nat_port=61004), 10.0)
    assert user_cap.value.drop is Drop.FLOW_CAP_USER
    assert len(table) == 4 and table.evicted == 0
    table.drop_session(ALICE)
    table.drop_session(b"session-alice-2")
    assert_empty(table)
