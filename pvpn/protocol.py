"""The pvpn link protocol as sans-IO state machines (after aioquic and h11).

A *link* is one TLS session between the user's process and a node. Over it:

    user                                   node
    HELLO {user, want, resume, token}  ->
                                       <-  CHALLENGE {nonce, node}
    AUTH {signature}                   ->      signature over nonce + TLS binding (auth.py)
                                       <-  ACCEPT {token, allow, resumed} | REFUSE {code, reason}
    PACKET / KEEPALIVE / CLOSE         <->

:class:`UserLink` is the user's end; :class:`ServerNode` is the server with all its links,
sessions and the NAT flow table. Inputs carry ``now``; outputs are commands collected in
``commands`` for one dispatcher to carry out. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence, Union

from pvpn import packet as pk
from pvpn.addresses import Destinations, Local, exclusion
from pvpn.config import Network, ServerConfig, UserPolicy, parse_prefix
from pvpn.drops import Drop, DropCounter
from pvpn.envelope import (
    DEFAULT_HOPS,
    MAX_PACKET,
    Envelope,
    EnvelopeDecoder,
    MsgType,
    Sequencer,
    decode_control,
    encode_control,
    encode_envelope,
)
from pvpn.errors import (
    AuthError,
    CertificateError,
    ConfigError,
    FlowTableFull,
    LocalProtocolError,
    MalformedFrame,
    MalformedPacket,
    RemoteProtocolError,
)
from pvpn.flowtable import FlowRefused, FlowTable
from pvpn.records import Record, session_hex


class TlsLike(Protocol):
    """What the protocol needs of a TLS session (pvpn.tls.TlsSession provides it)."""

    @property
    def handshake_complete(self) -> bool: ...
    def receive_data(self, data: bytes) -> None: ...
    def read(self) -> bytes: ...
    def send(self, data: bytes) -> None: ...
    def data_to_send(self) -> bytes: ...
    def binding(self) -> bytes: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------- commands (node -> dispatcher)


@dataclass(slots=True)
class SendBytes:
    link: int
    data: bytes


@dataclass(slots=True)
class CloseLink:
    link: int


@dataclass(slots=True)
class InjectPacket:
    """Send this IP packet into the server's network (raw socket)."""

    packet: bytes


@dataclass(slots=True)
class LogRecord:
    record: Record


@dataclass(slots=True)
class CapturePacket:
    """Write this inner packet of ``session`` to its capture (server ``capture`` on only)."""

    session: bytes
    packet: bytes


Command = Union[SendBytes, CloseLink, InjectPacket, LogRecord, CapturePacket]


# ---------------------------------------------------------------- destination matching


class PrefixSet:
    """Fast membership test of packed addresses in a list of prefixes (hot path)."""

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = list(networks)
        self._v4 = [(int(n.network_address), int(n.netmask)) for n in self.networks if n.version == 4]
        self._v6 = [(int(n.network_address), int(n.netmask)) for n in self.networks if n.version == 6]

    def contains(self, address: bytes) -> bool:
        value = int.from_bytes(address, "big")
        table = self._v4 if len(address) == 4 else self._v6
        for net, mask in table:
            if value & mask == net:
                return True
        return False


# ---------------------------------------------------------------- the user's end of a link


class LinkState(enum.Enum):
    HELLO_SENT = "hello-sent"
    AUTH_SENT = "auth-sent"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(slots=True)
class LinkEstablished:
    session: bytes
    token: bytes
    allow: list[str]
    node: str
    resumed: bool


@dataclass(slots=True)
class LinkRefused:
    code: str
    reason: str


@dataclass(slots=True)
class PacketsReceived:
    packets: list[bytes]


@dataclass(slots=True)
class DataReceived:
    """Opaque bytes relayed by a gateway: the ciphertext of the next hop's link."""

    data: bytes


@dataclass(slots=True)
class LinkClosed:
    reason: str
    fatal: bool = False  # retrying can't help (the node's certificate was refused)


LinkEvent = Union[LinkEstablished, LinkRefused, PacketsReceived, DataReceived, LinkClosed]
Signer = Callable[[bytes, bytes, str], bytes]  # (challenge, binding, node) -> signature


