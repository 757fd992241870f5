"""The user's end, sans-IO (after aioquic and h11): one link, the chain of links, and the
tunnel process that joins the chain to pvpn-client.

:class:`UserLink` is the user's end of one link: it speaks the HELLO / CHALLENGE / AUTH
exchange of :mod:`pvpn.nodes.base` from the user's side and reports events
(:mod:`pvpn.events`).

:class:`UserChain` is the user's end of a chain of links: hop 0 rides on the TCP connection,
hop i+1 rides inside hop i's DATA envelopes (TLS inside TLS, like SSH ProxyJump), and the last
hop, the server, carries the user's packets. It is driven by :meth:`UserChain.receive_data`
(bytes from the first hop's socket), :meth:`UserChain.send_packets` and
:meth:`UserChain.handle_timer`; the bytes for the socket come from
:meth:`UserChain.data_to_send`. Hops are built one after the other: hop i+1 is started once
hop i has accepted the user.

:class:`SigningAgent` and :class:`UserAgent` are what `pvpn connect` decides since issue 12:
pvpn-client holds the chain (pvpn.hosted) and the user's process is its agent, signing each
challenge with the key only it holds. :class:`UserTunnel` is what `pvpn connect` decided when
it held the chain itself (pvpn-client still serves that protocol): its registration with pvpn-client over
the local channel, when to ATTACH, what pvpn-client's answers and errors mean, what the
chain's events mean (up, down and rebuilt, failed for good), and how the VPN ends. Its
commands (:class:`Say`, :class:`CloseChain`, ...) are carried out by client/connect.py.

Inputs carry ``now``. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from pvpn.commands import Command

from pvpn.config import DEFAULT_DEAD_AFTER, DEFAULT_KEEPALIVE
from pvpn.envelope import (
    DEFAULT_HOPS, MAX_PACKET, OFFLOAD, Envelope, EnvelopeDecoder, MsgType, Sequencer,
    bare_packet, decode_control, encode_control, encode_envelope,
)
from pvpn.errors import CertificateError, LocalProtocolError, MalformedFrame, RemoteProtocolError
from pvpn.events import (
    ChainEvent, ChainFailed, ChainUp, DataReceived, LinkClosed, LinkEstablished, LinkEvent,
    LinkRefused, PacketsReceived, SignatureWanted,
)
from pvpn.local import LocalChannel
from pvpn.nodes.base import TlsLike, client_host_name
from pvpn.records import NODE_NAME


# ---------------------------------------------------------------- the user's end of a link


class LinkState(enum.Enum):
    HELLO_SENT = "hello-sent"
    AUTH_SENT = "auth-sent"
    ESTABLISHED = "established"
    CLOSED = "closed"


#: Re-authentications a user's end answers in a burst, and the seconds that earn one more
#: (a node's shortest reauth_interval).
REAUTH_BURST = 8
REAUTH_REFILL = 10.0
#: (challenge, binding, node) -> the signature, or None: asked of an agent, given later to
#: :meth:`UserLink.signed` (the link reports SignatureWanted meanwhile).
Signer = Callable[[bytes, bytes, str], "bytes | None"]


class UserLink:
    """The user's end of one link: says hello, answers the challenge, then carries packets
    (to a server) or the next hop's ciphertext (through a gateway, in DATA envelopes).

    Driven by :meth:`receive_data` (ciphertext from the node), :meth:`send_packets` and
    :meth:`send_data`; its ciphertext output is taken with :meth:`data_to_send`. The session
    id is proposed by the user so every hop of a chain logs the same one.

    A link carries one kind of payload: PACKET envelopes to the server (the last hop, no
    ``next_hop``), DATA to a gateway. Anything else from the node closes the link: a gateway
    relays the next hop's ciphertext and cannot speak inside the tunnel. A CHALLENGE on an
    established link is the node asking the user to prove their key again; it is answered
    with a signature bound to the same TLS session.
    """

    def __init__(
        self,
        tls: TlsLike,
        *,
        user: str,
        uid: int,
        signer: Signer,
        want: Sequence[str],
        client_name: str,
        session: bytes = b"",
        token: bytes | None = None,
        next_hop: str | None = None,
        path: Sequence[str] = (),
        hops: int = DEFAULT_HOPS,
        keepalive: float = DEFAULT_KEEPALIVE,
        dead_after: float = DEFAULT_DEAD_AFTER,
    ) -> None:
        self.tls = tls
        self.user = user
        self.uid = uid
        self._signer = signer
        self.state = LinkState.HELLO_SENT
        self.session = session
        self._decoder = EnvelopeDecoder()
        self._seq = Sequencer()
        self._pending: list[bytes] = []
        self.keepalive = keepalive
        self.dead_after = dead_after
        self._last_received = 0.0
        self._last_sent = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.congested = False  # set by the adapter from the socket's high-water mark
        self.dropped = 0
        # What this hop carries: packets to the server, the next hop's ciphertext to a gateway.
        self.carries = MsgType.PACKET if next_hop is None else MsgType.DATA
        self.node = ""  # the node's name, once it has accepted us
        self.offload = False  # the node said it sends super-packets (pvpn.envelope.OFFLOAD)
        self.reauthenticated = 0  # answers to a node's CHALLENGE on the established link
        # A node challenges again at most every reauth_interval (10 s at least) and on a
        # reload, one challenge at a time; each answer costs an RSA signature, so a node (a
        # rogue gateway) asking faster than that could keep the user's process busy signing.
        self._reauth_tokens = float(REAUTH_BURST)
        self._reauth_refilled = 0.0
        self._broken = False  # the link failed: nothing more is sent on it
        self.signing = False  # a SignatureWanted is unanswered
        self._unreported: str | None = None  # a failure on output, for handle_timer to tell
        self._pending.append(encode_envelope(
            MsgType.HELLO, session, uid, self._seq.take(), encode_control({
                "user": user, "want": list(want), "token": token,
                "client": client_host_name(client_name), "next": next_hop, "path": list(path),
                # The server may send super-packets (pvpn.envelope.OFFLOAD): pvpn-client,
                # whose chain this is (or which a user's process relays bodies to as they
                # are), takes them.
                **({"offload": [OFFLOAD]} if next_hop is None else {}),
            }), hops))

    # -- output
    def _send_control(self, mtype: MsgType, fields: dict[str, object]) -> None:
        self._pending.append(
            encode_envelope(mtype, self.session, self.uid, self._seq.take(), encode_control(fields))
        )

    def send_packets(self, packets: Iterable[bytes]) -> None:
        """Queue IP packets; they leave together on the next :meth:`data_to_send`."""
        if self.state is not LinkState.ESTABLISHED:
            return  # fail closed: nothing goes anywhere before the node accepted us
        if self.congested:
            self.dropped += 1
            return
        pending, session, uid, seq = self._pending, self.session, self.uid, self._seq
        for packet in packets:
            pending.append(encode_envelope(MsgType.PACKET, session, uid, seq.take(), packet))
            self.bytes_out += len(packet)

    def send_data(self, data: bytes) -> None:
        """Queue opaque bytes for the gateway to pass to the next hop."""
        if self.state is not LinkState.ESTABLISHED or not data:
            return
        pending, session, uid, seq = self._pending, self.session, self.uid, self._seq
        for start in range(0, len(data), MAX_PACKET):
            pending.append(encode_envelope(MsgType.DATA, session, uid, seq.take(),
                                           data[start:start + MAX_PACKET]))

    def close(self, reason: str) -> None:
        if self.state is LinkState.ESTABLISHED:
            self._send_control(MsgType.CLOSE, {"reason": reason})
        self.state = LinkState.CLOSED

    def data_to_send(self, now: float = 0.0) -> bytes:
        if self._broken:
            self._pending.clear()  # its TLS failed: what was queued goes nowhere
        try:
            if self._pending:
                # One TLS write for everything waiting: fewer records, fewer syscalls.
                data = b"".join(self._pending)
                self._pending.clear()
                self.tls.send(data)
                self._last_sent = now
            return self.tls.data_to_send()
        except (RemoteProtocolError, LocalProtocolError) as exc:
            # The session failed (on input, or now on output): the link is over, and its
            # output with it; the owner hears of it from receive_data or, for a failure here,
            # from the next handle_timer.
            if not self._broken:
                self._unreported = f"TLS failed on output: {type(exc).__name__}: {exc}"
            self._broken = True
            self.state = LinkState.CLOSED
            return b""

    # -- input
    def start(self, now: float) -> None:
        self._last_received = now
        self._last_sent = now

    def receive_data(self, data: bytes, now: float) -> list[LinkEvent]:
        """Ciphertext in, events out. Remote errors close the link and come back as LinkClosed."""
        events: list[LinkEvent] = []
        self._last_received = now
        try:
            self.tls.receive_data(data)
            plaintext = self.tls.read()
            if plaintext:
                packets: list[bytes] = []
                relayed: list[bytes] = []
                established = self.state is LinkState.ESTABLISHED
                carries = self.carries
                for envelope in self._decoder.feed(plaintext):
                    mtype = envelope.type
                    if mtype is MsgType.PACKET or mtype is MsgType.DATA:
                        if mtype is not carries or not established:
                            raise MalformedFrame(self._not_carried(mtype))
                        if mtype is MsgType.PACKET:
                            packets.append(envelope.body)
                            self.bytes_in += len(envelope.body)
                        else:
                            relayed.append(envelope.body)
                        continue
                    if packets:
                        events.append(PacketsReceived(packets))
                        packets = []
                    if relayed:
                        events.append(DataReceived(b"".join(relayed)))
                        relayed = []
                    event = self._control(envelope, now)
                    if event is not None:
                        events.append(event)
                    established = self.state is LinkState.ESTABLISHED
                if packets:
                    events.append(PacketsReceived(packets))
                if relayed:
                    events.append(DataReceived(b"".join(relayed)))
        except CertificateError as exc:
            self.state = LinkState.CLOSED
            self._broken = True
            events.append(LinkClosed(f"node certificate refused: {exc}", fatal=True))
        except RemoteProtocolError as exc:
            self.state = LinkState.CLOSED
            self._broken = True
            events.append(LinkClosed(f"{type(exc).__name__}: {exc}"))
        return events

    def _not_carried(self, mtype: MsgType) -> str:
        node = self.node or "the node"
        if self.state is not LinkState.ESTABLISHED:
            return f"{node} sent {mtype.name} before it accepted us"
        if self.carries is MsgType.DATA:
            return (f"gateway {node} sent {mtype.name} envelopes: a gateway only relays the "
                    "next hop's ciphertext, only the server may carry packets")
        return f"the server {node} sent {mtype.name} envelopes: it carries packets only"

    def _control(self, envelope: Envelope, now: float) -> LinkEvent | None:
        handler = USER_TRANSITIONS.get((self.state, envelope.type), UserLink._unexpected)
        return handler(self, envelope, now)

    # -- what an envelope does in each state of the link (USER_TRANSITIONS, below the class)
    def _keepalive(self, envelope: Envelope, now: float) -> LinkEvent | None:
        if not self.congested:  # a node that does not read gets no echo to pile up
            self._send_control(MsgType.KEEPALIVE_ACK, {})
        return None

    def _keepalive_ack(self, envelope: Envelope, now: float) -> LinkEvent | None:
        return None

    def _challenge(self, envelope: Envelope, now: float) -> LinkEvent | None:
        fields = decode_control(envelope)
        self.state = LinkState.AUTH_SENT
        return self._sign(fields["nonce"], fields["node"])

    def _sign(self, nonce: bytes, node: str) -> LinkEvent | None:
        """AUTH with the signer's answer now, or SignatureWanted if it answers later."""
        binding = self.tls.binding()
        signature = self._signer(nonce, binding, node)
        if signature is None:
            self.signing = True
            return SignatureWanted(nonce, binding, node)
        self._send_control(MsgType.AUTH, {"signature": signature})
        return None

    def signed(self, signature: bytes) -> None:
        """The signature asked for by the last SignatureWanted: AUTH (only one answer per
        request; none on a link that closed meanwhile)."""
        if not self.signing or self.state is LinkState.CLOSED:
            return
        self.signing = False
        self._send_control(MsgType.AUTH, {"signature": signature})

    def _rechallenge(self, envelope: Envelope, now: float) -> LinkEvent | None:
        # Re-authentication: the same key, a fresh nonce, the same TLS session's binding.
        fields = decode_control(envelope)
        if fields["node"] != self.node:
            raise MalformedFrame("a CHALLENGE naming another node on an established link")
        tokens = min(float(REAUTH_BURST), self._reauth_tokens
                     + (now - self._reauth_refilled) / REAUTH_REFILL)
        self._reauth_refilled = now
        if tokens < 1.0:
            raise MalformedFrame(f"{self.node} asks for re-authentication far more often "
                                 "than a node does")
        self._reauth_tokens = tokens - 1.0
        self.reauthenticated += 1
        return self._sign(fields["nonce"], fields["node"])

    def _accept(self, envelope: Envelope, now: float) -> LinkEvent | None:
        fields = decode_control(envelope)
        if len(envelope.session) != 16:
            raise MalformedFrame("ACCEPT without a session id")
        if not NODE_NAME.fullmatch(fields["node"]):
            raise MalformedFrame("ACCEPT with a node name that is not one")
        self.session = envelope.session
        self.node = fields["node"]
        self.offload = OFFLOAD in fields.get("offload", ())  # super-packets may come
        self.state = LinkState.ESTABLISHED
        return LinkEstablished(
            envelope.session, fields["token"], [str(a) for a in fields["allow"]],
            fields["node"], fields["resumed"],
        )

    def _refuse(self, envelope: Envelope, now: float) -> LinkEvent | None:
        fields = decode_control(envelope)
        self.state = LinkState.CLOSED
        return LinkRefused(fields["code"], fields["reason"])

    def _close(self, envelope: Envelope, now: float) -> LinkEvent | None:
        fields = decode_control(envelope)
        self.state = LinkState.CLOSED
        return LinkClosed(f"node closed the session: {fields['reason']}")

    def _unexpected(self, envelope: Envelope, now: float) -> LinkEvent | None:
        decode_control(envelope)  # a body that is not one says so first, as it always did
        raise MalformedFrame(f"unexpected {envelope.type.name} in state {self.state.value}")

    def handle_timer(self, now: float) -> LinkEvent | None:
        """Keepalives out; a silent node is declared dead after ``dead_after`` seconds."""
        if self._unreported is not None:
            reason, self._unreported = self._unreported, None
            return LinkClosed(reason)
        if self.state is LinkState.CLOSED:
            return None
        if now - self._last_received > self.dead_after:
            self.state = LinkState.CLOSED
            return LinkClosed(f"no word from the node for {self.dead_after:.0f} s (keepalive)")
        if self.state is LinkState.ESTABLISHED and now - self._last_sent >= self.keepalive:
            self._send_control(MsgType.KEEPALIVE, {})
        return None


