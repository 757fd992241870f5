"""A node's control socket: answers STATUS, and never takes over another node's socket."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pvpn.envelope import EnvelopeDecoder, MsgType, decode_control, encode_control, encode_envelope
from pvpn.errors import ConfigError
from pvpn.io.control import start_control, stop_control


def test_status_and_no_takeover(tmp_path: Path) -> None:
    path = tmp_path / "node.ctl"

    async def scenario() -> None:
        server = await start_control(path, lambda: [{"session": "ab", "user": "alice"}])
        try:
            with pytest.raises(ConfigError, match="another node already answers"):
                await start_control(path, lambda: [])
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(encode_envelope(MsgType.STATUS, b"", 0, 0, encode_control({})))
            data = await asyncio.wait_for(reader.read(65536), 5)
            (reply,) = list(EnvelopeDecoder().feed(data))
            expected = MsgType.STATUS_REPLY if os.geteuid() == 0 else MsgType.ERROR
            assert reply.type is expected
            if expected is MsgType.STATUS_REPLY:
                assert decode_control(reply)["sessions"][0]["user"] == "alice"
            writer.close()
        finally:
            stop_control(server, path)
        assert not path.exists()
        again = await start_control(path, lambda: [])  # a stale path is taken over
        stop_control(again, path)

    asyncio.run(scenario())


def test_a_status_too_large_for_one_envelope_comes_in_pages(tmp_path: Path) -> None:
    """Issue 9 point 2: 1,000 sessions (far over one envelope's 65,535 bytes) used to make the
    node raise LocalProtocolError while building its answer; now every one arrives."""
    from pvpn.cli import ask_daemon

    path = tmp_path / "node.ctl"
    sessions = [{"session": f"{n:032x}", "user": "u" * 32, "server": "s" * 300}
                for n in range(1000)]

    async def scenario() -> tuple[MsgType, dict[str, object]]:
        server = await start_control(path, lambda: sessions)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, ask_daemon, path, MsgType.STATUS, {})
        finally:
            stop_control(server, path)

    mtype, reply = asyncio.run(scenario())
    if os.geteuid() != 0:
        assert mtype is MsgType.ERROR
        return
    assert mtype is MsgType.STATUS_REPLY
    assert reply["sessions"] == sessions
