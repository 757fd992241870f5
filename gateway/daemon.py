"""pvpn-gateway: authenticates each user over its own TLS session, then relays the user's
next-hop TLS session as opaque bytes (pvpn.nodes.gateway). No per-flow state, no decryption of
anything but its own hop's envelopes."""

from __future__ import annotations

import asyncio
import itertools
import time

from pvpn import auth, tls
from pvpn.commands import CloseLink, CloseNext, LogRecord, OpenNextHop, SendBytes, SendNext
from pvpn.config import GatewayConfig, load_gateway_config
from pvpn.errors import ConfigError
from pvpn.io.reasons import connect_failure
from pvpn.io.control import start_control, stop_control
from pvpn.io.localaddrs import LocalAddressWatch
from pvpn.io.loop import (
    LISTEN_BACKLOG, WRITE_HIGH_WATER, Guard, daemon_main, guarded, install_signals, peer_text,
    set_nodelay,
)
from pvpn.names import (
    AUTH_KEY_SKIPPED, NODE_RELOADED, NODE_RELOAD_FAILED, NODE_STARTED, NODE_STOPPED, NODE_WARNING,
)
from pvpn.nodes.gateway import GatewayNode
from pvpn.records import Record, RecordWriter


class Gateway:
    """Wires the sans-IO GatewayNode to the previous-hop and next-hop sockets."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.log = RecordWriter("gateway", config.name, clock=time.time)
        # What escapes the core (a bug a peer may trigger) costs that peer's link only.
        self.guard = Guard(self.log.write, self.close_failed)
        self.context = tls.make_server_context(str(config.certificate), str(config.private_key))
        keys = auth.AuthorizedKeys(config.authorized_keys, warn=self.key_warning)
        self.node = GatewayNode(config, keys, auth.verify_signature)
        self.links: dict[int, asyncio.Transport] = {}
        self.nexts: dict[int, asyncio.Transport] = {}
        self._ids = itertools.count(1)
        self.loop = asyncio.get_running_loop()
        # The gateway's own addresses, refused as next hops unless a rule names them.
        self.addresses = LocalAddressWatch()
        self.refresh_addresses(force=True)

    def refresh_addresses(self, force: bool = False) -> None:
        """Hand the node the gateway's own addresses: at start, on reload, every 10 s."""
        addresses = self.addresses.poll(self.loop.time(), force)
        if addresses is not None:
            self.node.set_local_addresses(addresses)
        error = self.addresses.take_error()
        if error is not None:
            self.log.write(Record(NODE_WARNING, reason=error))

    def dispatch(self) -> None:
        node = self.node
        for _ in range(64):  # commands beget commands (a failed write closes a link); bounded
            if not node.commands:
                return
            commands, node.commands = node.commands, []
            for cmd in commands:
                try:
                    self._carry_out(cmd)
                except Exception as exc:  # noqa: BLE001 - one command's failure, the guard's
                    self.guard.failed(f"dispatch {type(cmd).__name__}", exc,
                                      getattr(cmd, "link", None))

    def _carry_out(self, cmd: object) -> None:
        if type(cmd) is SendNext:
            transport = self.nexts.get(cmd.link)
            if transport is not None:
                transport.write(cmd.data)
        elif type(cmd) is SendBytes:
            transport = self.links.get(cmd.link)
            if transport is not None:
                transport.write(cmd.data)
        elif type(cmd) is LogRecord:
            self.log.write(cmd.record)
        elif type(cmd) is CloseLink:
            transport = self.links.pop(cmd.link, None)
            if transport is not None:
                transport.close()
        elif type(cmd) is CloseNext:
            transport = self.nexts.pop(cmd.link, None)
            if transport is not None:
                transport.close()
        elif type(cmd) is OpenNextHop:
            self.loop.create_task(self._open_next(cmd))

    async def _open_next(self, cmd: OpenNextHop) -> None:
        try:
            try:
                transport, _ = await asyncio.wait_for(self.loop.create_connection(
                    lambda: NextHopProtocol(self, cmd.link), cmd.host, cmd.port), cmd.timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = connect_failure(exc, cmd.timeout)
                self.node.next_failed(cmd.link, reason, self.loop.time())
            else:
                if cmd.link in self.links:
                    replaced = self.nexts.get(cmd.link)
                    if replaced is not None:  # never: one AUTH, one next hop per link
                        replaced.close()
                    self.nexts[cmd.link] = transport
                    self.node.next_opened(cmd.link, self.loop.time())
                else:
                    transport.close()
            self.dispatch()
        except Exception as exc:  # noqa: BLE001 - a task's failure, the guard's
            self.guard.failed("next hop", exc, cmd.link)

    def close_failed(self, link_id: int, reason: str) -> None:
        """The guard's way to close one link: the core forgets it, and both its sockets close
        even if the core can't say so."""
        try:
            self.node.link_failed(link_id, reason, self.loop.time())
        finally:
            for transports in (self.links, self.nexts):
                transport = transports.pop(link_id, None)
                if transport is not None:
                    transport.close()

    def key_warning(self, user: str, message: str) -> None:
        self.log.write(Record(AUTH_KEY_SKIPPED, user=user, reason=message))

    def reload(self) -> None:
        try:
            config = load_gateway_config(self.config.path)
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


class PrevHopProtocol(asyncio.Protocol):
    """The link from the previous hop (the user's side)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.guard = gateway.guard
        self.id = 0

    @property
    def guard_link(self) -> int | None:
        return self.id or None

    @guarded("connection_made")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        gw = self.gateway
        self.id = next(gw._ids)
        gw.links[self.id] = transport
        context = gw.context
        now = gw.loop.time()
        # The TLS session is made when the peer's first bytes come (a silent stranger costs
        # no TLS state).
        if not gw.node.link_opened(self.id, lambda: tls.TlsSession(context, server_side=True),
                                   peer_text(transport), now):
            gw.links.pop(self.id, None)
            transport.close()
        gw.dispatch()

    @guarded("data_received")
    def data_received(self, data: bytes) -> None:
        gw = self.gateway
        gw.node.receive_data(self.id, data, gw.loop.time())
        gw.dispatch()

    # Relayed bytes can't be dropped (they are a TLS stream): back-pressure instead. The node
    # hears of it too, so it answers no KEEPALIVE of a peer that does not read.
    @guarded("pause_writing")
    def pause_writing(self) -> None:
        self.gateway.node.link_congested(self.id, True)
        nxt = self.gateway.nexts.get(self.id)
        if nxt is not None:
            nxt.pause_reading()

    @guarded("resume_writing")
    def resume_writing(self) -> None:
        self.gateway.node.link_congested(self.id, False)
        nxt = self.gateway.nexts.get(self.id)
        if nxt is not None:
            nxt.resume_reading()

    @guarded("connection_lost")
    def connection_lost(self, exc: Exception | None) -> None:
        gw = self.gateway
        gw.links.pop(self.id, None)
        gw.node.link_lost(self.id, gw.loop.time(),
                          f"connection lost: {exc}" if exc else "connection closed")
        gw.dispatch()


class NextHopProtocol(asyncio.Protocol):
    """The connection to the next hop, carrying the user's own TLS session with it."""

    def __init__(self, gateway: Gateway, link_id: int) -> None:
        self.gateway = gateway
        self.guard = gateway.guard
        self.link_id = link_id

    @property
    def guard_link(self) -> int | None:
        return self.link_id

    @guarded("next connection_made")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    @guarded("next data_received")
    def data_received(self, data: bytes) -> None:
        gw = self.gateway
        gw.node.next_data(self.link_id, data, gw.loop.time())
        gw.dispatch()

    @guarded("next pause_writing")
    def pause_writing(self) -> None:
        prev = self.gateway.links.get(self.link_id)
        if prev is not None:
            prev.pause_reading()

    @guarded("next resume_writing")
    def resume_writing(self) -> None:
        prev = self.gateway.links.get(self.link_id)
        if prev is not None:
            prev.resume_reading()

    @guarded("next connection_lost")
    def connection_lost(self, exc: Exception | None) -> None:
        gw = self.gateway
        if gw.nexts.pop(self.link_id, None) is None and self.link_id not in gw.node.splices:
            return
        gw.node.next_lost(self.link_id, f"{exc}" if exc else "connection closed",
                          gw.loop.time())
        gw.dispatch()


async def serve(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    loop = gateway.loop
    listeners: list[asyncio.AbstractServer] = []
    control: asyncio.AbstractServer | None = None
    stop = asyncio.Event()
    try:
        guard = gateway.guard
        guard.install(loop)
        for host, port in config.listen:
            listeners.append(await loop.create_server(
                lambda: PrevHopProtocol(gateway), host, port, reuse_address=True,
                backlog=LISTEN_BACKLOG))
        control = await start_control(config.control,
                                      lambda: gateway.node.describe(loop.time()))
        install_signals(loop, stop, lambda: guard.call("reload", gateway.reload))
        gateway.log.write(Record(NODE_STARTED, extra={
            "listen": [f"{h}:{p}" for h, p in config.listen]}))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            guard.call("timer", gateway.node.handle_timer, loop.time())
            guard.call("addresses", gateway.refresh_addresses)
            guard.call("dispatch", gateway.dispatch)
    finally:
        # Shutdown goes on whatever happens here.
        gateway.guard.call("shutdown", gateway.node.close_all, "gateway shutting down")
        gateway.guard.call("shutdown dispatch", gateway.dispatch)
        for listener in listeners:
            listener.close()
        stop_control(control, config.control)
        await asyncio.sleep(0.05)  # let CLOSE envelopes and close_notify leave
        gateway.log.write(Record(NODE_STOPPED, reason="clean"))


def main(argv: list[str] | None = None) -> int:
    return daemon_main("pvpn-gateway", __doc__, load_gateway_config, serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
