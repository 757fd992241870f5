"""pvpn-gateway: authenticates each user over its own TLS session, then relays the user's
next-hop TLS session as opaque bytes (pvpn.nodes.gateway). No per-flow state, no decryption of
anything but its own hop's envelopes."""

from __future__ import annotations

import asyncio
import time

from pvpn import auth
from pvpn.commands import CloseNext, OpenNextHop, SendNext
from pvpn.config import GatewayConfig, load_gateway_config
from pvpn.io.reasons import connect_failure
from pvpn.io.loop import (
    WRITE_HIGH_WATER, daemon_main, guarded, install_signals, set_nodelay, stream_transport,
)
from pvpn.io.node import LinkProtocol, NodeDaemon, close_transport
from pvpn.names import NODE_STOPPED
from pvpn.nodes.gateway import GatewayNode
from pvpn.records import Record, RecordWriter


class Gateway(NodeDaemon[GatewayConfig, GatewayNode]):
    """Wires the sans-IO GatewayNode to the previous-hop and next-hop sockets."""

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config, RecordWriter("gateway", config.name, clock=time.time))
        self.node = GatewayNode(config, self.keys, auth.verify_signature)
        self.nexts: dict[int, asyncio.Transport] = {}
        self.dispatcher.on(SendNext, self._send_next)
        self.dispatcher.on(CloseNext, lambda cmd: close_transport(self.nexts.pop(cmd.link, None)))
        self.dispatcher.on(OpenNextHop, lambda cmd: self.loop.create_task(self._open_next(cmd)))
        self.refresh_addresses(force=True)

    def load_config(self) -> GatewayConfig:
        return load_gateway_config(self.config.path)

    def _send_next(self, cmd: SendNext) -> None:
        transport = self.nexts.get(cmd.link)
        if transport is not None:
            transport.write(cmd.data)

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

    def drop_sockets(self, link_id: int) -> None:
        super().drop_sockets(link_id)  # and the next hop's
        close_transport(self.nexts.pop(link_id, None))


class PrevHopProtocol(LinkProtocol):
    """The link from the previous hop (the user's side)."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(gateway)
        self.gateway = gateway

    # Relayed bytes can't be dropped (they are a TLS stream): back-pressure instead. The node
    # hears of it too, so it answers no KEEPALIVE of a peer that does not read.
    def congested(self, congested: bool) -> None:
        super().congested(congested)
        nxt = self.gateway.nexts.get(self.id)
        if nxt is None:
            return
        if congested:
            nxt.pause_reading()
        else:
            nxt.resume_reading()


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
        transport = stream_transport(transport)
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
    try:
        await gateway.start_serving(lambda: PrevHopProtocol(gateway), install_signals)
        await gateway.run_until_stopped()
    finally:
        # Shutdown goes on whatever happens here.
        gateway.guard.call("shutdown", gateway.node.close_all, "gateway shutting down")
        gateway.guard.call("shutdown dispatch", gateway.dispatch)
        await gateway.stop_serving()
        gateway.log.write(Record(NODE_STOPPED, reason="clean"))


def main(argv: list[str] | None = None) -> int:
    return daemon_main("pvpn-gateway", __doc__, load_gateway_config, serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