class UserLink:
    """The user's end of one link: says hello, answers the challenge, then carries packets
    (to a server) or the next hop's ciphertext (through a gateway, in DATA envelopes).

    Driven by :meth:`receive_data` (ciphertext from the node), :meth:`send_packets` and
    :meth:`send_data`; its ciphertext output is taken with :meth:`data_to_send`. The session
    id is proposed by the user so every hop of a chain logs the same one.
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
        keepalive: float = 10.0,
        dead_after: float = 30.0,
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
        self._pending.append(encode_envelope(
            MsgType.HELLO, session, uid, self._seq.take(), encode_control({
                "user": user, "want": list(want), "token": token, "client": client_name,
                "next": next_hop, "path": list(path),
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
        if self._pending:
            # One TLS write for everything waiting: fewer records, fewer syscalls.
            self.tls.send(b"".join(self._pending))
            self._pending.clear()
            self._last_sent = now
        return self.tls.data_to_send()

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
                for envelope in self._decoder.feed(plaintext):
                    if envelope.type is MsgType.PACKET:
                        if self.state is LinkState.ESTABLISHED:
                            packets.append(envelope.body)
                            self.bytes_in += len(envelope.body)
                        continue
                    if envelope.type is MsgType.DATA:
                        if self.state is LinkState.ESTABLISHED:
                            relayed.append(envelope.body)
                        continue
                    if packets:
                        events.append(PacketsReceived(packets))
                        packets = []
                    if relayed:
                        events.append(DataReceived(b"".join(relayed)))
                        relayed = []
                    event = self._control(envelope)
                    if event is not None:
                        events.append(event)
                if packets:
                    events.append(PacketsReceived(packets))
                if relayed:
                    events.append(DataReceived(b"".join(relayed)))
        except CertificateError as exc:
            self.state = LinkState.CLOSED
            events.append(LinkClosed(f"node certificate refused: {exc}", fatal=True))
        except RemoteProtocolError as exc:
            self.state = LinkState.CLOSED
            events.append(LinkClosed(f"{type(exc).__name__}: {exc}"))
        return events

    def _control(self, envelope: Envelope) -> LinkEvent | None:
        mtype = envelope.type
        if mtype is MsgType.KEEPALIVE:
            self._send_control(MsgType.KEEPALIVE_ACK, {})
            return None
        if mtype is MsgType.KEEPALIVE_ACK:
            return None
        fields = decode_control(envelope)
        if mtype is MsgType.CHALLENGE and self.state is LinkState.HELLO_SENT:
            signature = self._signer(fields["nonce"], self.tls.binding(), fields["node"])
            self._send_control(MsgType.AUTH, {"signature": signature})
            self.state = LinkState.AUTH_SENT
            return None
        if mtype is MsgType.ACCEPT and self.state is LinkState.AUTH_SENT:
            if len(envelope.session) != 16:
                raise MalformedFrame("ACCEPT without a session id")
            self.session = envelope.session
            self.state = LinkState.ESTABLISHED
            return LinkEstablished(
                envelope.session, fields["token"], [str(a) for a in fields["allow"]],
                fields["node"], fields["resumed"],
            )
        if mtype is MsgType.REFUSE:
            self.state = LinkState.CLOSED
            return LinkRefused(fields["code"], fields["reason"])
        if mtype is MsgType.CLOSE:
            self.state = LinkState.CLOSED
            return LinkClosed(f"node closed the session: {fields['reason']}")
        raise MalformedFrame(f"unexpected {mtype.name} in state {self.state.value}")

    def handle_timer(self, now: float) -> LinkEvent | None:
        """Keepalives out; a silent node is declared dead after ``dead_after`` seconds."""
        if self.state is LinkState.CLOSED:
            return None
        if now - self._last_received > self.dead_after:
            self.state = LinkState.CLOSED
            return LinkClosed(f"no word from the node for {self.dead_after:.0f} s (keepalive)")
        if self.state is LinkState.ESTABLISHED and now - self._last_sent >= self.keepalive:
            self._send_control(MsgType.KEEPALIVE, {})
        return None


# ---------------------------------------------------------------- nodes: the shared part


class NodeLinkState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(slots=True)
class Session:
    """One user's personal VPN at the server; outlives its link for ``resume_grace``.

    ``allow`` is where its packets may go (what the user asked for and the policy allows, less
    the special and own addresses the policy does not name), precomputed for the packet path.
    ``drops`` counts dropped packets by fixed code and rate-limits their records.
    """

    id: bytes
    token: bytes
    user: str
    uid: int
    client: str
    peer: str
    allow: Destinations
    opened: float
    link: int | None = None
    detached_since: float | None = None
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    drops: DropCounter = field(default_factory=DropCounter)


@dataclass(slots=True)
class NodeLink:
    """A node's end of one user's link (one TLS session over one TCP connection)."""

    id: int
    tls: TlsLike
    peer: str
    opened: float
    state: NodeLinkState = NodeLinkState.AWAIT_HELLO
    decoder: EnvelopeDecoder = field(default_factory=EnvelopeDecoder)
    seq: Sequencer = field(default_factory=Sequencer)
    pending: list[bytes] = field(default_factory=list)
    # What the user said in HELLO.
    user: str = ""
    uid: int = -1
    client: str = ""
    want: list[Network] = field(default_factory=list)
    session_id: bytes = b""  # proposed by the user, or resumed
    token: bytes | None = None
    next_hop: str | None = None
    path: list[str] = field(default_factory=list)
    hops: int = 0
    nonce: bytes = b""
    session: Session | None = None  # the server's session once established
    last_received: float = 0.0
    last_sent: float = 0.0
    # The socket's send buffer is above its high-water mark: drop packets before encryption,
    # like a router's full queue, instead of buffering without bound (TCP inside backs off).
    congested: bool = False
    # Counters for the hop records.
    envelopes_in: int = 0
    envelopes_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def closed(self) -> bool:
        return self.state is NodeLinkState.CLOSED


class KeyLookup(Protocol):
    def keys_for(self, user: str) -> list[Any]: ...


Verifier = Callable[[list[Any], bytes, bytes, bytes, str, str], object]


class NodeBase:
    """What every node does with its users' links: the HELLO / CHALLENGE / AUTH exchange,
    keepalives, dead-peer detection, one TLS write per link per batch, and hop records.
    Subclasses say what happens once a user is authenticated and what envelopes carry."""

    MAX_LINKS = 4096
    role = "node"

    def __init__(self, name: str, keys: KeyLookup, verify: Verifier,
                 random: Callable[[int], bytes], keepalive: float, dead_after: float) -> None:
        self.name = name
        self._keys = keys
        self._verify = verify
        self._random = random
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.links: dict[int, NodeLink] = {}
        self.commands: list[Command] = []
        self._dirty: set[int] = set()

    # -- helpers
    def _log(self, event: str, link: NodeLink | None = None, session: Session | None = None,
             **kw: object) -> None:
        rec = Record(event=event)
        if session is not None:
            rec.session, rec.user, rec.uid, rec.peer = (
                session_hex(session.id), session.user, session.uid, session.peer)
        elif link is not None:
            rec.user, rec.peer = link.user, link.peer
            rec.session = session_hex(link.session_id)
            rec.uid = link.uid if link.uid >= 0 else None
        for key, value in kw.items():
            if hasattr(rec, key) and key != "extra":
                setattr(rec, key, value)
            else:
                rec.extra[key] = value
        self.commands.append(LogRecord(rec))

    def _send(self, link: NodeLink, mtype: MsgType, session: bytes, body: bytes) -> None:
        link.pending.append(encode_envelope(mtype, session, link.uid, link.seq.take(), body))
        link.envelopes_out += 1
        self._dirty.add(link.id)

    def _refuse(self, link: NodeLink, code: str, reason: str, log_reason: str) -> None:
        self._send(link, MsgType.REFUSE, b"", encode_control({"code": code, "reason": reason}))
        self._log("auth:refused", link, reason=log_reason, code=code)
        self._close_link(link)

    def _close_link(self, link: NodeLink) -> None:
        if link.closed:
            return
        link.state = NodeLinkState.CLOSED
        self.flush_link(link)
        self.commands.append(CloseLink(link.id))

    # -- inputs
    def link_opened(self, link_id: int, tls: TlsLike, peer: str, now: float) -> bool:
        """A TCP connection arrived. False if the node is full (the adapter closes it)."""
        if len(self.links) >= self.MAX_LINKS:
            self._log("link:refused", peer=peer, reason="too many links")
            return False
        self.links[link_id] = NodeLink(link_id, tls, peer, now, last_received=now, last_sent=now)
        self._log("link:opened", peer=peer)
        return True

    def receive_data(self, link_id: int, data: bytes, now: float) -> None:
        link = self.links.get(link_id)
        if link is None or link.closed:
            return
        link.last_received = now
        try:
            link.tls.receive_data(data)
            plaintext = link.tls.read()
            if plaintext:
                for envelope in link.decoder.feed(plaintext):
                    if link.closed:
                        break
                    link.envelopes_in += 1
                    mtype = envelope.type
                    if mtype is MsgType.PACKET and link.state is NodeLinkState.ESTABLISHED:
                        self._on_packet(link, envelope.body, now)
                    elif mtype is MsgType.DATA and link.state is NodeLinkState.ESTABLISHED:
                        link.bytes_in += len(envelope.body)
                        self._on_data(link, envelope.body, now)
                    else:
                        self._control(link, envelope, now)
        except RemoteProtocolError as exc:
            # Garbage from one peer closes that link only; everyone else is served on.
            self._log("link:error", link, link.session, reason=f"{type(exc).__name__}: {exc}")
            self._close_link(link)
        self.flush_link(link)

    def link_congested(self, link_id: int, congested: bool) -> None:
        link = self.links.get(link_id)
        if link is not None:
            link.congested = congested

    def link_lost(self, link_id: int, now: float, reason: str = "connection closed") -> None:
        link = self.links.pop(link_id, None)
        if link is None:
            return
        self._dirty.discard(link_id)
        self._on_link_lost(link, now, reason)
        self._log("link:closed", link, reason=reason)

    # -- control messages
    def _control(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        mtype = envelope.type
        if mtype is MsgType.KEEPALIVE:
            self._send(link, MsgType.KEEPALIVE_ACK, envelope.session, encode_control({}))
            return
        if mtype is MsgType.KEEPALIVE_ACK:
            return
        fields = decode_control(envelope)
        if mtype is MsgType.HELLO and link.state is NodeLinkState.AWAIT_HELLO:
            self._hello(link, envelope, fields)
        elif mtype is MsgType.AUTH and link.state is NodeLinkState.AWAIT_AUTH:
            self._auth(link, fields["signature"], now)
        elif mtype is MsgType.CLOSE and link.state is NodeLinkState.ESTABLISHED:
            self._on_close(link, str(fields["reason"]), now)
            self._close_link(link)
        else:
            raise MalformedFrame(f"unexpected {mtype.name} in state {link.state.value}")

    def _hello(self, link: NodeLink, envelope: Envelope, fields: dict[str, Any]) -> None:
        link.user = str(fields["user"])
        link.uid = envelope.uid
        link.client = str(fields["client"])
        link.session_id = envelope.session
        link.hops = envelope.hops
        want, path, next_hop = fields["want"], fields["path"], fields["next"]
        if not all(isinstance(w, str) for w in want) or len(want) > 64:
            raise MalformedFrame("HELLO 'want' must be a list of at most 64 prefixes")
        if not all(isinstance(p, str) for p in path) or len(path) > 64:
            raise MalformedFrame("HELLO 'path' must be a list of node names")
        if next_hop is not None and not isinstance(next_hop, str):
            raise MalformedFrame("HELLO 'next' must be a string or nil")
        try:
            link.want = [parse_prefix(w) for w in want]
        except ConfigError as exc:
            raise MalformedFrame(str(exc)) from None
        link.path, link.next_hop = list(path), next_hop
        token = fields["token"]
        link.token = token if isinstance(token, bytes) else None
        # Always challenge, known user or not, so a probe learns nothing about who exists.
        link.nonce = self._random(32)
        self._send(link, MsgType.CHALLENGE, b"",
                   encode_control({"nonce": link.nonce, "node": self.name}))
        link.state = NodeLinkState.AWAIT_AUTH

    def _auth(self, link: NodeLink, signature: bytes, now: float) -> None:
        generic = (f"user {link.user!r} is not authorised with this key at {self.name}; "
                   "ask its administrator to install your public key")
        try:
            keys = self._keys.keys_for(link.user)
            self._verify(keys, signature, link.nonce, link.tls.binding(), link.user, self.name)
        except AuthError as exc:
            self._refuse(link, "auth-failed", generic, str(exc))
            return
        if self.name in link.path:
            # A chain that comes back to a node it already crossed would loop.
            self._refuse(link, "loop", f"the chain {' > '.join(link.path + [self.name])} "
                         f"visits {self.name} twice; remove the repeated hop", "looped chain")
            return
        self._authorized(link, now)

    # -- what subclasses decide
    def _authorized(self, link: NodeLink, now: float) -> None:
        raise NotImplementedError

    def _on_packet(self, link: NodeLink, packet: bytes, now: float) -> None:
        raise MalformedFrame(f"a {self.role} does not take PACKET envelopes")

    def _on_data(self, link: NodeLink, data: bytes, now: float) -> None:
        raise MalformedFrame(f"a {self.role} does not take DATA envelopes")

    def _on_close(self, link: NodeLink, reason: str, now: float) -> None:
        pass

    def _on_link_lost(self, link: NodeLink, now: float, reason: str) -> None:
        pass

    # -- output and time
    def flush_link(self, link: NodeLink, now: float | None = None) -> None:
        if link.pending:
            link.tls.send(b"".join(link.pending))
            link.pending.clear()
            if now is not None:
                link.last_sent = now
        data = link.tls.data_to_send()
        if data:
            self.commands.append(SendBytes(link.id, data))
        self._dirty.discard(link.id)

    def flush(self, now: float | None = None) -> None:
        """One TLS write per link for everything queued since the last flush."""
        for link_id in list(self._dirty):
            link = self.links.get(link_id)
            if link is not None:
                self.flush_link(link, now)
        self._dirty.clear()

    def _link_timers(self, now: float) -> None:
        for link in list(self.links.values()):
            if link.closed:
                continue
            if now - link.last_received > self.dead_after:
                self._log("link:dead", link, link.session,
                          reason=f"no word for {self.dead_after:.0f} s (keepalive)")
                self._close_link(link)
            elif link.state is not NodeLinkState.ESTABLISHED and now - link.opened > 15.0:
                self._log("link:error", link, reason="authentication took too long")
                self._close_link(link)
            elif link.state is NodeLinkState.ESTABLISHED and now - link.last_sent >= self.keepalive:
                self._send(link, MsgType.KEEPALIVE, link.session_id, encode_control({}))
                link.last_sent = now

    def _accept(self, link: NodeLink, session_id: bytes, token: bytes, allow: list[str],
                resumed: bool) -> None:
        link.state = NodeLinkState.ESTABLISHED
        link.session_id = session_id
        self._send(link, MsgType.ACCEPT, session_id, encode_control({
            "token": token, "allow": allow, "node": self.name, "resumed": resumed}))


# ---------------------------------------------------------------- the server


class ServerNode(NodeBase):
    """The server: authenticates users, NATs their packets, routes each reply to its session.

    Inputs: :meth:`link_opened`, :meth:`receive_data`, :meth:`link_lost`,
    :meth:`receive_reply` (a packet captured on its way back), :meth:`handle_timer`.
    Outputs: :attr:`commands`, and :meth:`flush` for the ciphertext of every link.
    """

    role = "server"
    # The server's own addresses (pvpn.io.localaddrs), kept out of every session's
    # destinations unless its policy names them; set with set_local_addresses.
    local_addresses: Local = frozenset()

    def __init__(
        self,
        config: ServerConfig,
        keys: KeyLookup,
        verify: Verifier,
        source_for: Callable[[bytes], bytes],
        random: Callable[[int], bytes] = os.urandom,
        flows: FlowTable | None = None,
    ) -> None:
        super().__init__(config.name, keys, verify, random, config.keepalive, config.dead_after)
        self.config = config
        self._source_for = source_for
        self.flows = flows or FlowTable.for_config(config)
        self.sessions: dict[bytes, Session] = {}
        # Emit CapturePacket for every inner packet: what the user sent, the replies returned.
        self.capture = False

    def _authorized(self, link: NodeLink, now: float) -> None:
        if link.next_hop is not None:
            self._refuse(link, "not-a-gateway", f"{self.name} is a server, not a gateway: it "
                         f"can't forward to {link.next_hop}; put it last in the chain",
                         "asked to forward")
            return
        policy: UserPolicy | None = self.config.users.get(link.user)
        if policy is None or not policy.allow:
            self._refuse(link, "no-destinations",
                         f"user {link.user!r} may reach no destination through {self.name}; "
                         "ask its administrator to add a [users.NAME] allow list",
                         "no [users] policy")
            return
        denied = [str(n) for n in link.want if not policy.permits(n)]
        if denied or not link.want:
            allowed = ", ".join(str(n) for n in policy.allow)
            self._refuse(link, "destination-not-allowed",
                         f"{', '.join(denied) or 'no destination'} not allowed for "
                         f"{link.user!r} at {self.name} (allowed: {allowed})",
                         f"denied destinations {denied}")
            return
        excluded = [why for why in (exclusion(n, policy.allow, self.local_addresses)
                                    for n in link.want) if why is not None]
        if excluded:
            self._refuse(link, "destination-not-allowed",
                         f"{'; '.join(excluded)}: {self.name} takes no user there unless the "
                         f"allow list of {link.user!r} names it", f"special destinations {excluded}")
            return
        allow = Destinations(link.want, policy.allow, self.local_addresses)
        session, resumed = None, False
        old = self.sessions.get(link.session_id)
        if old is not None and link.token is not None:
            if old.user == link.user and old.token == link.token:
                session, resumed = old, True
                if old.link is not None and old.link in self.links:
                    self._close_link(self.links[old.link])
                # What it asks for now (and the policy now allows); mappings outside it go.
                self._narrow(old, policy, link.want)
        if session is None and not self._room_for_session(link):
            return
        if session is None:
            # The user's proposed id (so all hops log the same one), unless it is taken.
            sid = link.session_id
            if len(sid) != 16 or sid in self.sessions:
                sid = self._random(16)
            session = Session(
                id=sid, token=self._random(16), user=link.user, uid=link.uid,
                client=link.client, peer=link.peer, allow=allow, opened=now,
            )
            self.sessions[session.id] = session
        session.link, session.detached_since, session.peer = link.id, None, link.peer
        link.session = session
        self._accept(link, session.id, session.token, [str(n) for n in link.want], resumed)
        self._log("session:resumed" if resumed else "session:opened", session=session,
                  client=link.client, allow=[str(n) for n in link.want], path=link.path,
                  tls=getattr(link.tls, "version", ""))

    def _room_for_session(self, link: NodeLink) -> bool:
        """At most ``sessions_per_user`` sessions per user (OpenSSH's MaxSessions default, 10):
        a new one ends the user's session detached longest ago, or is refused if all are live.
        A user reconnecting without resuming so cannot pile up sessions, mappings or captures,
        and never locks themselves out."""
        limit = self.config.sessions_per_user
        mine = [s for s in self.sessions.values() if s.user == link.user]
        if len(mine) < limit:
            return True
        detached = sorted((s for s in mine if s.detached_since is not None),
                          key=lambda s: s.detached_since or 0.0)
        excess = len(mine) - limit + 1
        if len(detached) < excess:
            self._refuse(link, "too-many-sessions",
                         f"user {link.user!r} has {len(mine)} sessions at {self.name}, the most "
                         "one user may have; end one (pvpn disconnect) and try again",
                         f"{len(mine)} sessions already")
            return False
        for session in detached[:excess]:
            self._end_session(session, f"replaced by a new session of {session.user!r}, who had "
                              f"{len(mine)} sessions, the most one user may have")
        return True

    def _on_close(self, link: NodeLink, reason: str, now: float) -> None:
        if link.session is not None:
            self._end_session(link.session, f"closed by the user: {reason}")

    def _on_link_lost(self, link: NodeLink, now: float, reason: str) -> None:
        session = link.session
        if session is not None and session.link == link.id:
            session.link = None
            session.detached_since = now
            self._log("session:detached", session=session, reason=reason)

    def _on_packet(self, link: NodeLink, packet: bytes, now: float) -> None:
        if link.session is not None:
            self._packet_from_user(link.session, packet, now)

    def _end_session(self, session: Session, reason: str) -> None:
        self.sessions.pop(session.id, None)
        session.link = None  # ended, not detached: its link closing later changes nothing
        flows = self.flows.drop_session(session.id)
        self._log("session:closed", session=session, reason=reason,
                  packets_in=session.packets_in, packets_out=session.packets_out,
                  bytes_in=session.bytes_in, bytes_out=session.bytes_out,
                  drops=session.drops.as_dict(), flows=len(flows))

    def _drop(self, session: Session, drop: Drop, now: float, flow: pk.FlowKey | None = None,
              detail: str = "") -> None:
        """Count a dropped packet under its fixed code; log it if the session's drop counter
        says so (the first of each code, then a few per second). The flow, which the user
        chooses, goes in the record's own field, described only when it is logged."""
        count = session.drops.count(drop, now)
        if not count:
            return
        extra: dict[str, Any] = {"count": count}
        unlogged = session.drops.take_unlogged()
        if unlogged:
            extra["unlogged"] = unlogged
        if detail:
            extra["detail"] = detail
        self._log("packet:dropped", session=session, reason=drop.value,
                  flow=flow.describe() if flow is not None else "", **extra)

    # -- the packet path
    def _packet_from_user(self, session: Session, packet: bytes, now: float) -> None:
        if self.capture:  # as the user sent it: before the checks and the NAT
            self.commands.append(CapturePacket(session.id, packet))
        try:
            flow, flags, error = pk.classify(packet, True)
        except pk.IpOptions:
            self._drop(session, Drop.IP_OPTIONS, now)
            return
        except MalformedPacket as exc:
            self._drop(session, Drop.MALFORMED_PACKET, now, detail=str(exc))
            return
        if error:
            # The client host's kernel answering a reply it could not deliver (a closed port):
            # it quotes the reply, so the flow it is about is the quote's, reversed. Only a
            # flow the session already has may carry it; it never opens one. It is judged on
            # what it is (type, length, outer addresses), not only on the flow it names.
            mine = flow.reversed()
            refusal = pk.sent_icmp_error_refusal(packet)
            if refusal is not None:
                self._drop(session, Drop.ICMP_ERROR_REFUSED, now, mine, refusal)
                return
            entry = self.flows.lookup(session.id, mine)
            if entry is None:
                self._drop(session, Drop.ICMP_ERROR_NO_FLOW, now, mine)
                return
        elif not session.allow.contains(flow.dst):
            self._drop(session, Drop.DESTINATION_SPECIAL if session.allow.covers(flow.dst)
                       else Drop.DESTINATION_NOT_ALLOWED, now, flow)
            return
        else:
            try:
                entry = self.flows.outbound(session.id, flow, self._source_for(flow.dst), now,
                                            flags, session.user)
            except FlowRefused as exc:
                self._drop(session, exc.drop, now, flow, str(exc))
                return
            except FlowTableFull as exc:
                self._drop(session, Drop.FLOW_TABLE_FULL, now, flow, str(exc))
                return
            except OSError as exc:
                self._drop(session, Drop.NO_ROUTE, now, flow, str(exc.strerror or exc))
                return
        session.packets_out += 1
        session.bytes_out += len(packet)
        self.commands.append(InjectPacket(pk.rewrite_source(packet, entry.nat_src, entry.nat_port)))

    def receive_reply(self, packet: bytes, now: float) -> bool:
        """A packet captured on its way in. True if it was ours (the adapter drops it from the
        kernel's path); False if it belongs to someone else on this host (accept it)."""
        try:
            flow, flags, error = pk.classify(packet, True)
        except pk.IpOptions:
            return self._refused_reply(packet, Drop.IP_OPTIONS, now)
        except MalformedPacket:
            return False
        if error:  # about a packet the server sent for a session: the quote is that packet
            entry = self.flows.find_reply(flow.proto, flow.dst, flow.dport, flow.src, flow.sport)
            if entry is None:
                return False
            refusal = pk.received_icmp_error_refusal(packet)
            if refusal is not None:
                owner = self.sessions.get(entry.session_id)
                if owner is not None:
                    self._drop(owner, Drop.REPLY_ICMP_REFUSED, now, entry.original, refusal)
                return True
        else:
            entry = self.flows.inbound(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                                       now, flags)
        if entry is None:
            return False
        session = self.sessions.get(entry.session_id)
        if session is None:
            return True
        if session.link is None:
            self._drop(session, Drop.SESSION_DETACHED, now, entry.original)
            return True
        link = self.links.get(session.link)
        if link is None:
            return True
        if link.congested:
            self._drop(session, Drop.LINK_CONGESTED, now, entry.original)
            return True
        reply = pk.rewrite_destination(packet, entry.original.src, entry.original.sport)
        if self.capture:  # as returned to the user: after the un-NAT
            self.commands.append(CapturePacket(session.id, reply))
        session.packets_in += 1
        session.bytes_in += len(reply)
        link.pending.append(
            encode_envelope(MsgType.PACKET, session.id, session.uid, link.seq.take(), reply))
        self._dirty.add(link.id)
        return True

    def _refused_reply(self, packet: bytes, drop: Drop, now: float) -> bool:
        """A packet the strict parse refused: ours (counted and dropped) if it answers a NAT
        mapping, else someone else's on this host (accepted)."""
        try:
            flow, _, error = pk.classify(packet)
        except MalformedPacket:
            return False
        if error:
            entry = self.flows.find_reply(flow.proto, flow.dst, flow.dport, flow.src, flow.sport)
        else:
            entry = self.flows.find_reply(flow.proto, flow.src, flow.sport, flow.dst, flow.dport)
        if entry is None:
            return False
        session = self.sessions.get(entry.session_id)
        if session is not None:
            self._drop(session, drop, now, entry.original)
        return True

    def apply_policy(self, users: dict[str, UserPolicy], now: float) -> None:
        """A reload's [users] apply to the live sessions too, not only to new ones: a session
        whose user has no allow list left ends (the user is told why, in a CLOSE); the others
        keep only what the new allow list still covers (less what it now excludes), and
        their mappings to destinations no longer allowed are dropped."""
        self.config.users = users
        for session in list(self.sessions.values()):
            policy = users.get(session.user)
            if policy is None or not policy.allow:
                self._end_live(session, f"the [users] policy of {session.user!r} at "
                               f"{self.name} was removed")
                continue
            kept = [n for n in _within(session.allow.networks, policy.allow)
                    if exclusion(n, policy.allow, self.local_addresses) is None]
            if not kept:
                self._end_live(session, f"none of its destinations is allowed any more at "
                               f"{self.name}")
                continue
            before = session.allow.networks
            flows = self.flows.sessions_flows(session.id)
            self._narrow(session, policy, kept)
            dropped = flows - self.flows.sessions_flows(session.id)
            if kept != _within(before, before) or dropped:
                self._log("session:narrowed", session=session, allow=[str(n) for n in kept],
                          was=[str(n) for n in before], flows=dropped,
                          reason="the [users] policy changed")

    def _end_live(self, session: Session, reason: str) -> None:
        """End a session the node no longer serves, telling its user why."""
        link = self.links.get(session.link) if session.link is not None else None
        if link is not None and link.state is NodeLinkState.ESTABLISHED:
            self._send(link, MsgType.CLOSE, session.id, encode_control({"reason": reason}))
        self._end_session(session, reason)
        if link is not None:
            self._close_link(link)

    def set_local_addresses(self, addresses: Local) -> None:
        """The server's own addresses changed (read at start, on reload, periodically):
        every session's destinations are computed again, and mappings to an address that
        became the server's own are dropped."""
        if addresses == self.local_addresses:
            return
        self.local_addresses = addresses
        for session in list(self.sessions.values()):
            policy = self.config.users.get(session.user)
            if policy is not None:
                self._narrow(session, policy, session.allow.networks)

    def _narrow(self, session: Session, policy: UserPolicy, networks: list[Network]) -> None:
        """Give ``session`` these prefixes under ``policy`` and the current own addresses,
        and drop its mappings to destinations it may no longer reach."""
        session.allow = Destinations(networks, policy.allow, self.local_addresses)
        allow = session.allow
        self.flows.drop_flows([f for f in self.flows.session_flows(session.id)
                               if not allow.contains(f.original.dst)])

    def handle_timer(self, now: float) -> None:
        self._link_timers(now)
        grace = self.config.resume_grace
        for session in list(self.sessions.values()):
            if session.detached_since is not None and now - session.detached_since > grace:
                self._end_session(session, f"not resumed within {grace:.0f} s")
        self.flows.expire(now)
        self.flush(now)

    def close_all(self, reason: str) -> None:
        for link in list(self.links.values()):
            if link.state is NodeLinkState.ESTABLISHED:
                self._send(link, MsgType.CLOSE, link.session_id, encode_control({"reason": reason}))
            self.flush_link(link)  # the CLOSE goes out before TLS's close_notify
            link.tls.close()
            self._close_link(link)
        for session in list(self.sessions.values()):
            self._end_session(session, reason)

    def describe(self, now: float) -> list[dict[str, Any]]:
        """The sessions, for `pvpn status` on this node."""
        return [{
            "session": s.id.hex(), "user": s.user, "uid": s.uid, "client": s.client,
            "peer": s.peer, "age": round(now - s.opened, 1),
            "state": "up" if s.link is not None else "detached (waiting for a resume)",
            "packets_out": s.packets_out, "packets_in": s.packets_in,
            "bytes_out": s.bytes_out, "bytes_in": s.bytes_in, "drops": s.drops.as_dict(),
            "flows": self.flows.sessions_flows(s.id),
            "allow": [str(n) for n in s.allow.networks], "excluded": s.allow.excluded(),
        } for s in self.sessions.values()]


def _within(networks: Iterable[Network], allowed: Iterable[Network]) -> list[Network]:
    """What of ``networks`` lies within ``allowed``: each network, or the allowed prefixes
    inside it, collapsed."""
    allowed = list(allowed)
    out: list[Network] = []
    for network in networks:
        for entry in allowed:
            if network.version != entry.version:
                continue
            if network.subnet_of(entry):  # type: ignore[arg-type]
                out.append(network)
            elif entry.subnet_of(network):  # type: ignore[arg-type]
                out.append(entry)
    v4 = [n for n in out if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in out if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def describe_networks(networks: Iterable[Network]) -> list[str]:
    return [str(n) for n in networks]


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


__all__ = [
    "CapturePacket", "Command", "CloseLink", "InjectPacket", "LinkClosed", "LinkEstablished",
    "LinkEvent",
    "LinkRefused", "LogRecord", "PacketsReceived", "PrefixSet", "SendBytes", "ServerNode",
    "UserLink", "LocalProtocolError",
]
