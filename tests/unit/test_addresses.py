"""Tests of pvpn.addresses (special and own addresses, the "named by" rule, the per-session
Destinations) and of the adapter that reads a node's own addresses (pvpn.io.localaddrs)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pvpn.addresses import SPECIAL, Destinations, address_exclusion, exclusion, named_entries
from pvpn.io.localaddrs import (
    LocalAddressWatch, parse_fib_trie, parse_if_inet6, read_local_addresses,
)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# The lab's server: 10.77.1.1 on the target link (broadcast 10.77.1.255), fd77:0:0:1::1.
LOCAL = frozenset(net(a) for a in ("10.77.0.2", "10.77.0.255", "10.77.1.1", "10.77.1.255",
                                   "127.0.0.1", "fd77::2", "fd77:0:0:1::1", "::1"))


def test_an_allow_list_covering_the_servers_subnet_does_not_reach_the_server() -> None:
    allow = [net("10.77.1.0/24"), net("fd77:0:0:1::/64")]
    dest = Destinations(allow, allow, LOCAL)
    assert dest.contains(packed("10.77.1.2")) and dest.contains(packed("fd77:0:0:1::2"))
    for own in ("10.77.1.1", "10.77.1.255", "fd77:0:0:1::1"):
        assert not dest.contains(packed(own)), own
    assert not dest.contains(packed("10.77.2.2"))  # outside the allow list, as before
    assert sorted(dest.excluded()) == ["10.77.1.1", "10.77.1.255", "fd77:0:0:1::1"]


EVERYWHERE = [net("0.0.0.0/0"), net("::/0")]
SPECIAL_SAMPLES = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.9.9.9", "169.254.169.254",
                   "224.0.0.1", "239.1.1.1", "255.255.255.255", "240.0.0.1", "::", "::1",
                   "::ffff:127.0.0.1", "::ffff:10.77.1.2", "::127.0.0.1", "fe80::1",
                   "ff02::1", "ff05::2"]


@pytest.mark.parametrize("address", SPECIAL_SAMPLES)
def test_special_addresses_are_excluded_from_everywhere(address: str) -> None:
    dest = Destinations(EVERYWHERE, EVERYWHERE, LOCAL)
    assert not dest.contains(packed(address))
    assert dest.contains(packed("192.0.2.7")) and dest.contains(packed("2001:db8::7"))


@pytest.mark.parametrize("address", SPECIAL_SAMPLES)
def test_an_entry_inside_a_special_range_names_it(address: str) -> None:
    entry = net(f"{address}/{32 if '.' in address and ':' not in address else 128}")
    allow = [*EVERYWHERE, entry]
    dest = Destinations(EVERYWHERE, allow, LOCAL)
    assert dest.contains(packed(address))


def test_naming_is_exactly_what_the_entry_covers() -> None:
    # The cloud metadata address named: reachable; the rest of link-local still not.
    allow = [net("0.0.0.0/0"), net("169.254.169.254/32"), net("127.0.0.0/8")]
    dest = Destinations([net("0.0.0.0/0")], allow, LOCAL)
    assert dest.contains(packed("169.254.169.254"))
    assert not dest.contains(packed("169.254.169.253"))
    # 127.0.0.0/8 lies inside loopback: it names all of it, the server's 127.0.0.1 too.
    assert dest.contains(packed("127.0.0.1")) and dest.contains(packed("127.1.2.3"))
    # A host entry equal to an own address names that address only.
    allow = [net("10.77.1.0/24"), net("10.77.1.1/32")]
    dest = Destinations([net("10.77.1.0/24")], allow, LOCAL)
    assert dest.contains(packed("10.77.1.1")) and not dest.contains(packed("10.77.1.255"))
    assert named_entries(allow, LOCAL) == [net("10.77.1.1/32")]
    # What the user asks for limits it all: a named address outside the session is not in it.
    assert not Destinations([net("10.77.1.2/32")], allow, LOCAL).contains(packed("10.77.1.1"))


def test_local_prefixes_work_like_special_ranges() -> None:
    local = LOCAL | {net("10.9.0.0/24")}  # ip route add local 10.9.0.0/24 dev lo
    dest = Destinations([net("10.0.0.0/8")], [net("10.0.0.0/8")], local)
    assert not dest.contains(packed("10.9.0.77")) and dest.contains(packed("10.8.0.77"))
    named = Destinations([net("10.0.0.0/8")], [net("10.0.0.0/8"), net("10.9.0.64/26")], local)
    assert named.contains(packed("10.9.0.77")) and not named.contains(packed("10.9.0.1"))


def test_exclusion_explains_a_destination_that_is_excluded_as_a_whole() -> None:
    assert "loopback" in (exclusion(net("127.0.0.1/32"), EVERYWHERE, LOCAL) or "")
    assert "IPv4-mapped" in (exclusion(net("::ffff:10.0.0.1/128"), EVERYWHERE, LOCAL) or "")
    assert "multicast" in (exclusion(net("ff02::/16"), EVERYWHERE, LOCAL) or "")
    own = exclusion(net("10.77.1.1/32"), [net("10.77.1.0/24")], LOCAL)
    assert own == "10.77.1.1 is an address of this node"
    # Named, or only partly excluded (the rest is dropped packet by packet): not refused.
    assert exclusion(net("127.0.0.1/32"), [*EVERYWHERE, net("127.0.0.0/8")], LOCAL) is None
    assert exclusion(net("10.77.1.1/32"), [net("10.77.1.1/32")], LOCAL) is None
    assert exclusion(net("10.77.1.0/24"), [net("10.77.1.0/24")], LOCAL) is None
    assert exclusion(net("0.0.0.0/0"), EVERYWHERE, LOCAL) is None
    assert exclusion(net("127.0.0.0/8"), [*EVERYWHERE, net("127.0.0.1/32")], LOCAL) is None
    assert address_exclusion(ipaddress.ip_address("::ffff:127.0.0.1"), EVERYWHERE, LOCAL)
    assert address_exclusion(ipaddress.ip_address("10.77.1.2"), EVERYWHERE, LOCAL) is None


def test_the_special_ranges_are_the_documented_ones() -> None:
    assert {str(n) for n, _ in SPECIAL} == {
        "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "::/128",
        "::1/128", "::/96", "::ffff:0:0/96", "fe80::/10", "ff00::/8", "64:ff9b::/96",
        "64:ff9b:1::/48", "2002::/16"}
    design = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    for network, _ in SPECIAL:
        assert f"`{network}`" in design, network


def test_every_drop_code_is_documented() -> None:
    from pvpn.drops import Drop

    design = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    section = design[design.index("## Drop codes"):]
    for drop in Drop:
        assert f"`{drop.value}`" in section, drop


# ---------------------------------------------------------------- reading the kernel's view

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.77.1.0/24 2 0 2
        +-- 10.77.1.0/30 2 0 2
           |-- 10.77.1.0
              /24 link UNICAST
           |-- 10.77.1.1
              /32 host LOCAL
        |-- 10.77.1.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 10.9.0.0
        /24 host LOCAL
        /16 link UNICAST
"""

