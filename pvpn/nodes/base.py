"""What every node does with its users' links, sans-IO (after aioquic and h11).

A *link* is one TLS session between the user's process and a node. Over it:

    user                                   node
    HELLO {user, want, resume, token}  ->
                                       <-  CHALLENGE {nonce, node}
    AUTH {signature}                   ->      signature over nonce + TLS binding (auth.py)
                                       <-  ACCEPT {token, allow, resumed} | REFUSE {code, reason}
    PACKET / KEEPALIVE / CLOSE         <->

What each message does in each state of a node's end is one table, :data:`TRANSITIONS`.
:class:`NodeBase` is a node's end of that exchange, shared by the server
(:mod:`pvpn.nodes.server`) and the gateway (:mod:`pvpn.nodes.gateway`); the user's end is
:class:`pvpn.user.UserLink`. Inputs carry ``now``; outputs are commands (:mod:`pvpn.commands`)
collected in ``commands`` for one dispatcher to carry out. Nothing here touches a socket or a
clock.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from pvpn.addresses import Destinations
from pvpn.commands import CloseLink, Command, LogRecord, SendBytes
from pvpn.config import Network, NodeLimits, parse_prefix
from pvpn.drops import Counters
from pvpn.envelope import (
    OFFLOAD, Envelope, EnvelopeDecoder, MsgType, Sequencer, decode_control, encode_control,
    encode_envelope,
)
from pvpn.errors import (
    AuthError, ConfigError, LocalProtocolError, MalformedFrame, RemoteProtocolError,
)
from pvpn.names import (
    AUTH_REFUSED, AUTH_RENEWED, AUTH_REVOKED, LINK_CLOSED, LINK_DEAD, LINK_ERROR, LINK_EVICTED,
    LINK_OPENED, LINK_REFUSED,
)
from pvpn.records import (
    CLIENT_NAME, ENDPOINT, NODE_NAME, USER_NAME, Record, RecordBudget, session_hex,
    with_fields,
)
from pvpn.text import clip, quoted


class TlsLike(Protocol):
    """What the protocol needs of a TLS session (pvpn.tls.TlsSession provides it)."""

    @property
    def handshake_complete(self) -> bool: ...
    @property
    def peer_closed(self) -> bool: ...
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


# ---------------------------------------------------------------- nodes: the shared part


class NodeLinkState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    AUTHENTICATED = "authenticated"  # the key verified; deciding, or connecting onward
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(slots=True)
class Session(Counters):
    """One user's personal VPN at the server; outlives its link for ``resume_grace``.

    ``allow`` is where its packets may go (what the user asked for and the policy allows, less
    the special and own addresses the policy does not name), precomputed for the packet path.
    Its counters (:class:`pvpn.drops.Counters`): ``drops`` counts dropped packets by fixed
    code and rate-limits their records.
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
    # The user's end offered super-packets (HELLO's "offload") and this node takes them: it
    # said so in ACCEPT, and may send them on this link (pvpn.envelope.OFFLOAD).
    offload: bool = False
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
    # Envelopes each way, for the gateway's hop records (it counts the bytes per splice).
    envelopes_in: int = 0
    envelopes_out: int = 0

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
#: Why a link closes when its peer sends TLS's close_notify.
PEER_CLOSED_TLS = "the peer closed its TLS session (close_notify)"
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
    #: Whether this node takes and sends super-packets (pvpn.envelope.OFFLOAD) when the user's
    #: end offers them; a gateway relays opaque bytes and has no use for them.
    takes_offload = False

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
            unlogged = budget.take_unlogged()
            if unlogged:
                rec.extra["unlogged"] = unlogged
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
        self.commands.append(LogRecord(with_fields(rec, kw)))

    def _send(self, link: NodeLink, mtype: MsgType, session: bytes, body: bytes) -> None:
        if link.closed:
            return  # a closed link's output is over
        link.pending.append(encode_envelope(mtype, session, link.uid, link.seq.take(), body))
        link.envelopes_out += 1
        self._dirty.add(link.id)

    def _refuse(self, link: NodeLink, code: str, reason: str, log_reason: str) -> None:
        self._send(link, MsgType.REFUSE, b"", encode_control(
            {"code": code, "reason": clip(reason, MAX_REASON)}))
        self._log(AUTH_REFUSED, link, reason=log_reason, code=code)
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
        self._log(LINK_ERROR, link, link.session, reason=reason)
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
            self._log(LINK_EVICTED, link, reason=why, count=count, source=link.source)
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
            self._log(LINK_REFUSED, peer=peer, reason="too many links")
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
        self._log(LINK_OPENED, link)
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
                    handler = TRANSITIONS.get((link.state, envelope.type), NodeBase._unexpected)
                    handler(self, link, envelope, now)
                if (link.authenticated_at is None and not link.closed
                        and decoder.buffered > MAX_PREAUTH_FRAME):
                    # A stranger's half-sent 64 KB frame held four times the memory of its
                    # connection, for as long as the node waited for its HELLO.
                    raise MalformedFrame(f"a frame of more than {MAX_PREAUTH_FRAME} bytes "
                                         "before authentication")
        except RemoteProtocolError as exc:
            # Garbage from one peer closes that link only; everyone else is served on.
            self._fail_link(link, f"{type(exc).__name__}: {exc}")
        if link.tls is not None and link.tls.peer_closed and not link.closed:
            # The peer ended its TLS session (close_notify, RFC 8446 6.1): nothing more can
            # come over it, so the link ends now, not when its TCP connection goes or
            # dead_after passes. Ended as a lost link is: a server's session waits for a resume.
            self._log(LINK_CLOSED, link, link.session, reason=PEER_CLOSED_TLS)
            self._close_politely(link, PEER_CLOSED_TLS, tell=False)
            return
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
        self._log(LINK_CLOSED, link, reason=reason)

    # -- what an envelope does in each state of its link (TRANSITIONS, below the class)
    def _packet_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        self._on_packet(link, envelope.body, now)

    def _data_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        self._on_data(link, envelope.body, now)

    def _keepalive_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        # Not on a congested link: a peer that sends KEEPALIVEs and never reads would have
        # the node buffer one answer per KEEPALIVE, without bound. Its socket is full of
        # what it has not read yet, so it knows the node is alive anyway.
        if not link.congested:
            self._send(link, MsgType.KEEPALIVE_ACK, link.session_id, encode_control({}))

    def _keepalive_ack_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        pass  # the link is alive: receive_data noted it

    def _hello_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        self._hello(link, envelope, decode_control(envelope))

    def _auth_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        self._auth(link, decode_control(envelope)["signature"], now)

    def _reauth_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        fields = decode_control(envelope)
        if link.reauth_deadline is None:  # one AUTH per challenge, and none unasked
            raise MalformedFrame(f"unexpected {envelope.type.name} in state {link.state.value}")
        self._reauth(link, fields["signature"], now)

    def _close_received(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        self._on_close(link, clip(decode_control(envelope)["reason"]), now)
        self._close_link(link)

    def _unexpected(self, link: NodeLink, envelope: Envelope, now: float) -> None:
        # A second HELLO or AUTH, anything before its time: the link is closed. A body that
        # is not even the control message its type names says that instead.
        decode_control(envelope)
        raise MalformedFrame(f"unexpected {envelope.type.name} in state {link.state.value}")

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
        link.offload = self.takes_offload and OFFLOAD in fields.get("offload", ())
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
        self._log(AUTH_RENEWED, link, link.session)

    def _revoke(self, link: NodeLink, reason: str, now: float) -> None:
        """The user's key no longer opens this link: end what it carries and close it."""
        self._log(AUTH_REVOKED, link, link.session, reason=reason)
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
                self._log(LINK_DEAD, link, link.session,
                          reason=f"no word for {self.dead_after:.0f} s (keepalive)")
                self._close_link(link)
            elif state is NodeLinkState.AWAIT_HELLO and now - link.opened > limits.hello_timeout:
                self._log(LINK_ERROR, link, reason=f"no HELLO within {limits.hello_timeout:g} s")
                self._close_link(link)
            elif (state is NodeLinkState.AWAIT_AUTH
                  and now - link.opened > limits.auth_timeout):
                self._log(LINK_ERROR, link, reason="authentication took too long")
                self._close_link(link)
            elif state is NodeLinkState.ESTABLISHED:
                if link.reauth_deadline is not None and now > link.reauth_deadline:
                    self._log(LINK_ERROR, link, link.session, reason="no answer to "
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
        # "offload" only to a user's end that offered it: an older one knows no such field.
        self._send(link, MsgType.ACCEPT, session_id, encode_control({
            "token": token, "allow": allow, "node": self.name, "resumed": resumed,
            **({"offload": [OFFLOAD]} if link.offload else {})}))


Handler = Callable[[NodeBase, NodeLink, Envelope, float], None]

#: The node's end of the handshake: what an envelope of each type does in each state of its
#: link (the exchange in the module docstring). Any pair not listed closes the link
#: (``NodeBase._unexpected``): a PACKET, DATA, KEEPALIVE or CLOSE before ESTABLISHED among
#: them, where the user's end (pvpn.user.UserLink) answers a KEEPALIVE in any state. A link
#: in AUTHENTICATED (its key verified, the node deciding or connecting onward) takes nothing.
TRANSITIONS: dict[tuple[NodeLinkState, MsgType], Handler] = {
    (NodeLinkState.AWAIT_HELLO, MsgType.HELLO): NodeBase._hello_received,  # -> AWAIT_AUTH
    (NodeLinkState.AWAIT_AUTH, MsgType.AUTH): NodeBase._auth_received,  # -> AUTHENTICATED
    (NodeLinkState.ESTABLISHED, MsgType.PACKET): NodeBase._packet_received,
    (NodeLinkState.ESTABLISHED, MsgType.DATA): NodeBase._data_received,
    (NodeLinkState.ESTABLISHED, MsgType.KEEPALIVE): NodeBase._keepalive_received,
    (NodeLinkState.ESTABLISHED, MsgType.KEEPALIVE_ACK): NodeBase._keepalive_ack_received,
    (NodeLinkState.ESTABLISHED, MsgType.AUTH): NodeBase._reauth_received,  # a re-challenge
    (NodeLinkState.ESTABLISHED, MsgType.CLOSE): NodeBase._close_received,  # -> CLOSED
}