UserHandler = Callable[[UserLink, Envelope, float], LinkEvent | None]

#: The user's end of the handshake: what a control envelope of each type does in each state
#: of the link (PACKET and DATA are taken in receive_data, once ESTABLISHED and only the kind
#: the hop carries). Any pair not listed closes the link (``UserLink._unexpected``). Unlike
#: the node's end (pvpn.nodes.base.TRANSITIONS), a KEEPALIVE is answered in any state, and a
#: REFUSE or CLOSE ends the link in any state.
USER_TRANSITIONS: dict[tuple[LinkState, MsgType], UserHandler] = {
    (LinkState.HELLO_SENT, MsgType.CHALLENGE): UserLink._challenge,  # -> AUTH_SENT
    (LinkState.AUTH_SENT, MsgType.ACCEPT): UserLink._accept,  # -> ESTABLISHED
    (LinkState.ESTABLISHED, MsgType.CHALLENGE): UserLink._rechallenge,  # a re-authentication
    **{(state, MsgType.KEEPALIVE): UserLink._keepalive for state in LinkState},
    **{(state, MsgType.KEEPALIVE_ACK): UserLink._keepalive_ack for state in LinkState},
    **{(state, MsgType.REFUSE): UserLink._refuse for state in LinkState},  # -> CLOSED
    **{(state, MsgType.CLOSE): UserLink._close for state in LinkState},  # -> CLOSED
}


