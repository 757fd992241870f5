"""A node's control socket: `pvpn status` asks a running pvpn-server or pvpn-gateway for its
sessions. Root only (the kernel tells us who asks); one request, one answer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Callable

from pvpn.envelope import MsgType, decode_control
from pvpn.errors import RemoteProtocolError
from pvpn.io.loop import peer_credentials, prepare_unix_socket, stream_transport
from pvpn.local import LocalChannel

StatusProvider = Callable[[], list[dict[str, Any]]]


class _ControlLink(asyncio.Protocol):
    def __init__(self, provider: StatusProvider) -> None:
        self.provider = provider
        self.channel = LocalChannel()
        self.transport: asyncio.Transport | None = None
        self.uid = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = stream_transport(transport)
        self.transport = transport
        _, self.uid, _ = peer_credentials(transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            for envelope in self.channel.receive(data):
                decode_control(envelope)
                if envelope.type is not MsgType.STATUS:
                    raise RemoteProtocolError(f"unexpected {envelope.type.name}")
                if self.uid != 0:
                    transport.write(self.channel.control(
                        MsgType.ERROR, b"", 0, {"code": "denied", "reason": "root only"}))
                else:
                    # In pages: a node with many sessions does not fit one envelope.
                    transport.write(b"".join(self.channel.status(b"", 0, self.provider())))
                transport.close()
                return
        except RemoteProtocolError:
            transport.close()


async def start_control(path: Path, provider: StatusProvider) -> asyncio.AbstractServer:
    prepare_unix_socket(
        path, f"{path} exists and is not a socket; remove it or change 'control'",
        f"another node already answers on {path}; give this one its own 'control' socket")
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: _ControlLink(provider), str(path))
    os.chmod(path, 0o600)
    return server


def stop_control(server: asyncio.AbstractServer | None, path: Path) -> None:
    if server is not None:
        server.close()
    path.unlink(missing_ok=True)
