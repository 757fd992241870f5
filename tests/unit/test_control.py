"""A node's control socket: answers STATUS, and never takes over another node's socket."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from pvpn.envelope import EnvelopeDecoder, MsgType, decode_control, encode_control, encode_envelope
from pvpn.errors import ConfigError
from pvpn.io.control import start_control, stop_control


def ask_status(path: Path, provider: Any) -> tuple[MsgType, dict[str, Any]]:
    """`pvpn status --node`'s request to a control socket at ``path`` serving ``provider``."""
    from pvpn.cli.main import ask_daemon

    async def scenario() -> tuple[MsgType, dict[str, Any]]:
        server = await start_control(path, provider)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, ask_daemon, path, MsgType.STATUS, {})
        finally:
            stop_control(server, path)

    return asyncio.run(scenario())


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
    sessions = [{"session": f"{n:032x}", "user": "u" * 32, "server": "s" * 300}
                for n in range(1000)]
    mtype, reply = ask_status(tmp_path / "node.ctl", lambda: sessions)
    if os.geteuid() != 0:
        assert mtype is MsgType.ERROR
        return
    assert mtype is MsgType.STATUS_REPLY
    assert reply["sessions"] == sessions


def _status_through_the_socket(tmp_path: Path, provider: Any,
                               monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """`pvpn status --node`'s request to a control socket serving ``provider``, as root."""
    from pvpn.io import control

    monkeypatch.setattr(control, "peer_credentials", lambda transport: (1, 0, 0))
    mtype, reply = ask_status(tmp_path / "node.ctl", provider)
    assert mtype is MsgType.STATUS_REPLY
    return list(reply["sessions"])


def test_the_server_describes_400_sessions_through_its_control_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 point 2: the server's node status broke near 330 sessions; 400 arrive whole."""
    from pvpn.config import ServerConfig, parse_prefix
    from pvpn.addresses import Destinations
    from pvpn.nodes.base import Session
    from pvpn.nodes.server import ServerNode

    config = ServerConfig(Path("s.toml"), "server", [], Path("c"), Path("k"), Path("u"), 0,
                          (61000, 61999), "t")
    node = ServerNode(config, keys=None, verify=None, source_for=lambda d: d)  # type: ignore[arg-type]
    allow = Destinations([parse_prefix(f"10.{n}.0.0/16") for n in range(16)])
    for n in range(400):
        sid = n.to_bytes(16, "big")
        node.sessions[sid] = Session(sid, b"t" * 16, f"user{n:027d}", 1000 + n, "h" * 64,
                                     f"[fd00::{n:x}]:65000", allow, 0.0, link=n)
    got = _status_through_the_socket(tmp_path, lambda: node.describe(5.0), monkeypatch)
    assert len(got) == 400 and got == node.describe(5.0)


def test_the_gateway_describes_400_splices_through_its_control_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pvpn.config import GatewayConfig
    from pvpn.nodes.base import NodeLink, NodeLinkState
    from pvpn.nodes.gateway import GatewayNode, Splice

    config = GatewayConfig(Path("g.toml"), "gw1", [], Path("c"), Path("k"), Path("u"), 5.0)
    node = GatewayNode(config, keys=None, verify=None)  # type: ignore[arg-type]
    for n in range(1, 401):
        link = NodeLink(n, None, f"[fd00::{n:x}]:65000", 0.0, state=NodeLinkState.ESTABLISHED,
                        user=f"user{n:027d}", uid=n, client="h" * 64,
                        session_id=n.to_bytes(16, "big"))
        node.links[n] = link
        node.splices[n] = Splice("[fd00:0:0:1::2]:4433", 0.0, connected=True)
    got = _status_through_the_socket(tmp_path, lambda: node.describe(5.0), monkeypatch)
    assert len(got) == 400 and got == node.describe(5.0)