# ---------------------------------------------------------------- the chain of links


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

    def signed(self, hop: int, signature: bytes) -> None:
        """The signature a SignatureWanted of hop ``hop`` asked for (pvpn.user.UserLink.signed)."""
        if self.failed is None and 0 <= hop < len(self.links):
            self.links[hop].signed(signature)

    def _link_event(self, index: int, event: object, now: float, out: list[ChainEvent]) -> None:
        if isinstance(event, SignatureWanted):
            event.hop = index
            out.append(event)
        elif isinstance(event, LinkEstablished):
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


# ---------------------------------------------------------------- the user's tunnel process


@dataclass(slots=True)
class Say(Command):
    """Tell the user (their terminal, or the tunnel process's log)."""

    text: str


@dataclass(slots=True)
class CloseLocalLink(Command):
    """Close the connection to pvpn-client."""


@dataclass(slots=True)
class CloseChain(Command):
    """Close the TCP connection to the chain's first hop (what the chain has to send first)."""


@dataclass(slots=True)
class Capture(Command):
    """Write these inner packets to the capture file (``pvpn connect --pcap``)."""

    packets: list[bytes]


@dataclass(slots=True)
class Reconnect(Command):
    """The chain went down, and may come back: build it again (and hold meanwhile)."""


@dataclass(slots=True)
class Reregister(Command):
    """pvpn-client went away (stopped, restarting, killed): register again once it is back."""


