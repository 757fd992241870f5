"""pvpn-server: accepts users' sessions, re-injects their packets, returns each reply to the
session whose flow it answers (the flow table), and logs every hop event as a JSON line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable


from pvpn import auth, firewall, tls
from pvpn.commands import CapturePacket, CloseLink, InjectPacket, LogRecord, SendBytes
from pvpn.config import ServerConfig, load_server_config
from pvpn.errors import ConfigError, PvpnError, StateError
from pvpn.flowtable import FlowTable
from pvpn.fragments import Reassembler
from pvpn.names import (
    AUTH_KEY_SKIPPED, NODE_CLEANUP, NODE_RELOADED, NODE_RELOAD_FAILED, NODE_STARTED,
    NODE_STATE_RESTORED, NODE_STOPPED, NODE_WARNING,
)
from pvpn.nodes.server import ServerNode
from pvpn.packet import destination_address
from pvpn.io import rules
from pvpn.io.control import start_control, stop_control
from pvpn.io.localaddrs import LocalAddressWatch
from pvpn.io.nfqueue import BatchedQueue
from pvpn.io.loop import (
    EX_CONFIG, LISTEN_BACKLOG, WRITE_HIGH_WATER, Guard, guarded, install_signals, peer_text,
    run_daemon, set_nodelay,
)
from pvpn.io.pcap import SessionCaptures
from pvpn.io.rawsock import PathMtu, RawSender, SourceAddresses
from pvpn.io.statefile import StateFile, StateKeeper
from pvpn.io.tun import open_tun, read_copies
from pvpn.records import Record, RecordWriter
from pvpn.state import decode_state


def check_nat_ports(config: ServerConfig) -> None:
    """The NAT range must not overlap the ports the kernel hands to local sockets."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(x) for x in handle.read().split())
    except OSError:
        return
    nat_low, nat_high = config.nat_ports
    if nat_low <= high and low <= nat_high:
        raise ConfigError(
            f"{config.path}: [server] nat_ports {nat_low}-{nat_high} overlaps the local port "
            f"range {low}-{high} (net.ipv4.ip_local_port_range); choose ports above {high}")


