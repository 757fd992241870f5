"""Addresses no user reaches through a node unless its administrator names them.

An allow list (server) or a next-hop rule (gateway) that covers a subnet the node sits on, or
``0.0.0.0/0`` and ``::/0``, would otherwise take a user to every service of the node itself,
arriving from the node's own address, and to its loopback, link-local neighbours, multicast
groups and broadcasts. So two kinds of address are excluded from every allow list and rule:

* the *special* ranges of :data:`SPECIAL` (loopback, unspecified, link-local, multicast,
  broadcast and the reserved class E, IPv4-mapped and IPv4-compatible IPv6, and the NAT64
  and 6to4 prefixes that embed an IPv4 address), and
* the node's *own* addresses: the local and broadcast addresses of its interfaces (and any
  prefix routed as local), read by an adapter (:mod:`pvpn.io.localaddrs`) and handed to the
  node.

An entry *names* such an address, and so lets it through, when the entry lies inside a special
range (``127.0.0.0/8``, ``169.254.169.254/32``, ``[::1]:4433``) or inside the node's own
addresses: for a single own address, when it is that address (``10.77.1.1/32``,
``10.77.1.1:4433``). Writing the special thing down is the opt-in; a covering prefix such as
``10.77.1.0/24`` or ``0.0.0.0/0`` never names anything.

:class:`Destinations` is the per-session form the server's packet path uses: built once per
session (again when the policy or the node's addresses change), then one or two prefix
lookups per packet, on packed addresses, with no ``ipaddress`` object.
"""

from __future__ import annotations

import ipaddress
from typing import Final, Iterable, Sequence, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _net(text: str) -> Network:
    return ipaddress.ip_network(text)


#: The special ranges, with what they are. ``::/96`` holds the unspecified address and the
#: loopback too; they are listed on their own so a refusal names them.
SPECIAL: Final[tuple[tuple[Network, str], ...]] = (
    (_net("0.0.0.0/8"), "'this network', the unspecified address (RFC 1122 3.2.1.3)"),
    (_net("127.0.0.0/8"), "loopback (RFC 1122 3.2.1.3)"),
    (_net("169.254.0.0/16"), "link-local (RFC 3927)"),
    (_net("224.0.0.0/4"), "multicast (RFC 5771)"),
    (_net("240.0.0.0/4"), "reserved, with the limited broadcast 255.255.255.255 "
                          "(RFC 1112 4, RFC 919 7)"),
    (_net("::/128"), "the unspecified address (RFC 4291 2.5.2)"),
    (_net("::1/128"), "loopback (RFC 4291 2.5.3)"),
    (_net("::/96"), "IPv4-compatible (deprecated, RFC 4291 2.5.5.1)"),
    (_net("::ffff:0:0/96"), "IPv4-mapped (RFC 4291 2.5.5.2)"),
    # IPv6 addresses that carry an IPv4 address a translator or tunnel on the node or its
    # network delivers to: an IPv6 allow list must not reach IPv4 (the node's own addresses
    # among them) through them unless it names them.
    (_net("64:ff9b::/96"), "NAT64, an IPv4 address embedded (RFC 6052)"),
    (_net("64:ff9b:1::/48"), "local-use NAT64, an IPv4 address embedded (RFC 8215)"),
    (_net("2002::/16"), "6to4, an IPv4 address embedded (RFC 3056)"),
    (_net("fe80::/10"), "link-local (RFC 4291 2.5.6)"),
    (_net("ff00::/8"), "multicast (RFC 4291 2.7)"),
)


def special_range(network: Network) -> str | None:
    """What the special range holding all of ``network`` is, or None if none holds it."""
    for special, what in SPECIAL:
        if network.version == special.version and network.subnet_of(special):  # type: ignore[arg-type]
            return what
    return None


#: The node's own addresses, as networks: a /32 or /128 per interface address (local and
#: broadcast), and any wider prefix routed as local (``ip route add local 10.9.0.0/24 dev lo``).
Local = frozenset[Network]


def _inside(network: Network, networks: Iterable[Network]) -> bool:
    return any(network.version == n.version and network.subnet_of(n)  # type: ignore[arg-type]
               for n in networks)


def own_network(network: Network, local: Local) -> Network | None:
    """The narrowest own network of the node holding all of ``network``, or None."""
    holding = [own for own in local if network.version == own.version
               and network.subnet_of(own)]  # type: ignore[arg-type]
    return max(holding, key=lambda own: own.prefixlen, default=None)


def named_entries(entries: Iterable[Network], local: Local) -> list[Network]:
    """The entries of an allow list or of next-hop rules that name special or own addresses:
    those lying inside a special range or inside one of the node's own networks (for a
    single own address: equal to it)."""
    return [e for e in entries if special_range(e) is not None or _inside(e, local)]