@dataclass(slots=True)
class Finish(Command):
    """The VPN is over: the tunnel process exits with ``status``."""

    status: int


class _ClientSide:
    """What the user's process does on its connection to pvpn-client, whether it holds the
    chain (UserTunnel) or is its agent (UserAgent): the answers to REGISTER and UNREGISTER,
    pvpn-client's errors, and losing it."""

    ending: bool
    finished: bool

    def __init__(self, uid: int, session: bytes, register: Mapping[str, Any]) -> None:
        self.uid = uid
        # Proposed by us, so every hop logs the same session id; the server's once accepted.
        self.session = session
        self.token = b""
        self._register = dict(register)
        self.commands: list[Command] = []
        # the local side: one connection to pvpn-client at a time
        self.channel = LocalChannel()
        self._local_out: list[bytes] = []
        self.local_open = False
        self.registered: dict[str, Any] | None = None  # REGISTERED's fields, this connection
        self.refused: str | None = None  # why this connection's registration failed
        # pvpn-client confirmed the protection is removed (or the socket is gone).
        self.unregistered = False

    def end(self, status: int, reason: str, unregister: bool = True) -> None:
        raise NotImplementedError

    def _local_control(self, mtype: MsgType, fields: Mapping[str, Any]) -> None:
        if self.local_open:
            self._local_out.append(self.channel.control(mtype, self.session, self.uid, fields))

    def _answer(self, mtype: MsgType, fields: dict[str, Any]) -> None:
        """pvpn-client's answers: REGISTERED, the STATUS_REPLY to UNREGISTER, an ERROR."""
        if mtype is MsgType.REGISTERED and self.registering:
            self.registered = fields
        elif mtype is MsgType.STATUS_REPLY and not self.unregistered:
            self._unregister_answer(fields)
            self.unregistered = True
        elif mtype is MsgType.ERROR:
            self._local_error(fields["code"], fields["reason"])

    def _end_locally(self, status: int, reason: str, unregister: bool) -> None:
        """The end on the local side (after ``end`` sent what goes first): UNREGISTER
        (pvpn-client removes the protection), or the connection closed, or the user told
        that the session stays held; then Finish."""
        if unregister and self.local_open:
            self._local_control(MsgType.UNREGISTER, {"reason": reason})
        elif self.local_open:
            self.commands.append(CloseLocalLink())
        else:
            if unregister and not self.registering:
                self.commands.append(Say(
                    "pvpn-client is not reachable now: your session stays held (its "
                    "protected traffic blocked) until `pvpn disconnect`"))
            self.unregistered = True
        self.finished = True
        self.commands.append(Finish(status))

    @property
    def registering(self) -> bool:
        """REGISTER is unanswered on this connection."""
        return self.registered is None and self.refused is None

    def local_to_send(self) -> bytes:
        data = b"".join(self._local_out)
        self._local_out.clear()
        return data

    def _unregister_answer(self, fields: dict[str, Any]) -> None:
        """pvpn-client's answer to UNREGISTER describes the session as it leaves it: held if
        this process never had it up (an earlier one did, and its protection stays)."""
        sessions = fields.get("sessions") or []
        if sessions and isinstance(sessions[0], dict) and str(
                sessions[0].get("state", "")).startswith("held"):
            self.commands.append(Say("your session stays held: its protected traffic is "
                                     "dropped until `pvpn connect` brings it up again, or "
                                     "`pvpn disconnect` ends it"))

    def _local_error(self, code: str, reason: str) -> None:
        if self.registering:
            self.refused = f"pvpn-client refused: {reason}"
            return
        if code == "daemon-stopping":
            # Stopping is not ending: the session stays held in the kernel; register again
            # with the next pvpn-client (the lost connection does that).
            self.commands += [Say(f"{reason}; holding your protected traffic until pvpn-client "
                                  "is back"), CloseLocalLink()]
            return
        self.commands.append(Say(f"{reason}"))
        self.end(0 if code == "disconnected" else 1, reason, unregister=False)

    def local_lost(self) -> None:
        """The connection to pvpn-client is gone."""
        self.local_open = False
        self.unregistered = True
        if self.ending or self.finished:
            return
        if self.registering:
            self.refused = "pvpn-client closed the connection"
            return
        self.commands += [Say("lost pvpn-client; your protected traffic is held (dropped) "
                              "until it is back"), Reregister()]