IF_INET6 = """\
fd770000000000010000000000000001 03 40 00 80  pvpnlab-1a
fe8000000000000000fc00fffe000001 03 40 20 80  pvpnlab-1a
00000000000000000000000000000001 01 80 10 80       lo
"""

ANYCAST6 = "3    pvpnlab-1a      fd770000000000010000000000000000     1\n"


def test_fib_trie_local_and_broadcast_entries() -> None:
    assert parse_fib_trie(FIB_TRIE.splitlines()) == {
        net("10.77.1.1/32"), net("10.77.1.255/32"), net("127.0.0.0/8"), net("127.0.0.1/32"),
        net("127.255.255.255/32"), net("10.9.0.0/24")}
    assert parse_fib_trie(["garbage", "/32 host LOCAL", "|-- x", "/y host LOCAL"]) == set()


def test_if_inet6_and_anycast6() -> None:
    assert parse_if_inet6(IF_INET6.splitlines()) == {
        net("fd77:0:0:1::1"), net("fe80::fc:ff:fe00:1"), net("::1")}
    assert parse_if_inet6(ANYCAST6.splitlines(), 2) == {net("fd77:0:0:1::")}
    assert parse_if_inet6(["too short", "zz" * 16 + " 01"]) == set()


def test_read_local_addresses_and_the_watch(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    found = read_local_addresses(tmp_path)
    assert net("10.77.1.1/32") in found and net("fd77:0:0:1::1/128") in found
    assert net("fd77:0:0:1::/128") not in found  # no anycast6 file: none
    reads: list[int] = []

    def reader() -> frozenset[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        reads.append(1)
        if len(reads) == 3:
            raise PermissionError(13, "Permission denied")
        return read_local_addresses(tmp_path)

    watch = LocalAddressWatch(reader, interval=10.0)
    assert watch.poll(0.0) == found
    assert watch.poll(5.0) is None and len(reads) == 1  # not due yet
    assert watch.poll(10.0) is None and len(reads) == 2  # read, unchanged
    assert watch.poll(11.0, force=True) is None and watch.addresses == found  # failed: kept
    assert watch.take_error() == "cannot read the node's addresses: Permission denied"
    assert watch.take_error() is None
    (tmp_path / "anycast6").write_text(ANYCAST6)
    changed = watch.poll(30.0)
    assert changed is not None and net("fd77:0:0:1::/128") in changed


def test_this_hosts_own_addresses_include_its_loopback() -> None:
    if not Path("/proc/net/fib_trie").exists():
        pytest.skip("no /proc/net/fib_trie here")
    assert net("127.0.0.1/32") in read_local_addresses()


_Z = "00000000000000000000000000000000"
IPV6_ROUTE = "".join(f"{dest} {plen} {_Z} 00 {_Z} {rest}\n" for dest, plen, rest in (
    ("fd770000000000010000000000000000", "40", "00000100 00000001 00000000 00000001 eth1"),
    ("00000000000000000000000000000001", "80", "00000000 00000003 00000000 80200001 lo"),
    ("20010db8000500000000000000000000", "40", "00000400 00000001 00000000 80000001 lo"),
    (_Z, "00", "ffffffff 00000001 00000000 00200200 lo"),
))


def test_an_ipv6_prefix_routed_as_local_is_the_nodes_own(tmp_path: Path) -> None:
    """`ip -6 route add local 2001:db8:5::/64 dev lo` (AnyIP) makes the host answer every
    address of the prefix, yet if_inet6 lists none of them: an allow list covering it (::/0)
    reached the server's own services there. Local routes of /proc/net/ipv6_route count as
    the node's own (the lines are a network namespace's, with that route added)."""
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "ipv6_route").write_text(IPV6_ROUTE)
    local = read_local_addresses(tmp_path)
    assert net("2001:db8:5::/64") in local
    allow = Destinations([net("::/0")], [net("::/0")], local)
    assert not allow.contains(ipaddress.ip_address("2001:db8:5::7").packed)
    assert allow.contains(ipaddress.ip_address("2001:db8:6::7").packed)
    from pvpn.io.localaddrs import parse_ipv6_route  # here, so the module loads without it

    assert parse_ipv6_route(IPV6_ROUTE.splitlines()) == {net("::1"), net("2001:db8:5::/64")}
    assert parse_ipv6_route(["short", "zz" * 16 + " 40 x x x x x x 80000001 lo"]) == set()


# A host with transparent proxying (TPROXY) routes everything as local in a table of its own,
# which fib_trie and ipv6_route list with the others (read from a network namespace with
# `ip route add local 0.0.0.0/0 dev lo table 100` and `ip -6 route add local ::/0 ...`).
TPROXY_TRIE = """\
Id 100:
  |-- 0.0.0.0
     /0 host LOCAL
"""


def test_a_catch_all_local_route_in_another_table_names_nothing_else() -> None:
    """With TPROXY's catch-all local route the node's own addresses held 0.0.0.0/0 and ::/0,
    so every allow entry lay inside an own network and "named" every excluded address: a
    user with 0.0.0.0/0 reached the server's loopback, link-local (cloud metadata) and its
    own addresses, and `--to 127.0.0.1` was accepted at login. An entry inside one excluded
    range now names only that range (or, inside a special range, what it covers)."""
    local = LOCAL | parse_fib_trie(TPROXY_TRIE.splitlines()) | {net("::/0")}
    assert net("0.0.0.0/0") in local
    dest = Destinations(EVERYWHERE, EVERYWHERE, local)
    for address in [*SPECIAL_SAMPLES, "10.77.1.1", "10.77.1.255", "fd77:0:0:1::1"]:
        assert not dest.contains(packed(address)), address
    assert dest.contains(packed("192.0.2.7")) and dest.contains(packed("2001:db8::7"))
    assert "loopback" in (exclusion(net("127.0.0.1/32"), EVERYWHERE, local) or "")
    assert exclusion(net("10.77.1.1/32"), [net("10.77.1.0/24")], local) == \
        "10.77.1.1 is an address of this node"
    assert address_exclusion(ipaddress.ip_address("::ffff:127.0.0.1"), EVERYWHERE, local)
    assert address_exclusion(ipaddress.ip_address("10.77.1.2"), EVERYWHERE, local) is None
    # What is named still opens, and nothing more.
    allow = [*EVERYWHERE, net("127.0.0.0/8"), net("10.77.1.1/32")]
    dest = Destinations(EVERYWHERE, allow, local)
    assert dest.contains(packed("127.0.0.1")) and dest.contains(packed("10.77.1.1"))
    assert not dest.contains(packed("10.77.1.255")) and not dest.contains(packed("169.254.0.1"))
    # A prefix really routed as local on its own, inside the catch-all: excluded unless named.
    anyip = local | {net("10.9.0.0/24")}
    dest = Destinations([net("10.0.0.0/8")], [net("10.0.0.0/8")], anyip)
    assert not dest.contains(packed("10.9.0.77")) and dest.contains(packed("10.8.0.77"))
    dest = Destinations([net("10.0.0.0/8")], [net("10.0.0.0/8"), net("10.9.0.64/26")], anyip)
    assert dest.contains(packed("10.9.0.77"))


@pytest.mark.parametrize("address", ["64:ff9b::a4d:101", "64:ff9b::7f00:1", "64:ff9b:1::a4d:101",
                                     "2002:a4d:101::1", "2002:7f00:1::1"])
def test_ipv6_that_embeds_ipv4_is_excluded_unless_named(address: str) -> None:
    """NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and 6to4 (2002::/16) addresses carry an IPv4
    address that a translator or tunnel on the server (tayga, a sit tunnel) or its network
    delivers to: with ::/0 allowed, 64:ff9b::10.77.1.1 reached the server's own 10.77.1.1 and
    any IPv4 address outside the user's IPv4 allow list. Excluded unless the allow list or a
    next rule names the prefix (the opt-in for a NAT64)."""
    assert not Destinations(EVERYWHERE, EVERYWHERE, LOCAL).contains(packed(address))
    assert address_exclusion(ipaddress.ip_address(address), EVERYWHERE, LOCAL)
    named = [*EVERYWHERE, net("64:ff9b::/96"), net("64:ff9b:1::/48"), net("2002::/16")]
    assert Destinations(EVERYWHERE, named, LOCAL).contains(packed(address))
