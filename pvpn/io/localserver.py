"""The server side of pvpn-client's unix socket: each connection's asyncio callbacks to the
client host's adapter (:class:`LocalLink`), and the socket itself (:func:`listen`), in a
directory only root may change. The envelopes' framing and what they mean are pvpn.local's and
pvpn.nodes.client.ClientHost's; this only carries bytes and the kernel's word on who sent
them (SO_PEERCRED)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from pvpn.envelope import Envelope, MsgType
from pvpn.errors import ConfigError, RemoteProtocolError
from pvpn.io.loop import (
    WRITE_HIGH_WATER, Guard, guarded, peer_credentials, prepare_unix_socket, stream_transport,
)
from pvpn.io.safedir import nearest_existing, unsafe_directory
from pvpn.names import LOCAL_ERROR
from pvpn.nodes.client import LocalPeer, SlotSession
from pvpn.text import clip


class LocalServed(Protocol):
    """What a local connection tells pvpn-client's adapter (client/daemon.py's ClientDaemon)."""

    guard: Guard
    loop: asyncio.AbstractEventLoop
    link_ids: Iterator[int]
    by_id: dict[int, LocalLink]

    def admit(self, link: LocalLink) -> None: ...
    def inject(self, link: LocalLink, packet: bytes) -> None: ...
    def local_control(self, link: LocalLink, envelope: Envelope) -> None: ...
    def local_record(self, event: str, link: LocalLink, session: SlotSession | None = None,
                     **kw: Any) -> None: ...
    def local_lost(self, link: LocalLink) -> None: ...
    def run(self) -> None: ...


class LocalLink(LocalPeer, asyncio.Protocol):
    """One `pvpn connect` (or `pvpn status`/`disconnect`) process on the unix socket."""

    def __init__(self, daemon: LocalServed) -> None:
        super().__init__(next(daemon.link_ids))
        self.daemon = daemon
        self.guard = daemon.guard
        self.transport: asyncio.Transport | None = None

    # -- asyncio; what escapes a callback goes to the guard, which closes this connection only
    @property
    def guard_link(self) -> int:
        return self.id

    @guarded("local connection_made")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = stream_transport(transport)
        self.transport = transport
        self.daemon.by_id[self.id] = self
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.pid, self.uid, _ = peer_credentials(transport)
        self.last_active = self.daemon.loop.time()
        self.daemon.admit(self)

    @guarded("local pause_writing")
    def pause_writing(self) -> None:
        self.congested = True

    @guarded("local resume_writing")
    def resume_writing(self) -> None:
        self.congested = False

    @guarded("local data_received")
    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        self.last_active = self.daemon.loop.time()
        try:
            for envelope in self.channel.receive(data):
                if envelope.type is MsgType.PACKET:
                    self.daemon.inject(self, envelope.body)
                else:
                    self.daemon.local_control(self, envelope)
                    self.flush()  # so the next question sees whether this answer is read
        except RemoteProtocolError as exc:
            self.daemon.local_record(LOCAL_ERROR, self, self.session,
                                     reason=clip(f"{type(exc).__name__}: {exc}"))
            self.close()
        finally:
            self.daemon.run()  # the read's TUN writes, together
        self.flush()

    @guarded("local connection_lost")
    def connection_lost(self, exc: Exception | None) -> None:
        self.daemon.by_id.pop(self.id, None)
        self.daemon.local_lost(self)

    # -- output
    def flush(self) -> None:
        if self.pending and self.transport is not None:
            self.transport.write(b"".join(self.pending))
            self.pending.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()


def ensure_socket_dir(path: Path) -> str | None:
    """The socket's directory, made if missing (0711: every user reaches the socket by name,
    nobody lists the directory). A warning if an existing one is not traversable by users.

    ConfigError if the directory, or one above it, is not root's alone: pvpn-client makes the
    socket 0666 with chmod, which follows symlinks, so whoever may change the directory could
    swap the new socket for a link to /etc/shadow between bind and chmod."""
    parent = path.parent
    existing = nearest_existing(parent)
    unsafe = unsafe_directory(existing, (0,))  # root's alone
    if unsafe is not None:
        raise ConfigError(f"{unsafe}; whoever may change it could swap {path.name} for a "
                          "symlink that pvpn-client would make 0666: give [client] socket a "
                          "directory that only root may change (/run/pvpn, 0711)")
    if existing != parent:
        made = [d for d in (parent, *parent.parents) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        for d in made:
            os.chmod(d, 0o711)  # explicit: supervisord's umask 077 would make them 0700
        return None
    if not parent.stat().st_mode & 0o001:
        return (f"{parent} is not traversable by other users, so they cannot reach "
                f"{path.name}; chmod o+x {parent} (0711)")
    return None


def prepare_socket(path: Path) -> None:
    """Make way for the socket (pvpn.io.loop.prepare_unix_socket; ConfigError)."""
    prepare_unix_socket(
        path, f"{path} exists and is not a socket; remove it or change [client] socket",
        f"another pvpn-client already listens on {path}")


async def listen(path: Path, link: Callable[[], LocalLink]) -> asyncio.AbstractServer:
    """Serve the socket, each connection a ``link()``."""
    listener = await asyncio.get_running_loop().create_unix_server(link, str(path))
    os.chmod(path, 0o666)  # anyone may ask; the kernel tells us who asked
    return listener


def remove_socket(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