class UserTunnel(_ClientSide):
    """The user's tunnel process (`pvpn connect`), sans-IO: its local channel with pvpn-client
    (REGISTER, ATTACH, UNREGISTER, packets both ways, one LocalChannel per connection) and its
    chain to the server (:class:`UserChain`), and what passes between them.

    Driven by :meth:`local_opened`, :meth:`receive_local` and :meth:`local_lost` for the unix
    socket; :meth:`new_chain`, :meth:`receive_remote`, :meth:`handle_timer` and
    :meth:`remote_lost` for the chain; :meth:`end`. The bytes for each socket come from
    :meth:`local_to_send` and :meth:`remote_to_send`; what the adapter must do besides
    (tell the user, close a socket, reconnect, exit) is appended to :attr:`commands`.

    While either side is down, pvpn-client keeps dropping the protected packets: nothing
    leaks in clear. Losing pvpn-client is not the end of the VPN: the session is held, we
    register again and re-attach."""

    def __init__(self, uid: int, session: bytes, register: Mapping[str, Any],
                 capturing: bool = False) -> None:
        super().__init__(uid, session, register)
        self.capturing = capturing
        self.local_congested = False  # set by the adapter from the socket's high-water mark
        self.attached = False  # ATTACH sent on the current local connection
        # the chain: gateways (--via) then the server
        self.chain: UserChain | None = None
        self.chain_up: ChainUp | None = None  # this chain is up
        self.chain_failure: ChainFailed | None = None  # this chain failed before it was up
        self.ending = False
        self.finished = False

    # -- the local side
    def local_opening(self) -> None:
        """A new connection to pvpn-client is being made: nothing of the last one carries
        over (its channel's numbering, its registration, its ATTACH)."""
        self.channel = LocalChannel()
        self._local_out.clear()
        self.registered = self.refused = None
        self.attached = False
        self.unregistered = False

    def local_opened(self) -> None:
        """The connection is made and pvpn-client trusted (root's socket): REGISTER."""
        self.local_open = True
        self.local_congested = False
        self._local_control(MsgType.REGISTER, self._register)

    def attach(self) -> None:
        """ATTACH (the session id) once both ends are up: registered with pvpn-client and the
        chain accepted, on every new registration and every rebuilt chain."""
        chain = self.chain
        if not self.attached and self.registered is not None and chain is not None \
                and chain.up:
            self._local_control(MsgType.ATTACH, {"session": self.session, "nodes": chain.nodes})
            self.attached = True


    def receive_local(self, data: bytes) -> bool:
        """Bytes from pvpn-client: its answers, and the protected packets for the chain;
        whether packets went to the chain (its bytes are then to be sent)."""
        packets: list[bytes] = []
        try:
            for envelope in self.channel.receive(data):
                if envelope.type is MsgType.PACKET:
                    packets.append(envelope.body)
                    continue
                self._answer(envelope.type, decode_control(envelope))
        except RemoteProtocolError as exc:
            self.commands += [Say(f"garbage from pvpn-client: {exc}"), CloseLocalLink()]
        chain = self.chain
        if not packets or chain is None or not chain.up:
            return False
        if self.capturing:
            self.commands.append(Capture(packets))
        chain.send_packets(packets)
        return True

    # -- the chain
    def new_chain(self, chain: UserChain) -> None:
        self.chain = chain
        self.chain_up = self.chain_failure = None

    @property
    def chain_pending(self) -> bool:
        """The current chain is neither up nor failed yet."""
        return self.chain_up is None and self.chain_failure is None

    def accepted(self, up: ChainUp) -> None:
        """The chain is up: the session (and the token that resumes it) are the server's."""
        self.session, self.token = up.accept.session, up.accept.token

    def renewed(self, up: ChainUp) -> None:
        """The chain is up again after it went down."""
        if not up.accept.resumed:
            # ATTACH again: a new server session (the server lost ours in a restart, or it
            # expired), so pvpn-client makes the connections the old one carried fail at
            # once instead of waiting for data that will never come.
            self.attached = False
        self.attach()

    def remote_to_send(self, now: float) -> bytes:
        return self.chain.data_to_send(now) if self.chain is not None else b""

    def receive_remote(self, data: bytes, now: float) -> None:
        """Bytes from the first hop's TCP connection."""
        if self.chain is not None:
            self._chain_events(self.chain.receive_data(data, now))

    def handle_timer(self, now: float) -> None:
        chain = self.chain
        if chain is None or chain.failed is not None:
            return  # down or being rebuilt
        self._chain_events(chain.handle_timer(now))

    def remote_lost(self, reason: str) -> None:
        """The TCP connection to the first hop is gone."""
        if self.chain is not None:
            failure = self.chain.connection_lost(reason)
            if failure is not None:
                self._chain_failed(failure)

    def _chain_events(self, events: list[ChainEvent]) -> None:
        for event in events:
            if type(event) is PacketsReceived:
                if self.capturing:  # super-packets without their offload header
                    self.commands.append(Capture([bare_packet(p) for p in event.packets]))
                if self.local_open and not self.local_congested:
                    uid, session, packet = self.uid, self.session, self.channel.packet
                    self._local_out += [packet(session, uid, p) for p in event.packets]
            elif type(event) is ChainUp:
                if self.chain_pending:
                    self.chain_up = event
            elif type(event) is ChainFailed:
                self._chain_failed(event)

    def _chain_failed(self, failure: ChainFailed) -> None:
        self.commands.append(CloseChain())
        reason = f"{failure.where}: {failure.reason}"
        if self.chain_pending:
            self.chain_failure = failure
        elif failure.fatal:
            self.end(1, reason)
        elif not (self.ending or self.finished):
            self.commands += [Say(f"tunnel down ({reason}); holding your protected traffic "
                                  "and reconnecting"), Reconnect()]

    # -- the end
    def end(self, status: int, reason: str, unregister: bool = True) -> None:
        """End the VPN: CLOSE to the server, UNREGISTER to pvpn-client (protection removed)."""
        if self.finished:
            return
        self.ending = True
        if self.chain is not None and self.chain.up:
            self.chain.close(reason)  # CLOSE to the server, through the chain
        self.commands.append(CloseChain())
        self._end_locally(status, reason, unregister)