class Server:
    """Wires the sans-IO ServerNode to sockets, NFQUEUE and the raw socket."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.log = RecordWriter("server", config.name, clock=time.time)
        # What escapes the core (a bug a peer may trigger) costs that peer's link only.
        self.guard = Guard(self.log.write, self.close_failed)
        self.context = tls.make_server_context(str(config.certificate), str(config.private_key))
        keys = auth.AuthorizedKeys(config.authorized_keys, warn=self.key_warning)
        self.sources = SourceAddresses()
        self.mtus = PathMtu()  # what the server fragments its users' datagrams to
        self.node = ServerNode(config, keys, auth.verify_signature, self.sources,
                               mtu_for=self.mtus)
        # [server] pcap_dir: every session's inner packets to <pcap_dir>/<session>.pcap.
        self.captures = (None if config.pcap_dir is None else SessionCaptures(
            config.pcap_dir, config.pcap_max_bytes, self.log.write,
            max_total_bytes=config.pcap_max_total_bytes, max_files=config.pcap_max_files))
        self.node.capture = self.captures is not None
        self.raw = RawSender()
        self.transports: dict[int, asyncio.Transport] = {}
        self._ids = itertools.count(1)
        self.loop = asyncio.get_running_loop()
        # The server's own addresses, kept out of allow lists that do not name them.
        self.addresses = LocalAddressWatch()
        self.refresh_addresses(force=True)

    def refresh_addresses(self, force: bool = False) -> None:
        """Hand the node the server's own addresses: at start, on reload, every 10 s."""
        addresses = self.addresses.poll(self.loop.time(), force)
        if addresses is not None:
            self.sources.clear()  # a source address the kernel chose may be gone
            self.node.set_local_addresses(addresses)
        error = self.addresses.take_error()
        if error is not None:
            self.log.write(Record(NODE_WARNING, reason=error))

    def dispatch(self) -> None:
        node = self.node
        if not node.commands:
            return
        commands, node.commands = node.commands, []
        seen = time.time()  # one capture timestamp per batch
        for cmd in commands:
            try:
                if type(cmd) is InjectPacket:
                    if self.raw.send(cmd.packet) == errno.EMSGSIZE:  # the link's MTU changed
                        self.mtus.forget(destination_address(cmd.packet))
                elif type(cmd) is SendBytes:
                    transport = self.transports.get(cmd.link)
                    if transport is not None:
                        transport.write(cmd.data)
                elif type(cmd) is LogRecord:
                    self.log.write(cmd.record)
                    if self.captures is not None:
                        self.captures.session_ended(cmd.record)
                elif type(cmd) is CloseLink:
                    transport = self.transports.pop(cmd.link, None)
                    if transport is not None:
                        transport.close()
                elif type(cmd) is CapturePacket and self.captures is not None:
                    self.captures.write(cmd.session, cmd.packet, seen)
            except Exception as exc:  # noqa: BLE001 - one command's failure, the guard's
                self.guard.failed(f"dispatch {type(cmd).__name__}", exc, getattr(cmd, "link", None))
        if self.captures is not None:
            self.guard.call("capture flush", self.captures.flush)

    def close_failed(self, link_id: int, reason: str) -> None:
        """The guard's way to close one link: the core forgets it, and its socket closes
        even if the core can't say so."""
        try:
            self.node.link_failed(link_id, reason, self.loop.time())
        finally:
            transport = self.transports.pop(link_id, None)
            if transport is not None:
                transport.close()

    def key_warning(self, user: str, message: str) -> None:
        self.log.write(Record(AUTH_KEY_SKIPPED, user=user, reason=message))

    def take_reply(self, packet: bytes) -> bool:
        """A queued packet: True if it was a session's reply (the queue drops the original)."""
        try:
            return self.node.receive_reply(packet, self.loop.time())
        except Exception as exc:  # noqa: BLE001 - the guard's; the packet is dropped (fail closed)
            self.guard.failed("reply", exc)
            return True

    def take_copies(self, fd: int, reassembler: Reassembler) -> None:
        """Replies too large for a queue message, as the kernel's copies brought them out of
        the server's TUN device; a copy made as the reply arrived lost one hop (as if
        forwarded), given back here."""
        for datagram in read_copies(fd, reassembler, self.loop.time(), 1, True):
            self.take_reply(datagram)

    def reload(self) -> None:
        try:
            config = load_server_config(self.config.path)
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


