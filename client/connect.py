"""`pvpn connect`: the user's own tunnel process.

Runs as the user, holds the user's private key and TLS session, and relays packets between
pvpn-client (over the local unix socket, where the kernel vouches for our uid, and for the
daemon's: it must be root) and the server. While it reconnects to either, pvpn-client keeps
dropping the protected packets: nothing leaks in clear. A pvpn-client that stops or restarts
is a lost one: we hold, register again and re-attach, and never exit as if the VPN had ended.
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
from pvpn.envelope import DEFAULT_HOPS, MsgType, decode_control
from pvpn.errors import ConfigError, PvpnError, RemoteProtocolError
from pvpn.events import ChainEvent, ChainFailed, ChainUp, PacketsReceived
from pvpn.io.loop import WRITE_HIGH_WATER, set_nodelay
from pvpn.io.pcap import PcapWriter
from pvpn.io.reasons import connect_failure
from pvpn.local import LocalChannel
from pvpn.text import printable
from pvpn.user import UserChain, UserLink

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
        assert isinstance(transport, asyncio.Transport)
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
    """Brings one personal VPN up and keeps it up until the user ends it."""

    def __init__(self, options: ConnectOptions, on_up: Callable[[str], None]) -> None:
        self.opt = options
        self.on_up = on_up
        self.key = auth.load_private_key(options.key_path)
        self.context = tls.make_client_context(ca_file=options.ca_file,
                                               pinned_certificate=options.pinned_cert)
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[int] = self.loop.create_future()
        # local side
        self.local: _Stream | None = None
        self.local_channel = LocalChannel()
        self.registered: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        # Set when pvpn-client confirms the protection is removed (or the socket is gone).
        self.unregistered: asyncio.Future[None] = self.loop.create_future()
        self.uid = os.getuid()
        # the chain: gateways (--via) then the server
        self.hops = [*options.via, (options.host, options.port)]
        self.chain: UserChain | None = None
        self.remote: _Stream | None = None  # TCP to the first hop
        self.up: asyncio.Future[ChainUp] = self.loop.create_future()
        # Proposed by us, so every hop logs the same session id.
        self.session = os.urandom(16)
        self.token = b""
        self.ending = False
        self.attached = False  # ATTACH sent on the current local connection
        # Created here, by the user, mode 0600; every batch is flushed (a crash leaves a
        # readable file).
        self.pcap = None if options.pcap is None else PcapWriter(
            options.pcap, options.pcap_max_bytes, on_stop=_say)

    # ------------------------------------------------------------ local socket to pvpn-client
    async def open_local(self) -> dict[str, Any]:
        self.local_channel = LocalChannel()
        self.registered = self.loop.create_future()
        self.attached = False
        if self.unregistered.done():
            self.unregistered = self.loop.create_future()

        def stream() -> _Stream:
            made = _Stream(self._local_data, lambda exc: self._local_lost(exc, made))
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
            self.registered.cancel()
            transport.abort()
            raise ConnectError(distrust)
        self.local = proto
        self._local_send(MsgType.REGISTER, {
            "prefixes": self.opt.prefixes, "server": f"{self.opt.host}:{self.opt.port}",
            "via": [_endpoint_text(*hop) for hop in self.hops[:-1]]})
        reply = await asyncio.wait_for(self.registered, CONNECT_TIMEOUT)
        self._attach()  # re-registering a running VPN: it is up again at once
        return reply

    def _attach(self) -> None:
        """ATTACH (the session id) once both ends are up: registered with pvpn-client and the
        chain accepted, on every new registration and every rebuilt chain."""
        chain = self.chain
        if (not self.attached and self.registered.done() and not self.registered.cancelled()
                and self.registered.exception() is None and chain is not None and chain.up):
            self._local_send(MsgType.ATTACH, {"session": self.session, "nodes": chain.nodes})
            self.attached = True

    def _local_send(self, mtype: MsgType, fields: dict[str, Any]) -> None:
        if self.local is not None and self.local.transport is not None:
            self.local.transport.write(self.local_channel.control(mtype, self.session, self.uid,
                                                                  fields))

    def _local_data(self, data: bytes) -> None:
        packets: list[bytes] = []
        try:
            for envelope in self.local_channel.receive(data):
                if envelope.type is MsgType.PACKET:
                    packets.append(envelope.body)
                    continue
                fields = decode_control(envelope)
                if envelope.type is MsgType.REGISTERED and not self.registered.done():
                    self.registered.set_result(fields)
                elif envelope.type is MsgType.STATUS_REPLY and not self.unregistered.done():
                    self._unregister_answer(fields)
                    self.unregistered.set_result(None)
                elif envelope.type is MsgType.ERROR:
                    self._local_error(fields["code"], fields["reason"])
        except RemoteProtocolError as exc:
            _say(f"garbage from pvpn-client: {exc}")
            if self.local and self.local.transport:
                self.local.transport.close()
        chain = self.chain
        if packets and chain is not None and chain.up:
            if self.pcap is not None:
                self.pcap.write_packets(packets, time.time())
            chain.send_packets(packets)
            self._flush_remote()

    def _unregister_answer(self, fields: dict[str, Any]) -> None:
        """pvpn-client's answer to UNREGISTER describes the session as it leaves it: held if
        this process never had it up (an earlier one did, and its protection stays)."""
        sessions = fields.get("sessions") or []
        if sessions and isinstance(sessions[0], dict) and str(
                sessions[0].get("state", "")).startswith("held"):
            _say("your session stays held: its protected traffic is dropped until `pvpn "
                 "connect` brings it up again, or `pvpn disconnect` ends it")

    def _local_error(self, code: str, reason: str) -> None:
        if not self.registered.done():
            self.registered.set_exception(ConnectError(f"pvpn-client refused: {reason}"))
            return
        if code == "daemon-stopping":
            # Stopping is not ending: the session stays held in the kernel; register again
            # with the next pvpn-client (the lost connection does that).
            _say(f"{reason}; holding your protected traffic until pvpn-client is back")
            if self.local is not None and self.local.transport is not None:
                self.local.transport.close()
            return
        _say(f"{reason}")
        self.end(0 if code == "disconnected" else 1, reason, unregister=False)

    def _local_lost(self, exc: Exception | None, stream: _Stream) -> None:
        if stream is not self.local:
            return  # a connection we dropped before using it (an untrusted peer)
        self.local = None
        if not self.unregistered.done():
            self.unregistered.set_result(None)
        if self.ending or self.finished.done():
            return
        if not self.registered.done():
            self.registered.set_exception(ConnectError("pvpn-client closed the connection"))
            return
        _say("lost pvpn-client; your protected traffic is held (dropped) until it is back")
        self.loop.create_task(self._relocal())

    async def _relocal(self) -> None:
        delay = 0.5
        start = self.loop.time()
        said = ""
        for _ in range(int(RELOCAL_FOR / 0.5)):  # bounded by time below, long before this
            if self.ending:
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
        opt = self.opt
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
            session=self.session, token=self.token if last and self.token else None,
            next_hop=None if last else _endpoint_text(*self.hops[index + 1]),
            path=nodes_before, hops=DEFAULT_HOPS - index,
            keepalive=opt.keepalive, dead_after=opt.dead_after,
        )

    async def open_remote(self) -> ChainUp:
        """Build the chain hop by hop; returns once the server has accepted us."""
        host, port = self.hops[0]
        self.up = self.loop.create_future()
        self.chain = UserChain(self._new_link, len(self.hops),
                               [_endpoint_text(*hop) for hop in self.hops])
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
        self.chain.start(self.loop.time())
        self._flush_remote()
        waited = CONNECT_TIMEOUT * (1 + len(self.hops))
        try:
            up = await asyncio.wait_for(self.up, waited)
        except asyncio.TimeoutError:
            proto.transport.close()  # a half-built chain is not kept
            raise ConnectionError(self.chain.silent_hop(waited)) from None
        except BaseException:
            proto.transport.close()
            raise
        self.session, self.token = up.accept.session, up.accept.token
        return up

    def _congestion(self, congested: bool) -> None:
        if self.chain is not None and self.chain.links:
            self.chain.links[-1].congested = congested

    def _flush_remote(self) -> None:
        remote, chain = self.remote, self.chain
        if chain is None or remote is None or remote.transport is None:
            return
        data = chain.data_to_send(self.loop.time())
        if data:
            remote.transport.write(data)

    def _remote_data(self, data: bytes) -> None:
        if self.chain is not None:
            self._chain_events(self.chain.receive_data(data, self.loop.time()))
            self._flush_remote()

    def _chain_events(self, events: list[ChainEvent]) -> None:
        for event in events:
            if type(event) is PacketsReceived:
                if self.pcap is not None:
                    self.pcap.write_packets(event.packets, time.time())
                local = self.local
                if local is not None and local.transport is not None and not local.congested:
                    uid, session, packet = self.uid, self.session, self.local_channel.packet
                    local.transport.write(b"".join(packet(session, uid, p)
                                                   for p in event.packets))
            elif type(event) is ChainUp:
                if not self.up.done():
                    self.up.set_result(event)
            elif type(event) is ChainFailed:
                self._chain_failed(event)

    def _chain_failed(self, failure: ChainFailed) -> None:
        if self.remote is not None and self.remote.transport is not None:
            self.remote.transport.close()
        reason = f"{failure.where}: {failure.reason}"
        if not self.up.done():
            self.up.set_exception(ConnectError(reason) if failure.fatal else
                                  ConnectionError(reason))
        elif failure.fatal:
            self.end(1, reason)
        else:
            self._link_down(reason)

    def _remote_lost(self, exc: Exception | None) -> None:
        self.remote = None
        chain = self.chain
        if chain is None:
            return
        failure = chain.connection_lost(
            f"connection lost: {exc}" if exc else "the first hop closed the connection")
        if failure is not None:
            self._chain_failed(failure)

    def _link_down(self, reason: str) -> None:
        if self.ending or self.finished.done():
            return
        _say(f"tunnel down ({reason}); holding your protected traffic and reconnecting")
        self.loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.5
        while not self.ending:
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
            _say(f"session {self.session.hex()} {state}")
            if not event.accept.resumed:
                # ATTACH again: a new server session (the server lost ours in a restart, or it
                # expired), so pvpn-client makes the connections the old one carried fail at
                # once instead of waiting for data that will never come.
                self.attached = False
            self._attach()
            return

    # ------------------------------------------------------------ lifecycle
    async def tick(self) -> None:
        while not self.finished.done():
            await asyncio.sleep(1.0)
            chain = self.chain
            if chain is None or chain.failed is not None:
                continue  # down or being rebuilt
            self._chain_events(chain.handle_timer(self.loop.time()))
            self._flush_remote()

    def end(self, status: int, reason: str, unregister: bool = True) -> None:
        """End the VPN: CLOSE to the server, UNREGISTER to pvpn-client (protection removed)."""
        if self.finished.done():
            return
        self.ending = True
        if self.chain is not None and self.chain.up:
            self.chain.close(reason)  # CLOSE to the server, through the chain
            self._flush_remote()
        if self.remote is not None and self.remote.transport is not None:
            self.remote.transport.close()
        if unregister and self.local is not None:
            self._local_send(MsgType.UNREGISTER, {"reason": reason})
        elif self.local is not None and self.local.transport is not None:
            self.local.transport.close()
        else:
            if unregister and self.registered.done():
                _say("pvpn-client is not reachable now: your session stays held (its protected "
                     "traffic blocked) until `pvpn disconnect`")
            if not self.unregistered.done():
                self.unregistered.set_result(None)
        self.finished.set_result(status)

    async def wait_unregistered(self) -> None:
        """Return once pvpn-client has removed the rules (bounded: it may be gone)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.unregistered), CONNECT_TIMEOUT)
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
        self._attach()
        self.on_up(
            f"session {self.session.hex()} is up for {opt.remote_user} (uid {reply['uid']}): "
            f"{', '.join(event.accept.allow)} via {' > '.join(event.nodes)} "
            f"({_endpoint_text(opt.host, opt.port)})")
        ticker = self.loop.create_task(self.tick())
        status = await self.finished
        ticker.cancel()
        if self.pcap is not None:
            self.pcap.close()
        await self.wait_unregistered()
        return status


def run_connect(options: ConnectOptions, background: bool, log_path: Path | None) -> int:
    """Run in the foreground, or fork and return once the VPN is up (or failed)."""
    if not background:
        async def foreground() -> int:
            connector = Connector(options, _tell)
            return await connector.run()
        try:
            return asyncio.run(foreground())
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
        status = asyncio.run(detached())
    except (ConnectError, ConfigError) as exc:
        report(str(exc))
    finally:
        report("")
    os._exit(status)
