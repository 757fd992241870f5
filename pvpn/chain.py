"""The user's end of a chain of links, sans-IO: hop 0 rides on the TCP connection, hop i+1
rides inside hop i's DATA envelopes (TLS inside TLS, like SSH ProxyJump), and the last hop,
the server, carries the user's packets.

Driven by :meth:`receive_data` (bytes from the first hop's socket), :meth:`send_packets` and
:meth:`handle_timer`; the bytes for the socket come from :meth:`data_to_send`. Hops are built
one after the other: hop i+1 is started once hop i has accepted the user.
"""

from __future__ import annotations

from typing import Callable, Iterable

from pvpn.events import (
    ChainEvent, ChainFailed, ChainUp, DataReceived, LinkClosed, LinkEstablished, LinkRefused,
    PacketsReceived,
)
from pvpn.protocol import LinkState, UserLink

RETRYABLE_REFUSALS = frozenset({"next-hop-unreachable"})

#: make_link(index, names of the nodes before it) -> the user's link with hop ``index``.
LinkFactory = Callable[[int, list[str]], UserLink]


class UserChain:
    def __init__(self, make_link: LinkFactory, length: int, names: list[str]) -> None:
        """``names`` says how to call hop i in messages until its node name is known."""
        self._make_link = make_link
        self.length = length
        self._names = names
        self.links: list[UserLink] = []
        self.nodes: list[str] = []
        self.up = False
        self.failed: ChainFailed | None = None

    @property
    def server_link(self) -> UserLink | None:
        return self.links[-1] if self.up else None

    def start(self, now: float) -> None:
        self.links.append(self._make_link(0, []))
        self.links[0].start(now)

    def _where(self, index: int) -> str:
        return self.nodes[index] if index < len(self.nodes) else self._names[index]

    def _fail(self, index: int, reason: str, fatal: bool) -> ChainFailed:
        for link in self.links:
            link.state = LinkState.CLOSED
        self.up = False
        self.failed = ChainFailed(index, self._where(index), reason, fatal)
        return self.failed

    # -- input
    def receive_data(self, data: bytes, now: float) -> list[ChainEvent]:
        events: list[ChainEvent] = []
        if self.failed is None:
            self._feed(0, data, now, events)
        return events

    def _feed(self, index: int, data: bytes, now: float, out: list[ChainEvent]) -> None:
        links = self.links
        last = index == self.length - 1
        for event in links[index].receive_data(data, now):
            if self.failed is not None:
                return
            if type(event) is DataReceived and not last:
                if index + 1 < len(links):
                    self._feed(index + 1, event.data, now, out)
            elif type(event) is PacketsReceived and last:
                out.append(event)
            elif type(event) in (DataReceived, PacketsReceived):
                # Only the server, the last hop, carries packets; a gateway only relays. (Each
                # UserLink refuses what its hop does not carry; this holds whatever it is given.)
                out.append(self._fail(index, f"{self._where(index)} sent what its hop does not "
                                             "carry (packets from a gateway, or relayed bytes "
                                             "from the server)", False))
                return
            else:
                self._link_event(index, event, now, out)

    def _link_event(self, index: int, event: object, now: float, out: list[ChainEvent]) -> None:
        if isinstance(event, LinkEstablished):
            if event.node in self.nodes:
                first = self.nodes.index(event.node) + 1
                out.append(self._fail(index, f"the chain visits node {event.node!r} twice (hops "
                                             f"{first} and {index + 1}); remove the repeated hop",
                                      True))
                return
            self.nodes.append(event.node)
            if index + 1 < self.length:
                link = self._make_link(index + 1, list(self.nodes))
                link.start(now)
                self.links.append(link)
            else:
                self.up = True
                out.append(ChainUp(event, list(self.nodes)))
        elif isinstance(event, LinkRefused):
            # A policy refusal stands; a gateway that can't reach its next hop (restarting,
            # say) may well succeed on the next try.
            fatal = event.code not in RETRYABLE_REFUSALS
            out.append(self._fail(index, f"refused: {event.reason} ({event.code})", fatal))
        elif isinstance(event, LinkClosed):
            out.append(self._fail(index, event.reason, event.fatal))

    def connection_lost(self, reason: str) -> ChainFailed | None:
        """The TCP connection to the first hop is gone."""
        if self.failed is not None:
            return None
        return self._fail(0, reason, False)

    def silent_hop(self, waited: float) -> str:
        """Why the chain is not up after ``waited`` seconds: the hop it waits for, and for
        what (a node that takes TCP but never speaks, a gateway whose next hop drops it)."""
        index = len(self.links) - 1
        if index < 0:
            return f"the chain did not start within {waited:g} s"
        link = self.links[index]
        where = f"hop {index + 1} of {self.length} ({self._where(index)})"
        if index:
            where += f", reached through {' > '.join(self.nodes)}"
        if not link.tls.handshake_complete:
            stage = ("its TLS handshake did not finish: is a pvpn node listening there, and "
                     "do its answers get back?")
        elif link.state is LinkState.HELLO_SENT:
            stage = "it took our TLS handshake but never sent its challenge"
        elif index + 1 < self.length:
            stage = ("it took our signature but did not accept us: it may still be connecting "
                     f"to its next hop, {self._names[index + 1]}")
        else:
            stage = "it never answered our signature (accept or refuse)"
        return f"no answer from {where} within {waited:g} s: {stage}"

    # -- output
    def send_packets(self, packets: Iterable[bytes]) -> None:
        if self.up:
            self.links[-1].send_packets(packets)

    def close(self, reason: str) -> None:
        """Orderly end: CLOSE to the server, through the chain."""
        if self.up:
            self.links[-1].close(reason)

    def data_to_send(self, now: float) -> bytes:
        links = self.links
        # Innermost first: each hop's ciphertext becomes the next-outer hop's DATA.
        for index in range(len(links) - 1, 0, -1):
            data = links[index].data_to_send(now)
            if data:
                links[index - 1].send_data(data)
        return links[0].data_to_send(now) if links else b""

    def handle_timer(self, now: float) -> list[ChainEvent]:
        out: list[ChainEvent] = []
        if self.failed is not None:
            return out
        for index, link in enumerate(list(self.links)):
            event = link.handle_timer(now)
            if event is not None:
                self._link_event(index, event, now, out)
                break
        return out
