"""The TCP connections of the chains pvpn-client holds (pvpn.hosted.HostedTunnel): one to
each session's first hop, made by root, on the event loop. The chain's decisions are the
tunnel's and pvpn.nodes.client.ClientHost's; this only carries bytes, congestion and the
connection's end, and writes each chain once per batch."""

from __future__ import annotations

import asyncio
import ctypes
import socket
from typing import Callable, Protocol

from pvpn.hosted import CONNECT_TIMEOUT, HostedTunnel
from pvpn.io.loop import WRITE_HIGH_WATER, Guard, set_nodelay, stream_transport
from pvpn.io.reasons import connect_failure


_libc = ctypes.CDLL(None, use_errno=True)


def user_socket(family: int, uid: int) -> socket.socket:
    """A TCP socket the kernel counts as ``uid``'s, though root makes it: its file's
    credentials (what ``-m owner --uid-owner`` matches) and its socket's uid (sock_diag)
    are taken from the fsuid at creation, so every rule, tool and test that knew the
    connection to the first hop by its user's uid (when `pvpn connect` made it) still does."""
    previous = _libc.setfsuid(uid)
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    finally:
        _libc.setfsuid(previous)


async def connect_as(loop: asyncio.AbstractEventLoop, host: str, port: int,
                     uid: int) -> socket.socket:
    """A connected socket of ``uid``'s to ``host``:``port`` (each address in turn; the last
    error if none answers)."""
    try:  # an address, the usual case: no resolver thread (uvloop's pool starts four)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, _, _, _, address in infos:
        sock = user_socket(family, uid)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


class ChainHost(Protocol):
    """What a chain's connection tells (pvpn.nodes.client.ClientHost)."""

    def chain_data(self, tunnel: HostedTunnel, data: bytes, now: float) -> None: ...
    def chain_event(self, tunnel: HostedTunnel, now: float, connected: bool | None = None,
                    reason: str = "") -> None: ...
    def chain_retry(self, tunnel: HostedTunnel, now: float) -> None: ...


class _Hop(asyncio.Protocol):
    def __init__(self, hops: "HopConnections", tunnel: HostedTunnel) -> None:
        self.hops, self.tunnel = hops, tunnel
        self.transport: asyncio.Transport | None = None
        self.closed = False  # closed by us: its end is no news
        self.paused = False  # its own writes wait above the high-water mark

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = stream_transport(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def pause_writing(self) -> None:
        self.paused = True
        self.congestion(True)

    def resume_writing(self) -> None:
        self.paused = False
        self.congestion(False)

    def congestion(self, congested: bool) -> None:
        """The tunnel's congestion, as this hop's writes say it; only the tunnel's current
        hop speaks for it (an old one, closed and still draining or ending, must not clear
        what its successor set, or the successor's writes would grow without bound)."""
        if self.hops.hops.get(self.tunnel) is not self:
            return
        tunnel = self.tunnel
        tunnel.congested = congested
        chain = tunnel.chain
        if chain is not None and chain.links:
            chain.links[-1].congested = congested
        hold = self.hops.hold
        if hold is not None:
            self.hops.guard.call("chain congestion", hold, tunnel, congested)

    def data_received(self, data: bytes) -> None:
        hops = self.hops
        hops.guard.call("chain data", hops.host.chain_data, self.tunnel, data, hops.now())
        hops.after()

    def connection_lost(self, exc: Exception | None) -> None:
        hops = self.hops
        if hops.hops.get(self.tunnel) is self:
            if self.paused:  # nothing waits to be written any more: nothing held
                self.paused = False
                self.congestion(False)
            del hops.hops[self.tunnel]
        if self.closed:
            return
        reason = f"connection lost: {exc}" if exc else "the first hop closed the connection"
        hops.guard.call("chain lost", hops.host.chain_event, self.tunnel, hops.now(), None,
                        reason)
        hops.after()


class HopConnections:
    """Every held chain's TCP connection, by tunnel. ``after`` runs the host's commands and
    flushes what they left (ClientDaemon.run then flush)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, guard: Guard, host: ChainHost,
                 after: Callable[[], None],
                 hold: Callable[[HostedTunnel, bool], None] | None = None) -> None:
        self.loop, self.guard, self.host, self.after = loop, guard, host, after
        # Told when a chain's writes wait above their high-water mark (True) and when they
        # drained (False): the daemon stops reading that session's queues meanwhile.
        self.hold = hold
        self.now = loop.time
        self.hops: dict[HostedTunnel, _Hop] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def open(self, tunnel: HostedTunnel, host: str, port: int, uid: int) -> None:
        task = self.loop.create_task(self._open(tunnel, host, port, uid))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, tunnel: HostedTunnel, host: str, port: int, uid: int) -> None:
        try:
            sock = await asyncio.wait_for(connect_as(self.loop, host, port, uid),
                                          CONNECT_TIMEOUT)
            _, hop = await self.loop.create_connection(lambda: _Hop(self, tunnel), sock=sock)
        except (OSError, asyncio.TimeoutError) as exc:
            self.guard.call("chain connect", self.host.chain_event, tunnel, self.now(), False,
                            connect_failure(exc, CONNECT_TIMEOUT))
            self.after()
            return
        assert hop.transport is not None
        if tunnel.ended:
            hop.closed = True
            hop.transport.close()
            return
        set_nodelay(hop.transport)
        self.hops[tunnel] = hop
        if tunnel.congested:  # what an earlier hop said no longer holds
            hop.congestion(False)
        self.guard.call("chain connected", self.host.chain_event, tunnel, self.now(), True)
        self.after()

    def write(self, tunnel: HostedTunnel) -> None:
        """The chain's packets waiting since the last batch, and whatever its TLS has."""
        if tunnel.outbox:
            tunnel.send_packets(tunnel.outbox)
            tunnel.outbox.clear()
        data = tunnel.data_to_send(self.now())
        hop = self.hops.get(tunnel)
        if data and hop is not None and hop.transport is not None:
            hop.transport.write(data)
            # A backstop: whatever the flags say, a buffer this large is congested (its next
            # packets are dropped as such), so it cannot grow without bound.
            if (not tunnel.congested
                    and hop.transport.get_write_buffer_size() > 4 * WRITE_HIGH_WATER):
                hop.congestion(True)

    def close(self, tunnel: HostedTunnel) -> None:
        self.write(tunnel)  # a CLOSE goes first
        hop = self.hops.pop(tunnel, None)
        if hop is not None and hop.transport is not None:
            hop.closed = True
            hop.transport.close()

    def retry_in(self, tunnel: HostedTunnel, delay: float) -> None:
        def retry() -> None:
            self.guard.call("chain retry", self.host.chain_retry, tunnel, self.now())
            self.after()
        self.loop.call_later(delay, retry)

    def close_all(self) -> None:
        for tunnel in list(self.hops):
            self.close(tunnel)
        for task in list(self.tasks):
            task.cancel()
