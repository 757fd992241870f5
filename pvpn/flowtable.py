"""The server's NAT flow table: which session a reply from the Internet belongs to.

Driven by the server node: :meth:`FlowTable.outbound` for every packet a session sends,
:meth:`FlowTable.inbound` for every packet arriving on the NAT port range, and
:meth:`FlowTable.expire` from its timer. Time is always passed in (``now``, seconds on a
monotonic clock); nothing here reads a clock.

The 2002 thesis matched replies by server address and port only, so two users on one client
host sending the identical 5-tuple to the same destination got each other's replies. Here every
(session, flow) pair gets its own NAT port, so the reply's destination port names the session.

Mapping rules:

* A NAT port is unique per *(protocol, NAT address, remote address, remote port)*: mappings are
  endpoint-dependent, so the whole range is available again for each remote endpoint, and a
  reply is looked up by the full (protocol, remote, remote port, NAT address, NAT port).
* Ports are handed out round-robin from one cursor over the range, never lowest-free, so a
  freed port is reused as late as possible (stale replies of an old flow do not reach a new one).
* ICMP/ICMPv6 echo: the NAT "port" is the echo identifier the server writes into the request;
  the reply carries it back. There is no remote port: it is taken as 0 on both sides, so the
  ``remote_port`` given to :meth:`FlowTable.inbound` is ignored for ICMP.
* ICMP errors: look them up with the quoted packet's flow (``icmp_error_inner_flow``), i.e.
  ``inbound(inner.proto, inner.dst, inner.dport, inner.src, inner.sport, now)``.

TCP mappings follow the connection's end: a FIN or RST moves a mapping to the *closing*
timeout; once both sides have sent a FIN, or an RST was seen, it is *closed*. A closed mapping
whose remote end sent the first FIN keeps its port ``tcp_time_wait`` (60 s, Linux's TIME-WAIT):
the remote end still holds that 4-tuple, and a new SYN to it from another client flow (with an
unrelated sequence number and timestamp) is answered with the old connection's ACK, costing the
new connection an RST and a retransmitted SYN. Any other closed mapping is kept only
``tcp_closed_timeout`` for the last ACK and retransmitted FINs. When every port towards an
endpoint is taken, the mapping closed longest ago (at least ``tcp_reuse_after`` seconds) gives
its port to the new flow rather than dropping its SYN (a second or more of waiting), as a
TCP stack reuses a TIME-WAIT port. Likewise a UDP mapping is kept ``udp_timeout`` only once it
is a stream (the client sent again after a reply); a one-off exchange such as a DNS query,
each from a new source port, is kept ``udp_single_timeout``, as Linux conntrack does.

A mapping is *unreplied* until the remote end sends anything on it, and unreplied mappings
expire fast, as Linux conntrack's do: a TCP mapping opened by a SYN after ``tcp_syn_timeout``
(120 s, conntrack's SYN_SENT), one picked up mid-stream (an ACK without SYN) after
``tcp_unreplied_timeout`` (300 s, conntrack's timeout for an ESTABLISHED entry that has seen
no reply), a UDP one after ``udp_single_timeout`` (30 s, conntrack's unreplied UDP). An ICMP
error neither refreshes a mapping nor counts as its reply (conntrack: RELATED).

Memory is bounded three ways: ``max_flows`` for the table, ``max_flows_per_user`` for all
sessions of one user and ``max_flows_per_session`` for one session. When one of them is
reached, a new mapping first takes the place of the oldest unreplied mapping in that scope,
then of the one closed longest ago (conntrack's early drop, which drops unassured entries and
TCP entries that are closing); only when there is neither is it refused. So a user sending
bare ACKs or SYNs to nowhere only ever displaces their own junk, and a user opening hundreds of
short connections a second reuses their closed mappings instead of being refused.

One user may hold at most ``user_share`` of a destination endpoint's ports in mappings that
are not closed, counted over all their sessions, so a user keeping thousands of connections
open cannot take a destination away from everyone else on the server (closed mappings do not
count: their ports go to whoever needs them).

A table made with ``tcp_pickup=False`` (pvpn-server's) never picks a TCP connection up
mid-stream: a segment without SYN for which it has no mapping is refused
(``tcp-no-mapping``), and the server answers it with a reset, as a host answers a segment for
a connection it does not have (RFC 9293 3.10.7.1). Such a segment can only belong to a
connection whose mapping is gone (lost in a restart, expired, ended with its session): a new
NAT port would reach a remote end that knows nothing of it, and the connection would hang.

The mappings survive a restart of the server (:meth:`FlowTable.saved_flows`,
:meth:`FlowTable.restore_flow`, pvpn.state): each with its port and state, the caps, the
user's share and the port range checked again as it is put back.

Lookups in both directions are dict lookups; idle flows sit in one insertion-ordered queue
per state (:class:`FlowState`, which names each state's lifetime), oldest first, so :meth:`FlowTable.expire` only touches the flows it
removes; the eviction candidates sit in creation-ordered queues per scope.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
import enum
import math
from typing import TYPE_CHECKING, NamedTuple, TypeVar, Union

from pvpn.drops import Drop
from pvpn.errors import ConfigError, FlowTableFull, LocalProtocolError
from pvpn.packet import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    FlowKey,
)

if TYPE_CHECKING:
    from pvpn.config import ServerConfig

#: The table's bound: as many mappings as one address has ports.
MAX_FLOWS = 65536

# (protocol, NAT address, remote address, remote port): the scope in which a NAT port is unique.
_Endpoint = tuple[int, bytes, bytes, int]
# (protocol, NAT address, NAT port, remote address, remote port): how replies are found.
_ReplyKey = tuple[int, bytes, int, bytes, int]
# Whose mappings count together: the user's name, or the session id of a session whose user
# the caller did not give.
Owner = Union[str, bytes]
_Queue = OrderedDict[int, "Flow"]
_K = TypeVar("_K")


class FlowRefused(FlowTableFull):
    """A new mapping was refused; ``drop`` is the code the packet is dropped under."""

    def __init__(self, drop: Drop, message: str) -> None:
        super().__init__(message)
        self.drop = drop


class FlowState(enum.IntEnum):
    """Where a mapping is in its life, which gives it its lifetime: how long it may sit idle
    (the ``FlowTable`` keyword named beside each, see the module docstring)."""

    TCP_OPEN = 0  # tcp_timeout: answered, no FIN or RST seen
    TCP_SYN_SENT = 1  # tcp_syn_timeout: opened by a SYN, not answered yet
    TCP_UNREPLIED = 2  # tcp_unreplied_timeout: picked up mid-stream, not answered yet
    TCP_CLOSING = 3  # tcp_closing_timeout: one FIN seen
    TCP_CLOSED = 4  # tcp_closed_timeout: both FINs or an RST seen, its port reusable
    TCP_TIME_WAIT = 5  # tcp_time_wait: closed, and the remote end holds the port in TIME-WAIT
    UDP_STREAM = 6  # udp_timeout: the client sent again after an answer
    UDP_SINGLE = 7  # udp_single_timeout: a one-off exchange so far (a DNS query)
    ICMP = 8  # icmp_timeout: an echo mapping


# The states as plain names: looking an Enum member up costs more than the rest of a packet's
# queue move (the per-packet path asks for a flow's state).
(_TCP_OPEN, _TCP_SYN_SENT, _TCP_UNREPLIED, _TCP_CLOSING, _TCP_CLOSED, _TCP_TIME_WAIT,
 _UDP_STREAM, _UDP_SINGLE, _ICMP) = FlowState


@dataclass(slots=True)
class Flow:
    """One NAT mapping: a session's flow and the server address and port it goes out with."""

    session_id: bytes
    original: FlowKey  # as the client sent it
    nat_src: bytes  # server address used as source
    nat_port: int  # TCP/UDP source port, or ICMP echo identifier, used on the server side
    last_seen: float
    closing: bool  # a FIN or RST was seen: short timeout
    fins: int = 0  # _FIN_OUT | _FIN_IN: which sides have sent a FIN
    closed: bool = False  # both FINs or an RST seen: kept briefly, its port reusable
    closed_at: float = 0.0
    remote_closed_first: bool = False  # the remote end sent the first FIN: it is in TIME-WAIT
    time_wait: bool = False  # closed, and the remote end holds the port in TIME-WAIT
    replied: bool = False  # the remote end sent something on it (conntrack's SEEN_REPLY)
    stream: bool = False  # UDP: the client sent again after an answer (not a one-off query)
    user: Owner = b""  # whose mappings it counts among (the session's user)
    syn: bool = False  # TCP: opened by a SYN (unreplied: SYN_SENT), not picked up mid-stream

    @property
    def state(self) -> FlowState:
        """The one place the flags above are read back to name the state."""
        proto = self.original.proto
        if proto == PROTO_TCP:
            if self.closed:
                return _TCP_TIME_WAIT if self.time_wait else _TCP_CLOSED
            if self.closing:
                return _TCP_CLOSING
            if not self.replied:
                return _TCP_SYN_SENT if self.syn else _TCP_UNREPLIED
            return _TCP_OPEN
        if proto == PROTO_UDP:
            return _UDP_STREAM if self.stream else _UDP_SINGLE
        return _ICMP


