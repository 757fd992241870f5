"""Small asyncio helpers shared by the daemons: signals, TCP options, peer credentials."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Coroutine

from pvpn.errors import ConfigError, PvpnError

#: Above this much unsent data on a tunnel or local socket, packets are dropped before they
#: are encrypted or framed (a router's full queue), so memory and latency stay bounded.
WRITE_HIGH_WATER = 1 << 20

EX_CONFIG = 78  # sysexits.h: supervisord shows a daemon that exits with it at once as FATAL


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


def install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event,
                    reload: Callable[[], None] | None = None) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)


def daemon_main(program: str, doc: str | None, load: Callable[[Path], Any],
                serve: Callable[[Any], Coroutine[Any, Any, None]],
                argv: list[str] | None) -> int:
    """The command line of a node daemon: ``PROGRAM --config FILE``."""
    parser = argparse.ArgumentParser(prog=program, description=doc)
    parser.add_argument("--config", required=True, type=Path, help="the node's TOML config")
    args = parser.parse_args(argv)

    async def run() -> None:
        await serve(load(args.config))

    return run_daemon(program, run)


def run_daemon(program: str, main: Callable[[], "asyncio.Future[None] | object"]) -> int:
    """One top-level error handler for a daemon: config errors exit with EX_CONFIG."""
    try:
        asyncio.run(main())  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"{program}: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except PvpnError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


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
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by a node that died
    else:
        raise ConfigError(in_use)
    finally:
        probe.close()
