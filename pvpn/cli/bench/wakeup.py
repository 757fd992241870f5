"""What one wake-up of a pvpn process costs, by event loop: a 1-byte ping-pong between two
processes over a unix socketpair, each end an asyncio Protocol on the loop measured (what
pvpn's adapters are), and the same ping-pong with blocking ``recv``/``send`` as the floor.

Every packet of the data path wakes each process it crosses, so this is the part of a round
trip that no change of the packet path's code removes; ``pvpn bench --sections wakeup``
reports it per loop.  Each loop is measured in a fresh interpreter
(``python -m pvpn.cli.bench.wakeup LOOP COUNT``), so one loop's import cannot change the
other's (uvloop installs itself as the policy of the process that imports it).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, cast

LOOPS = ("blocking", "asyncio", "uvloop")
TIMEOUT = 60.0


def _blocking(sock: socket.socket, first: bool, count: int) -> None:
    # The first end sends first and does not answer the last reply: both ends then send and
    # receive ``count`` times, and neither writes to an end that has finished.
    if first:
        sock.send(b"x")
    for turn in range(count):
        if not sock.recv(64):
            return
        if not (first and turn == count - 1):
            sock.send(b"x")


async def _protocol(sock: socket.socket, first: bool, count: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    seen = 0

    class PingPong(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses: no isinstance check
            self.transport = cast(asyncio.Transport, transport)
            if first:
                self.transport.write(b"x")

        def data_received(self, data: bytes) -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                if not done.done():
                    done.set_result(None)
                if first:
                    return
            self.transport.write(b"x")

        def connection_lost(self, exc: Exception | None) -> None:
            if not done.done():
                done.set_result(None)

    transport, _ = await loop.connect_accepted_socket(PingPong, sock)
    await asyncio.wait_for(done, TIMEOUT)
    transport.close()


def _side(kind: str, sock: socket.socket, first: bool, count: int) -> None:
    if kind == "blocking":
        _blocking(sock, first, count)
    elif kind == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_protocol(sock, first, count))
    else:
        asyncio.run(_protocol(sock, first, count))


def ping_pong(kind: str, count: int) -> float:
    """Seconds per round trip (two wake-ups, one in each process) on loop ``kind``."""
    if kind not in LOOPS:
        raise ValueError(f"unknown loop {kind!r}")
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit status is checked below
        ours.close()
        try:
            _side(kind, theirs, False, count)
        finally:
            os._exit(0)
    theirs.close()
    try:
        start = time.perf_counter()
        _side(kind, ours, True, count)
        elapsed = time.perf_counter() - start
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return elapsed / count


def measure(count: int) -> list[dict[str, Any]]:
    """One record per loop, each from its own interpreter: seconds per round trip, or why
    not."""
    records: list[dict[str, Any]] = []
    for kind in LOOPS:
        record: dict[str, Any] = {"loop": kind, "round_trips": count}
        try:
            done = subprocess.run([sys.executable, "-m", "pvpn.cli.bench.wakeup", kind,
                                   str(count)], capture_output=True, text=True,
                                  timeout=TIMEOUT)
            record.update(json.loads(done.stdout) if done.returncode == 0 else
                          {"error": (done.stderr.strip() or f"exit {done.returncode}")[-300:]})
        except (subprocess.TimeoutExpired, ValueError) as exc:
            record["error"] = str(exc)[:300]
        records.append(record)
    return records


if __name__ == "__main__":
    print(json.dumps({"round_trip": ping_pong(sys.argv[1], int(sys.argv[2]))}))