_FIN_OUT = 1  # the client's side sent a FIN
_FIN_IN = 2  # the remote side sent a FIN

# A saved mapping's state (SavedFlow.state), one bit per Flow field.
STATE_CLOSING = 1
STATE_FIN_OUT = 2
STATE_FIN_IN = 4
STATE_CLOSED = 8
STATE_REMOTE_CLOSED_FIRST = 16
STATE_TIME_WAIT = 32
STATE_REPLIED = 64
STATE_STREAM = 128
STATE_SYN = 256
STATE_BITS = 511
_TCP_ONLY = (STATE_CLOSING | STATE_FIN_OUT | STATE_FIN_IN | STATE_CLOSED
             | STATE_REMOTE_CLOSED_FIRST | STATE_TIME_WAIT | STATE_SYN)
#: Ages a saved mapping may give (seconds): more than any timeout, less than a clock's nonsense.
MAX_AGE = 366 * 86400.0


class SavedFlow(NamedTuple):
    """One mapping as it is kept across a restart of the server (pvpn.state): its flow, NAT
    address and port, and its times as ages at the snapshot (``idle``: since it was last
    seen; ``closed_for``: since it closed, 0 while open)."""

    key: FlowKey
    nat_src: bytes
    nat_port: int
    idle: float
    state: int
    closed_for: float


