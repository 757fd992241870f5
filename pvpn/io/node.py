"""What a node daemon (pvpn-server, pvpn-gateway) does with its sans-IO node and its users'
links: the TLS context and authorised keys, one socket per link, the one dispatcher, the
guard, reloads (SIGHUP), the node's own addresses, the control socket, and the scaffolding
of serving: listen, tick every second, stop. Each program adds only what is its own (the
server's NAT, raw socket and queues; the gateway's next-hop connections)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any, Callable, Generic, Protocol, TypeVar

from pvpn import auth, tls
from pvpn.addresses import Local
from pvpn.commands import CloseLink, Command, LogRecord, SendBytes
from pvpn.config import GatewayConfig, ServerConfig
from pvpn.errors import ConfigError
from pvpn.io.control import start_control, stop_control
from pvpn.io.localaddrs import LocalAddressWatch
from pvpn.io.loop import (
    LISTEN_BACKLOG, WRITE_HIGH_WATER, Dispatcher, Guard, guarded, peer_text, set_nodelay,
    stream_transport, tick_until,
)
from pvpn.names import (
    AUTH_KEY_SKIPPED, NODE_RELOADED, NODE_RELOAD_FAILED, NODE_STARTED, NODE_WARNING,
)
from pvpn.nodes.base import TlsFactory, TlsLike
from pvpn.records import Record, RecordWriter


class ServedNode(Protocol):
    """The inputs a node daemon gives its node (pvpn.nodes.server, pvpn.nodes.gateway)."""

    commands: list[Command]

    def link_opened(self, link_id: int, tls: TlsLike | TlsFactory, peer: str,
                    now: float) -> bool: ...
    def receive_data(self, link_id: int, data: bytes, now: float) -> None: ...
    def link_congested(self, link_id: int, congested: bool) -> None: ...
    def link_failed(self, link_id: int, reason: str, now: float) -> None: ...
    def link_lost(self, link_id: int, now: float, reason: str = ...) -> None: ...
    def set_local_addresses(self, addresses: Local) -> None: ...
    def apply_policy(self, users: Any, now: float) -> None: ...
    def reauthenticate(self, now: float) -> None: ...
    def flush(self, now: float | None = None) -> None: ...
    def handle_timer(self, now: float) -> None: ...
    def describe(self, now: float) -> list[dict[str, Any]]: ...


ConfigT = TypeVar("ConfigT", bound=ServerConfig | GatewayConfig)
NodeT = TypeVar("NodeT", bound=ServedNode)
SignalInstaller = Callable[[asyncio.AbstractEventLoop, asyncio.Event, Callable[[], object]],
                           None]


class NodeDaemon(Generic[ConfigT, NodeT]):
    """Wires a sans-IO node to its links' sockets. Driven by its links' asyncio callbacks
    (:class:`LinkProtocol`), a tick every second and SIGHUP; a subclass makes ``node``, adds
    its own commands' handlers to ``dispatcher`` and says how its config is read again."""

    node: NodeT

    def __init__(self, config: ConfigT, log: RecordWriter) -> None:
        self.config = config
        self.log = log
        # What escapes the core (a bug a peer may trigger) costs that peer's link only.
        self.guard = Guard(self.log.write, self.close_failed)
        self.context = tls.make_server_context(str(config.certificate), str(config.private_key))
        self.keys = auth.AuthorizedKeys(config.authorized_keys, warn=self.key_warning)
        self.links: dict[int, asyncio.Transport] = {}
        self.link_ids = itertools.count(1)
        self.loop = asyncio.get_running_loop()
        # The node's own addresses: kept out of allow lists and next hops that do not name them.
        self.addresses = LocalAddressWatch()
        self.dispatcher = Dispatcher(self.guard)
        self.dispatcher.on(SendBytes, self._send)
        self.dispatcher.on(LogRecord, lambda cmd: self.log.write(cmd.record))
        self.dispatcher.on(CloseLink, lambda cmd: close_transport(self.links.pop(cmd.link, None)))
        self.listeners: list[asyncio.AbstractServer] = []
        self.control: asyncio.AbstractServer | None = None
        self.stop = asyncio.Event()

    def load_config(self) -> ConfigT:
        """The node's config file, read again (SIGHUP)."""
        raise NotImplementedError

    def _send(self, cmd: SendBytes) -> None:
        transport = self.links.get(cmd.link)
        if transport is not None:
            transport.write(cmd.data)

    def dispatch(self) -> None:
        self.dispatcher.run(self.node)

    def refresh_addresses(self, force: bool = False) -> None:
        """Hand the node its own addresses: at start, on reload, every 10 s."""
        addresses = self.addresses.poll(self.loop.time(), force)
        if addresses is not None:
            self.addresses_changed(addresses)
        error = self.addresses.take_error()
        if error is not None:
            self.log.write(Record(NODE_WARNING, reason=error))

    def addresses_changed(self, addresses: Local) -> None:
        self.node.set_local_addresses(addresses)

    def close_failed(self, link_id: int, reason: str) -> None:
        """The guard's way to close one link: the core forgets it, and its sockets close
        even if the core can't say so."""
        try:
            self.node.link_failed(link_id, reason, self.loop.time())
        finally:
            self.drop_sockets(link_id)

    def drop_sockets(self, link_id: int) -> None:
        close_transport(self.links.pop(link_id, None))

    def key_warning(self, user: str, message: str) -> None:
        self.log.write(Record(AUTH_KEY_SKIPPED, user=user, reason=message))

    def reload(self) -> None:
        try:
            config = self.load_config()
        except ConfigError as exc:
            self.log.write(Record(NODE_RELOAD_FAILED, reason=str(exc)))
            return
        self.refresh_addresses(force=True)
        now = self.loop.time()
        self.node.apply_policy(config.users, now)  # live sessions too, not only new ones
        self.log.write(Record(NODE_RELOADED, extra={"users": sorted(config.users)}))
        self.reauthenticate()

    def reauthenticate(self) -> None:
        """After a reload the keys may have changed: a live session whose user has no key left
        ends now, every other one proves its key again now."""
        now = self.loop.time()
        self.node.reauthenticate(now)
        self.node.flush(now)
        self.dispatch()

    # -- serving
    async def start_serving(self, link: Callable[[], asyncio.Protocol],
                            install_signals: SignalInstaller,
                            sockets: list[socket.socket] | None = None, **started: Any) -> None:
        """Listen (each connection a ``link()``; on ``sockets`` if given: a worker's, which
        its parent listens on), answer on the control socket, take SIGTERM and SIGINT (stop)
        and SIGHUP (reload) through the program's ``install_signals`` (its tests hook none),
        and say so in ``node:started``."""
        loop, config, guard = self.loop, self.config, self.guard
        guard.install(loop)
        for sock in sockets or ():
            self.listeners.append(await loop.create_server(link, sock=sock,
                                                           backlog=LISTEN_BACKLOG))
        for host, port in config.listen if sockets is None else ():
            self.listeners.append(await loop.create_server(
                link, host, port, reuse_address=True, backlog=LISTEN_BACKLOG))
        self.control = await start_control(config.control,
                                           lambda: self.node.describe(loop.time()))
        install_signals(loop, self.stop, lambda: guard.call("reload", self.reload))
        self.log.write(Record(NODE_STARTED, extra={
            "listen": [f"{h}:{p}" for h, p in config.listen], **started}))

    async def run_until_stopped(self) -> None:
        await tick_until(self.stop, 1.0, self.tick)

    def tick(self) -> None:
        guard = self.guard
        guard.call("timer", self.node.handle_timer, self.loop.time())
        guard.call("addresses", self.refresh_addresses)
        guard.call("dispatch", self.dispatch)

    async def stop_serving(self) -> None:
        """After the node's last commands: no more connections or status questions."""
        for listener in self.listeners:
            listener.close()
        stop_control(self.control, self.config.control)
        await asyncio.sleep(0.05)  # let close_notify and CLOSE envelopes leave


