"""`pvpn connect`: the user's own tunnel process.

Runs as the user and holds the user's private key; it is the session's agent, like
ssh-agent. pvpn-client (over the local unix socket, where the kernel vouches for our uid, and
for the daemon's: it must be root) holds the chain to the server and writes the protected
packets into it; we register with what it needs (the hops, the CA or pinned certificate we
chose, as the PEM we read), sign each node's challenge for our own user only, and tell the
user what the chain does. While the chain is rebuilt, pvpn-client keeps dropping the protected
packets: nothing leaks in clear. A pvpn-client that stops or restarts is a lost one: we hold,
register again (the new one resumes the chain with the server's token we kept), and never exit
as if the VPN had ended.

What the process decides is pvpn.user.UserAgent, sans-IO; this is its asyncio adapter: the
unix socket, the retries' timing, the capture file and the terminal.
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
from pvpn.errors import ConfigError, PvpnError
from pvpn.io.loop import WRITE_HIGH_WATER, run_loop, stream_transport
from pvpn.io.pcap import PcapWriter
from pvpn.text import printable
from pvpn.user import Capture, CloseLocalLink, Finish, Reregister, Say, SigningAgent, UserAgent

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
    of one UserAgent (pvpn.user), which decides. pvpn-client holds the chain (its TLS
    sessions and the TCP connection to the first hop); this process is the session's agent,
    like ssh-agent: it registers with what the chain needs (the trust anchors as the PEM it
    read itself), signs every challenge with the key only it holds, tells the user what the
    chain does, and writes the capture file."""

    def __init__(self, options: ConnectOptions, on_up: Callable[[str], None]) -> None:
        self.opt = options
        self.on_up = on_up
        self.key = auth.load_private_key(options.key_path)
        # Which CA or pin to trust is the user's to decide: checked here, and its PEM given to
        # pvpn-client, which never opens a path of ours.
        tls.make_client_context(ca_file=options.ca_file, pinned_certificate=options.pinned_cert)
        trust = options.ca_file if options.ca_file is not None else options.pinned_cert
        assert trust is not None
        try:
            pem = Path(trust).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {trust}: {exc.strerror}") from None
        if len(pem) > tls.MAX_PEM:
            raise ConfigError(f"{trust} is {len(pem)} bytes; pvpn-client takes trust anchors "
                              f"of at most {tls.MAX_PEM}")
        self.loop = asyncio.get_running_loop()
        self.uid = os.getuid()
        # the chain: gateways (--via) then the server
        self.hops = [*options.via, (options.host, options.port)]
        register: dict[str, Any] = {
            "prefixes": options.prefixes, "server": f"{options.host}:{options.port}",
            "via": [_endpoint_text(*hop) for hop in self.hops[:-1]],
            "hops": [[host, port] for host, port in self.hops],
            "ca_pem" if options.ca_file is not None else "pin_pem": pem,
            "trust_name": str(trust), "user": options.remote_user,
            "client": options.client_name, "keepalive": options.keepalive,
            "dead_after": options.dead_after, "capture": options.pcap is not None,
        }
        if options.server_name:
            register["server_name"] = options.server_name
        key = self.key
        self.tunnel = UserAgent(self.uid, os.urandom(16), register, SigningAgent(
            options.remote_user, lambda challenge, binding, user, node: auth.sign_challenge(
                key, challenge, binding, user, node)))
        # Set whenever the tunnel has taken an input: what a wait below waits for may be so.
        self.moved = asyncio.Event()
        self.status = 1
        self.local: _Stream | None = None
        # Created here, by the user, mode 0600; every batch is flushed (a crash leaves a
        # readable file).
        self.pcap = None if options.pcap is None else PcapWriter(
            options.pcap, options.pcap_max_bytes, on_stop=_say)

    # ------------------------------------------------------------ what the agent asks for
    def _carry(self) -> None:
        """Write what the agent has for pvpn-client and carry out its commands, in order."""
        tunnel = self.tunnel
        self._flush_local()
        commands, tunnel.commands = tunnel.commands, []
        for cmd in commands:
            if type(cmd) is Capture:
                if self.pcap is not None:
                    self.pcap.write_packets(cmd.packets, time.time())
            elif type(cmd) is Say:
                _say(cmd.text)
            elif type(cmd) is CloseLocalLink:
                self._flush_local()  # an UNREGISTER goes first
                if self.local is not None and self.local.transport is not None:
                    self.local.transport.close()
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
            return _Stream(self._local_data, lambda exc: self._local_lost(made))

        try:
            transport, made = await self.loop.create_unix_connection(
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
        self.local = made
        tunnel.local_opened()
        self._carry()
        await self._until(lambda: not tunnel.registering, CONNECT_TIMEOUT)
        if tunnel.registered is None:
            raise ConnectError(tunnel.refused)
        return tunnel.registered

    def _flush_local(self) -> None:
        data = self.tunnel.local_to_send()
        if data and self.local is not None and self.local.transport is not None:
            self.local.transport.write(data)

    def _local_data(self, data: bytes) -> None:
        self.tunnel.receive_local(data, self.loop.time())
        self._carry()

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

    # ------------------------------------------------------------ lifecycle
    def end(self, status: int, reason: str, unregister: bool = True) -> None:
        """End the VPN: UNREGISTER (pvpn-client sends CLOSE to the server and removes the
        protection)."""
        self.tunnel.end(status, reason, unregister)
        self._carry()

    async def wait_unregistered(self) -> None:
        """Return once pvpn-client has removed the rules (bounded: it may be gone)."""
        try:
            await self._until(lambda: self.tunnel.unregistered, CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            _say("pvpn-client did not confirm the end of the session; check `pvpn status`")

    async def run(self) -> int:
        opt, tunnel = self.opt, self.tunnel
        reply = await self.open_local()
        # pvpn-client builds the chain now; it says when it is up, or why not.
        waited = CONNECT_TIMEOUT * (3 + len(self.hops))
        try:
            await self._until(lambda: tunnel.up is not None or tunnel.failure is not None
                              or tunnel.finished, waited)
        except asyncio.TimeoutError:
            tunnel.failure = f"pvpn-client did not bring the chain up within {waited:g} s"
        if tunnel.up is None:
            reason = tunnel.failure or "pvpn-client ended the session"
            if not tunnel.finished:
                self.end(1, f"could not connect: {reason}")
            await self.wait_unregistered()
            raise ConnectError(reason)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self.end, 0, "ended by the user")
        up = tunnel.up
        self.on_up(
            f"session {tunnel.session.hex()} is up for {opt.remote_user} (uid "
            f"{reply['uid']}): {', '.join(str(a) for a in up.get('allow', []))} via "
            f"{' > '.join(str(n) for n in up.get('nodes', []))} "
            f"({_endpoint_text(opt.host, opt.port)})")
        await self._until(lambda: tunnel.finished, None)
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
