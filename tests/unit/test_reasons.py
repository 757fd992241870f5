"""What a user reads when a connection to a hop fails (issue 10: the reason was empty)."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from pvpn.io.reasons import connect_failure


def refused_by_the_kernel() -> OSError:
    # A port nobody listens on: bind one, keep it unlistened, connect to it.
    with socket.socket() as closed, socket.socket() as s:
        closed.bind(("127.0.0.1", 0))
        try:
            s.connect(closed.getsockname())
        except OSError as exc:
            return exc
    raise AssertionError("connect to an unlistened port succeeded")


def test_every_failure_has_a_reason_that_says_what_to_check() -> None:
    assert connect_failure(asyncio.TimeoutError(), 10) == (
        "no answer within 10 s (timed out: the host is down, or a firewall drops the packets)")
    assert "no answer (timed out" in connect_failure(TimeoutError())
    assert connect_failure(refused_by_the_kernel()).startswith(
        "connection refused (the host is up but nothing listens on that port")
    assert connect_failure(OSError(errno.EHOSTUNREACH, "No route to host")).startswith(
        "no route to host")
    assert connect_failure(OSError(errno.ENETUNREACH, "x")).startswith("network unreachable")
    assert connect_failure(OSError(errno.EACCES, "Permission denied")) == (
        "Permission denied (EACCES)")
    assert connect_failure(OSError("Multiple exceptions: a, b")) == "Multiple exceptions: a, b"


def test_a_name_that_does_not_resolve_says_so() -> None:
    # As getaddrinfo raises it (no lookup here: tests ask no resolver outside this machine).
    failed = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert connect_failure(failed) == "cannot resolve the name (Name or service not known)"


@pytest.mark.parametrize("exc", [TimeoutError(), asyncio.TimeoutError(), OSError(),
                                 ConnectionError(), OSError(errno.ECONNRESET, "")])
def test_no_reason_is_ever_empty(exc: BaseException) -> None:
    assert connect_failure(exc).strip()