class ServerLinkProtocol(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.guard = server.guard
        self.id = 0

    @property
    def guard_link(self) -> int | None:
        return self.id or None

    @guarded("connection_made")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        server = self.server
        self.id = next(server._ids)
        context = server.context
        server.transports[self.id] = transport
        now = server.loop.time()
        # The TLS session is made when the peer's first bytes come (a silent stranger costs
        # no TLS state).
        if not server.node.link_opened(
                self.id, lambda: tls.TlsSession(context, server_side=True),
                peer_text(transport), now):
            server.transports.pop(self.id, None)
            transport.close()
        server.dispatch()

    @guarded("pause_writing")
    def pause_writing(self) -> None:
        self.server.node.link_congested(self.id, True)

    @guarded("resume_writing")
    def resume_writing(self) -> None:
        self.server.node.link_congested(self.id, False)

    @guarded("data_received")
    def data_received(self, data: bytes) -> None:
        server = self.server
        server.node.receive_data(self.id, data, server.loop.time())
        server.dispatch()

    @guarded("connection_lost")
    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.transports.pop(self.id, None)
        server.node.link_lost(self.id, server.loop.time(),
                              f"connection lost: {exc}" if exc else "connection closed")
        server.dispatch()


def restore_state(server: Server, keeper: StateKeeper) -> None:
    """Put back the sessions and mappings the last server saved (pvpn.state), before the
    first link or reply is served."""
    node = server.node
    try:
        loaded = keeper.load(server.config.resume_grace)
        if loaded is None:
            return
        state, downtime = loaded
        report = node.restore(state, server.loop.time(), downtime)
    except ValueError as exc:  # another node's state
        keeper.refuse(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - a bug must not keep the server from starting
        server.guard.failed("state restore", exc)
        node.sessions.clear()  # nothing half put back
        node.flows = FlowTable.for_config(server.config)
        keeper.refuse(f"restoring it failed: {type(exc).__name__}")
        return
    server.dispatch()  # the session:restored and session:closed records
    server.log.write(Record(NODE_STATE_RESTORED, reason=f"the server was away "
                            f"{downtime:.1f} s", extra={**report, "path": str(keeper.store.path),
                                                         "downtime": round(downtime, 3)}))


async def serve(config: ServerConfig) -> None:
    check_nat_ports(config)
    server = Server(config)
    loop = server.loop
    # [server] state_file: sessions and NAT mappings survive a restart (ConfigError now for
    # an unsafe directory).
    keeper = None if config.state_file is None else StateKeeper(
        StateFile(config.state_file), server.node.snapshot, server.node.state_version,
        server.log.write, config.state_interval)
    kept = False  # the state was saved at the stop: the NAT ports' rules stay
    # This run has taken the state over (put it back): until then a failure to start leaves
    # an earlier server's state and rules to the next one.
    took_over = keeper is None
    queue: BatchedQueue | None = None
    copies: int | None = None
    listeners: list[asyncio.AbstractServer] = []
    control: asyncio.AbstractServer | None = None
    stop = asyncio.Event()
    try:
        queue = BatchedQueue(config.queue, server.take_reply, max_len=8192)
        # Replies too large for a queue message: the kernel's copies, out of this device.
        copies = open_tun(firewall.server_tun(config.instance))
        # Replaced in place, with no moment without them: a packet of a NAT flow that
        # reached the host's own stack while the server restarts would be answered with a
        # reset, and end the connection a resumed session was to carry on.
        rules.apply(firewall.server_rules(config.instance, config.queue, config.nat_ports))
        stale = rules.ensure_only_jumps(config.instance, firewall.server_jumps(config.instance))
        if stale:
            server.log.write(Record(NODE_CLEANUP, reason="rules left by an earlier run",
                                    extra={"rules": stale}))
        if keeper is not None:
            restore_state(server, keeper)
            took_over = True

        guard = server.guard
        guard.install(loop)
        reassembler = Reassembler()

        def read_big_replies(fd: int = copies) -> None:
            guard.call("copies", server.take_copies, fd, reassembler)
            guard.call("flush", server.node.flush, loop.time())
            guard.call("dispatch", server.dispatch)

        def drain_queue(queue: BatchedQueue = queue) -> None:
            guard.call("queue drain", queue.drain)
            guard.call("flush", server.node.flush, loop.time())
            guard.call("dispatch", server.dispatch)

        loop.add_reader(queue.fileno(), drain_queue)  # bound above, so removable below
        loop.add_reader(copies, read_big_replies)
        for host, port in config.listen:
            listeners.append(await loop.create_server(
                lambda: ServerLinkProtocol(server), host, port, reuse_address=True,
                backlog=LISTEN_BACKLOG))
        control = await start_control(config.control,
                                      lambda: server.node.describe(loop.time()))
        install_signals(loop, stop, lambda: guard.call("reload", server.reload))
        server.log.write(Record(NODE_STARTED, extra={
            "listen": [f"{h}:{p}" for h, p in config.listen], "queue": config.queue}))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            guard.call("timer", server.node.handle_timer, loop.time())
            guard.call("addresses", server.refresh_addresses)
            guard.call("dispatch", server.dispatch)
            if keeper is not None:
                guard.call("state", keeper.tick, loop.time())
    finally:
        # Shutdown goes on whatever happens here. With a state file the sessions are kept
        # for the next server: detached (their users' processes hold and resume them), saved
        # with their mappings; without one they end, their users told why.
        if not took_over:
            server.guard.call("shutdown", server.node.close_all, "server shutting down")
        elif keeper is not None and server.node.sessions:
            now = loop.time()
            server.guard.call("shutdown", server.node.detach_all, "server stopping; the "
                              "session is kept for its resume", now)
            try:
                kept = await keeper.final(now)
            except Exception as exc:  # noqa: BLE001 - the guard's; the stop goes on
                server.guard.failed("shutdown state", exc)
            if not kept:
                server.guard.call("shutdown", server.node.close_all, "server shutting down")
        elif keeper is not None:  # nothing to keep: the host as it was found
            server.guard.call("shutdown", server.node.close_all, "server shutting down")
            server.guard.call("shutdown state", keeper.store.remove)
        else:
            server.guard.call("shutdown", server.node.close_all, "server shutting down")
        server.guard.call("shutdown dispatch", server.dispatch)
        if server.captures is not None:
            server.guard.call("shutdown captures", server.captures.close_all)
        for listener in listeners:
            listener.close()
        stop_control(control, config.control)
        await asyncio.sleep(0.05)  # let close_notify and CLOSE envelopes leave
        if queue is not None:
            loop.remove_reader(queue.fileno())
            queue.close()
        if copies is not None:
            loop.remove_reader(copies)
            os.close(copies)
        errors: list[str] = []
        if not took_over:
            errors.append("it stopped before it took the saved state over: the state and the "
                          "rules stay for the next server")
        elif kept:
            # The NAT ports' rules stay (nobody reads the queue: the kernel drops, and the
            # remote ends retransmit to the next server), the ICMP ones go.
            try:
                rules.apply(firewall.server_rules(config.instance, config.queue,
                                                  config.nat_ports, icmp=False))
            except PvpnError as exc:
                errors.append(str(exc))
        else:
            errors = rules.remove_instance(config.instance)
        server.raw.close()
        server.log.write(Record(NODE_STOPPED, reason="; ".join(errors) or "clean", extra={
            "state": "saved: the sessions are kept for the next server" if kept else
                     "none kept: the sessions ended"}))


def remove_sessions(config: ServerConfig, out: Callable[[str], None]) -> int:
    """`pvpn-server --config FILE --remove-sessions`: with pvpn-server stopped (for good, say),
    forget the sessions it kept for the next server (naming each) and the rules it left for
    their connections."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(config.control))
    except OSError:
        pass
    else:
        out(f"pvpn-server is running (it answers on {config.control}); stop it first")
        return 1
    finally:
        probe.close()
    errors: list[str] = []
    if config.state_file is not None:
        store = StateFile(config.state_file)
        try:
            found = store.read()
            saved = None if found is None else decode_state(found[0])
        except StateError as exc:
            out(f"{config.state_file}: {exc}; removing it all the same")
            saved = None
        for session in saved.sessions if saved is not None else ():
            out(f"forgetting session {session.id.hex()} of {session.user} "
                f"({len(session.flows)} NAT mappings)")
        try:
            if store.remove():
                out(f"removed {config.state_file}")
        except OSError as exc:
            errors.append(f"{config.state_file}: {exc.strerror or exc}")
    errors += rules.remove_instance(config.instance)
    for error in errors:
        out(f"error: {error}")
    out(f"the rules of instance {config.instance} are gone; the next pvpn-server starts "
        "without sessions")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pvpn-server", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the node's TOML config")
    parser.add_argument("--remove-sessions", action="store_true",
                        help="with pvpn-server stopped: forget the sessions it kept for the "
                        "next server ([server] state_file) and the rules it left for them")
    args = parser.parse_args(argv)
    if args.remove_sessions:
        try:
            return remove_sessions(load_server_config(args.config), print)
        except ConfigError as exc:
            print(f"pvpn-server: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
        except PvpnError as exc:
            print(f"pvpn-server: {exc}", file=sys.stderr)
            return 1

    async def run() -> None:
        await serve(load_server_config(args.config))

    return run_daemon("pvpn-server", run)


if __name__ == "__main__":
    raise SystemExit(main())