def _openers(excluded: Network | None, entries: Iterable[Network]) -> list[Network]:
    """The entries that name addresses of ``excluded``, one of the node's own networks (None:
    a special range): those lying inside a special range, and those lying inside ``excluded``
    itself (for a single own address: equal to it). An entry lying inside *another* excluded
    range names nothing here: a prefix routed as local in a policy-routing table (TPROXY's
    ``local 0.0.0.0/0 dev lo table 100``) holds every entry, and must not make every entry name
    the node's loopback and its own addresses."""
    return [e for e in entries if special_range(e) is not None or (
        excluded is not None and e.version == excluded.version
        and e.subnet_of(excluded))]  # type: ignore[arg-type]


def exclusion(network: Network, entries: Sequence[Network], local: Local) -> str | None:
    """Why *all* of ``network`` is excluded although ``entries`` cover it: it lies in a special
    range or in the node's own addresses, and no entry names any of it. None if some of it
    may be reached (what is left excluded is dropped packet by packet)."""
    what = special_range(network)
    own = own_network(network, local) if what is None else None
    if what is not None:
        why = f"{network} is {what}"
    elif own is not None:
        why = (f"{network.network_address} is an address of this node" if own.num_addresses == 1
               else f"{network} lies in {own}, routed as local on this node")
    else:
        return None
    if any(n.version == network.version and n.overlaps(network)
           for n in _openers(own, entries)):
        return None
    return why


def address_exclusion(address: Address, entries: Sequence[Network], local: Local) -> str | None:
    """Why ``address`` (a next hop) is excluded although ``entries`` cover it; None if not."""
    return exclusion(ipaddress.ip_network(address), entries, local)


_PrefixTable = list[tuple[int, int]]


def _table(networks: Iterable[Network], version: int) -> _PrefixTable:
    return [(int(n.network_address), int(n.netmask)) for n in networks if n.version == version]


def _matches(value: int, table: _PrefixTable) -> bool:
    for net, mask in table:
        if value & mask == net:
            return True
    return False


class Destinations:
    """Where one session's packets may go: its prefixes (``networks``, what the user asked
    for and the policy allows), less the special ranges and the node's own addresses that the
    user's allow list (``entries``) does not name.

    Built by the server for each session, and again when the policy or the node's addresses
    change; :meth:`contains` runs for every packet. Only the special ranges that overlap the
    session's prefixes are kept, so a session limited to ordinary prefixes costs one prefix
    scan and one set lookup per packet.
    """

    __slots__ = ("networks", "_v4", "_v6", "_ranges4", "_ranges6", "_own", "_special")

    def __init__(self, networks: Iterable[Network], entries: Sequence[Network] = (),
                 local: Local = frozenset()) -> None:
        self.networks = list(networks)
        # Special ranges and the node's own wider local prefixes work alike: excluded but
        # what an entry names (see _openers), each range with the entries that open it. Own
        # single addresses go in a set.
        ranges: list[tuple[Network, list[Network]]] = [
            (s, _openers(None, entries)) for s, _ in SPECIAL]
        ranges += [(n, _openers(n, entries)) for n in local if n.num_addresses > 1]
        kept = [(r, opened) for r, opened in ranges
                if any(r.version == n.version and r.overlaps(n) for n in self.networks)]
        self._special = kept
        self._v4 = _table(self.networks, 4)
        self._v6 = _table(self.networks, 6)
        self._ranges4 = [(int(r.network_address), int(r.netmask), _table(opened, 4))
                         for r, opened in kept if r.version == 4]
        self._ranges6 = [(int(r.network_address), int(r.netmask), _table(opened, 6))
                         for r, opened in kept if r.version == 6]
        # The node's own addresses inside the session's prefixes, less the named ones.
        own = set()
        for host in local:
            if host.num_addresses != 1:
                continue
            address = host.network_address.packed
            value = int.from_bytes(address, "big")
            inside = _matches(value, self._v4 if len(address) == 4 else self._v6)
            if inside and not _matches(value, _table(_openers(host, entries), host.version)):
                own.add(address)
        self._own = frozenset(own)

    def contains(self, address: bytes) -> bool:
        """Whether a packet to ``address`` (packed, 4 or 16 bytes) may leave."""
        value = int.from_bytes(address, "big")
        if len(address) == 4:
            table, ranges = self._v4, self._ranges4
        else:
            table, ranges = self._v6, self._ranges6
        for net, mask in table:
            if value & mask == net:
                break
        else:
            return False
        if address in self._own:
            return False
        for net, mask, opened in ranges:  # every range holding it must be named
            if value & mask == net and not _matches(value, opened):
                return False
        return True

    def covers(self, address: bytes) -> bool:
        """Whether ``address`` is in the session's prefixes, excluded or not (to tell the two
        reasons for a drop apart; not on the per-packet path)."""
        return _matches(int.from_bytes(address, "big"), self._v4 if len(address) == 4 else self._v6)

    def excluded(self) -> list[str]:
        """What is excluded from the session's prefixes, for ``pvpn status``."""
        out = [str(ipaddress.ip_address(a)) for a in sorted(self._own)]
        for special, opened in self._special:
            out.append(f"{special} (but what the allow list names)" if opened else str(special))
        return out
