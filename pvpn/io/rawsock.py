"""Raw IP sockets: the server re-sends its users' packets (already NATed) into its network."""

from __future__ import annotations

import socket

from pvpn.errors import PvpnError


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
        self.errors = 0

    def send(self, packet: bytes) -> None:
        try:
            if packet[0] >> 4 == 4:
                self._v4.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
            else:
                self._v6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))
        except OSError:
            # A full send buffer or an unroutable destination: the packet is lost like any
            # packet on a congested link; TCP inside the tunnel retransmits.
            self.errors += 1

    def close(self) -> None:
        self._v4.close()
        self._v6.close()


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
