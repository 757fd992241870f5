"""Why a socket call failed, in words a user can act on: ``str()`` of a timeout is empty,
and a bare strerror says nothing of what to check."""

from __future__ import annotations

import errno
import os
import socket


def connect_failure(exc: BaseException, timeout: float | None = None) -> str:
    """Why a TCP connect failed, in words a user can act on (``str()`` of a timeout is
    empty, and a bare strerror says nothing of what to check)."""
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError too (3.11)
        within = f" within {timeout:g} s" if timeout is not None else ""
        return (f"no answer{within} (timed out: the host is down, or a firewall drops the "
                "packets)")
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the name ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return ("connection refused (the host is up but nothing listens on that port: is its "
                "pvpn node running?)")
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return _UNREACHABLE[exc.errno]
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    return str(exc) or type(exc).__name__


_UNREACHABLE = {
    errno.EHOSTUNREACH: "no route to host (the host or a router on the way answers that it "
                        "cannot be reached)",
    errno.ENETUNREACH: "network unreachable (this host has no route to that network)",
    errno.EHOSTDOWN: "host is down",
}