def _state_bits(flow: Flow) -> int:
    return ((STATE_CLOSING if flow.closing else 0)
            | (STATE_FIN_OUT if flow.fins & _FIN_OUT else 0)
            | (STATE_FIN_IN if flow.fins & _FIN_IN else 0)
            | (STATE_CLOSED if flow.closed else 0)
            | (STATE_REMOTE_CLOSED_FIRST if flow.remote_closed_first else 0)
            | (STATE_TIME_WAIT if flow.time_wait else 0)
            | (STATE_REPLIED if flow.replied else 0)
            | (STATE_STREAM if flow.stream else 0)
            | (STATE_SYN if flow.syn else 0))


def state_refusal(proto: int, state: int) -> str | None:
    """Why ``state`` is no state a mapping of ``proto`` can be in, or None."""
    if state & ~STATE_BITS:
        return f"unknown state bits {state:#x}"
    if proto != PROTO_TCP and state & _TCP_ONLY:
        return "TCP state on a mapping that is not TCP"
    if proto != PROTO_UDP and state & STATE_STREAM:
        return "a UDP stream mark on a mapping that is not UDP"
    if state & STATE_CLOSED and not state & STATE_CLOSING:
        return "closed but not closing"
    if state & STATE_TIME_WAIT and not state & STATE_CLOSED:
        return "in TIME-WAIT but not closed"
    if state & (STATE_FIN_OUT | STATE_FIN_IN) and not state & STATE_CLOSING:
        return "a FIN seen but not closing"
    return None


def _remote_port(flow: FlowKey) -> int:
    # ICMP echo has no remote port; both directions use 0 (see the module docstring).
    if flow.proto == PROTO_TCP or flow.proto == PROTO_UDP:
        return flow.dport
    return 0


def _endpoint(flow: Flow) -> _Endpoint:
    original = flow.original
    return (original.proto, flow.nat_src, original.dst, _remote_port(original))


