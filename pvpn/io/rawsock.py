"""Raw IP sockets: the server re-sends its users' packets (already NATed) into its network."""

from __future__ import annotations

import socket
import time
from typing import Callable

from pvpn.errors import PvpnError

# linux/in.h, linux/in6.h
_IP_MTU = 14
_IP_NODEFRAG = 22
_IPV6_MTU = 24


class RawSender:
    """Sends complete IPv4/IPv6 packets, header included (IP_HDRINCL; for IPv6, IPPROTO_RAW
    implies it on Linux)."""

    def __init__(self) -> None:
        try:
            self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError:
            raise PvpnError("raw sockets need root (CAP_NET_RAW)") from None
        for sock in (self._v4, self._v6):
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        # The fragments pvpn-server makes leave as made: the kernel reassembles fragments in
        # this namespace (firewall.server_rules), on the way out too unless told not to.
        self._v4.setsockopt(socket.IPPROTO_IP, _IP_NODEFRAG, 1)
        self.errors = 0

    def send(self, packet: bytes) -> int:
        """Send ``packet``; 0, or the errno of a failure (EMSGSIZE: larger than the link,
        whose MTU changed since pvpn-server last asked, see PathMtu.forget)."""
        try:
            if packet[0] >> 4 == 4:
                self._v4.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
            else:
                self._v6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))
        except OSError as exc:
            # A full send buffer or an unroutable destination: the packet is lost like any
            # packet on a congested link; TCP inside the tunnel retransmits.
            self.errors += 1
            return exc.errno or -1
        return 0

    def close(self) -> None:
        self._v4.close()
        self._v6.close()


class PathMtu:
    """The MTU the kernel would send a destination's packets with (the route's, or what path
    MTU discovery learned since: the ICMP errors pvpn-server hands on reach the kernel too),
    asked through a connected UDP socket (IP_MTU, IPV6_MTU) and kept ``lifetime`` seconds."""

    def __init__(self, lifetime: float = 1.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._cache: dict[bytes, tuple[int, float]] = {}

    def __call__(self, destination: bytes) -> int:
        now = self._clock()
        cached = self._cache.get(destination)
        if cached is not None and now - cached[1] < self.lifetime:
            return cached[0]
        if len(destination) == 4:
            family, level, option = socket.AF_INET, socket.IPPROTO_IP, _IP_MTU
        else:
            family, level, option = socket.AF_INET6, socket.IPPROTO_IPV6, _IPV6_MTU
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.inet_ntop(family, destination), 9))
            mtu = probe.getsockopt(level, option)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[destination] = (mtu, now)
        return int(mtu)

    def forget(self, destination: bytes) -> None:
        """The next packet to ``destination`` asks the kernel again (a send was too large)."""
        self._cache.pop(destination, None)

    def clear(self) -> None:
        self._cache.clear()


class SourceAddresses:
    """Which local address the kernel would use to reach a destination (cached)."""

    def __init__(self) -> None:
        self._cache: dict[bytes, bytes] = {}

    def __call__(self, destination: bytes) -> bytes:
        cached = self._cache.get(destination)
        if cached is not None:
            return cached
        family = socket.AF_INET if len(destination) == 4 else socket.AF_INET6
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.inet_ntop(family, destination), 9))
            source = socket.inet_pton(family, probe.getsockname()[0])
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[destination] = source
        return source

    def clear(self) -> None:
        """Forget every answer (the host's addresses changed: one may be gone)."""
        self._cache.clear()
