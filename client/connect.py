"""`pvpn connect`: the user's own tunnel process.

Runs as the user, holds the user's private key and TLS session, and relays packets between
pvpn-client (over the local unix socket, where the kernel vouches for our uid, and for the
daemon's: it must be root) and the server. While it reconnects to either, pvpn-client keeps
dropping the protected packets: nothing leaks in clear. A pvpn-client that stops or restarts
is a lost one: we hold, register again and re-attach, and never exit as if the VPN had ended.

What the process decides is pvpn.user.UserTunnel, sans-IO; this is its asyncio adapter: the
unix socket and the TCP connection, the retries' timing, the capture file and the terminal.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pvpn import auth, tls
from pvpn.client.peer import untrusted_peer
from pvpn.config import DEFAULT_DEAD_AFTER, DEFAULT_KEEPALIVE, DEFAULT_MAX_BYTES
from pvpn.envelope import DEFAULT_HOPS
from pvpn.errors import ConfigError, PvpnError
from pvpn.events import ChainUp
from pvpn.io.loop import WRITE_HIGH_WATER, run_loop, set_nodelay, stream_transport
from pvpn.io.pcap import PcapWriter
from pvpn.io.reasons import connect_failure
from pvpn.text import printable
from pvpn.user import (
    Capture, CloseChain, CloseLocalLink, Finish, Reconnect, Reregister, Say, UserChain, UserLink,
    UserTunnel,
)

CONNECT_TIMEOUT = 10.0
MAX_BACKOFF = 10.0
#: How long we keep trying to register again with a pvpn-client that went away (stopped,
#: restarting, killed); the protection stays in the kernel meanwhile, and after it.
RELOCAL_FOR = 3600.0


@dataclass(slots=True)
class ConnectOptions:
    host: str
    port: int
    prefixes: list[str]
    key_path: Path
    remote_user: str
    socket_path: Path
    ca_file: str | None = None
    pinned_cert: str | None = None
    server_name: str | None = None
    keepalive: float = DEFAULT_KEEPALIVE
    dead_after: float = DEFAULT_DEAD_AFTER
    client_name: str = field(default_factory=socket.gethostname)
    via: list[tuple[str, int]] = field(default_factory=list)  # gateways, in order
    pcap: Path | None = None  # write the session's inner packets here (both directions)
    pcap_max_bytes: int = DEFAULT_MAX_BYTES


class ConnectError(PvpnError):
    """The VPN could not be brought up; the message says what to do."""


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _terminal(text: str) -> str:
    """A line for the user's terminal: what nodes and gateways said (a refusal's reason, a
    node name) is theirs to choose, so every non-printable character is escaped; our own
    line breaks stay."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _say(text: str) -> None:
    print(f"pvpn: {_terminal(text)}", file=sys.stderr, flush=True)


def _tell(text: str) -> None:
    print(f"pvpn: {_terminal(text)}", flush=True)