# ---------------------------------------------------------------- the user's process as agent


#: Signatures the agent gives in a burst, and per second after it: a chain of the most hops
#: authenticates, fails and is built again a few times, and every node re-authenticates at
#: most every 10 s; a pvpn-client asking faster is refused (each answer costs an RSA
#: signature of the user's process).
AGENT_BURST = 2 * DEFAULT_HOPS
AGENT_RATE = 1.0
#: The largest challenge and TLS binding a SIGN may carry (a node's nonce is 32 bytes, the
#: binding 32).
MAX_SIGNED_INPUT = 64

#: (challenge, binding, user, node) -> signature: auth.sign_challenge with the user's key.
KeySigner = Callable[[bytes, bytes, str, str], bytes]


class SigningAgent:
    """The user's private key as pvpn-client may use it (like ssh-agent): a SIGN request
    is answered with ``auth.sign_challenge(key, challenge, binding, user, node)`` for the
    agent's own user only, so pvpn-client can obtain nothing but pvpn-auth signatures of
    this user, bound to the TLS session it names; at most AGENT_BURST in a burst and
    AGENT_RATE a second after it. The key never leaves the user's process."""

    def __init__(self, user: str, sign: KeySigner) -> None:
        self.user = user
        self._sign = sign
        self._tokens = float(AGENT_BURST)
        self._refilled: float | None = None
        self.signed = 0
        self.refused = 0

    def answer(self, fields: Mapping[str, Any], now: float) -> dict[str, Any]:
        """SIGNED's fields for a SIGN's: the signature, or why it is refused."""
        reason = self._refusal(fields, now)
        if reason is not None:
            self.refused += 1
            return {"id": fields["id"], "signature": b"", "refused": reason}
        self.signed += 1
        return {"id": fields["id"], "signature": self._sign(
            fields["challenge"], fields["binding"], self.user, fields["node"]), "refused": ""}

    def _refusal(self, fields: Mapping[str, Any], now: float) -> str | None:
        if fields["user"] != self.user:
            return (f"asked to sign as {fields['user'][:64]!r}; this process signs for "
                    f"{self.user!r} only")
        challenge, binding = fields["challenge"], fields["binding"]
        if not 16 <= len(challenge) <= MAX_SIGNED_INPUT or \
                not 16 <= len(binding) <= MAX_SIGNED_INPUT:
            return "a challenge or TLS binding of an impossible size"
        if not NODE_NAME.fullmatch(fields["node"]):
            return "a node name that is not one"
        if self._refilled is None:
            self._refilled = now
        tokens = min(float(AGENT_BURST), self._tokens + (now - self._refilled) * AGENT_RATE)
        self._refilled = now
        if tokens < 1.0:
            self._tokens = tokens
            return (f"asked for signatures far faster than a chain needs (more than "
                    f"{AGENT_BURST} at once, {AGENT_RATE:g} a second after)")
        self._tokens = tokens - 1.0
        return None