def close_transport(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None:
        transport.close()


class LinkProtocol(asyncio.Protocol):
    """A user's link (or a previous hop's) to a node daemon: its socket's events to the node."""

    def __init__(self, daemon: NodeDaemon[Any, Any]) -> None:
        self.daemon = daemon
        self.guard = daemon.guard
        self.id = 0

    @property
    def guard_link(self) -> int | None:
        return self.id or None

    @guarded("connection_made")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = stream_transport(transport)
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        daemon = self.daemon
        self.id = next(daemon.link_ids)
        daemon.links[self.id] = transport
        context = daemon.context
        now = daemon.loop.time()
        # The TLS session is made when the peer's first bytes come (a silent stranger costs
        # no TLS state).
        if not daemon.node.link_opened(self.id, lambda: tls.TlsSession(context, server_side=True),
                                       peer_text(transport), now):
            daemon.links.pop(self.id, None)
            transport.close()
        daemon.dispatch()

    @guarded("data_received")
    def data_received(self, data: bytes) -> None:
        daemon = self.daemon
        daemon.node.receive_data(self.id, data, daemon.loop.time())
        daemon.dispatch()

    @guarded("pause_writing")
    def pause_writing(self) -> None:
        self.congested(True)

    @guarded("resume_writing")
    def resume_writing(self) -> None:
        self.congested(False)

    def congested(self, congested: bool) -> None:
        self.daemon.node.link_congested(self.id, congested)

    @guarded("connection_lost")
    def connection_lost(self, exc: Exception | None) -> None:
        daemon = self.daemon
        daemon.links.pop(self.id, None)
        daemon.node.link_lost(self.id, daemon.loop.time(),
                              f"connection lost: {exc}" if exc else "connection closed")
        daemon.dispatch()