class _Stream(asyncio.Protocol):
    """Forwards asyncio callbacks to plain functions (one per connection)."""

    def __init__(self, on_data: Callable[[bytes], None],
                 on_lost: Callable[[Exception | None], None]) -> None:
        self.on_data, self.on_lost = on_data, on_lost
        self.transport: asyncio.Transport | None = None
        self.congested = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = stream_transport(transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def pause_writing(self) -> None:
        self.congested = True
        self.on_congestion(True)

    def resume_writing(self) -> None:
        self.congested = False
        self.on_congestion(False)

    def on_congestion(self, congested: bool) -> None:
        """Overridden per connection where a link state must follow."""

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(exc)


class Connector:
    """Brings one personal VPN up and keeps it up until the user ends it: the asyncio adapter
    of one UserTunnel (pvpn.user), which decides; this owns the two sockets, the retries'
    timing, the capture file and the user's terminal."""

    def __init__(self, options: ConnectOptions, on_up: Callable[[str], None]) -> None:
        self.opt = options
        self.on_up = on_up
        self.key = auth.load_private_key(options.key_path)
        self.context = tls.make_client_context(ca_file=options.ca_file,
                                               pinned_certificate=options.pinned_cert)
        self.loop = asyncio.get_running_loop()
        self.uid = os.getuid()
        # the chain: gateways (--via) then the server
        self.hops = [*options.via, (options.host, options.port)]
        self.tunnel = UserTunnel(self.uid, os.urandom(16), {
            "prefixes": options.prefixes, "server": f"{options.host}:{options.port}",
            "via": [_endpoint_text(*hop) for hop in self.hops[:-1]]},
            capturing=options.pcap is not None)
        # Set whenever the tunnel has taken an input: what a wait below waits for may be so.
        self.moved = asyncio.Event()
        self.status = 1
        self.local: _Stream | None = None
        self.remote: _Stream | None = None  # TCP to the first hop
        # Created here, by the user, mode 0600; every batch is flushed (a crash leaves a
        # readable file).
        self.pcap = None if options.pcap is None else PcapWriter(
            options.pcap, options.pcap_max_bytes, on_stop=_say)

    # ------------------------------------------------------------ what the tunnel asks for
    def _carry(self) -> None:
        """Write what the tunnel has for each socket and carry out its commands, in order."""
        tunnel = self.tunnel
        self._flush_local()
        commands, tunnel.commands = tunnel.commands, []
        for cmd in commands:
            if type(cmd) is Capture:
                if self.pcap is not None:
                    self.pcap.write_packets(cmd.packets, time.time())
            elif type(cmd) is Say:
                _say(cmd.text)
            elif type(cmd) is CloseChain:
                self._flush_remote()  # the CLOSE of an orderly end goes first
                if self.remote is not None and self.remote.transport is not None:
                    self.remote.transport.close()
            elif type(cmd) is CloseLocalLink:
                self._flush_local()  # an UNREGISTER goes first
                if self.local is not None and self.local.transport is not None:
                    self.local.transport.close()
            elif type(cmd) is Reconnect:
                self.loop.create_task(self._reconnect())
            elif type(cmd) is Reregister:
                self.loop.create_task(self._relocal())
            elif type(cmd) is Finish:
                self.status = cmd.status
            else:
                raise TypeError(f"pvpn connect cannot carry out {type(cmd).__name__}")
        self._flush_local()
        self.moved.set()

    async def _until(self, done: Callable[[], bool], timeout: float | None) -> None:
        """Return once ``done()`` (asyncio.TimeoutError after ``timeout`` seconds)."""
        async def moved() -> None:
            while not done():
                self.moved.clear()
                await self.moved.wait()
        await asyncio.wait_for(moved(), timeout)

    # ------------------------------------------------------------ local socket to pvpn-client
    async def open_local(self) -> dict[str, Any]:
        tunnel = self.tunnel
        tunnel.local_opening()

        def stream() -> _Stream:
            made = _Stream(self._local_data, lambda exc: self._local_lost(made))
            made.on_congestion = (  # type: ignore[method-assign]
                lambda congested: self._local_congestion(made, congested))
            return made

        try:
            transport, proto = await self.loop.create_unix_connection(
                stream, str(self.opt.socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ConnectError(
                f"pvpn-client is not running on this host (nothing listens on "
                f"{self.opt.socket_path}); ask root to start it (supervisorctl start pvpn-client)"
            ) from None
        except PermissionError:
            raise ConnectError(f"no permission to use {self.opt.socket_path}") from None
        distrust = untrusted_peer(transport.get_extra_info("socket"), self.opt.socket_path)
        if distrust is not None:
            tunnel.refused = distrust
            transport.abort()
            raise ConnectError(distrust)
        self.local = proto
        tunnel.local_opened()
        self._carry()
        await self._until(lambda: not tunnel.registering, CONNECT_TIMEOUT)
        if tunnel.registered is None:
            raise ConnectError(tunnel.refused)
        tunnel.attach()  # re-registering a running VPN: it is up again at once
        self._carry()
        return tunnel.registered

    def _flush_local(self) -> None:
        data = self.tunnel.local_to_send()
        if data and self.local is not None and self.local.transport is not None:
            self.local.transport.write(data)

    def _local_data(self, data: bytes) -> None:
        forwarded = self.tunnel.receive_local(data)
        self._carry()
        if forwarded:
            self._flush_remote()

    def _local_congestion(self, stream: _Stream, congested: bool) -> None:
        if stream is self.local:
            self.tunnel.local_congested = congested

    def _local_lost(self, stream: _Stream) -> None:
        if stream is not self.local:
            return  # a connection we dropped before using it (an untrusted peer)
        self.local = None
        self.tunnel.local_lost()
        self._carry()

    async def _relocal(self) -> None:
        delay = 0.5
        start = self.loop.time()
        said = ""
        for _ in range(int(RELOCAL_FOR / 0.5)):  # bounded by time below, long before this
            if self.tunnel.ending:
                return
            if self.loop.time() - start > RELOCAL_FOR:
                break
            try:
                await self.open_local()
                _say("re-registered with pvpn-client")
                return
            except (ConnectError, asyncio.TimeoutError, OSError) as exc:
                text = str(exc) or "timed out"
                if text != said:  # each new reason once, not every retry
                    _say(f"pvpn-client not back yet: {text}")
                    said = text
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
        self.end(1, f"pvpn-client did not come back within {RELOCAL_FOR:.0f} s; your protected "
                 "traffic stays blocked until `pvpn connect` or `pvpn disconnect`",
                 unregister=False)

    # ------------------------------------------------------------ the chain to the server
    def _new_link(self, index: int, nodes_before: list[str]) -> UserLink:
        """The user's link with hop ``index``: its TLS session checks that hop's certificate
        and name; it rides on TCP (hop 0) or inside the previous hop's DATA envelopes."""
        opt, tunnel = self.opt, self.tunnel
        host, _ = self.hops[index]
        last = index == len(self.hops) - 1
        server_name = (opt.server_name or host) if last else host
        session = tls.TlsSession(self.context, server_side=False, server_name=server_name)
        session.start()
        return UserLink(
            session, user=opt.remote_user, uid=self.uid,
            signer=lambda nonce, binding, node: auth.sign_challenge(
                self.key, nonce, binding, opt.remote_user, node),
            want=opt.prefixes if last else [], client_name=opt.client_name,
            session=tunnel.session, token=tunnel.token if last and tunnel.token else None,
            next_hop=None if last else _endpoint_text(*self.hops[index + 1]),
            path=nodes_before, hops=DEFAULT_HOPS - index,
            keepalive=opt.keepalive, dead_after=opt.dead_after,
        )

    async def open_remote(self) -> ChainUp:
        """Build the chain hop by hop; returns once the server has accepted us."""
        host, port = self.hops[0]
        tunnel = self.tunnel
        chain = UserChain(self._new_link, len(self.hops),
                          [_endpoint_text(*hop) for hop in self.hops])
        tunnel.new_chain(chain)
        try:
            _, proto = await asyncio.wait_for(self.loop.create_connection(
                lambda: _Stream(self._remote_data, self._remote_lost), host, port),
                CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            first = "the first hop " if len(self.hops) > 1 else ""
            raise ConnectionError(f"cannot reach {first}{_endpoint_text(host, port)}: "
                                  f"{connect_failure(exc, CONNECT_TIMEOUT)}") from None
        assert proto.transport is not None
        set_nodelay(proto.transport)
        proto.on_congestion = self._congestion  # type: ignore[method-assign]
        self.remote = proto
        chain.start(self.loop.time())
        self._flush_remote()
        waited = CONNECT_TIMEOUT * (1 + len(self.hops))
        try:
            await self._until(lambda: not tunnel.chain_pending, waited)
        except asyncio.TimeoutError:
            proto.transport.close()  # a half-built chain is not kept
            raise ConnectionError(chain.silent_hop(waited)) from None
        except BaseException:
            proto.transport.close()
            raise
        up, failure = tunnel.chain_up, tunnel.chain_failure
        if up is None:
            assert failure is not None
            proto.transport.close()
            reason = f"{failure.where}: {failure.reason}"
            raise ConnectError(reason) if failure.fatal else ConnectionError(reason)
        tunnel.accepted(up)
        return up

    def _congestion(self, congested: bool) -> None:
        chain = self.tunnel.chain
        if chain is not None and chain.links:
            chain.links[-1].congested = congested

    def _flush_remote(self) -> None:
        remote = self.remote
        if remote is None or remote.transport is None:
            return
        data = self.tunnel.remote_to_send(self.loop.time())
        if data:
            remote.transport.write(data)

    def _remote_data(self, data: bytes) -> None:
        self.tunnel.receive_remote(data, self.loop.time())
        self._carry()
        self._flush_remote()

    def _remote_lost(self, exc: Exception | None) -> None:
        self.remote = None
        self.tunnel.remote_lost(
            f"connection lost: {exc}" if exc else "the first hop closed the connection")
        self._carry()

    async def _reconnect(self) -> None:
        delay = 0.5
        while not self.tunnel.ending:
            await asyncio.sleep(delay)
            try:
                event = await self.open_remote()
            except ConnectError as exc:
                self.end(1, str(exc))
                return
            except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                _say(f"reconnect failed: {connect_failure(exc)}; retrying")
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            state = "resumed" if event.accept.resumed else "re-established as a new session"
            _say(f"session {self.tunnel.session.hex()} {state}")
            self.tunnel.renewed(event)
            self._carry()
            return

    # ------------------------------------------------------------ lifecycle
    async def tick(self) -> None:
        while not self.tunnel.finished:
            await asyncio.sleep(1.0)
            self.tunnel.handle_timer(self.loop.time())
            self._carry()
            self._flush_remote()

    def end(self, status: int, reason: str, unregister: bool = True) -> None:
        """End the VPN: CLOSE to the server, UNREGISTER to pvpn-client (protection removed)."""
        self.tunnel.end(status, reason, unregister)
        self._carry()

    async def wait_unregistered(self) -> None:
        """Return once pvpn-client has removed the rules (bounded: it may be gone)."""
        try:
            await self._until(lambda: self.tunnel.unregistered, CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            _say("pvpn-client did not confirm the end of the session; check `pvpn status`")

    async def run(self) -> int:
        opt = self.opt
        reply = await self.open_local()
        try:
            event = await self.open_remote()
        except (ConnectError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
            self.end(1, f"could not connect: {exc}")
            await self.wait_unregistered()
            raise ConnectError(str(exc) or "timed out waiting for the server") from None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self.end, 0, "ended by the user")
        self.tunnel.attach()
        self._carry()
        self.on_up(
            f"session {self.tunnel.session.hex()} is up for {opt.remote_user} (uid "
            f"{reply['uid']}): {', '.join(event.accept.allow)} via {' > '.join(event.nodes)} "
            f"({_endpoint_text(opt.host, opt.port)})")
        ticker = self.loop.create_task(self.tick())
        await self._until(lambda: self.tunnel.finished, None)
        ticker.cancel()
        if self.pcap is not None:
            self.pcap.close()
        await self.wait_unregistered()
        return self.status


def run_connect(options: ConnectOptions, background: bool, log_path: Path | None) -> int:
    """Run in the foreground, or fork and return once the VPN is up (or failed)."""
    if not background:
        async def foreground() -> int:
            connector = Connector(options, _tell)
            return await connector.run()
        try:
            return run_loop(foreground())
        except (ConnectError, ConfigError) as exc:
            _say(f"error: {exc}")
            return 1

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            message = pipe.read()
        if message.startswith("up "):
            _tell(f"{message[3:].strip()} (pid {pid})")
            return 0
        _say(f"error: {message.strip() or 'the tunnel process exited'}")
        return 1
    # Child: detach from the terminal, report once through the pipe.
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    target = devnull
    if log_path is not None:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            target = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            target = devnull
    os.dup2(target, 1)
    os.dup2(target, 2)
    pipe_out = os.fdopen(write_fd, "w")

    def report(text: str) -> None:
        if not pipe_out.closed:
            pipe_out.write(text)
            pipe_out.close()

    def on_up(line: str) -> None:
        _tell(line)
        report(f"up {line}")

    async def detached() -> int:
        return await Connector(options, on_up).run()

    status = 1
    try:
        status = run_loop(detached())
    except (ConnectError, ConfigError) as exc:
        report(str(exc))
    finally:
        report("")
    os._exit(status)