class UserAgent(_ClientSide):
    """`pvpn connect` when pvpn-client holds the chain: the session's agent, sans-IO. It
    registers with everything pvpn-client needs to build the chain (REGISTER), answers SIGN
    with its :class:`SigningAgent`, tells the user what the chain does (NOTICE), writes the
    copies of packets pvpn-client sends when a capture was asked for, and ends the VPN
    (UNREGISTER: pvpn-client sends CLOSE to the server and removes the protection).

    Driven by :meth:`local_opening`, :meth:`local_opened`, :meth:`receive_local`,
    :meth:`local_lost` and :meth:`end`; bytes from :meth:`local_to_send`; commands (Say,
    Capture, CloseLocalLink, Reregister, Finish) in :attr:`commands`."""

    def __init__(self, uid: int, session: bytes, register: Mapping[str, Any],
                 agent: SigningAgent) -> None:
        super().__init__(uid, session, register)
        self.agent = agent
        self.up: dict[str, Any] | None = None  # the first NOTICE up: the VPN is up
        self.failure: str | None = None  # the first chain failed: the VPN never came up
        self.ending = False
        self.finished = False

    def local_opening(self) -> None:
        self.channel = LocalChannel()
        self._local_out.clear()
        self.registered = self.refused = None
        self.unregistered = False

    def local_opened(self) -> None:
        self.local_open = True
        fields = dict(self._register, session=self.session)
        if self.token:
            fields["token"] = self.token  # pvpn-client resumes the server's session
        self._local_control(MsgType.REGISTER, fields)


    def receive_local(self, data: bytes, now: float) -> None:
        captured: list[bytes] = []
        try:
            for envelope in self.channel.receive(data):
                if envelope.type is MsgType.PACKET:
                    captured.append(envelope.body)
                    continue
                fields = decode_control(envelope)
                if envelope.type is MsgType.SIGN:
                    answer = self.agent.answer(fields, now)
                    if answer["refused"]:
                        self.commands.append(Say(f"refused to sign for pvpn-client: "
                                                 f"{answer['refused']}"))
                    self._local_control(MsgType.SIGNED, answer)
                elif envelope.type is MsgType.NOTICE:
                    self._notice(fields)
                else:
                    self._answer(envelope.type, fields)
        except RemoteProtocolError as exc:
            self.commands += [Say(f"garbage from pvpn-client: {exc}"), CloseLocalLink()]
        if captured:
            self.commands.append(Capture(captured))

    def _notice(self, fields: dict[str, Any]) -> None:
        event, reason = fields["event"], fields["reason"]
        if event == "up":
            session, token = fields.get("session", b""), fields.get("token", b"")
            if len(session) == 16:
                self.session = session
            if token:
                self.token = token
            if self.up is None:
                self.up = fields
            else:
                state = "resumed" if fields.get("resumed") else "re-established as a new session"
                self.commands.append(Say(f"session {self.session.hex()} {state}"))
        elif event == "down":
            self.commands.append(Say(f"tunnel down ({reason}); holding your protected "
                                     "traffic and reconnecting"))
        elif event == "retry":
            self.commands.append(Say(f"reconnect failed: {reason}; retrying"))
        elif event == "failed":
            if self.up is None:
                self.failure = reason
            elif not (self.ending or self.finished):
                self.end(1, reason)

    def end(self, status: int, reason: str, unregister: bool = True) -> None:
        """End the VPN: UNREGISTER (pvpn-client sends CLOSE to the server, through the chain,
        and removes the protection)."""
        if self.finished:
            return
        self.ending = True
        self._end_locally(status, reason, unregister)
