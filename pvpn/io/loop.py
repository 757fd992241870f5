"""Small asyncio helpers shared by the daemons: signals, TCP options, peer credentials, the
command line, the guard that keeps a daemon serving whatever an exception says, and the one
dispatcher that carries out what a core asks for."""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import socket
import stat
import struct
import sys
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable, Concatenate, Coroutine, ParamSpec, Protocol, TypeVar, cast

import uvloop

from pvpn.commands import Command
from pvpn.errors import ConfigError, PvpnError
from pvpn.names import NODE_ERROR
from pvpn.records import Record
from pvpn.text import clip

#: Above this much unsent data on a tunnel or local socket, packets are dropped before they
#: are encrypted or framed (a router's full queue), so memory and latency stay bounded.
WRITE_HIGH_WATER = 1 << 20

#: Listening sockets' accept queue (asyncio's default is 100): a burst of connections reaches
#: the nodes' pre-authentication policy, which decides whom to keep, instead of the kernel
#: dropping SYNs, a legitimate user's among them, for a second or more (net.core.somaxconn
#: caps it).
LISTEN_BACKLOG = 1024

EX_CONFIG = 78  # sysexits.h: supervisord shows a daemon that exits with it at once as FATAL


_T = TypeVar("_T")


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` to its end on uvloop, as every pvpn process does (the daemons and `pvpn
    connect`): each packet wakes a process, and a wake-up of asyncio's own loop costs about
    four of uvloop's here (40 us against 10 us for a 1-byte ping-pong between two processes:
    `pvpn bench --sections wakeup`)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def stream_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """A connection's transport, typed as the stream transport it is: uvloop's transports
    have asyncio.Transport's methods without subclassing it, so no isinstance check holds."""
    return cast(asyncio.Transport, transport)


def peer_text(transport: asyncio.BaseTransport) -> str:
    """``host:port`` of a TCP peer, IPv6 in brackets."""
    peer = transport.get_extra_info("peername")
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on every tunnel socket: without it TCP-in-TCP stalls on Nagle + delayed ACK."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, from the kernel."""
    sock = transport.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


#: The loops that got a SIGHUP while their daemon started (installed without ``reload``).
_HELD_RELOADS: "weakref.WeakSet[asyncio.AbstractEventLoop]" = weakref.WeakSet()


def install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event,
                    reload: Callable[[], object] | None = None) -> None:
    """SIGTERM and SIGINT set ``stop``; SIGHUP calls ``reload``. Without ``reload`` (the
    daemon still starts) a SIGHUP is held, not left to its default action, which ended the
    daemon there and left its rules (an administrator's reload right after a restart); the
    held one runs once ``reload`` is installed."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is None:
        loop.add_signal_handler(signal.SIGHUP, _HELD_RELOADS.add, loop)
        return
    loop.add_signal_handler(signal.SIGHUP, reload)
    if loop in _HELD_RELOADS:
        _HELD_RELOADS.discard(loop)
        loop.call_soon(reload)


async def tick_until(stop: asyncio.Event, period: float, tick: Callable[[], object]) -> None:
    """``tick()`` every ``period`` seconds, and once more when ``stop`` is set."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=period)
        except asyncio.TimeoutError:
            pass
        tick()


RemoveSessions = Callable[[Any, Callable[[str], None]], int]


def daemon_main(program: str, doc: str | None, load: Callable[[Path], Any],
                serve: Callable[[Any], Coroutine[Any, Any, None]],
                argv: list[str] | None, remove_sessions: RemoveSessions | None = None,
                remove_help: str = "",
                formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter) -> int:
    """The command line of a daemon: ``PROGRAM --config FILE``, and with ``remove_sessions``
    ``PROGRAM --config FILE --remove-sessions`` too (offline, its lines printed)."""
    parser = argparse.ArgumentParser(prog=program, description=doc,
                                     formatter_class=formatter_class)
    parser.add_argument("--config", required=True, type=Path, help="the node's TOML config")
    if remove_sessions is not None:
        parser.add_argument("--remove-sessions", action="store_true", help=remove_help)
    args = parser.parse_args(argv)
    if remove_sessions is not None and args.remove_sessions:
        return exit_status(program, lambda: remove_sessions(load(args.config), print))

    async def serve_config() -> None:
        await serve(load(args.config))

    def run() -> int:
        run_loop(serve_config())
        return 0

    try:
        return exit_status(program, run)
    except KeyboardInterrupt:
        return 0


def exit_status(program: str, run: Callable[[], int]) -> int:
    """``run()``'s exit status; one top-level error handler: a config error exits with
    EX_CONFIG, any other PvpnError with 1, each said on stderr."""
    try:
        return run()
    except ConfigError as exc:
        print(f"{program}: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except PvpnError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 1


def prepare_unix_socket(path: Path, not_a_socket: str, in_use: str) -> None:
    """Make way for a listening unix socket at ``path``: a socket left by a node that died is
    removed; ConfigError(``not_a_socket``) if something else is there (a symlink is not
    followed), ConfigError(``in_use``) if a live node answers on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(not_a_socket)
    if answers(path):
        raise ConfigError(in_use)
    path.unlink()  # left by a node that died


def answers(path: Path) -> bool:
    """Whether a live process answers on the unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


# ---------------------------------------------------------------- no exception ends a daemon

_P = ParamSpec("_P")


class Guard:
    """The one place where an exception nobody planned for ends up, in every node daemon.

    The sans-IO core turns everything a peer can send into a typed remote error that closes
    that peer's link; what is left is a bug, and a bug a peer can trigger must cost that peer's
    link, not the daemon (with every session and NAT mapping in it). The daemons call in here
    from each entry point: every dispatched command, the timer, the queue drain, every asyncio
    callback of a link (:func:`guarded`), and the loop's exception handler for the rest
    (:meth:`install`). The guard writes a ``node:error`` record with the traceback (the first
    ten per place, then at powers of two), closes only the link concerned (``close_link``), and
    the daemon goes on serving."""

    MAX_TRACEBACK = 8000  # characters of the traceback's end kept in the record

    def __init__(self, write: Callable[[Record], None],
                 close_link: Callable[[int, str], None] | None = None) -> None:
        self._write = write
        self.close_link = close_link
        self.errors: dict[str, int] = {}  # place -> exceptions caught there

    def failed(self, where: str, exc: BaseException, link: int | None = None) -> None:
        """``exc`` escaped from ``where`` (about ``link``, if one): log it, close that link."""
        count = self.errors.get(where, 0) + 1
        if len(self.errors) < 1024 or where in self.errors:
            self.errors[where] = count
        if count <= 10 or count & (count - 1) == 0:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            extra: dict[str, Any] = {"where": where, "count": count,
                                     "traceback": tb[-self.MAX_TRACEBACK:]}
            if link is not None:
                extra["link"] = link
            self._record(Record(NODE_ERROR, reason=clip(f"{type(exc).__name__}: {exc}"),
                                extra=extra))
        if link is not None and self.close_link is not None:
            try:
                self.close_link(link, f"internal error in {where}: {type(exc).__name__}")
            except Exception as again:  # noqa: BLE001 - the guard's own last resort
                self.failed(f"{where} (closing the link)", again)

    def call(self, where: str, function: Callable[_P, object], *args: _P.args,
             **kwargs: _P.kwargs) -> bool:
        """``function(*args)``; False if it raised (the guard has it)."""
        try:
            function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - this is the guard
            self.failed(where, exc)
            return False
        return True

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route what asyncio catches itself (a task's exception, a callback's, a transport's
        protocol error) here too, as records instead of text on stderr."""
        loop.set_exception_handler(self._asyncio_failed)

    def _asyncio_failed(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "asyncio error")
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            self.failed(f"asyncio: {clip(message, 80)}", exc)
        else:
            self._record(Record(NODE_ERROR, reason=clip(message), extra={"where": "asyncio"}))

    def _record(self, record: Record) -> None:
        try:
            self._write(record)
        except Exception as exc:  # noqa: BLE001 - the log itself is broken: say so on stderr
            try:
                print(f"pvpn: cannot write a log record ({type(exc).__name__}: {exc}); "
                      f"{record.event}: {record.reason}", file=sys.stderr)
            except OSError:
                pass  # stderr is gone too: nothing is left to tell


class CommandSource(Protocol):
    """A sans-IO core whose inputs leave commands for its program (a node, the client host)."""

    commands: list[Command]


_C = TypeVar("_C", bound=Command)


class Dispatcher:
    """A program's one dispatcher: it carries out what its core asks for, each command by the
    handler of its type (:meth:`on`), in order. Carrying one out may beget more (a failed
    write closes a link): they are carried out too, in bounded rounds. What a handler raises
    goes to the guard as a ``node:error`` record with its traceback, costing that command's
    link (if it has one), and the rest of the batch goes on."""

    ROUNDS = 64

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._handlers: dict[type[Command], Callable[[Any], object]] = {}

    def on(self, kind: type[_C], handler: Callable[[_C], object]) -> None:
        self._handlers[kind] = handler

    def run(self, source: CommandSource) -> None:
        for _ in range(self.ROUNDS):
            if not source.commands:
                return
            commands, source.commands = source.commands, []
            for cmd in commands:
                try:
                    handler = self._handlers.get(type(cmd))
                    if handler is None:
                        raise TypeError(f"nothing carries out {type(cmd).__name__}")
                    handler(cmd)
                except Exception as exc:  # noqa: BLE001 - one command's failure, the guard's
                    self.guard.failed(f"dispatch {type(cmd).__name__}", exc,
                                      getattr(cmd, "link", None))


class GuardedCallbacks(Protocol):
    """An asyncio protocol of one link whose callbacks :func:`guarded` covers."""

    guard: Guard

    @property
    def guard_link(self) -> int | None: ...


_G = TypeVar("_G", bound=GuardedCallbacks)


def guarded(where: str) -> Callable[[Callable[Concatenate[_G, _P], None]],
                                    Callable[Concatenate[_G, _P], None]]:
    """A link protocol's callback: what escapes it goes to the guard, closing that link."""
    def wrap(method: Callable[Concatenate[_G, _P], None]) -> Callable[Concatenate[_G, _P], None]:
        def run(self: _G, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
            try:
                method(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - this is the guard
                self.guard.failed(where, exc, self.guard_link)
        functools.update_wrapper(run, method)
        return run
    return wrap