class FlowTable:
    """Maps (session, flow) to a NAT address and port and replies back to the session.

    Driven by the server node with explicit ``now`` values, which must not go backwards (the
    idle queues are ordered by last use).
    """

    def __init__(
        self,
        port_range: tuple[int, int],
        max_flows: int = MAX_FLOWS,
        tcp_timeout: float = 7440.0,
        tcp_closing_timeout: float = 60.0,
        udp_timeout: float = 180.0,
        icmp_timeout: float = 30.0,
        tcp_closed_timeout: float = 10.0,
        tcp_time_wait: float = 60.0,
        tcp_reuse_after: float = 1.0,
        udp_single_timeout: float = 30.0,
        user_share: float = 1.0,
        tcp_syn_timeout: float = 120.0,
        tcp_unreplied_timeout: float = 300.0,
        max_flows_per_user: int = 16384,
        max_flows_per_session: int = 8192,
        tcp_pickup: bool = True,
    ) -> None:
        low, high = port_range
        if not 1 <= low <= high <= 65535:
            raise ConfigError(f"nat_ports {low}-{high}: need 1 <= first <= last <= 65535")
        if max_flows < 1:
            raise ConfigError(f"max_flows {max_flows}: need at least 1")
        if min(tcp_timeout, tcp_closing_timeout, udp_timeout, icmp_timeout,
               tcp_closed_timeout, tcp_time_wait, udp_single_timeout, tcp_syn_timeout,
               tcp_unreplied_timeout) <= 0 or tcp_reuse_after < 0:
            raise ConfigError("flow timeouts must be positive")
        if not 0 < user_share <= 1:
            raise ConfigError(f"user_share {user_share}: need 0 < share <= 1")
        if min(max_flows_per_session, max_flows_per_user) < 1:
            raise ConfigError("flow caps per user and per session: need at least 1")
        self._low = low
        self._size = high - low + 1
        self._cursor = 0  # offset of the next port to offer, round-robin
        self._max_flows = max_flows
        self._by_session_flow: dict[tuple[bytes, FlowKey], Flow] = {}
        self._by_reply: dict[_ReplyKey, Flow] = {}
        self._ports_used: dict[_Endpoint, int] = {}
        self._by_session: dict[bytes, dict[int, Flow]] = {}
        # Closed TCP mappings per endpoint, closed longest ago first: ports to reuse when full.
        self._closed_by_endpoint: dict[_Endpoint, OrderedDict[int, Flow]] = {}
        self._reuse_after = tcp_reuse_after
        # Mappings not closed, per (user, endpoint), and how many one user may hold.
        self._held: dict[tuple[Owner, _Endpoint], int] = {}
        self._share = max(1, int(self._size * user_share))
        # The caps, the mappings each user holds, and the eviction candidates in creation
        # order: unreplied ones, then closed ones, for the table, per user and per session.
        self._per_user = min(max_flows_per_user, max_flows)
        self._per_session = min(max_flows_per_session, self._per_user)
        self._user_flows: dict[Owner, int] = {}
        self._unreplied: _Queue = OrderedDict()
        self._unreplied_by_user: dict[Owner, _Queue] = {}
        self._unreplied_by_session: dict[bytes, _Queue] = {}
        self._closed: _Queue = OrderedDict()
        self._closed_by_user: dict[Owner, _Queue] = {}
        self._closed_by_session: dict[bytes, _Queue] = {}
        self.evicted = 0  # mappings that made room for a new one (early drop)
        # Whether a TCP segment without SYN may open a mapping (conntrack's tcp_loose).
        self._pickup = tcp_pickup
        # Counts every change worth saving (a mapping made, removed or changing state), so
        # the server snapshots only a table that changed; never touched per packet.
        self.changes = 0
        # One idle queue per state, keyed by id(flow) (Flow is mutable, so not hashable), least
        # recently seen first, and the state's lifetime. The default TCP timeout is RFC 5382
        # REQ-5's 2 h 4 min; the UDP one stays above RFC 4787 REQ-5's 2 min minimum. An
        # unanswered mapping never outlives an answered one of its protocol.
        lifetimes = {
            FlowState.TCP_OPEN: tcp_timeout,
            FlowState.TCP_SYN_SENT: min(tcp_syn_timeout, tcp_timeout),
            FlowState.TCP_UNREPLIED: min(tcp_unreplied_timeout, tcp_timeout),
            FlowState.TCP_CLOSING: tcp_closing_timeout,
            FlowState.TCP_CLOSED: tcp_closed_timeout,
            FlowState.TCP_TIME_WAIT: tcp_time_wait,
            FlowState.UDP_STREAM: udp_timeout,
            FlowState.UDP_SINGLE: min(udp_single_timeout, udp_timeout),
            FlowState.ICMP: icmp_timeout,
        }
        self._idle: list[_Queue] = [OrderedDict() for _ in FlowState]  # indexed by state
        self._queues = tuple((self._idle[state], lifetimes[state]) for state in FlowState)

    @classmethod
    def for_config(cls, config: ServerConfig) -> FlowTable:
        """The table a server with these [server] settings uses."""
        return cls(config.nat_ports, user_share=config.nat_share,
                   tcp_syn_timeout=config.nat_syn_timeout,
                   tcp_unreplied_timeout=config.nat_unreplied_timeout,
                   max_flows_per_user=config.nat_flows_per_user,
                   max_flows_per_session=config.nat_flows_per_session,
                   tcp_pickup=False)

    def __len__(self) -> int:
        return len(self._by_session_flow)

    def sessions_flows(self, session_id: bytes) -> int:
        """How many flows this session has in the table."""
        flows = self._by_session.get(session_id)
        return 0 if flows is None else len(flows)

    def user_flows(self, user: Owner) -> int:
        """How many flows the sessions of this user have in the table."""
        return self._user_flows.get(user, 0)

    def outbound(
        self, session_id: bytes, flow: FlowKey, nat_src: bytes, now: float, tcp_flags: int = 0,
        user: str = "",
    ) -> Flow:
        """The mapping for a packet a session sends, created if new; refreshes ``last_seen``.

        ``nat_src`` and ``user`` (whose caps and share it counts against; without one, the
        session counts alone) are used only when the mapping is created. Raises FlowRefused
        (a FlowTableFull) with its drop code when a cap or the user's share is reached and
        nothing can make room, or every port is taken for that remote endpoint.
        """
        found = self._by_session_flow.get((session_id, flow))
        if found is not None:
            self._touch(found, now, tcp_flags, True)
            return found
        if not self._pickup and flow.proto == PROTO_TCP and not tcp_flags & TCP_SYN:
            raise FlowRefused(Drop.TCP_NO_MAPPING, "a TCP segment without SYN, and no mapping "
                              "for its connection")
        return self._create(session_id, user or session_id, flow, nat_src, now, tcp_flags)

    def lookup(self, session_id: bytes, flow: FlowKey) -> Flow | None:
        """The mapping of a session's flow, if there is one (never creates it)."""
        return self._by_session_flow.get((session_id, flow))

    def find_reply(self, proto: int, remote: bytes, remote_port: int, nat_dst: bytes,
                   nat_port: int) -> Flow | None:
        """The mapping a packet from ``remote:remote_port`` to ``nat_dst:nat_port`` belongs to,
        without counting it as a reply: for ICMP errors, which neither refresh a mapping nor
        make it replied (conntrack treats them as RELATED, not as the connection's traffic),
        and for packets refused before they reach the session."""
        if proto != PROTO_TCP and proto != PROTO_UDP:
            remote_port = 0
        return self._by_reply.get((proto, nat_dst, nat_port, remote, remote_port))

    def inbound(
        self,
        proto: int,
        remote: bytes,
        remote_port: int,
        nat_dst: bytes,
        nat_port: int,
        now: float,
        tcp_flags: int = 0,
    ) -> Flow | None:
        """The mapping a reply from ``remote:remote_port`` to ``nat_dst:nat_port`` belongs to.

        None if there is none (the packet is not ours: drop it). Refreshes ``last_seen``.
        """
        if proto != PROTO_TCP and proto != PROTO_UDP:
            remote_port = 0
        found = self._by_reply.get((proto, nat_dst, nat_port, remote, remote_port))
        if found is not None:
            self._touch(found, now, tcp_flags, False)
        return found

    def expire(self, now: float) -> list[Flow]:
        """Remove and return the flows idle for at least their timeout at ``now``.

        Costs O(1) per queue plus O(1) per flow removed: each queue is oldest first.
        """
        expired: list[Flow] = []
        for queue, timeout in self._queues:
            while queue:
                flow = next(iter(queue.values()))
                if now - flow.last_seen < timeout:
                    break
                self._remove(flow)
                expired.append(flow)
        return expired

    def session_flows(self, session_id: bytes) -> list[Flow]:
        """The mappings of one session."""
        return list(self._by_session.get(session_id, {}).values())

    def drop_flows(self, flows: list[Flow]) -> None:
        """Remove these mappings (a policy narrowed): their ports become free."""
        for flow in flows:
            if self._by_session_flow.get((flow.session_id, flow.original)) is flow:
                self._remove(flow)

    def drop_session(self, session_id: bytes) -> list[Flow]:
        """Remove and return every flow of a session (it closed); their ports become free."""
        flows = list(self._by_session.get(session_id, {}).values())
        for flow in flows:
            self._remove(flow)
        return flows

    # -- across a restart ---------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """Where the round-robin hand-out of ports stands (saved, so a restarted server goes
        on handing out the ports used longest ago)."""
        return self._cursor

    def restore_cursor(self, cursor: int) -> None:
        if 0 <= cursor < self._size:
            self._cursor = cursor

    def saved_flows(self, session_id: bytes, now: float) -> list[SavedFlow]:
        """The mappings of one session as a restarted server gets them back."""
        return [SavedFlow(f.original, f.nat_src, f.nat_port, max(0.0, now - f.last_seen),
                          _state_bits(f), max(0.0, now - f.closed_at) if f.closed else 0.0)
                for f in self._by_session.get(session_id, {}).values()]

    def restore_flow(self, session_id: bytes, user: Owner, saved: SavedFlow,
                     now: float) -> Flow:
        """Put a mapping saved before a restart back, with its NAT port and state, as if it
        had never gone; its times are ``now`` less its ages. Give the oldest first: the idle
        queues are ordered by last use.

        Nothing is evicted to make room, and everything the table keeps for its own mappings
        is checked first: ValueError for a mapping it never makes (a protocol without NAT,
        mixed address families, an impossible state, a negative age, the same flow of the
        session twice, a NAT port towards an endpoint that another mapping holds),
        FlowRefused for one that breaks a bound (a NAT port outside its range, the session's,
        the user's or the table's cap, the user's share of a destination: the settings may
        have changed since)."""
        key, nat_src, port = saved.key, saved.nat_src, saved.nat_port
        proto = key.proto
        if proto not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6):
            raise ValueError(f"no NAT for protocol {proto}")
        if not len(key.src) == len(key.dst) == len(nat_src) or len(nat_src) not in (4, 16):
            raise ValueError("addresses of different families or lengths")
        if (proto == PROTO_ICMP and len(nat_src) != 4
                or proto == PROTO_ICMPV6 and len(nat_src) != 16):
            raise ValueError("ICMP of the other address family")
        if not (0 <= key.sport <= 65535 and 0 <= key.dport <= 65535):
            raise ValueError("a port outside 0-65535")
        if proto in (PROTO_ICMP, PROTO_ICMPV6) and key.sport != key.dport:
            raise ValueError("an echo mapping with two identifiers")
        if not 0 <= port - self._low < self._size:  # nat_ports changed since
            raise FlowRefused(Drop.NO_NAT_PORT, f"NAT port {port} outside nat_ports "
                              f"{self._low}-{self._low + self._size - 1}")
        refusal = state_refusal(proto, saved.state)
        if refusal is not None:
            raise ValueError(refusal)
        for age in (saved.idle, saved.closed_for):
            if not (math.isfinite(age) and 0 <= age <= MAX_AGE):
                raise ValueError(f"an age of {age!r} s")
        remote_port = _remote_port(key)
        endpoint = (proto, nat_src, key.dst, remote_port)
        reply_key = (proto, nat_src, port, key.dst, remote_port)
        if (session_id, key) in self._by_session_flow:
            raise ValueError("the session's flow is mapped already")
        if reply_key in self._by_reply:
            raise ValueError("its NAT port towards that endpoint is taken")
        if len(self._by_session.get(session_id, ())) >= self._per_session:
            raise FlowRefused(Drop.FLOW_CAP_SESSION, "the session holds as many mappings as "
                              f"one session may ({self._per_session})")
        if self._user_flows.get(user, 0) >= self._per_user:
            raise FlowRefused(Drop.FLOW_CAP_USER, "the user holds as many mappings as one "
                              f"user may ({self._per_user})")
        if len(self._by_session_flow) >= self._max_flows:
            raise FlowRefused(Drop.FLOW_TABLE_FULL, f"the table holds {self._max_flows}")
        state = saved.state
        closed = bool(state & STATE_CLOSED)
        if not closed and self._held.get((user, endpoint), 0) >= self._share:
            raise FlowRefused(Drop.NAT_SHARE, "the user holds its share of that destination's "
                              "ports")
        flow = Flow(session_id, key, nat_src, port, now - saved.idle,
                    bool(state & STATE_CLOSING),
                    fins=(_FIN_OUT if state & STATE_FIN_OUT else 0)
                    | (_FIN_IN if state & STATE_FIN_IN else 0),
                    closed=closed, closed_at=now - saved.closed_for if closed else 0.0,
                    remote_closed_first=bool(state & STATE_REMOTE_CLOSED_FIRST),
                    time_wait=bool(state & STATE_TIME_WAIT), replied=bool(state & STATE_REPLIED),
                    stream=bool(state & STATE_STREAM), user=user, syn=bool(state & STATE_SYN))
        self.changes += 1
        fid = id(flow)
        self._by_session_flow[(session_id, key)] = flow
        self._by_reply[reply_key] = flow
        self._ports_used[endpoint] = self._ports_used.get(endpoint, 0) + 1
        self._by_session.setdefault(session_id, {})[fid] = flow
        self._user_flows[user] = self._user_flows.get(user, 0) + 1
        self._queue(flow)[fid] = flow
        if not flow.replied:
            self._index(flow, self._unreplied, self._unreplied_by_user,
                        self._unreplied_by_session)
        if closed:
            self._closed_by_endpoint.setdefault(endpoint, OrderedDict())[fid] = flow
            self._index(flow, self._closed, self._closed_by_user, self._closed_by_session)
        else:
            self._hold(flow, 1)
        return flow

    # -- internals ---------------------------------------------------------------------------

    def _queue(self, flow: Flow) -> _Queue:
        return self._idle[flow.state]

    def _touch(self, flow: Flow, now: float, tcp_flags: int, outbound: bool) -> None:
        flow.last_seen = now
        if not outbound and not flow.replied:
            self._replied(flow)
        if flow.original.proto == PROTO_TCP and tcp_flags:
            if tcp_flags & (TCP_FIN | TCP_RST):
                self._track_end(flow, now, tcp_flags, outbound)
                return
            if flow.closing and outbound and tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                # The client reuses the 4-tuple for a new connection (after TIME-WAIT): a new
                # connection, unreplied until the remote end answers, on the same NAT port.
                self._requeue(flow, closing=False, closed=False, time_wait=False, now=now,
                              reopened=True)
                flow.fins = 0
                flow.remote_closed_first = False
                return
        elif flow.original.proto == PROTO_UDP and not flow.stream:
            if outbound and flow.replied:
                del self._queue(flow)[id(flow)]
                flow.stream = True
                self._queue(flow)[id(flow)] = flow
                return
        self._queue(flow).move_to_end(id(flow))

    def _track_end(self, flow: Flow, now: float, tcp_flags: int, outbound: bool) -> None:
        if tcp_flags & TCP_FIN and not flow.closed:  # a FIN after an RST changes nothing
            if not flow.fins and not outbound:
                flow.remote_closed_first = True
            flow.fins |= _FIN_OUT if outbound else _FIN_IN
        reset = bool(tcp_flags & TCP_RST)
        if reset or flow.fins == _FIN_OUT | _FIN_IN:
            # The remote end holds TIME-WAIT for this port after closing first; an RST ends
            # that (and any other state) on both sides.
            time_wait = flow.remote_closed_first and not reset
            if flow.closed and flow.time_wait == time_wait:
                self._queue(flow).move_to_end(id(flow))
            else:
                self._requeue(flow, closing=True, closed=True, time_wait=time_wait, now=now)
        elif not flow.closing:
            self._requeue(flow, closing=True, closed=False, time_wait=False, now=now)
        else:
            self._queue(flow).move_to_end(id(flow))  # closing, or closed by an RST

    def _replied(self, flow: Flow) -> None:
        """The first packet from the remote end: the mapping is no longer an eviction
        candidate, and a TCP one leaves its short unreplied timeout."""
        self.changes += 1
        key = id(flow)
        old = self._queue(flow)
        flow.replied = True
        new = self._queue(flow)
        if new is not old:
            del old[key]
            new[key] = flow
        self._unindex(flow, self._unreplied, self._unreplied_by_user, self._unreplied_by_session)

    def _requeue(
        self, flow: Flow, closing: bool, closed: bool, time_wait: bool, now: float,
        reopened: bool = False,
    ) -> None:
        self.changes += 1
        key = id(flow)
        del self._queue(flow)[key]
        if flow.closed:
            self._forget_closed(flow)
        if closed != flow.closed:
            self._hold(flow, -1 if closed else 1)
        flow.closing, flow.closed, flow.time_wait = closing, closed, time_wait
        if reopened:
            flow.syn = True
            if flow.replied:
                flow.replied = False
                self._index(flow, self._unreplied, self._unreplied_by_user,
                            self._unreplied_by_session)
        self._queue(flow)[key] = flow
        if closed:
            flow.closed_at = now
            self._closed_by_endpoint.setdefault(_endpoint(flow), OrderedDict())[key] = flow
            self._index(flow, self._closed, self._closed_by_user, self._closed_by_session)

    def _forget_closed(self, flow: Flow) -> None:
        endpoint = _endpoint(flow)
        closed = self._closed_by_endpoint[endpoint]
        del closed[id(flow)]
        if not closed:
            del self._closed_by_endpoint[endpoint]
        self._unindex(flow, self._closed, self._closed_by_user, self._closed_by_session)

    @staticmethod
    def _index(flow: Flow, table: _Queue, by_user: dict[Owner, _Queue],
               by_session: dict[bytes, _Queue]) -> None:
        key = id(flow)
        table[key] = flow
        _scoped(by_user, flow.user)[key] = flow
        _scoped(by_session, flow.session_id)[key] = flow

    @staticmethod
    def _unindex(flow: Flow, table: _Queue, by_user: dict[Owner, _Queue],
                 by_session: dict[bytes, _Queue]) -> None:
        key = id(flow)
        del table[key]
        _unscope(by_user, flow.user, key)
        _unscope(by_session, flow.session_id, key)

    def _evict(self, unreplied: _Queue | None, closed: _Queue | None) -> bool:
        """Remove the oldest unreplied mapping of a scope, else the one closed longest ago
        (conntrack's early drop); False if the scope has neither."""
        for queue in (unreplied, closed):
            if queue:
                self._remove(next(iter(queue.values())))
                self.evicted += 1
                return True
        return False

    def _make_room(self, session_id: bytes, user: Owner) -> None:
        """Make room for one more mapping of this session under every cap, or refuse it."""
        session_flows = self._by_session.get(session_id)
        if session_flows is not None and len(session_flows) >= self._per_session and not (
                self._evict(self._unreplied_by_session.get(session_id),
                            self._closed_by_session.get(session_id))):
            raise FlowRefused(Drop.FLOW_CAP_SESSION, f"this session holds {self._per_session} "
                              "NAT mappings, all open and answered, the most one session may")
        if self._user_flows.get(user, 0) >= self._per_user and not self._evict(
                self._unreplied_by_user.get(user), self._closed_by_user.get(user)):
            raise FlowRefused(Drop.FLOW_CAP_USER, f"this user's sessions hold {self._per_user} "
                              "NAT mappings, all open and answered, the most one user may")
        if len(self._by_session_flow) >= self._max_flows and not self._evict(
                self._unreplied, self._closed):
            raise FlowRefused(Drop.FLOW_TABLE_FULL, f"flow table full ({self._max_flows} "
                              "flows, all open and answered)")

    def _reusable(self, endpoint: _Endpoint, now: float) -> Flow | None:
        """The mapping towards ``endpoint`` closed longest ago, if long enough to reuse its port."""
        closed = self._closed_by_endpoint.get(endpoint)
        if closed:
            oldest = next(iter(closed.values()))
            if now - oldest.closed_at >= self._reuse_after:
                return oldest
        return None

    def _create(
        self, session_id: bytes, user: Owner, flow: FlowKey, nat_src: bytes, now: float,
        tcp_flags: int,
    ) -> Flow:
        proto = flow.proto
        if proto not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6):
            raise LocalProtocolError(f"no NAT for protocol {proto}")
        if len(nat_src) != len(flow.dst):
            raise LocalProtocolError("NAT address and flow are of different address families")
        remote_port = _remote_port(flow)
        endpoint = (proto, nat_src, flow.dst, remote_port)
        if self._held.get((user, endpoint), 0) >= self._share:
            raise FlowRefused(Drop.NAT_SHARE, f"this user already holds {self._share} open "
                              "mappings towards this destination, its share of the ports")
        self._make_room(session_id, user)
        used = self._ports_used.get(endpoint, 0)
        if used >= self._size:
            reused = self._reusable(endpoint, now)
            if reused is None:
                raise FlowRefused(Drop.NO_NAT_PORT, "every NAT port towards this destination "
                                  "is in use")
            self._remove(reused)
            return self._add(session_id, user, flow, nat_src, reused.nat_port, now, tcp_flags)
        # Round-robin from the shared cursor; the first port free for this endpoint wins. The
        # count above guarantees one exists within a full turn.
        by_reply = self._by_reply
        size = self._size
        cursor = self._cursor
        for _ in range(size):
            port = self._low + cursor
            cursor += 1
            if cursor == size:
                cursor = 0
            reply_key = (proto, nat_src, port, flow.dst, remote_port)
            if reply_key not in by_reply:
                break
        else:  # unreachable while the counts are consistent; fail safe rather than overwrite
            raise FlowRefused(Drop.NO_NAT_PORT, "every NAT port towards this destination is "
                              "in use")
        self._cursor = cursor
        return self._add(session_id, user, flow, nat_src, port, now, tcp_flags)

    def _add(
        self, session_id: bytes, user: Owner, flow: FlowKey, nat_src: bytes, port: int,
        now: float, tcp_flags: int,
    ) -> Flow:
        self.changes += 1
        created = Flow(session_id, flow, nat_src, port, now, False, user=user,
                       syn=flow.proto == PROTO_TCP and tcp_flags & TCP_SYN != 0)
        remote_port = _remote_port(flow)
        endpoint = (flow.proto, nat_src, flow.dst, remote_port)
        self._by_session_flow[(session_id, flow)] = created
        self._by_reply[(flow.proto, nat_src, port, flow.dst, remote_port)] = created
        self._ports_used[endpoint] = self._ports_used.get(endpoint, 0) + 1
        self._by_session.setdefault(session_id, {})[id(created)] = created
        self._user_flows[user] = self._user_flows.get(user, 0) + 1
        self._queue(created)[id(created)] = created
        self._index(created, self._unreplied, self._unreplied_by_user, self._unreplied_by_session)
        self._hold(created, 1)
        if flow.proto == PROTO_TCP and tcp_flags & (TCP_FIN | TCP_RST):
            self._track_end(created, now, tcp_flags, True)  # a flow first seen mid-way
        return created

    def _remove(self, flow: Flow) -> None:
        self.changes += 1
        original = flow.original
        remote_port = _remote_port(original)
        del self._by_session_flow[(flow.session_id, original)]
        del self._by_reply[(original.proto, flow.nat_src, flow.nat_port, original.dst, remote_port)]
        endpoint = (original.proto, flow.nat_src, original.dst, remote_port)
        used = self._ports_used[endpoint] - 1
        if used:
            self._ports_used[endpoint] = used
        else:
            del self._ports_used[endpoint]
        key = id(flow)
        session_flows = self._by_session[flow.session_id]
        del session_flows[key]
        if not session_flows:
            del self._by_session[flow.session_id]
        count = self._user_flows[flow.user] - 1
        if count:
            self._user_flows[flow.user] = count
        else:
            del self._user_flows[flow.user]
        del self._queue(flow)[key]
        if not flow.replied:
            self._unindex(flow, self._unreplied, self._unreplied_by_user,
                          self._unreplied_by_session)
        if flow.closed:
            self._forget_closed(flow)
        else:
            self._hold(flow, -1)

    def _hold(self, flow: Flow, change: int) -> None:
        key = (flow.user, _endpoint(flow))
        held = self._held.get(key, 0) + change
        if held:
            self._held[key] = held
        else:
            del self._held[key]


def _scoped(index: dict[_K, _Queue], key: _K) -> _Queue:
    queue = index.get(key)
    if queue is None:
        queue = index[key] = OrderedDict()
    return queue


def _unscope(index: dict[_K, _Queue], key: _K, flow_key: int) -> None:
    queue = index[key]
    del queue[flow_key]
    if not queue:
        del index[key]
