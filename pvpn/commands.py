"""Every command a node can ask for (after mitmproxy's ``proxy/commands.py``).

A node never acts itself: each input (``receive_data``, ``receive_reply``, ``handle_timer``,
...) appends commands to the node's ``commands`` list, and the program's one dispatcher
carries them out in order (write bytes to a socket, close it, inject a packet, write a
record). This module is the whole list of what a node can ask for; it imports no node.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvpn.envelope import Offload
from pvpn.records import Record


class Command:
    """Base of every command: what a node asks its program's dispatcher to do."""

    __slots__ = ()


# ---------------------------------------------------------------- every node: its links


@dataclass(slots=True)
class SendBytes(Command):
    link: int
    data: bytes


@dataclass(slots=True)
class CloseLink(Command):
    link: int


@dataclass(slots=True)
class LogRecord(Command):
    record: Record


# ---------------------------------------------------------------- the server


@dataclass(slots=True)
class InjectPacket(Command):
    """Send this IP packet into the server's network: by the raw socket, or, with
    ``offload``, as a super-packet for the kernel to forward and segment (the server's TUN
    device, pvpn.forwarding)."""

    packet: bytes
    offload: Offload | None = None


@dataclass(slots=True)
class CapturePacket(Command):
    """Write this inner packet of ``session`` to its capture (server ``capture`` on only)."""

    session: bytes
    packet: bytes


@dataclass(slots=True)
class SessionClosed(Command):
    """``session`` has ended (its ``session:closed`` record is written): its capture closes
    (server ``capture`` on only)."""

    session: bytes


@dataclass(slots=True)
class ResumeElsewhere(Command):
    """Link ``link`` (authenticated) resumes a session another worker of this server holds
    (pvpn.workers): route its source's next connection to ``worker``, then close it without
    a CLOSE (:meth:`ServerNode.hand_off`), so its user's process reconnects and resumes."""

    link: int
    worker: int


# ---------------------------------------------------------------- the gateway: its next hop


@dataclass(slots=True)
class OpenNextHop(Command):
    """Connect to the next hop for this link (the adapter answers next_opened/next_failed)."""

    link: int
    host: str
    port: int
    timeout: float


@dataclass(slots=True)
class SendNext(Command):
    link: int
    data: bytes


@dataclass(slots=True)
class CloseNext(Command):
    link: int
