"""Every event the user's end reports (after aioquic's ``quic/events.py``).

:class:`pvpn.user.UserLink` turns what its node sends into link events, and
:class:`pvpn.user.UserChain` turns its links' events into chain events; the program that drives
them (``pvpn connect``) acts on them. Events are facts in the past tense; this module imports
neither the user's end nor any node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


class Event:
    """Base of every event the user's end reports."""

    __slots__ = ()


# ---------------------------------------------------------------- one link (UserLink)


@dataclass(slots=True)
class LinkEstablished(Event):
    session: bytes
    token: bytes
    allow: list[str]
    node: str
    resumed: bool


@dataclass(slots=True)
class LinkRefused(Event):
    code: str
    reason: str


@dataclass(slots=True)
class PacketsReceived(Event):
    packets: list[bytes]


@dataclass(slots=True)
class DataReceived(Event):
    """Opaque bytes relayed by a gateway: the ciphertext of the next hop's link."""

    data: bytes


@dataclass(slots=True)
class LinkClosed(Event):
    reason: str
    fatal: bool = False  # retrying can't help (the node's certificate was refused)


@dataclass(slots=True)
class SignatureWanted(Event):
    """The node challenged the user and the signer answers later (the user's process, an
    agent, signs for pvpn-client): sign this, then give it to the link (``signed``).
    ``hop`` is the link's place in its chain (set by UserChain)."""

    challenge: bytes
    binding: bytes
    node: str
    hop: int = 0


LinkEvent = Union[LinkEstablished, LinkRefused, PacketsReceived, DataReceived, LinkClosed,
                  SignatureWanted]


# ---------------------------------------------------------------- the chain of links (UserChain)


@dataclass(slots=True)
class ChainUp(Event):
    """Every hop accepted the user; ``accept`` is the server's answer."""

    accept: LinkEstablished
    nodes: list[str]


@dataclass(slots=True)
class ChainFailed(Event):
    """The chain is down. ``fatal``: trying again can't help (refused, bad certificate, loop)."""

    hop: int
    where: str
    reason: str
    fatal: bool


ChainEvent = Union[ChainUp, ChainFailed, PacketsReceived, SignatureWanted]
