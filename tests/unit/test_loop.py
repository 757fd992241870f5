"""Every pvpn process runs on uvloop (pvpn.io.loop.run_loop), and the adapters take its
transports, which are not asyncio.Transport subclasses."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

from pvpn.io.loop import peer_credentials, run_loop, set_nodelay, stream_transport


def test_run_loop_runs_the_coroutine_on_uvloop_and_returns_its_value() -> None:
    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_loop(main()).startswith("uvloop")


def test_the_adapters_helpers_work_on_uvloop_s_transports() -> None:
    # The isinstance(transport, asyncio.Transport) the adapters used to assert fails on
    # uvloop: pvpn connect died at its first connection to pvpn-client.
    async def main() -> tuple[bool, int, int, int]:
        loop = asyncio.get_running_loop()
        seen: list[asyncio.BaseTransport] = []

        class Server(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.append(transport)

        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        tcp = stream_transport(transport)
        set_nodelay(tcp)
        nodelay = tcp.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        tcp.set_write_buffer_limits(high=1 << 20)
        tcp.write(b"x")
        a, b = socket.socketpair()
        unix, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        _, uid, _ = peer_credentials(stream_transport(unix))
        was_asyncio_transport = isinstance(transport, asyncio.Transport)
        for t in (tcp, unix, *seen):
            t.close()
        b.close()
        server.close()
        return was_asyncio_transport, nodelay, uid, len(seen)

    was_asyncio_transport, nodelay, uid, accepted = run_loop(main())
    assert not was_asyncio_transport  # why stream_transport casts instead of checking
    assert nodelay == 1
    assert uid == os.getuid()
    assert accepted == 1


# In a process of its own: without the fix the SIGHUP ends it (the signal's default action).
HELD_SIGHUP = """
import asyncio, os, signal
from pvpn.io.loop import install_signals, run_loop

async def main():
    loop, stop, reloads = asyncio.get_running_loop(), asyncio.Event(), []
    install_signals(loop, stop)  # starting: no reload yet
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.1)
    install_signals(loop, stop, lambda: reloads.append(1))  # serving
    await asyncio.sleep(0.1)
    held = len(reloads)
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(stop.wait(), 5)
    print(held, len(reloads))

run_loop(main())
"""


def test_a_sighup_while_a_daemon_starts_is_held_for_its_reload_not_its_end() -> None:
    """An administrator's reload right after a restart came while the daemon started, before
    its SIGHUP handler: the default action ended it there, its rules left behind."""
    done = subprocess.run([sys.executable, "-c", HELD_SIGHUP], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split() == ["1", "2"], "the held SIGHUPs reload once, later ones each"
