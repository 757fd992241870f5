"""The node's own addresses, read from the kernel of the network namespace it runs in.

IPv4 from ``/proc/net/fib_trie``: every LOCAL entry (an interface address as a /32, or a whole
prefix routed as local, ``ip route add local 10.9.0.0/24 dev lo``) and every BROADCAST entry
(the directed broadcast of each subnet). IPv6 from ``/proc/net/if_inet6`` (the interface
addresses), ``/proc/net/anycast6`` (the anycast ones, such as a router's subnet-router
anycast) and the local routes of ``/proc/net/ipv6_route`` (a prefix routed as local, ``ip -6
route add local 2001:db8::/64 dev lo``: AnyIP, TPROXY; the host answers every address in it,
though if_inet6 lists none). The nodes keep them out of every allow list and next-hop rule
that does not name them (:mod:`pvpn.addresses`); they are read at start, on reload and every
:data:`REFRESH_INTERVAL` seconds, so an address added later is excluded within that time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from pathlib import Path

from pvpn.addresses import Local, Network

PROC_NET = Path("/proc/net")
REFRESH_INTERVAL = 10.0  # seconds


def parse_fib_trie(lines: Iterable[str]) -> set[Network]:
    """The LOCAL and BROADCAST entries of ``/proc/net/fib_trie`` (both tables)."""
    found: set[Network] = set()
    leaf = ""
    for line in lines:
        text = line.strip()
        if text.startswith("|--"):
            leaf = text[3:].strip()
        elif text.startswith("/") and leaf:
            fields = text.split()
            if fields[-1] in ("LOCAL", "BROADCAST") and fields[0][1:].isdigit():
                try:
                    found.add(ipaddress.ip_network(f"{leaf}/{fields[0][1:]}", strict=False))
                except ValueError:
                    continue
    return found


def parse_if_inet6(lines: Iterable[str], column: int = 0) -> set[Network]:
    """The addresses of ``/proc/net/if_inet6`` (32 hex digits in ``column``; 2 for anycast6)."""
    found: set[Network] = set()
    for line in lines:
        fields = line.split()
        if len(fields) > column and len(fields[column]) == 32:
            try:
                found.add(ipaddress.ip_network(bytes.fromhex(fields[column])))
            except ValueError:
                continue
    return found


#: RTF_LOCAL (linux/ipv6_route.h): a route to the host itself.
_RTF_LOCAL = 0x80000000


def parse_ipv6_route(lines: Iterable[str]) -> set[Network]:
    """The local routes of ``/proc/net/ipv6_route`` (every table): destination, prefix length
    and flags are its first, second and ninth columns, in hex."""
    found: set[Network] = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 9 or len(fields[0]) != 32:
            continue
        try:
            if not int(fields[8], 16) & _RTF_LOCAL:
                continue
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            found.add(ipaddress.ip_network(f"{address}/{int(fields[1], 16)}", strict=False))
        except ValueError:
            continue
    return found


def read_local_addresses(proc_net: Path = PROC_NET) -> Local:
    """Every address of this host (its network namespace); OSError if IPv4's can't be read
    (a host without IPv6 has no if_inet6: then there are none)."""
    found: set[Network] = set()
    with open(proc_net / "fib_trie") as handle:
        found |= parse_fib_trie(handle)
    for name, column in (("if_inet6", 0), ("anycast6", 2)):
        try:
            with open(proc_net / name) as handle:
                found |= parse_if_inet6(handle, column)
        except FileNotFoundError:
            continue
    try:
        with open(proc_net / "ipv6_route") as handle:
            found |= parse_ipv6_route(handle)
    except FileNotFoundError:
        pass
    return frozenset(found)


class LocalAddressWatch:
    """Re-reads the node's addresses at most every ``interval`` seconds.

    :meth:`poll` returns the addresses when they are read for the first time or have changed,
    else None; ``force`` reads now (a reload). A failed read keeps the last addresses;
    :meth:`take_error` says why, once per run of failures.
    """

    def __init__(self, reader: Callable[[], Local] = read_local_addresses,
                 interval: float = REFRESH_INTERVAL) -> None:
        self._reader = reader
        self.interval = interval
        self.addresses: Local | None = None
        self._read_at: float | None = None
        self.error: str | None = None
        self._reported = False

    def poll(self, now: float, force: bool = False) -> Local | None:
        if not force and self._read_at is not None and now - self._read_at < self.interval:
            return None
        self._read_at = now
        try:
            addresses = self._reader()
        except OSError as exc:
            self.error = f"cannot read the node's addresses: {exc.strerror or exc}"
            return None
        self.error, self._reported = None, False
        if addresses == self.addresses:
            return None
        self.addresses = addresses
        return addresses

    def take_error(self) -> str | None:
        """The read error, the first time it is asked for after a failure began."""
        if self.error is None or self._reported:
            return None
        self._reported = True
        return self.error
