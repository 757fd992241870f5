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
import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from pvpn import fragments
from pvpn import packet as pk
from pvpn.addresses import Destinations, Local, exclusion
from pvpn.commands import CapturePacket, CloseLink, Command, InjectPacket, LogRecord, SendBytes
from pvpn.config import NodeLimits, Network, ServerConfig, UserPolicy, parse_prefix
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
    PvpnError,
    RemoteProtocolError,
)
from pvpn.events import (
    DataReceived, LinkClosed, LinkEstablished, LinkEvent, LinkRefused, PacketsReceived,
)
from pvpn.flowtable import FlowRefused, FlowTable
from pvpn.reset import tcp_reset
from pvpn.state import MAX_SESSIONS, SavedSession, ServerState, token_hash
from pvpn.records import (
    CLIENT_NAME, ENDPOINT, NODE_NAME, USER_NAME, Record, session_hex,
)
from pvpn.text import clip, quoted


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


#: Re-authentications a user's end answers in a burst, and the seconds that earn one more
#: (a node's shortest reauth_interval).
REAUTH_BURST = 8
REAUTH_REFILL = 10.0
Signer = Callable[[bytes, bytes, str], bytes]  # (challenge, binding, node) -> signature


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
        # What this hop carries: packets to the server, the next hop's ciphertext to a gateway.
        self.carries = MsgType.PACKET if next_hop is None else MsgType.DATA
        self.node = ""  # the node's name, once it has accepted us
        self.reauthenticated = 0  # answers to a node's CHALLENGE on the established link
        # A node challenges again at most every reauth_interval (10 s at least) and on a
        # reload, one challenge at a time; each answer costs an RSA signature, so a node (a
        # rogue gateway) asking faster than that could keep the user's process busy signing.
        self._reauth_tokens = float(REAUTH_BURST)
        self._reauth_refilled = 0.0
        self._broken = False  # the link failed: nothing more is sent on it
        self._unreported: str | None = None  # a failure on output, for handle_timer to tell
        self._pending.append(encode_envelope(
            MsgType.HELLO, session, uid, self._seq.take(), encode_control({
                "user": user, "want": list(want), "token": token,
                "client": client_host_name(client_name), "next": next_hop, "path": list(path),
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
        mtype = envelope.type
        if mtype is MsgType.KEEPALIVE:
            if not self.congested:  # a node that does not read gets no echo to pile up
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
        if mtype is MsgType.CHALLENGE and self.state is LinkState.ESTABLISHED:
            # Re-authentication: the same key, a fresh nonce, the same TLS session's binding.
            if fields["node"] != self.node:
                raise MalformedFrame("a CHALLENGE naming another node on an established link")
            tokens = min(float(REAUTH_BURST), self._reauth_tokens
                         + (now - self._reauth_refilled) / REAUTH_REFILL)
            self._reauth_refilled = now
            if tokens < 1.0:
                raise MalformedFrame(f"{self.node} asks for re-authentication far more often "
                                     "than a node does")
            self._reauth_tokens = tokens - 1.0
            signature = self._signer(fields["nonce"], self.tls.binding(), fields["node"])
            self._send_control(MsgType.AUTH, {"signature": signature})
            self.reauthenticated += 1
            return None
        if mtype is MsgType.ACCEPT and self.state is LinkState.AUTH_SENT:
            if len(envelope.session) != 16:
                raise MalformedFrame("ACCEPT without a session id")
            if not NODE_NAME.fullmatch(fields["node"]):
                raise MalformedFrame("ACCEPT with a node name that is not one")
            self.session = envelope.session
            self.node = fields["node"]
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


# ---------------------------------------------------------------- nodes: the shared part


class NodeLinkState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    AUTHENTICATED = "authenticated"  # the key verified; deciding, or connecting onward
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(slots=True)
class Session:
    """One user's personal VPN at the server; outlives its link for ``resume_grace``.

    ``allow`` is where its packets may go (what the user asked for and the policy allows, less
    the special and own addresses the policy does not name), precomputed for the packet path.
    ``drops`` counts dropped packets by fixed code and rate-limits their records.
    ``token_hash`` is what a resume's token is checked against (pvpn.state.token_hash), the
    one thing of the token a saved state keeps; ``token`` is empty in a session a restarted
    server put back, until its user resumes it.
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
    token_hash: bytes = b""


@dataclass(slots=True)
class NodeLink:
    """A node's end of one user's link (one TLS session over one TCP connection).

    The TLS session is made from ``make_tls`` when the peer's first bytes arrive (and the
    envelope decoder when its first plaintext does): a connection that never speaks costs a
    node no TLS state."""

    id: int
    tls: TlsLike | None
    peer: str
    opened: float
    make_tls: Callable[[], TlsLike] | None = None
    source: str = ""  # the address (IPv6: its /64) the pre-authentication limits count by
    state: NodeLinkState = NodeLinkState.AWAIT_HELLO
    decoder: EnvelopeDecoder | None = None
    seq: Sequencer = field(default_factory=Sequencer)
    pending: list[bytes] = field(default_factory=list)
    # What the user said in HELLO (validated: see NodeBase._hello).
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
    # Authentication: when the user last proved their key on this link (None: not yet), and
    # the challenge of a re-authentication under way (its nonce and deadline).
    authenticated_at: float | None = None
    reauth_nonce: bytes = b""
    reauth_deadline: float | None = None
    reauth_due: bool = False  # challenge again as soon as the link is established
    preauth: bool = False  # counted among the connections awaiting authentication
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

    @property
    def progress(self) -> int:
        """How far a connection got towards authentication: 0 silent, 1 in the TLS handshake,
        2 TLS up, 3 HELLO answered (waiting for AUTH). Eviction takes the least advanced."""
        if self.state is not NodeLinkState.AWAIT_HELLO:
            return 3
        if self.tls is None:
            return 0
        return 2 if self.tls.handshake_complete else 1


class KeyLookup(Protocol):
    def keys_for(self, user: str) -> list[Any]: ...


Verifier = Callable[[list[Any], bytes, bytes, bytes, str, str], object]
TlsFactory = Callable[[], TlsLike]

#: What a REFUSE or CLOSE reason carries at most (it may quote what the peer sent).
MAX_REASON = 1024
#: Entries of a HELLO's ``want`` (destination prefixes) and ``path`` (nodes before this one).
MAX_WANT = 64
MAX_PATH = 64
#: What a frame may hold before its link has authenticated: the largest HELLO (64 prefixes
#: and 64 node names) is under 9 KB, an AUTH under 3 KB.
MAX_PREAUTH_FRAME = 16384


def source_of(peer: str) -> str:
    """The pre-authentication limits' key for a peer ``host:port`` / ``[v6]:port``: the IPv4
    address, or the IPv6 address's /64 (as WireGuard's handshake rate limiter counts: one host
    has a whole /64 to choose from)."""
    host = peer
    if peer.startswith("[") and "]" in peer:
        host = peer[1:peer.index("]")]
    elif peer.count(":") == 1:
        host = peer.split(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def client_host_name(name: str) -> str:
    """The client host's name as a HELLO may carry it (records.CLIENT_NAME): what a node would
    refuse is replaced here, so an odd host name never locks its users out."""
    kept = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "_" for c in name)
    return kept[:64] or "client"


class RecordBudget:
    """A token bucket deciding which of a kind of record are written: a burst, then ``rate``
    a second; what it holds back is counted in :attr:`unlogged`. Time is passed in."""

    __slots__ = ("unlogged", "_burst", "_rate", "_tokens", "_refilled")

    def __init__(self, burst: float, rate: float) -> None:
        self.unlogged = 0
        self._burst, self._rate = burst, rate
        self._tokens, self._refilled = burst, 0.0

    def take(self, now: float) -> bool:
        tokens = min(self._burst, self._tokens + max(0.0, now - self._refilled) * self._rate)
        self._refilled = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        self.unlogged += 1
        return False


#: Records about connections that have not authenticated, of each kind (link:opened,
#: auth:refused, ...): per source (an address, an IPv6 /64) a burst of 20, then one a second,
#: and from all sources together 100, then 10 a second. A stranger's connection writes two or
#: three records; unbounded, a few minutes of connections from one host rotated a node's
#: whole log history away (issue 9 point 7).
STRANGER_RECORDS_PER_SOURCE = (20.0, 1.0)
STRANGER_RECORDS = (100.0, 10.0)


class NodeBase:
    """What every node does with its users' links: the HELLO / CHALLENGE / AUTH exchange,
    re-authentication of live links, keepalives, dead-peer detection, one TLS write per link
    per batch, hop records, and what a connection may cost before it has authenticated.
    Subclasses say what happens once a user is authenticated and what envelopes carry.

    A failure that belongs to one link (garbage from its peer, its TLS session failing on
    input or output) closes that link only: its pending output is dropped, it leaves every
    dirty set, and nothing is sent on it again."""

    MAX_LINKS = 4096
    role = "node"

    def __init__(self, name: str, keys: KeyLookup, verify: Verifier,
                 random: Callable[[int], bytes], keepalive: float, dead_after: float,
                 limits: NodeLimits | None = None) -> None:
        self.name = name
        self._keys = keys
        self._verify = verify
        self._random = random
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.limits = limits or NodeLimits()
        self.links: dict[int, NodeLink] = {}
        self.commands: list[Command] = []
        self._dirty: set[int] = set()
        # Connections awaiting authentication, by source, oldest first.
        self._preauth: dict[str, dict[int, None]] = {}
        self._preauth_count = 0
        self._evictions: dict[str, int] = {}  # per source, for rate-limited records
        self._closing: set[int] = set()  # closed by us, until the adapter says they are gone
        # Which records about strangers' connections are written (see STRANGER_RECORDS).
        self._stranger_records: dict[tuple[str, str], RecordBudget] = {}
        self._all_stranger_records: dict[str, RecordBudget] = {}
        self._now = 0.0  # the time of the latest input, for the record budgets

    # -- helpers
    def _log(self, event: str, link: NodeLink | None = None, session: Session | None = None,
             **kw: object) -> None:
        rec = Record(event=event)
        if session is None and (link is None or link.authenticated_at is None):
            # About a connection that has not authenticated: written within a budget.
            source = link.source if link is not None else source_of(str(kw.get("peer", "")))
            budget = self._stranger_records.get((source, event))
            if budget is None:
                if len(self._stranger_records) >= 4096:
                    self._stranger_records.clear()
                budget = self._stranger_records[(source, event)] = RecordBudget(
                    *STRANGER_RECORDS_PER_SOURCE)
            everyone = self._all_stranger_records.get(event)
            if everyone is None:
                everyone = self._all_stranger_records[event] = RecordBudget(*STRANGER_RECORDS)
            if not budget.take(self._now):
                return
            if not everyone.take(self._now):
                budget.unlogged += 1
                return
            if budget.unlogged:
                rec.extra["unlogged"], budget.unlogged = budget.unlogged, 0
        if session is not None:
            rec.session, rec.user, rec.uid, rec.peer = (
                session_hex(session.id), session.user, session.uid, session.peer)
        elif link is not None:
            rec.user, rec.peer = link.user, link.peer
            # Only an authenticated user's records join a session's trace: before that the
            # id is whatever a stranger's HELLO claimed, maybe someone else's.
            if link.authenticated_at is not None:
                rec.session = session_hex(link.session_id)
            rec.uid = link.uid if link.uid >= 0 else None
        for key, value in kw.items():
            if hasattr(rec, key) and key != "extra":
                setattr(rec, key, value)
            else:
                rec.extra[key] = value
        self.commands.append(LogRecord(rec))

    def _send(self, link: NodeLink, mtype: MsgType, session: bytes, body: bytes) -> None:
        if link.closed:
            return  # a closed link's output is over
        link.pending.append(encode_envelope(mtype, session, link.uid, link.seq.take(), body))
        link.envelopes_out += 1
        self._dirty.add(link.id)

    def _refuse(self, link: NodeLink, code: str, reason: str, log_reason: str) -> None:
        self._send(link, MsgType.REFUSE, b"", encode_control(
            {"code": code, "reason": clip(reason, MAX_REASON)}))
        self._log("auth:refused", link, reason=log_reason, code=code)
        self._close_link(link)

    def _close_link(self, link: NodeLink) -> None:
        """Close ``link``: its last words (a REFUSE or CLOSE already queued, TLS's alert) go
        out if its TLS session can still send them; everything after is dropped."""
        if link.closed:
            return
        self._write_out(link, None)  # a failure here changes nothing: it is closing anyway
        link.state = NodeLinkState.CLOSED
        link.pending.clear()
        link.reauth_deadline = None
        self._dirty.discard(link.id)
        self._leave_preauth(link)
        self._closing.add(link.id)
        self.commands.append(CloseLink(link.id))

    def _fail_link(self, link: NodeLink, reason: str) -> None:
        self._log("link:error", link, link.session, reason=reason)
        self._close_link(link)

    # -- what a stranger may cost
    def _leave_preauth(self, link: NodeLink) -> None:
        if not link.preauth:
            return
        link.preauth = False
        self._preauth_count -= 1
        mine = self._preauth.get(link.source)
        if mine is not None:
            mine.pop(link.id, None)
            if not mine:
                del self._preauth[link.source]

    def _victim(self, ids: Iterable[int]) -> NodeLink:
        """The connection to give up: the least advanced, then the oldest (OpenSSH's
        MaxStartups drops early too; here a flood costs the flooder's own connections, and a
        user who has already said HELLO outlasts every stranger that has not)."""
        links = self.links
        return min((links[i] for i in ids), key=lambda l: (l.progress, l.opened, l.id))

    def _evict(self, link: NodeLink, why: str) -> None:
        count = self._evictions.get(link.source, 0) + 1
        if len(self._evictions) > 4096:
            self._evictions.clear()
        self._evictions[link.source] = count
        if count <= 3 or count & (count - 1) == 0:  # the first few, then at powers of two
            self._log("link:evicted", link, reason=why, count=count, source=link.source)
        self._close_link(link)

    def _make_room(self, source: str) -> bool:
        """Room for one more connection from ``source`` awaiting authentication: the least
        advanced one of that source goes if the source is at its limit, of the busiest source
        if the node is. False if the node is full of authenticated links."""
        limits = self.limits
        mine = self._preauth.get(source)
        if mine is not None and len(mine) >= limits.preauth_per_source:
            self._evict(self._victim(mine), f"more than {limits.preauth_per_source} connections "
                        f"from {source} awaiting authentication")
        elif (self._preauth_count >= limits.preauth_max
              or len(self.links) - len(self._closing) >= self.MAX_LINKS):
            if not self._preauth:
                return False
            busiest = max(self._preauth.values(), key=len)
            self._evict(self._victim(busiest), f"more than {limits.preauth_max} connections "
                        "awaiting authentication at this node")
        return True

    # -- inputs
    def link_opened(self, link_id: int, tls: TlsLike | TlsFactory, peer: str,
                    now: float) -> bool:
        """A TCP connection arrived; ``tls`` is its TLS session, or what makes it (then it is
        made on the first bytes). False if the node is full (the adapter closes it)."""
        self._now = now
        source = source_of(peer)
        if not self._make_room(source):
            self._log("link:refused", peer=peer, reason="too many links")
            return False
        if callable(tls):
            link = NodeLink(link_id, None, peer, now, make_tls=tls, source=source,
                            last_received=now, last_sent=now)
        else:
            link = NodeLink(link_id, tls, peer, now, source=source, last_received=now,
                            last_sent=now)
        self.links[link_id] = link
        self._preauth.setdefault(source, {})[link_id] = None
        self._preauth_count += 1
        link.preauth = True
        self._log("link:opened", link)
        return True

    def receive_data(self, link_id: int, data: bytes, now: float) -> None:
        link = self.links.get(link_id)
        if link is None or link.closed:
            return
        self._now = now
        link.last_received = now
        try:
            tls = link.tls
            if tls is None:
                if link.make_tls is None or not data:
                    return
                tls = link.tls = link.make_tls()
            tls.receive_data(data)
            plaintext = tls.read()
            if plaintext:
                decoder = link.decoder
                if decoder is None:
                    decoder = link.decoder = EnvelopeDecoder()
                for envelope in decoder.feed(plaintext):
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
                if (link.authenticated_at is None and not link.closed
                        and decoder.buffered > MAX_PREAUTH_FRAME):
                    # A stranger's half-sent 64 KB frame held four times the memory of its
                    # connection, for as long as the node waited for its HELLO.
                    raise MalformedFrame(f"a frame of more than {MAX_PREAUTH_FRAME} bytes "
                                         "before authentication")
        except RemoteProtocolError as exc:
            # Garbage from one peer closes that link only; everyone else is served on.
            self._fail_link(link, f"{type(exc).__name__}: {exc}")
        self.flush_link(link)

    def link_congested(self, link_id: int, congested: bool) -> None:
        link = self.links.get(link_id)
        if link is not None:
            link.congested = congested

    def link_failed(self, link_id: int, reason: str, now: float) -> None:
        """Something went wrong with this link outside the protocol (the daemon's guard caught
        it): close it, and only it."""
        self._now = now
        link = self.links.get(link_id)
        if link is not None and not link.closed:
            self._fail_link(link, reason)

    def link_lost(self, link_id: int, now: float, reason: str = "connection closed") -> None:
        self._now = now
        link = self.links.pop(link_id, None)
        if link is None:
            return
        self._dirty.discard(link_id)
        self._closing.discard(link_id)
        self._leave_preauth(link)
        link.pending.clear()
        link.state = NodeLinkState.CLOSED
        link.reauth_deadline = None
        self._on_link_lost(link, now, reason)
        self._log("link:closed", link, reason=reason)

    # -- control messages
    def _control(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        mtype, state = envelope.type, link.state
        if mtype is MsgType.KEEPALIVE and state is NodeLinkState.ESTABLISHED:
            # Not on a congested link: a peer that sends KEEPALIVEs and never reads would have
            # the node buffer one answer per KEEPALIVE, without bound. Its socket is full of
            # what it has not read yet, so it knows the node is alive anyway.
            if not link.congested:
                self._send(link, MsgType.KEEPALIVE_ACK, link.session_id, encode_control({}))
            return
        if mtype is MsgType.KEEPALIVE_ACK and state is NodeLinkState.ESTABLISHED:
            return
        fields = decode_control(envelope)
        if mtype is MsgType.HELLO and state is NodeLinkState.AWAIT_HELLO:
            self._hello(link, envelope, fields)
        elif mtype is MsgType.AUTH and state is NodeLinkState.AWAIT_AUTH:
            self._auth(link, fields["signature"], now)
        elif (mtype is MsgType.AUTH and state is NodeLinkState.ESTABLISHED
              and link.reauth_deadline is not None):
            self._reauth(link, fields["signature"], now)
        elif mtype is MsgType.CLOSE and state is NodeLinkState.ESTABLISHED:
            self._on_close(link, clip(fields["reason"]), now)
            self._close_link(link)
        else:
            # A second AUTH (one per link, one per challenge), anything before its time.
            raise MalformedFrame(f"unexpected {mtype.name} in state {state.value}")

    def _hello(self, link: NodeLink, envelope: Envelope, fields: dict[str, Any]) -> None:
        # Every identifier is checked before it is used or logged (records.py's patterns), so
        # what a stranger writes into a refusal, a record or root's terminal is short and plain.
        user, client = fields["user"], fields["client"]
        want, path, next_hop = fields["want"], fields["path"], fields["next"]
        link.uid = envelope.uid
        link.hops = envelope.hops
        problem = ""
        if not USER_NAME.fullmatch(user):
            problem = (f"the user name {quoted(user, 40)} is not valid at {self.name} "
                       "(a-z, 0-9, '_.-', at most 32 characters; give --user NAME)")
        elif not CLIENT_NAME.fullmatch(client):
            problem = "the client host name must be at most 64 letters, digits and '_.-'"
        elif len(want) > MAX_WANT or not all(isinstance(w, str) and len(w) <= 64 for w in want):
            problem = f"name at most {MAX_WANT} destination prefixes"
        elif len(path) > MAX_PATH or not all(isinstance(p, str) and NODE_NAME.fullmatch(p)
                                             for p in path):
            problem = f"the chain before {self.name} must be at most {MAX_PATH} node names"
        elif next_hop is not None and not ENDPOINT.fullmatch(next_hop):
            problem = "the next hop must be ADDRESS:PORT or [ADDRESS]:PORT"
        if problem:
            # Refused before any challenge: it says only what is wrong with the request.
            self._refuse(link, "bad-hello", problem, problem)
            return
        try:
            link.want = [parse_prefix(w) for w in want]
        except ConfigError as exc:
            raise MalformedFrame(clip(str(exc), 200)) from None
        link.user, link.client = user, client
        link.session_id = envelope.session
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
            self._verify(keys, signature, link.nonce, self._binding(link), link.user, self.name)
        except AuthError as exc:
            self._refuse(link, "auth-failed", generic, str(exc))
            return
        # One AUTH per link: from here on another one closes it (a gateway used to take AUTH
        # again while it connected onward, one next-hop connection per copy).
        link.state = NodeLinkState.AUTHENTICATED
        link.authenticated_at = now
        self._leave_preauth(link)
        if self.name in link.path:
            # A chain that comes back to a node it already crossed would loop.
            self._refuse(link, "loop", f"the chain {' > '.join(link.path + [self.name])} "
                         f"visits {self.name} twice; remove the repeated hop", "looped chain")
            return
        self._authorized(link, now)

    @staticmethod
    def _binding(link: NodeLink) -> bytes:
        if link.tls is None:
            raise MalformedFrame("AUTH before TLS")  # cannot happen: envelopes come over TLS
        return link.tls.binding()

    # -- re-authentication: a live link proves its key again
    def _challenge_again(self, link: NodeLink, now: float) -> None:
        """A fresh CHALLENGE on an established link; the user's process signs it bound to the
        same TLS session (UserLink), within ``auth_timeout``."""
        link.reauth_due = False
        if link.reauth_deadline is not None or link.closed:
            return  # one challenge at a time
        link.reauth_nonce = self._random(32)
        link.reauth_deadline = now + self.limits.auth_timeout
        self._send(link, MsgType.CHALLENGE, link.session_id,
                   encode_control({"nonce": link.reauth_nonce, "node": self.name}))

    def _reauth(self, link: NodeLink, signature: bytes, now: float) -> None:
        nonce, link.reauth_nonce, link.reauth_deadline = link.reauth_nonce, b"", None
        try:
            keys = self._keys.keys_for(link.user)
            self._verify(keys, signature, nonce, self._binding(link), link.user, self.name)
        except AuthError as exc:
            self._revoke(link, f"re-authentication failed: {exc}", now)
            return
        link.authenticated_at = now
        self._log("auth:renewed", link, link.session)

    def _revoke(self, link: NodeLink, reason: str, now: float) -> None:
        """The user's key no longer opens this link: end what it carries and close it."""
        self._log("auth:revoked", link, link.session, reason=reason)
        said = clip(f"{self.name}: {reason}", MAX_REASON)
        if link.state is NodeLinkState.ESTABLISHED:
            self._send(link, MsgType.CLOSE, link.session_id, encode_control({"reason": said}))
        else:
            self._send(link, MsgType.REFUSE, b"", encode_control({"code": "revoked",
                                                                  "reason": said}))
        self._end_link(link, f"revoked: {reason}")
        self._close_link(link)

    def reauthenticate(self, now: float) -> None:
        """The keys may have changed (a reload): every authenticated link whose user has no
        key left is ended at once, and every other is challenged again at once (its user must
        still hold one of the keys now installed)."""
        for link in list(self.links.values()):
            if link.authenticated_at is None or link.closed:
                continue
            try:
                if not self._keys.keys_for(link.user):
                    raise AuthError(f"user {link.user!r} has no authorised keys")
            except AuthError as exc:
                self._revoke(link, f"no key left: {exc}", now)
                continue
            if link.state is NodeLinkState.ESTABLISHED:
                self._challenge_again(link, now)
            else:
                link.reauth_due = True  # once it is established (a gateway connecting onward)
        self._reauthenticate_detached(now)
        self.flush(now)

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

    def _end_link(self, link: NodeLink, reason: str) -> None:
        """End what ``link`` carries for good (its user's key was revoked)."""

    def _reauthenticate_detached(self, now: float) -> None:
        """End the state of users with no key left that no link carries (a server's detached
        sessions)."""

    # -- output and time
    def _write_out(self, link: NodeLink, now: float | None) -> Exception | None:
        """Everything queued for ``link`` through its TLS session into one SendBytes. On a
        TLS failure the output is dropped and the error returned."""
        pending, tls = link.pending, link.tls
        if tls is None:
            pending.clear()  # nothing can be said before the peer's first bytes
            return None
        try:
            if pending:
                data = b"".join(pending)
                pending.clear()
                tls.send(data)
                if now is not None:
                    link.last_sent = now
            out = tls.data_to_send()
        except (RemoteProtocolError, LocalProtocolError) as exc:
            pending.clear()
            return exc
        if out:
            self.commands.append(SendBytes(link.id, out))
        return None

    def flush_link(self, link: NodeLink, now: float | None = None) -> None:
        self._dirty.discard(link.id)
        if link.closed:
            link.pending.clear()  # a reply routed to a link that is gone goes nowhere
            return
        error = self._write_out(link, now)
        if error is not None:
            self._fail_link(link, f"TLS failed on output: {type(error).__name__}: {error}")

    def flush(self, now: float | None = None) -> None:
        """One TLS write per link for everything queued since the last flush."""
        dirty, links = self._dirty, self.links
        while dirty:
            link = links.get(dirty.pop())
            if link is not None:
                self.flush_link(link, now)

    def _link_timers(self, now: float) -> None:
        self._now = now
        limits = self.limits
        for link in list(self.links.values()):
            if link.closed:
                continue
            state = link.state
            if now - link.last_received > self.dead_after:
                self._log("link:dead", link, link.session,
                          reason=f"no word for {self.dead_after:.0f} s (keepalive)")
                self._close_link(link)
            elif state is NodeLinkState.AWAIT_HELLO and now - link.opened > limits.hello_timeout:
                self._log("link:error", link, reason=f"no HELLO within {limits.hello_timeout:g} s")
                self._close_link(link)
            elif (state is NodeLinkState.AWAIT_AUTH
                  and now - link.opened > limits.auth_timeout):
                self._log("link:error", link, reason="authentication took too long")
                self._close_link(link)
            elif state is NodeLinkState.ESTABLISHED:
                if link.reauth_deadline is not None and now > link.reauth_deadline:
                    self._log("link:error", link, link.session, reason="no answer to "
                              f"re-authentication within {limits.auth_timeout:g} s")
                    self._close_link(link)
                    continue
                if link.reauth_due or (link.authenticated_at is not None and
                                       now - link.authenticated_at >= limits.reauth_interval):
                    self._challenge_again(link, now)
                if now - link.last_sent >= self.keepalive:
                    self._send(link, MsgType.KEEPALIVE, link.session_id, encode_control({}))
                    link.last_sent = now

    def _close_politely(self, link: NodeLink, reason: str, tell: bool = True) -> None:
        """Shutdown: CLOSE with ``reason`` (unless not ``tell``: the session is to be
        resumed), then TLS's close_notify, then the connection."""
        if link.closed:
            return
        if tell and link.state is NodeLinkState.ESTABLISHED:
            self._send(link, MsgType.CLOSE, link.session_id,
                       encode_control({"reason": clip(reason, MAX_REASON)}))
        self.flush_link(link)  # the CLOSE goes out before TLS's close_notify
        if link.tls is not None and not link.closed:
            try:
                link.tls.close()
            except (RemoteProtocolError, LocalProtocolError):
                pass  # its TLS already failed: nothing polite left to say
        self._close_link(link)

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
        mtu_for: Callable[[bytes], int] | None = None,
    ) -> None:
        super().__init__(config.name, keys, verify, random, config.keepalive, config.dead_after,
                         config.limits)
        self.config = config
        self._source_for = source_for
        # The MTU towards a destination (pvpn.io.rawsock.PathMtu); None: nothing is too big.
        self._mtu_for = mtu_for
        self.too_big_reports = fragments.PacketTooBigReports()
        self._ident4 = int.from_bytes(random(2), "big")  # IPv4 fragment ids, one per datagram
        self.flows = flows or FlowTable.for_config(config)
        self.sessions: dict[bytes, Session] = {}
        # Emit CapturePacket for every inner packet: what the user sent, the replies returned.
        self.capture = False
        # Sessions made, resumed, detached, narrowed or ended (with the flow table's own
        # count: state_version), so the daemon saves only a state that changed.
        self._changes = 0

    def state_version(self) -> int:
        """Changes so far to what a snapshot holds (never counted per packet)."""
        return self._changes + self.flows.changes

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
            if old.user == link.user and hmac.compare_digest(old.token_hash,
                                                             token_hash(link.token)):
                session, resumed = old, True
                old.token = link.token  # a session put back after a restart kept its hash
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
            token = self._random(16)
            session = Session(
                id=sid, token=token, user=link.user, uid=link.uid,
                client=link.client, peer=link.peer, allow=allow, opened=now,
                token_hash=token_hash(token),
            )
            self.sessions[session.id] = session
        self._changes += 1
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
            self._changes += 1
            self._log("session:detached", session=session, reason=reason)

    def _end_link(self, link: NodeLink, reason: str) -> None:
        if link.session is not None:
            self._end_session(link.session, reason)

    def _reauthenticate_detached(self, now: float) -> None:
        # A detached session could only come back through a full HELLO / AUTH, but one whose
        # user has no key left is over now, not at the end of resume_grace.
        for session in list(self.sessions.values()):
            if session.link is not None:
                continue
            try:
                if not self._keys.keys_for(session.user):
                    raise AuthError(f"user {session.user!r} has no authorised keys")
            except AuthError as exc:
                self._end_session(session, f"revoked: no key left: {exc}")

    def _on_packet(self, link: NodeLink, packet: bytes, now: float) -> None:
        if link.session is not None:
            self._packet_from_user(link.session, packet, now)

    def _end_session(self, session: Session, reason: str) -> None:
        self._changes += 1
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
        mtu = 0
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
            mtu = self._path_mtu(packet, flow.dst)
            if mtu and self._too_big(session, packet, flow, mtu, now):
                return
            try:
                entry = self.flows.outbound(session.id, flow, self._source_for(flow.dst), now,
                                            flags, session.user)
            except FlowRefused as exc:
                if exc.drop is Drop.TCP_NO_MAPPING:
                    self._reset(session, packet, flow, now)
                    return
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
        sent = pk.rewrite_source(packet, entry.nat_src, entry.nat_port)
        if not error and mtu and len(sent) > mtu:
            self._inject_fragments(sent, mtu)
        else:
            self.commands.append(InjectPacket(sent))

    # -- datagrams larger than the next link (docs/design.md "Datagrams of any size")
    def _path_mtu(self, packet: bytes, destination: bytes) -> int:
        """The MTU towards ``destination`` if ``packet`` might not fit it, else 0. Every
        IPv4 path carries 576 bytes in practice and every IPv6 link 1280 (RFC 8200 5), so
        smaller packets need no look-up; an unroutable destination is the NAT's to refuse."""
        if self._mtu_for is None or len(packet) <= (
                576 if packet[0] >> 4 == 4 else fragments.IPV6_MIN_MTU):
            return 0
        try:
            return self._mtu_for(destination)
        except OSError:
            return 0

    def _too_big(self, session: Session, packet: bytes, flow: pk.FlowKey, mtu: int,
                 now: float) -> bool:
        """Answer a packet that must not be fragmented and does not fit with the ICMP error
        of path MTU discovery (then it is dropped): an IPv4 packet with DF (RFC 1191), an
        IPv6 one its sender's kernel would have sent whole (fragments.PacketTooBigReports).
        The error comes from the server's own address towards the destination, the router
        where the MTU drops, and reaches the session as any reply does."""
        if len(packet) <= mtu:
            return False
        if packet[0] >> 4 == 4:
            if not fragments.dont_fragment(packet):
                return False
        elif not self.too_big_reports.must_report((session.id, flow.src, flow.dst),
                                                  len(packet), mtu, now):
            return False
        self._drop(session, Drop.TOO_BIG, now, flow, f"{len(packet)} bytes, mtu {mtu}")
        try:
            source = self._source_for(flow.dst)
        except OSError:
            return True
        self._to_session(session, fragments.too_big(packet, mtu, source), now)
        return True

    def _inject_fragments(self, packet: bytes, mtu: int) -> None:
        """Send ``packet`` as fragments that fit ``mtu``: the raw socket sends what it is given
        (IP_HDRINCL) and refuses more than the link's MTU. IPv4 ids count up from a random
        start, one per datagram (none repeats within 65,536 of the server's fragmented
        datagrams); IPv6 ids are random 32-bit values (RFC 7739)."""
        if packet[0] >> 4 == 4:
            self._ident4 = self._ident4 % 0xFFFF + 1  # 1..65535: 0 would be replaced
            ident = self._ident4
        else:
            ident = int.from_bytes(self._random(4), "big")
        for piece in fragments.fragment(packet, mtu, ident):
            self.commands.append(InjectPacket(piece))

    def _to_session(self, session: Session, packet: bytes, now: float) -> None:
        """A packet the server itself sends to a session (an ICMP error), as replies go."""
        link = self.links.get(session.link) if session.link is not None else None
        if link is None or link.closed:
            self._drop(session, Drop.SESSION_DETACHED, now)
            return
        if link.congested:
            self._drop(session, Drop.LINK_CONGESTED, now)
            return
        if self.capture:
            self.commands.append(CapturePacket(session.id, packet))
        session.packets_in += 1
        session.bytes_in += len(packet)
        link.pending.append(
            encode_envelope(MsgType.PACKET, session.id, session.uid, link.seq.take(), packet))
        self._dirty.add(link.id)

    def _reset(self, session: Session, packet: bytes, flow: pk.FlowKey, now: float) -> None:
        """A TCP segment of a connection the server has no mapping for: it can reach nobody
        (its NAT port is gone with the mapping), so the user's TCP gets the reset a host
        answers such a segment with (pvpn.reset), at once, instead of a silent hang."""
        reset = tcp_reset(packet)
        link = self.links.get(session.link) if session.link is not None else None
        if reset is None or link is None or link.closed or link.congested:
            self._drop(session, Drop.TCP_NO_MAPPING, now, flow)
            return
        self._drop(session, Drop.TCP_NO_MAPPING, now, flow, "answered with a reset")
        if self.capture:
            self.commands.append(CapturePacket(session.id, reset))
        session.packets_in += 1
        session.bytes_in += len(reset)
        link.pending.append(
            encode_envelope(MsgType.PACKET, session.id, session.uid, link.seq.take(), reset))
        self._dirty.add(link.id)

    def receive_reply(self, packet: bytes, now: float) -> bool:
        """A packet captured on its way in. True if it was ours (the adapter drops it from the
        kernel's path); False if it belongs to someone else on this host (accept it), and for
        a path MTU error handed on to a session, which the server's kernel learns from too."""
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
            if ((flow.proto == pk.PROTO_ICMP or flow.proto == pk.PROTO_ICMPV6)
                    and pk.icmp_type(packet) not in pk.ECHO_REPLIES):
                # An echo request to the NAT address and id of a user's ping is the server's
                # own to answer (conntrack: NEW, not the mapping's reply), not a way for the
                # remote end to ping the user's host back through the tunnel.
                return False
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
        if link is None or link.closed:  # closed, not yet lost: its output is over
            self._drop(session, Drop.SESSION_DETACHED, now, entry.original)
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
        # A path MTU error goes to the user and to the server's own kernel as well: the MTU
        # it learns is what the server fragments its users' datagrams to (rawsock.PathMtu).
        return not (error and fragments.is_path_mtu_error(packet))

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
        every session's destinations are computed again, mappings to an address that became
        the server's own are dropped, and so are mappings from an address it no longer has."""
        if addresses == self.local_addresses:
            return
        # Addresses the server had and lost (renumbered, a failover address moved to another
        # host): a mapping sending from one would go on with a source the server no longer
        # owns (the raw socket does not check), and its replies would reach whoever has it now.
        gone = {n.network_address.packed for n in self.local_addresses - addresses
                if n.num_addresses == 1}
        self.local_addresses = addresses
        for session in list(self.sessions.values()):
            policy = self.config.users.get(session.user)
            if policy is not None:
                self._narrow(session, policy, session.allow.networks)
            if gone:
                self.flows.drop_flows([f for f in self.flows.session_flows(session.id)
                                       if f.nat_src in gone])

    def _narrow(self, session: Session, policy: UserPolicy, networks: list[Network]) -> None:
        """Give ``session`` these prefixes under ``policy`` and the current own addresses,
        and drop its mappings to destinations it may no longer reach."""
        session.allow = Destinations(networks, policy.allow, self.local_addresses)
        self._changes += 1
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
        """Shutdown for good (no state is kept): every session ends, its user told why."""
        for link in list(self.links.values()):
            self._close_politely(link, reason)
        for session in list(self.sessions.values()):
            self._end_session(session, reason)

    def detach_all(self, reason: str, now: float) -> None:
        """Shutdown to come back (the state is saved): every link closes with TLS's
        close_notify but no CLOSE, so each user's process holds its protected traffic and
        resumes the same session from the next server; the sessions are detached, not
        ended, and the snapshot taken after this keeps them with their mappings."""
        self._now = now
        for link in list(self.links.values()):
            session = link.session
            if session is not None and session.link == link.id:
                session.link = None
                session.detached_since = now
                self._changes += 1
                self._log("session:detached", session=session, reason=reason)
            self._close_politely(link, reason, tell=False)

    # -- across a restart (pvpn.state; the daemon reads and writes the file)
    def snapshot(self, now: float) -> ServerState:
        """What a restarted server needs to resume every session with its mappings; the
        sessions active most recently first, within pvpn.state's bounds. ``saved_at`` is
        left 0 for the adapter, which reads the wall clock."""
        def recency(session: Session) -> float:
            return now if session.link is not None else session.detached_since or 0.0

        sessions = sorted(self.sessions.values(), key=recency, reverse=True)[:MAX_SESSIONS]
        return ServerState(self.name, 0.0, self.flows.cursor, tuple(
            SavedSession(
                s.id, s.token_hash, s.user, s.uid, s.client, s.peer,
                tuple(str(n) for n in s.allow.networks), max(0.0, now - s.opened),
                None if s.detached_since is None else max(0.0, now - s.detached_since),
                (s.packets_in, s.packets_out, s.bytes_in, s.bytes_out),
                tuple(self.flows.saved_flows(s.id, now)))
            for s in sessions))

    def restore(self, state: ServerState, now: float, downtime: float) -> dict[str, Any]:
        """Put back the sessions and mappings of a snapshot taken ``downtime`` seconds of
        server absence ago, judged by the settings, policies, keys and addresses of now.
        Each session comes back detached, waiting for its user's resume (a full HELLO and
        AUTH with the user's key, and the token), and is written as ``session:restored``;
        one that cannot come back is written as ``session:closed`` with the reason: its
        grace ran out while the server was away (the downtime counts as detached time), its
        user has no policy or no key left (revoked), nothing it asked for is allowed now, its
        user already has ``sessions_per_user``. Its mappings come back with their ports and
        states, each checked as the table checks its own (and its destination against the
        session's allow list, its NAT address against the server's); the mappings' ages are
        those of the snapshot, so a connection that was alive does not expire because the
        server was away. Returns what was done, for the summary record."""
        self._now = now
        grace = self.config.resume_grace
        report: dict[str, Any] = {"sessions": 0, "flows": 0, "skipped": {}}
        skipped: dict[str, int] = report["skipped"]
        if state.node != self.name:
            raise ValueError(f"it was written by node {state.node!r}, not {self.name!r}")
        self.flows.restore_cursor(state.cursor)
        per_user: dict[str, int] = {}
        restored: list[tuple[Session, SavedSession]] = []
        # The sessions detached last first, so a lowered sessions_per_user keeps the freshest.
        for saved in sorted(state.sessions, key=lambda s: s.detached or 0.0):
            detached_for = (saved.detached or 0.0) + downtime
            session = Session(
                id=saved.id, token=b"", user=saved.user, uid=saved.uid, client=saved.client,
                peer=saved.peer, allow=Destinations([], [], self.local_addresses),
                opened=now - saved.age - downtime, detached_since=now - detached_for,
                packets_in=saved.counters[0], packets_out=saved.counters[1],
                bytes_in=saved.counters[2], bytes_out=saved.counters[3],
                token_hash=saved.token_hash)
            why = self._unrestorable(session, saved, detached_for, grace, per_user)
            if why is not None:
                skipped[why[0]] = skipped.get(why[0], 0) + 1
                self._log("session:closed", session=session, reason=why[1],
                          packets_in=session.packets_in, packets_out=session.packets_out,
                          bytes_in=session.bytes_in, bytes_out=session.bytes_out,
                          flows=len(saved.flows))
                continue
            per_user[session.user] = per_user.get(session.user, 0) + 1
            self.sessions[session.id] = session
            restored.append((session, saved))
        # The mappings oldest first: the table's idle queues are ordered by last use.
        flows = sorted(((f.idle, i, f) for i, (_, saved) in enumerate(restored)
                        for f in saved.flows), key=lambda item: (-item[0], item[1]))
        counts = [0] * len(restored)
        for _, index, flow in flows:
            session = restored[index][0]
            refused = self._flow_refusal(session, flow.key.dst, flow.nat_src)
            if refused is None:
                try:
                    self.flows.restore_flow(session.id, session.user, flow, now)
                except (FlowTableFull, ValueError) as exc:
                    refused = str(exc)
            if refused is not None:
                skipped[f"mapping: {refused}"] = skipped.get(f"mapping: {refused}", 0) + 1
                continue
            counts[index] += 1
        for (session, saved), count in zip(restored, counts):
            self._log("session:restored", session=session, client=session.client,
                      allow=[str(n) for n in session.allow.networks], flows=count,
                      reason=f"put back after the server's restart; detached "
                             f"{now - (session.detached_since or now):.0f} s, waiting for "
                             "its user's resume")
        report["sessions"], report["flows"] = len(restored), sum(counts)
        self._changes += 1
        return report

    def _unrestorable(self, session: Session, saved: SavedSession, detached_for: float,
                      grace: float, per_user: dict[str, int]) -> tuple[str, str] | None:
        """Why a saved session does not come back (a short kind and the record's reason),
        or None; a session that does gets its destinations under today's policy."""
        if saved.id in self.sessions:
            return "duplicate", "not restored: a session of that id is up already"
        if detached_for > grace:
            return "expired", (f"not resumed within {grace:.0f} s (the server was away "
                               f"{detached_for - (saved.detached or 0.0):.0f} s)")
        policy = self.config.users.get(saved.user)
        if policy is None or not policy.allow:
            return "revoked", (f"revoked: the [users] policy of {saved.user!r} at {self.name} "
                               "is gone")
        try:
            if not self._keys.keys_for(saved.user):
                raise AuthError(f"user {saved.user!r} has no authorised keys")
        except AuthError as exc:
            return "revoked", f"revoked: no key left: {exc}"
        if per_user.get(saved.user, 0) >= self.config.sessions_per_user:
            return "too-many", (f"not restored: {saved.user!r} has "
                                f"{self.config.sessions_per_user} sessions, the most one "
                                "user may have")
        try:
            wanted = [parse_prefix(text) for text in saved.allow]
        except ConfigError:
            return "invalid", "not restored: a prefix that is not one"
        kept = [n for n in _within(wanted, policy.allow)
                if exclusion(n, policy.allow, self.local_addresses) is None]
        if not kept:
            return "revoked", f"none of its destinations is allowed any more at {self.name}"
        session.allow = Destinations(kept, policy.allow, self.local_addresses)
        return None

    def _flow_refusal(self, session: Session, destination: bytes, nat_src: bytes) -> str | None:
        """Why a saved mapping of ``session`` does not come back (beyond the table's own
        checks), or None: its destination must be one the session may reach now, and its
        NAT address the one the server sends from towards it, or one of its own."""
        if not session.allow.contains(destination):
            return "its destination is not allowed now"
        try:
            if self._source_for(destination) == nat_src:
                return None
        except (OSError, PvpnError):
            return "no route to its destination"
        if any(n.num_addresses == 1 and n.network_address.packed == nat_src
               for n in self.local_addresses):
            return None
        return "its NAT address is not the server's"

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


__all__ = [
    "PrefixSet", "ServerNode",
    "UserLink", "LocalProtocolError",
]
