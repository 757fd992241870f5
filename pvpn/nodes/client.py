"""The client host's policy, sans-IO: which user holds which session slot, what happens to a
queued packet of a slot, which replies may reach a user's TUN device, the local connections
on pvpn-client's socket, and what the kernel's rules say (sessions a restart finds, rules
someone else removed, marks a slot still carries). No socket, no subprocess, no clock: inputs carry ``now``;
outputs are commands collected in :attr:`ClientHost.commands` (and the bytes every local
connection has to send, in its ``pending``) for pvpn-client (client/daemon.py) to carry out.

A slot gives a session its NFQUEUE number, its connection mark and its TUN device name. The uid
of every request comes from the kernel (SO_PEERCRED), never from the message.

What one local user may take is bounded (docs/design.md, "Limits and defences: the client
host"): sessions and prefixes per uid, flows per session, and how long a session is kept
without its tunnel process: briefly if it never came up, ``held_timeout`` if it did.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, TypeVar

from pvpn import firewall
from pvpn import packet as pk
from pvpn.commands import Command, LogRecord
from pvpn.config import ClientConfig, Network, parse_prefixes
from pvpn.drops import Counters, Drop
from pvpn.envelope import (
    DEFAULT_HOPS, GSO_TCPV4, GSO_TCPV6, MIN_GSO_SIZE, Envelope, MsgType, Offload, bare_packet,
    decode_control, encode_offload, is_offloaded, split_offload,
)
from pvpn.hosted import HostedEvents, HostedTunnel, parse_chain_spec
from pvpn.errors import (
    ConfigError, MalformedPacket, PolicyError, PvpnError, RemoteProtocolError,
)
from pvpn.local import LocalChannel
from pvpn.names import (
    LOCAL_REFUSED, NODE_CLEANUP, NODE_RECOVER_FAILED, NODE_STOPPING, NODE_WARNING, PACKET_DROPPED,
    SESSION_ATTACHED, SESSION_CLOSED, SESSION_CONNECTIONS_RESET, SESSION_HELD, SESSION_REATTACHED,
    SESSION_RECOVERED, SESSION_REGISTERED, SLOT_QUARANTINED,
)
from pvpn.packet import FlowKey
from pvpn.records import Record, session_hex, with_fields
from pvpn.text import clip, quoted

#: A flow idle this long is forgotten (its replies are refused from then on): the server keeps
#: an open TCP mapping as long (2 h 4 min, RFC 5382's minimum), so nothing it still routes
#: back is dropped here for being old.
FLOW_IDLE = 7440.0

#: `pvpn disconnect ID`: an id prefix shorter than this is refused (a typo must not match).
MIN_ID_PREFIX = 8
_ID_PREFIX_RE = re.compile(rf"[0-9a-f]{{{MIN_ID_PREFIX},32}}")

#: Free slots probed (each a conntrack query) before a registration is refused because every
#: one of them still carries connections of its last holder.
MAX_SLOT_PROBES = 8

#: How many candidates a refusal lists.
_LISTED = 16

#: A TCP flow's segment size is asked of its socket again after this long (a path MTU that
#: changed), and at most this many are kept per session.
SEGMENT_SIZE_TTL = 1.0
MAX_SEGMENT_SIZES = 64


class Queued(enum.Enum):
    """What becomes of a packet of a session's queue (ClientHost.queued)."""

    TAKEN = "taken"  # dropped from the kernel's path: into the tunnel, or dropped and counted
    SEGMENT = "segment"  # to the session's segmenting queue: the kernel segments it first


@dataclass(slots=True)
class SlotSession(Counters):
    """One user's protected prefixes on this host, with or without a live tunnel process."""

    slot: int
    uid: int
    user: str
    server: str
    networks: list[Network]
    queue: int
    mark: int
    tun: str
    opened: float  # registered (or recovered after a restart)
    max_flows: int = 8192
    # Where a super-packet goes for the kernel to segment it (a queue without
    # NFQA_CFG_F_GSO): queue_base + max_sessions + slot; -1 for none (its queue then has no
    # F_GSO either: the kernel segments everything first, as before super-packets).
    segmenting_queue: int = -1
    # Its TCP flows' segment sizes, as their sockets said (sock_diag), until when: the
    # upload super-packets' offload headers. Bounded (MAX_SEGMENT_SIZES).
    segment_sizes: dict[FlowKey, tuple[tuple[int, bool] | None, float]] = field(
        default_factory=dict)
    # The chain as its tunnel process told it: the gateways' endpoints (REGISTER) and the
    # names every node gave, the server's last (ATTACH); what `pvpn status` shows.
    via: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    session_id: bytes = b""
    # The id recorded in the session's rules (what the next pvpn-client reads), and when.
    recorded: bytes = b""
    recorded_at: float = float("-inf")
    attached: bool = False  # a tunnel process is connected for it
    ever_up: bool = False  # it was attached (ATTACH) with a session id at least once
    held_since: float | None = None  # when its tunnel process went
    # Flows this session sent, so only replies to them may be injected (anti-spoofing).
    # Least recently used first: a full table forgets the flow idle longest.
    flows: dict[FlowKey, float] = field(default_factory=dict)
    flows_evicted: int = 0
    # When its TCP connections were last made to speak after the server's session turned out
    # to be a new one (ClientHost.reset_connections), so ATTACHes cannot repeat it at will.
    probed_at: float = float("-inf")

    @property
    def state(self) -> str:
        if self.attached:
            return "up" if self.session_id else "connecting"
        return "held (no tunnel process: dropping)"

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "slot": self.slot, "uid": self.uid, "user": self.user, "server": self.server,
            "via": list(self.via), "nodes": list(self.nodes),
            "session": self.session_id.hex(), "prefixes": [str(n) for n in self.networks],
            "state": self.state, "age": round(now - self.opened, 1), "queue": self.queue,
            "tun": self.tun, **self.traffic(), "flows": len(self.flows),
            "flows_evicted": self.flows_evicted,
        }

    def drop(self, code: Drop, now: float) -> int:
        """Count a drop; its count so far if it should be logged, else 0 (rate-limited)."""
        return self.drops.count(code, now)

    def note_flow(self, key: FlowKey, now: float) -> None:
        """Remember a flow this session sent: least recently used last, so a full table
        forgets the flow idle longest."""
        flows = self.flows
        flows.pop(key, None)
        flows[key] = now
        if len(flows) > self.max_flows:
            del flows[next(iter(flows))]
            self.flows_evicted += 1

    def prune_flows(self, now: float) -> None:
        """Forget flows idle longer than FLOW_IDLE: the oldest come first, so this touches only
        what it removes (and the first flow it keeps)."""
        flows = self.flows
        stale = []
        for key, seen in flows.items():
            if now - seen <= FLOW_IDLE:
                break
            stale.append(key)
        for key in stale:
            del flows[key]

    def label(self) -> str:
        """How a refusal names the session to a person."""
        return (f"{self.session_id.hex() or '(no id yet)'} (slot {self.slot}, {quoted(self.user)}, "
                f"{', '.join(str(n) for n in self.networks[:4])}"
                f"{', ...' if len(self.networks) > 4 else ''})")


def _listing(sessions: list[SlotSession]) -> str:
    shown = "; ".join(s.label() for s in sessions[:_LISTED])
    more = len(sessions) - _LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


class Registry:
    """Slots by number; requests checked against the caller's kernel-given uid."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.sessions: dict[int, SlotSession] = {}
        self._shift = (config.mark_mask & -config.mark_mask).bit_length() - 1
        # uid -> (allowance of new sessions, when it was counted): a token bucket of
        # max_sessions_per_uid refilled at max_new_sessions_per_minute.
        self.rates: dict[int, tuple[float, float]] = {}
        # Set at recovery: rules of an earlier pvpn-client named queues this config would not
        # give (another queue_base or max_sessions), or were incomplete. Until this process
        # ends no session gets a segmenting queue (segmenting_queue): any number may be one.
        self.foreign_rules = False

    def mark_for(self, slot: int) -> int:
        # Slot 0 gets mark 1 (shifted into the mask): an unmarked connection is never a session.
        # The mask is contiguous (config), so every slot's mark is distinct and non-zero.
        return ((slot + 1) << self._shift) & self.config.mark_mask

    def find_held(self, uid: int, networks: list[Network]) -> SlotSession | None:
        """A session of this uid for exactly these prefixes whose tunnel process is gone."""
        wanted = set(networks)
        for session in self.sessions.values():
            if session.uid == uid and not session.attached and set(session.networks) == wanted:
                return session
        return None

    def of_uid(self, uid: int) -> list[SlotSession]:
        return [s for s in self.sessions.values() if s.uid == uid]

    def allocate(self, uid: int, user: str, server: str, networks: list[Network], now: float,
                 usable: Callable[[int], bool] = lambda slot: True) -> SlotSession:
        """A new session in a free slot, within the uid's limits. ``usable(slot)`` says whether
        nothing in the kernel still carries the slot's mark (a connection of its last holder):
        a slot for which it says no is skipped (quarantined) and asked again next time."""
        config = self.config
        networks = list(dict.fromkeys(networks))  # the same prefix twice is one prefix
        mine = self.of_uid(uid)
        if len(mine) >= config.max_sessions_per_uid:
            raise PolicyError(
                f"you hold {len(mine)} sessions on this host, the most one user may "
                f"(max_sessions_per_uid = {config.max_sessions_per_uid}); `pvpn disconnect` "
                f"one of them: {_listing(mine)}")
        if len(networks) > config.max_prefixes_per_session:
            raise PolicyError(
                f"{len(networks)} prefixes in one session; at most "
                f"{config.max_prefixes_per_session} (max_prefixes_per_session): protect a "
                "covering prefix instead")
        held = sum(len(s.networks) for s in mine)
        if held + len(networks) > config.max_prefixes_per_uid:
            raise PolicyError(
                f"your sessions protect {held} prefixes; {len(networks)} more would exceed "
                f"{config.max_prefixes_per_uid} per user (max_prefixes_per_uid)")
        for session in mine:
            # Other users may protect the same prefixes: the owner match splits them.
            for have in session.networks:
                for new in networks:
                    if have.version == new.version and have.overlaps(new):
                        raise PolicyError(
                            f"{new} overlaps {have}, already protected by your session "
                            f"{session.session_id.hex() or '(connecting)'} in slot "
                            f"{session.slot}; `pvpn disconnect` it first")
        free = [s for s in range(config.max_sessions) if s not in self.sessions]
        if not free:
            raise PolicyError(f"all {config.max_sessions} session slots of this host are "
                              "in use; ask root to raise max_sessions")
        self._take_allowance(uid, now)
        slot = next((s for s in free[:MAX_SLOT_PROBES] if usable(s)), None)
        if slot is None:
            raise PolicyError(
                "the free session slots still carry connections of their last holders "
                "(quarantined until those end); try again in a minute")
        session = SlotSession(
            slot=slot, uid=uid, user=user, server=server, networks=networks,
            queue=config.queue_base + slot, mark=self.mark_for(slot),
            tun=f"{config.instance}{slot}", opened=now, max_flows=config.max_flows_per_session,
            segmenting_queue=self.segmenting_queue(slot),
        )
        self.sessions[slot] = session
        return session

    def _take_allowance(self, uid: int, now: float) -> None:
        """Count one new session (its rules installed, later removed, conntrack asked) against
        the uid's rate, or PolicyError: so nobody's loop of registrations keeps pvpn-client
        running iptables for them (root is never refused)."""
        if uid == 0:
            return
        burst, rate = float(self.config.max_sessions_per_uid), \
            self.config.max_new_sessions_per_minute / 60.0
        tokens, then = self.rates.get(uid, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens < 1.0:
            raise PolicyError(
                f"too many new sessions: at most {self.config.max_new_sessions_per_minute} a "
                f"minute per user (max_new_sessions_per_minute); try again in "
                f"{(1.0 - tokens) / rate:.0f} s")
        self.rates[uid] = (tokens - 1.0, now)

    def forget_rates(self, now: float) -> None:
        """Drop the uids whose allowance is whole again (the table holds the recent ones)."""
        burst, rate = float(self.config.max_sessions_per_uid), \
            self.config.max_new_sessions_per_minute / 60.0
        for uid, (tokens, then) in list(self.rates.items()):
            if tokens + (now - then) * rate >= burst:
                del self.rates[uid]

    def segmenting_queue(self, slot: int, queue: int | None = None) -> int:
        """Slot ``slot``'s segmenting queue, or -1 if that number is, or may become, another
        session's queue (``queue`` its own: one a recovered session's rules name, which an
        earlier config gave). Its number must never be one that rules of a session feed:
        the packets of that session's user would enter this session's tunnel. Rules made
        under another queue_base or max_sessions may name any number, so a session whose
        queue is not this config's gets none, and no segmenting queue is one that a held
        session's rules name."""
        config = self.config
        number = config.queue_base + config.max_sessions + slot
        if self.foreign_rules or not 0 <= slot < config.max_sessions or number > 0xFFFF:
            return -1
        if queue is not None and queue != config.queue_base + slot:
            return -1
        if any(s.queue == number or s.queue != config.queue_base + s.slot
               for s in self.sessions.values()):
            return -1  # rules of another config are about: none is safe to guess
        return number

    def adopt(self, slot: int, uid: int, user: str, networks: list[Network], queue: int,
              mark: int, tun: str, now: float, session_id: bytes = b"",
              ever_up: bool = False) -> SlotSession:
        """A session whose rules outlived a pvpn-client (stopped, crashed or upgraded): held
        until its user's tunnel process registers again (its packets are dropped meanwhile).
        ``ever_up``: it was up before, so it is kept ``held_timeout``, not ``grace_time``."""
        session = SlotSession(slot=slot, uid=uid, user=user, server="(recovered)",
                              networks=list(networks), queue=queue, mark=mark, tun=tun,
                              opened=now, max_flows=self.config.max_flows_per_session,
                              session_id=session_id, recorded=session_id, ever_up=ever_up,
                              held_since=now, segmenting_queue=self.segmenting_queue(
                                  slot, queue))
        self.sessions[slot] = session
        return session

    def release(self, slot: int) -> SlotSession | None:
        return self.sessions.pop(slot, None)

    def visible_to(self, uid: int) -> list[SlotSession]:
        return [s for s in self.sessions.values() if uid == 0 or s.uid == uid]

    def expired(self, now: float) -> list[tuple[SlotSession, str]]:
        """Sessions to end now, with the reason: never up ``grace_time`` after registering
        (or after a restart found them), or held ``held_timeout`` without a tunnel process
        (0: held until `pvpn disconnect`)."""
        grace, held = self.config.grace_time, self.config.held_timeout
        out = []
        for session in self.sessions.values():
            if not session.ever_up:
                if now - session.opened > grace:
                    out.append((session, f"never up within {grace:g} s (grace_time)"))
            elif (held > 0 and not session.attached and session.held_since is not None
                  and now - session.held_since > held):
                out.append((session, f"held {held:g} s without its tunnel process "
                                     "(held_timeout)"))
        return out

    def select_for_disconnect(self, uid: int, session: str = "", slot: int | None = None,
                              everything: bool = False) -> list[SlotSession]:
        """The sessions `pvpn disconnect` ends for ``uid`` (root may name anyone's):

        * ``everything`` (``--all``): all the caller may see (root: every session);
        * ``slot``: the session in that slot;
        * ``session``: the one whose id starts with that prefix of at least MIN_ID_PREFIX hex
          digits; an ambiguous prefix is refused with the candidates;
        * nothing named: the caller's own session if it has exactly one (root's own, never
          everyone's).
        PolicyError says what to name instead."""
        visible = self.visible_to(uid)
        if everything:
            if not visible:
                raise PolicyError("no session" + ("" if uid == 0 else " of yours") +
                                  " on this host")
            return visible
        if slot is not None:
            found = [s for s in visible if s.slot == slot]
            if not found:
                raise PolicyError(f"no session of yours in slot {slot}")
            return found
        if session:
            text = session.lower()
            if not _ID_PREFIX_RE.fullmatch(text):
                raise PolicyError(
                    f"{quoted(session, 64)} is not a session id: give at least "
                    f"{MIN_ID_PREFIX} of its hex digits (`pvpn status` lists them), or --all")
            found = [s for s in visible if s.session_id.hex().startswith(text)]
            if not found:
                raise PolicyError(f"no session {text} of yours on this host")
            if len(found) > 1:
                raise PolicyError(f"{text} names {len(found)} sessions: {_listing(found)}; "
                                  "give more digits")
            return found
        own = self.of_uid(uid)
        if len(own) == 1:
            return own
        if not own:
            raise PolicyError("no session of yours on this host" +
                              (" (root: name one, or --all for everyone's)" if uid == 0 else ""))
        raise PolicyError(f"you have {len(own)} sessions: {_listing(own)}; name one "
                          "(pvpn disconnect ID) or give --all")


# ---------------------------------------------------------------- the host: its commands


@dataclass(slots=True)
class WriteTun(Command):
    """Write this reply into the session's TUN device; a write that fails is reported back
    with :meth:`ClientHost.tun_refused`."""

    session: SlotSession
    packet: bytes
    flow: FlowKey
    # A TCP super-packet's offload header (its checksum the pseudo-header's sum): written
    # with its virtio_net_hdr, for the kernel to deliver whole.
    offload: Offload | None = None


@dataclass(slots=True)
class CloseLocal(Command):
    """Close this local connection once what it has pending is written."""

    peer: "LocalPeer"


#: At most one local:error or local:refused record per uid this often (seconds).
LOCAL_LOG_EVERY = 10.0
#: A session's id is written into its rules at its first ATTACH, a change of it at most this
#: often (seconds; the timer writes what is due), so ATTACHes cannot keep iptables running.
RECORD_EVERY = 60.0
#: A session's TCP connections are probed (reset_connections) at most this often (seconds):
#: a round costs a sock_diag question per flow, up to max_flows_per_session of them.
PROBE_EVERY = 30.0
#: How often the timer forgets flows idle past FLOW_IDLE and uids' old rates (seconds).
PRUNE_EVERY = 60.0
#: A registered ``server`` (shown in `pvpn status`, logged) is a host and port: a DNS name is at
#: most 253 characters. Anything longer or with control characters is refused at REGISTER.
MAX_SERVER = 300
#: The questions answered with more than an acknowledgement: refused while the asker leaves
#: earlier answers unread (WRITE_HIGH_WATER), so one local user cannot make pvpn-client buffer
#: without bound.
ANSWERED = frozenset({MsgType.REGISTER, MsgType.STATUS, MsgType.DISCONNECT})


def chain_names(names: object, what: str) -> list[str]:
    """A chain's endpoints or node names from a tunnel process, bounded for status."""
    if (not isinstance(names, list) or len(names) > DEFAULT_HOPS
            or not all(isinstance(n, str) and 0 < len(n) <= MAX_SERVER and n.isprintable()
                       for n in names)):
        raise ConfigError(f"the chain's {what} must be at most {DEFAULT_HOPS} printable "
                          f"names of at most {MAX_SERVER} characters each")
    return list(names)


class RuleRunner(Protocol):
    """The instance's iptables rules (pvpn.io.hostkernel.InstanceRules; a fake in tests).
    Every change counts in ``epoch``, so a check of rules read before it is not acted on."""

    epoch: int

    def apply(self, ruleset: firewall.RuleSet) -> None:
        """Each family's rules in one transaction (PvpnError)."""

    def run_each(self, commands: list[list[str]], versions: tuple[int, ...]) -> list[str]:
        """Commands one by one, in these families; the errors (what is gone already is none)."""

    def remove_chains(self, chains: list[str], referring: str) -> list[str]: ...

    def ensure_jump(self, builtin: str, chain: str) -> None: ...

    def ensure_rule(self, rule: str) -> None: ...

    def remove_instance(self) -> list[str]: ...


class HostKernel(Protocol):
    """What the policy asks of the host's kernel, each answer deciding what it does next
    (pvpn-client's daemon: TUN, NFQUEUE, iptables, conntrack, sock_diag; a fake in tests)."""

    rules: RuleRunner

    def install(self, session: SlotSession) -> None:
        """TUN device, queue, then rules (PvpnError if any cannot be had)."""

    def uninstall(self, session: SlotSession) -> list[str]:
        """Its rules, queue and TUN device go; the rule errors."""

    def attach_devices(self, session: SlotSession) -> None:
        """Its TUN device and queue again (its rules stayed; PvpnError)."""

    def has_devices(self, session: SlotSession) -> bool: ...

    def marked(self, mark: int) -> int:
        """How many connections carry the mark (conntrack; PvpnError)."""

    def forget_marked(self, mark: int) -> int:
        """Forget the connections that carry the mark; how many (PvpnError)."""

    def abort_connections(self, session: SlotSession) -> int | str: ...

    def forget_marks(self, session: SlotSession) -> int | str: ...

    def write_id(self, session: SlotSession) -> str | None:
        """Write the session's id into its rules; why it could not, or None."""

    def reset_connections(self, session: SlotSession) -> int:
        """Make its TCP connections answer (the server's session is a new one); how many."""


class OwnerLookup(Protocol):
    """Whose socket a packet of a flow would reach (pvpn.io.sockdiag.SocketOwners; a fake in
    tests): a uid, None for no process's, PvpnError when the kernel cannot tell."""

    def owner(self, flow: FlowKey) -> int | None: ...

    def send_mss(self, flow: FlowKey) -> tuple[int, bool] | None:
        """The local TCP socket of ``flow`` (as sent): its segment size and whether its
        segments carry timestamps; None without one."""


class LocalPeer:
    """One connection on pvpn-client's socket (a `pvpn connect`, `pvpn status` or `pvpn
    disconnect` process) as the policy sees it: who the kernel says it is, the session it
    holds, and the envelopes it has to be sent (``pending``, written by the adapter)."""

    def __init__(self, id: int) -> None:
        self.id = id
        self.uid = -1
        self.pid = -1
        self.channel = LocalChannel()
        self.pending: list[bytes] = []
        self.session: SlotSession | None = None
        self.attached_here = False  # this process sent ATTACH: it had the session up
        self.unregistered = False
        self.congested = False
        self.last_active = 0.0
        self.admitted = False
        self.tunnel: HostedTunnel | None = None  # the chain pvpn-client holds for it

    def send_control(self, mtype: MsgType, fields: dict[str, Any]) -> None:
        session = self.session.session_id if self.session else b""
        self.pending.append(self.channel.control(mtype, session, self.uid, fields))

    def send_status(self, sessions: list[dict[str, Any]]) -> None:
        """STATUS_REPLY in as many pages as the sessions need."""
        session = self.session.session_id if self.session else b""
        self.pending += self.channel.status(session, self.uid, sessions)


def session_event(event: str, session: SlotSession | None = None, **kw: Any) -> Record:
    """A record of pvpn-client's, about ``session`` if given."""
    rec = Record(event)
    if session is not None:
        rec.session, rec.user = session_hex(session.session_id), session.user
        rec.uid = session.uid
        rec.extra["slot"] = session.slot
    return with_fields(rec, kw)


P = TypeVar("P", bound=LocalPeer)


class ClientHost(Generic[P]):
    """The client host's policy. Driven by pvpn-client: :meth:`admit`, :meth:`control` and
    :meth:`lost` for the local connections and their questions, :meth:`queued` for each packet
    of a session's queue, :meth:`reply` for each packet a tunnel process returns,
    :meth:`tick` for the timer, :meth:`recover` at the start and :meth:`check_rules` from
    the rules' watch (each with what iptables-save shows). ``owners``, ``user_name`` and
    ``kernel`` are its questions to the host (whose socket, which name, what the kernel could
    do)."""

    def __init__(self, config: ClientConfig, owners: OwnerLookup,
                 user_name: Callable[[int], str], kernel: HostKernel) -> None:
        self.config = config
        self.registry = Registry(config)
        self.owners = owners
        self.kernel = kernel
        self.user_name = user_name
        self.commands: list[Command] = []
        self.links: dict[int, P] = {}  # slot -> attached connection
        self.local: set[P] = set()  # every admitted connection on the socket
        self.local_by_uid: dict[int, int] = {}
        # uid -> (time of its last local:* record, records suppressed since)
        self.local_logged: dict[int, tuple[float, int]] = {}
        # (event, slot) -> the same, for what a user does with their own session
        self.session_logged: dict[tuple[str, int], tuple[float, int]] = {}
        # The connections with envelopes pending from the packet path, to be written.
        self.dirty: set[P] = set()
        # The chains pvpn-client holds (slot -> its tunnel), and those with bytes to write.
        self.tunnels: dict[int, HostedTunnel] = {}
        self.dirty_tunnels: set[HostedTunnel] = set()
        self.pruned = 0.0

    def log(self, event: str, session: SlotSession | None = None, **kw: Any) -> None:
        self.commands.append(LogRecord(session_event(event, session, **kw)))

    # -- local connections: bounded per uid and in all (root is never refused)
    def admit(self, peer: P, now: float) -> None:
        config, uid = self.config, peer.uid
        users = len(self.local) - self.local_by_uid.get(0, 0)
        mine = self.local_by_uid.get(uid, 0)
        if uid != 0 and (mine >= config.max_local_connections_per_uid
                         or users >= config.max_local_connections):
            limit = (f"{config.max_local_connections_per_uid} per user "
                     "(max_local_connections_per_uid)"
                     if mine >= config.max_local_connections_per_uid else
                     f"{config.max_local_connections} in all (max_local_connections)")
            self.local_record(LOCAL_REFUSED, peer, now,
                              reason=f"too many connections to pvpn-client: {limit}")
            peer.send_control(MsgType.ERROR, {"code": "refused", "reason":
                              f"too many connections to pvpn-client: {limit}"})
            self.commands.append(CloseLocal(peer))
            return
        peer.admitted = True
        self.local.add(peer)
        self.local_by_uid[uid] = mine + 1

    def forget_local(self, peer: P) -> None:
        """The connection is gone: it no longer counts against its uid's bounds."""
        self.dirty.discard(peer)
        if peer.admitted and peer in self.local:
            self.local.discard(peer)
            left = self.local_by_uid.get(peer.uid, 1) - 1
            if left > 0:
                self.local_by_uid[peer.uid] = left
            else:
                self.local_by_uid.pop(peer.uid, None)

    def local_record(self, event: str, peer: LocalPeer, now: float,
                     session: SlotSession | None = None, **kw: Any) -> None:
        """A record about a local connection's misstep (refused, garbage): at most one per uid
        per LOCAL_LOG_EVERY seconds, saying how many were left out, so a local user looping
        over bad connections cannot flood the log."""
        last, suppressed = self.local_logged.get(peer.uid, (-LOCAL_LOG_EVERY, 0))
        if now - last < LOCAL_LOG_EVERY:
            self.local_logged[peer.uid] = (last, suppressed + 1)
            return
        self.local_logged[peer.uid] = (now, 0)
        self.log(event, session, uid=peer.uid, user=self.user_name(peer.uid), pid=peer.pid,
                 suppressed=suppressed, **kw)

    def session_record(self, event: str, session: SlotSession, now: float, **kw: Any) -> None:
        """A record of what a user did with their own session (attached, reattached, held),
        which costs pvpn-client nothing else and so could be repeated at will: at most one
        per event and session per LOCAL_LOG_EVERY seconds, saying how many were left out."""
        key = (event, session.slot)
        last, suppressed = self.session_logged.get(key, (-LOCAL_LOG_EVERY, 0))
        if now - last < LOCAL_LOG_EVERY:
            self.session_logged[key] = (last, suppressed + 1)
            return
        self.session_logged[key] = (now, 0)
        self.log(event, session, **kw, **({"suppressed": suppressed} if suppressed else {}))

    def forget_records(self, now: float) -> None:
        """The rate limits' memory of uids and sessions quiet for LOCAL_LOG_EVERY goes."""
        for uid, (at, suppressed) in list(self.local_logged.items()):
            if now - at >= LOCAL_LOG_EVERY and not suppressed:
                del self.local_logged[uid]
        for key, (at, suppressed) in list(self.session_logged.items()):
            if now - at >= LOCAL_LOG_EVERY and not suppressed:
                del self.session_logged[key]

    # -- the packet path: queue -> user's process
    def queued(self, session: SlotSession, payload: bytes, now: float,
               info: int = 0) -> Queued:
        """A packet of the session's queue: TAKEN (dropped by the queue: it never leaves this
        host in clear), or SEGMENT. Without a tunnel process that had the session up it is
        dropped (fail closed), and counted.

        ``info``: the queue's NFQA_SKB_INFO flags (pvpn.packet.SKB_*; the queue has
        NFQA_CFG_F_GSO). A TCP super-packet goes whole, with its offload header, to a chain
        whose server takes them; a checksum the kernel left undone is done. SEGMENT: the
        kernel is to segment it first (and finish its checksums) in the session's segmenting
        queue, whose segments come back here one by one: a UDP super-packet (no segment size
        comes with it), one of a socket that cannot say its segment size, one for a chain
        or an agent's tunnel that takes none, one with IP options or extension headers."""
        link = self.links.get(session.slot)
        if link is None or not session.session_id:
            self.dropped(session, Drop.TUNNEL_DOWN, now)
            return Queued.TAKEN
        tunnel = link.tunnel
        if tunnel is not None and not tunnel.up:
            self.dropped(session, Drop.TUNNEL_DOWN, now)
            return Queued.TAKEN
        if tunnel.congested if tunnel is not None else link.congested:
            self.dropped(session, Drop.TUNNEL_CONGESTED, now)
            return Queued.TAKEN
        try:
            key = pk.parse_flow(payload)
        except MalformedPacket:
            key = None  # e.g. a locally generated ICMP error; it still belongs to this session
        body = payload
        if info & (pk.SKB_GSO | pk.SKB_CSUMNOTREADY):
            done = self._offloaded(session, tunnel, key, payload, info, now)
            if done is None:
                return Queued.SEGMENT
            body = done
            if is_offloaded(done):
                session.super_out += 1
            else:
                payload = done  # its checksum done
        if key is not None:
            session.note_flow(key, now)
        session.count_out(len(payload))
        if tunnel is not None:
            # Straight into the chain: written once per drain (the adapter's flush).
            tunnel.outbox.append(body)
            self.dirty_tunnels.add(tunnel)
            if not tunnel.spec.capture or link.congested:
                return Queued.TAKEN
        link.pending.append(link.channel.packet(session.session_id, session.uid, payload))
        self.dirty.add(link)
        return Queued.TAKEN

    def _offloaded(self, session: SlotSession, tunnel: HostedTunnel | None,
                   key: FlowKey | None, payload: bytes, info: int, now: float) -> bytes | None:
        """What a packet the local stack left to offloads goes into the tunnel as (see
        :meth:`queued`), or None: SEGMENT."""
        proto = pk.plain_transport(payload)  # None: IP options, extension headers, not TCP/UDP
        if not info & pk.SKB_GSO:  # one segment or datagram, its checksum left undone
            return bytes(pk.complete_checksum(payload)) if proto is not None else None
        if (proto != pk.PROTO_TCP or key is None or tunnel is None or not tunnel.takes_offload
                or tunnel.spec.capture):
            return None
        headers = pk.tcp_headers_length(payload)
        size = self._segment_size(session, key, payload, headers, now)
        if size is None:
            return None
        if len(payload) - headers <= size:  # a "super-packet" of one segment
            return bytes(pk.complete_checksum(payload))
        if not info & pk.SKB_CSUMNOTREADY:  # the header's checksum is the pseudo-header's sum
            payload = bytes(pk.partial_checksum(payload))
        return encode_offload(Offload(GSO_TCPV4 if payload[0] >> 4 == 4 else GSO_TCPV6, size,
                                      pk.l4_offset(payload), 16, headers), payload)

    def _segment_size(self, session: SlotSession, key: FlowKey, payload: bytes, headers: int,
                      now: float) -> int | None:
        """The data per segment the local kernel would have cut ``payload`` into: its socket's
        segment size (tcpi_snd_mss, asked at most every SEGMENT_SIZE_TTL), less the options
        this segment carries beyond the usual ones (SACK blocks). None if the socket cannot
        say (gone: data sent after its close()) or it is below what a header may carry."""
        sizes = session.segment_sizes
        cached = sizes.get(key)
        if cached is not None and cached[1] > now:
            found = cached[0]
        else:
            try:
                found = self.owners.send_mss(key)
            except PvpnError:
                found = None
            if cached is None and len(sizes) >= MAX_SEGMENT_SIZES:
                for old in [k for k, (_, until) in sizes.items() if until <= now] or \
                        [next(iter(sizes))]:
                    del sizes[old]
            sizes[key] = (found, now + SEGMENT_SIZE_TTL)
        if found is None:
            return None
        mss, timestamps = found
        size = mss - (headers - pk.l4_offset(payload) - 20 - (12 if timestamps else 0))
        return size if size >= MIN_GSO_SIZE else None

    def dropped(self, session: SlotSession, code: Drop, now: float,
                flow: FlowKey | None = None, detail: str = "") -> None:
        """Count a drop by its code; log it when the session's rate limit allows."""
        count = session.drop(code, now)
        if count:
            self.log(PACKET_DROPPED, session, reason=code.value,
                     flow=flow.describe() if flow is not None else "", count=count,
                     unlogged=session.drops.take_unlogged(),
                     **({"detail": clip(detail, 200)} if detail else {}))

    # -- the packet path: user's process -> TUN
    def reply(self, peer: LocalPeer, packet: bytes, now: float) -> None:
        """A packet the tunnel process returns: written to the session's TUN device
        (WriteTun) only if it answers a flow the session sent and reaches only a socket of
        the session's user; otherwise dropped and counted."""
        session = peer.session
        if session is None or not session.session_id:
            raise RemoteProtocolError("PACKET before the session is attached")
        if peer.tunnel is not None:
            raise RemoteProtocolError("PACKET from an agent: pvpn-client holds its chain")
        self.reply_of(session, packet, now)

    def reply_of(self, session: SlotSession, packet: bytes, now: float) -> None:
        """A packet that came back for the session (from its chain or its tunnel process):
        anti-spoofed, then WriteTun. A super-packet (pvpn.envelope.OFFLOAD) must say the
        truth about itself in its header; then it is judged as strictly as any reply."""
        offload = None
        if is_offloaded(packet):
            try:
                offload, packet = split_offload(packet)
            except RemoteProtocolError as exc:
                self.dropped(session, Drop.MALFORMED_OFFLOAD, now, detail=str(exc))
                return
        try:
            flow, _, error = pk.classify(packet, offload is not None)  # one pass over the headers
            sent = flow if error else flow.reversed()  # an error quotes the packet as sent
        except MalformedPacket:
            self.dropped(session, Drop.MALFORMED_REPLY, now)
            return
        # Only replies to flows this session sent may enter the host: a user's process must not
        # be able to forge packets from protected addresses to other local sockets.
        if sent not in session.flows:
            self.dropped(session, Drop.REPLY_NO_FLOW, now, sent)
            return
        if error:
            # An ICMP error about one of the session's flows enters only as a host may receive
            # it: no redirect or source quench, at most 576/1280 bytes, addressed to the
            # source of the packet it quotes (RFC 1122 3.2.2, RFC 1812 4.3.2.3, RFC 4443 2.4).
            try:
                refused = pk.received_icmp_error_refusal(packet) is not None
            except MalformedPacket:
                refused = True
            if refused:
                self.dropped(session, Drop.REPLY_ICMP_REFUSED, now, sent)
                return
        if sent.proto == pk.PROTO_TCP or sent.proto == pk.PROTO_UDP:
            # The flow is the session's, but its local port may have changed hands since: only
            # a socket of the session's user, or no process's, may get the packet.
            try:
                owner = self.owners.owner(sent)
            except PvpnError:
                owner = -1  # the kernel cannot tell: fail closed
            if owner is not None and owner != session.uid:
                self.dropped(session, Drop.REPLY_NOT_YOURS, now, sent)
                return
        session.count_in(len(packet))
        if offload is not None and offload.gso_type:
            session.super_in += 1
        self.commands.append(WriteTun(session, packet, sent, offload))

    def tun_refused(self, cmd: WriteTun, code: Drop, now: float) -> None:
        """The TUN device did not take the reply (full, or failed): not counted in, dropped."""
        cmd.session.packets_in -= 1
        cmd.session.bytes_in -= len(cmd.packet)
        self.dropped(cmd.session, code, now, cmd.flow)

    # -- local control
    def control(self, link: P, envelope: Envelope, now: float) -> None:
        """A control envelope of a local connection: REGISTER, ATTACH, UNREGISTER, STATUS or
        DISCONNECT (RemoteProtocolError for anything else, or out of turn)."""
        mtype = envelope.type
        if link.congested and mtype in ANSWERED:
            # Its answers wait unread above WRITE_HIGH_WATER: another question would only grow
            # what pvpn-client holds for it (ATTACH and UNREGISTER are never refused so).
            raise RemoteProtocolError("asks faster than it reads the answers")
        fields = decode_control(envelope)
        if mtype is MsgType.REGISTER:
            self._register(link, fields, now)
        elif mtype is MsgType.SIGNED and link.tunnel is not None:
            link.tunnel.signed(fields, now)
            self.hosted(link.tunnel, HostedEvents([]), now)
        elif mtype is MsgType.ATTACH and link.session is not None:
            try:
                nodes = chain_names(fields.get("nodes", []), "node names")
            except ConfigError as exc:
                raise RemoteProtocolError(f"ATTACH: {exc}") from None
            self._attach(link, link.session, fields["session"], now)
            link.session.nodes = nodes
        elif mtype is MsgType.UNREGISTER and link.session is not None:
            link.unregistered = True
            session = link.session
            if session.ever_up and not link.attached_here:
                # This process picked up a held session but never had it up (say, the server
                # was out of reach): the protection an earlier process set up stays.
                self._detach(link, session, "the tunnel process that picked it up ended "
                             f"without bringing it up: {clip(fields['reason'])}", now)
            else:
                self.end_session(session, f"ended by the user: {clip(fields['reason'])}")
            # Answer only once the rules are gone, so `pvpn connect` exits with nothing left.
            link.send_status([session.describe(now)])
            self.commands.append(CloseLocal(link))
        elif mtype is MsgType.STATUS:
            link.send_status([s.describe(now) for s in self.registry.visible_to(link.uid)])
        elif mtype is MsgType.DISCONNECT:
            self._disconnect(link, fields, now)
        else:
            raise RemoteProtocolError(f"unexpected {mtype.name} on the local socket")

    def _attach(self, link: P, session: SlotSession, session_id: bytes, now: float) -> None:
        if len(session_id) != 16:
            raise RemoteProtocolError("ATTACH needs the 16-byte session id")
        if any(other.session_id == session_id and other is not session
               for other in self.registry.sessions.values()):
            # The server makes ids unique; one named again here is someone else's, and its
            # records would join that session's trace.
            raise RemoteProtocolError("ATTACH of a session id another session holds")
        # A new session at the server, not the one this session's connections went through:
        # a second ATTACH on one registration (the tunnel process re-established the server
        # session as a new one: the server lost it in a restart, or it expired), or another
        # id than the one it was up with (a new tunnel process picked a held session up).
        renewed = link.attached_here or (bool(session.session_id)
                                         and session.session_id != session_id)
        session.session_id = session_id
        session.ever_up = True
        link.attached_here = True
        self.record_id(session, now)
        self.session_record(SESSION_ATTACHED, session, now, pid=link.pid,
                            server=session.server)
        if renewed:
            self.reset_connections(session, now)

    def reset_connections(self, session: SlotSession, now: float) -> None:
        """The server's session is a new one: none of its NAT mappings carried this session's
        TCP connections, and those wait for data that will never come (a download sends
        nothing by itself), until the application gives up. The kernel makes each connected
        socket of the session's user answer through its TUN device (HostKernel.
        reset_connections); the answer goes through the new session to the server, which has
        no mapping for it and answers with a reset: the application's connection fails within
        a round trip, explicitly. At most once per PROBE_EVERY, and only with its devices."""
        if not self.kernel.has_devices(session) or now - session.probed_at < PROBE_EVERY:
            return
        session.probed_at = now
        probed = self.kernel.reset_connections(session)
        if probed:
            self.log(SESSION_CONNECTIONS_RESET, session, count=probed,
                     reason="the server's session is a new one: its TCP connections "
                            "are made to answer, and the server resets them")

    def slot_usable(self, slot: int) -> bool:
        """Whether no connection carries the slot's mark any more (asked before the slot goes
        to a new session). Marks left behind (a failed clean-up, a crash in between) are
        forgotten and asked again; a slot that still has some is skipped (quarantined)."""
        mark, kernel = self.registry.mark_for(slot), self.kernel
        try:
            if kernel.marked(mark) == 0:
                return True
            kernel.forget_marked(mark)
            left = kernel.marked(mark)
        except PvpnError as exc:
            self.log(SLOT_QUARANTINED, slot=slot, reason=f"cannot ask conntrack: {exc}")
            return False
        if left:
            self.log(SLOT_QUARANTINED, slot=slot, connections=left,
                     reason="connections of its last holder still carry its mark")
        return left == 0

    def _disconnect(self, link: P, fields: dict[str, Any], now: float) -> None:
        slot = fields["slot"]
        try:
            found = self.registry.select_for_disconnect(
                link.uid, fields["session"], slot if isinstance(slot, int) else None,
                fields["all"])
        except PolicyError as exc:
            link.send_control(MsgType.ERROR, {"code": "not-found", "reason": str(exc)})
            return
        described = [s.describe(now) for s in found]
        who = self.user_name(link.uid)
        for session in found:
            holder = self.links.get(session.slot)
            if holder is not None:
                holder.send_control(MsgType.ERROR, {
                    "code": "disconnected",
                    "reason": f"disconnected by {who} (pvpn disconnect)"})
                holder.unregistered = True
                self.commands.append(CloseLocal(holder))
            self.end_session(session, f"pvpn disconnect by {who} (uid {link.uid})"
                             + (" --all" if fields["all"] else ""))
        link.send_status(described)

    def _register(self, link: P, fields: dict[str, Any], now: float) -> None:
        if link.session is not None:
            raise RemoteProtocolError("REGISTER twice on one connection")
        server = fields["server"]
        kernel = self.kernel
        try:
            if len(server) > MAX_SERVER or not server.isprintable():
                raise ConfigError(f"the server name must be printable and at most {MAX_SERVER} "
                                  "characters")
            via = chain_names(fields.get("via", []), "gateway endpoints")
            if not all(isinstance(p, str) for p in fields["prefixes"]):
                raise ConfigError("prefixes must be strings")
            networks = parse_prefixes(fields["prefixes"])
            # The chain pvpn-client is to hold for it, checked before anything is allocated
            # (a bad PEM, a hop too many: a clear refusal, and nothing else spent).
            spec = parse_chain_spec(fields)
            proposed = fields.get("session", b"")
            if spec is not None and len(proposed) != 16:
                raise ConfigError("a session id of 16 bytes is needed to build the chain")
            session = self.registry.find_held(link.uid, networks)
            if session is None:
                session = self.registry.allocate(link.uid, self.user_name(link.uid), server,
                                                 networks, now, usable=self.slot_usable)
                try:
                    kernel.install(session)
                except PvpnError:
                    kernel.uninstall(session)
                    self.registry.release(session.slot)
                    raise
                self.log(SESSION_REGISTERED, session, pid=link.pid,
                         prefixes=[str(n) for n in session.networks])
            else:
                if not kernel.has_devices(session):  # its devices failed at recovery
                    kernel.attach_devices(session)
                self.session_record(SESSION_REATTACHED, session, now, pid=link.pid)
        except (ConfigError, PolicyError, PvpnError) as exc:
            link.send_control(MsgType.ERROR, {"code": "refused", "reason": str(exc)})
            return
        session.attached = True
        session.held_since = None
        session.server = server
        session.via = via
        link.session = session
        self.links[session.slot] = link
        link.send_control(MsgType.REGISTERED, {"slot": session.slot, "queue": session.queue,
                                               "uid": link.uid, "user": session.user})
        if spec is not None:
            tunnel = HostedTunnel(spec, proposed, fields.get("token", b""), session.uid)
            tunnel.slot = session.slot
            link.tunnel = tunnel
            tunnel.start(now)
            self.hosted(tunnel, HostedEvents([]), now)

    # -- the chains pvpn-client holds (pvpn.hosted)
    def hosted(self, tunnel: HostedTunnel, events: HostedEvents, now: float) -> None:
        """What a chain's input gave: replies anti-spoofed into the TUN device, a chain up
        attached, the agent told (NOTICE, SIGN) and the adapter's commands taken."""
        link = self.links.get(tunnel.slot)
        session = self.registry.sessions.get(tunnel.slot)
        if link is None or link.tunnel is not tunnel or session is None:
            # An old chain of a session that moved on: it only closes.
            self.commands += tunnel.commands
            tunnel.commands.clear()
            return
        if events.packets:
            if tunnel.spec.capture and not link.congested:
                packet = link.channel.packet
                link.pending += [packet(session.session_id, session.uid, bare_packet(p))
                                 for p in events.packets]  # without offload headers
            reply = self.reply_of
            for p in events.packets:
                reply(session, p, now)
        up = events.up
        if up is not None:
            if not link.attached_here or not up.accept.resumed:
                try:
                    self._attach(link, session, up.accept.session, now)
                except RemoteProtocolError as exc:
                    tunnel.end(str(exc), orderly=True)
            session.nodes = list(up.nodes)
        for mtype, fields in tunnel.to_agent:
            link.send_control(mtype, fields)
        if tunnel.to_agent:
            tunnel.to_agent.clear()
            self.dirty.add(link)
        self.commands += tunnel.commands
        tunnel.commands.clear()
        self.dirty_tunnels.add(tunnel)

    def chain_data(self, tunnel: HostedTunnel, data: bytes, now: float) -> None:
        self.hosted(tunnel, tunnel.receive_data(data, now), now)

    def chain_event(self, tunnel: HostedTunnel, now: float, connected: bool | None = None,
                    reason: str = "") -> None:
        """The chain's TCP connection: made (True), not made (False, why), lost (None, why)."""
        if connected:
            tunnel.connected(now)
        elif connected is False:
            tunnel.connect_failed(reason, now)
        else:
            tunnel.connection_lost(reason, now)
        self.hosted(tunnel, HostedEvents([]), now)

    def chain_retry(self, tunnel: HostedTunnel, now: float) -> None:
        tunnel.retry(now)
        self.hosted(tunnel, HostedEvents([]), now)

    def chain_timers(self, now: float) -> None:
        """Every held chain's keepalives, dead nodes and slow hops (each second)."""
        for link in list(self.links.values()):
            if link.tunnel is not None:
                self.hosted(link.tunnel, link.tunnel.handle_timer(now), now)

    def _end_tunnel(self, link: P | None, reason: str, orderly: bool) -> None:
        """The chain of the session ``link`` held goes: orderly (CLOSE to the server, the VPN
        ends) or not (its agent is gone: the server holds the session for a resume)."""
        if link is None or link.tunnel is None:
            return
        tunnel, link.tunnel = link.tunnel, None
        tunnel.end(reason, orderly)
        self.commands += tunnel.commands
        tunnel.commands.clear()
        self.dirty_tunnels.add(tunnel)

    def _detach(self, link: P, session: SlotSession, reason: str, now: float) -> None:
        """The session's tunnel process is gone; its packets keep being queued and dropped
        until the user reconnects or runs `pvpn disconnect` (fail closed)."""
        if self.links.get(session.slot) is link:
            del self.links[session.slot]
        self._end_tunnel(link, reason, orderly=False)
        if session.attached:
            session.attached = False
            session.held_since = now
        link.session = None
        self.session_record(SESSION_HELD, session, now, reason=reason)

    def lost(self, link: P, now: float) -> None:
        """The local connection is gone: a session it held is held (fail closed) unless it
        was ended."""
        self.forget_local(link)
        session = link.session
        if session is None or link.unregistered:
            return
        self._detach(link, session, "tunnel process gone; dropping its packets until it "
                     "reconnects or `pvpn disconnect`", now)

    def end_session(self, session: SlotSession, reason: str) -> None:
        """Abort the session's TCP connections, remove its rules, then the marks its
        connections carry, then free the slot: nothing of this session's is left for the
        slot's next holder. Its connections went through a tunnel that is gone and would wait
        for data that never comes; they are aborted first, while its rules still hold, so the
        resets the kernel sends go into its queue, never out in clear."""
        link = self.links.pop(session.slot, None)
        if link is not None:
            self._end_tunnel(link, reason, orderly=True)
            link.session = None
        kernel = self.kernel
        aborted = kernel.abort_connections(session)
        errors = kernel.uninstall(session)
        forgotten = kernel.forget_marks(session)
        self.registry.release(session.slot)
        for event in (SESSION_ATTACHED, SESSION_REATTACHED, SESSION_HELD):
            self.session_logged.pop((event, session.slot), None)
        self.log(SESSION_CLOSED, session, reason=reason, packets_out=session.packets_out,
                 packets_in=session.packets_in, bytes_out=session.bytes_out,
                 bytes_in=session.bytes_in, drops=session.drops.as_dict(),
                 connections_aborted=aborted, connections_forgotten=forgotten,
                 rule_errors=errors or None)

    def record_id(self, session: SlotSession, now: float) -> None:
        """Write the session's id into its rules, so a restarted pvpn-client knows it was up:
        at once when none is recorded, a changed one at most once a RECORD_EVERY (the timer
        writes it when due; the record already says the session was up)."""
        if session.recorded == session.session_id or (
                session.recorded and now - session.recorded_at < RECORD_EVERY):
            return
        session.recorded_at = now
        error = self.kernel.write_id(session)
        if error is not None:  # tried again in RECORD_EVERY
            self.log(NODE_WARNING, session, reason=f"session id not recorded: {error}")
            return
        session.recorded = session.session_id

    # -- the timer
    def tick(self, now: float) -> None:
        """Sessions past their time end; idle connections without a session go; ids not yet
        in their session's rules are written; old flows and rates are forgotten."""
        for session, reason in self.registry.expired(now):
            holder = self.links.get(session.slot)
            if holder is not None:
                holder.send_control(MsgType.ERROR, {"code": "expired", "reason":
                                    f"pvpn-client ended the session: {reason}"})
                holder.unregistered = True
                self.commands.append(CloseLocal(holder))
            self.end_session(session, reason)
        # A connection that holds no session answers one question and goes; one that sits
        # idle is closed after grace_time, like an SSH login that never completes.
        for link in list(self.local):
            if link.session is None and now - link.last_active > self.config.grace_time:
                self.commands.append(CloseLocal(link))
        self.forget_records(now)
        for session in list(self.registry.sessions.values()):
            if session.ever_up and session.recorded != session.session_id:
                self.record_id(session, now)
        if now - self.pruned >= PRUNE_EVERY:
            self.pruned = now
            self.registry.forget_rates(now)
            for session in self.registry.sessions.values():
                session.prune_flows(now)

    def shutdown(self, reason: str) -> None:
        """An orderly stop: the tunnel processes are let go and every session stays, rules and
        all (held): the kernel drops its packets until the next pvpn-client picks it up and the
        user's `pvpn connect` registers again."""
        for link in list(self.local):
            self._end_tunnel(link, reason, orderly=False)
            self.commands.append(CloseLocal(link))
        kept = list(self.registry.sessions.values())
        if kept:
            self.log(NODE_STOPPING, reason=f"{reason}; {len(kept)} session(s) stay "
                     "protected (held) for the next pvpn-client",
                     sessions=[{"slot": s.slot, "uid": s.uid, "user": s.user,
                                "session": s.session_id.hex()} for s in kept])

    def release_host(self) -> list[str]:
        """After the stop: with no session left the instance's rules go (the host is left as
        found); with sessions, everything stays for the next pvpn-client."""
        if self.registry.sessions:
            return []
        return self.kernel.rules.remove_instance()

    # -- the kernel's rules: what a restart finds, what someone else removed
    def recover(self, saved: list[str], now: float) -> None:
        """Pick up what an earlier pvpn-client left (stopped, killed or an older version), as
        ``saved`` (iptables-save of each family) shows it: its sessions' rules stayed in the
        kernel (protection never lapsed, the kernel dropped their packets); their queues and
        TUN devices are bound again and they are held until their users' tunnel processes
        come back. Jumps of the older format are converted in place."""
        instance, rules = self.config.instance, self.kernel.rules
        p = firewall.chain_prefix(instance)
        installed, broken = firewall.parse_installed_sessions(instance, saved)
        missing = [f":{p}-OUT " not in text or f":{p}-IN " not in text for text in saved]
        if any(missing) and not installed:  # a first start, or a half-made one
            rules.remove_instance()
            rules.apply(firewall.client_base(instance))
            return
        if any(missing):
            # Someone removed one family's chains (a firewall reload, say): they are put back
            # there first (the sessions' jumps are repaired into them below), and nothing of
            # what the other family still holds goes.
            base = firewall.client_base(instance)
            rules.apply(firewall.RuleSet(base.v4 if missing[0] else "",
                                         base.v6 if missing[1] else ""))
            self.log(NODE_WARNING, reason="the instance's hook chains were missing in "
                     + " and ".join(f for f, m in zip(("IPv4", "IPv6"), missing) if m)
                     + "; put back")
        config = self.config
        self.registry.foreign_rules = self.registry.foreign_rules or bool(broken) or any(
            f.queue != config.queue_base + f.slot or not 0 <= f.slot < config.max_sessions
            for f in installed)
        for found in installed:
            # A session whose rules predate the record of its id (legacy) may have been up:
            # it is held as long as one that was.
            session = self.registry.adopt(
                found.slot, found.uid, self.user_name(found.uid), found.networks, found.queue,
                found.mark, found.tun, now, session_id=found.session_id,
                ever_up=bool(found.session_id) or found.legacy)
            try:
                self.kernel.attach_devices(session)
            except PvpnError as exc:
                # Its rules stay: with nobody reading its queue the kernel drops its packets.
                # Ending it here would let them out in clear though nobody said stop; its
                # devices are tried again when its user's tunnel process registers.
                self.log(NODE_RECOVER_FAILED, session, reason=f"{exc}; held, its rules "
                         "kept; tried again when its tunnel process registers")
            repair = firewall.client_jumps_repair(instance, found, self.config.mark_mask)
            if repair is not None:
                try:
                    rules.apply(repair)
                except PvpnError as exc:  # the jumps found still feed the queue
                    self.log(NODE_WARNING, session, reason=f"jumps not converted: {exc}")
            self.log(SESSION_RECOVERED, session, reason="rules kept across a restart; "
                     "held until the user's tunnel process registers again",
                     prefixes=[str(n) for n in found.networks],
                     converted="legacy" if found.legacy else bool(repair))
        if broken:
            self.log(NODE_CLEANUP, reason="incomplete session rules removed", chains=broken)
            rules.remove_chains(broken, f"{p}-OUT")
            rules.remove_chains(broken, f"{p}-IN")
        rules.ensure_jump("OUTPUT", f"{p}-OUT")
        rules.ensure_jump("PREROUTING", f"{p}-IN")
        # Rules made before datagrams of any size lack it: no user's socket may send out of
        # a session's TUN device, which pvpn-client now reads.
        rules.ensure_rule(firewall.tun_guard(f"{p}-OUT", f"{instance}+"))

    def held_rules(self) -> list[firewall.InstalledSession]:
        """Every session's rules as pvpn-client installs them (what the kernel must hold)."""
        return [firewall.InstalledSession(s.slot, s.uid, list(s.networks), s.queue, s.mark,
                                          s.tun, s.recorded)
                for s in self.registry.sessions.values()]

    def check_rules(self, saved: list[str], epoch: int) -> None:
        """Put back what someone else took from the sessions' rules (a firewall reload, a
        flush of the mangle table): ``saved`` is iptables-save of each family, read while
        the rules were at ``epoch``. Until then the session's packets went the normal route,
        so this is logged as a warning naming what was missing."""
        rules = self.kernel.rules
        if epoch != rules.epoch:
            return  # pvpn-client changed them since: the next check looks again
        instance, mask = self.config.instance, self.config.mark_mask
        held = {s.slot: s for s in self.held_rules()}
        found = firewall.check_rules(instance, saved, held.values(), mask)
        if not found:
            return
        p = firewall.chain_prefix(instance)
        base = firewall.client_base(instance)
        for version in found.unbased:
            # Chains and hooks of this family anew (nothing of it is left to flush).
            rules.apply(firewall.RuleSet(base.v4 if version == 4 else "",
                                         base.v6 if version == 6 else ""))
        if found.unhooked:
            rules.ensure_jump("OUTPUT", f"{p}-OUT")
            rules.ensure_jump("PREROUTING", f"{p}-IN")
        repaired = []
        for version, slots in found.broken.items():
            for slot in slots:
                # What is left of the session in this family and all of it anew, in one
                # transaction: removed first and then added, a pvpn-client killed between
                # the two left the next one half a session to recover (issue 11).
                text = firewall.client_session_repair(instance, held[slot], mask, version,
                                                      saved[0 if version == 4 else 1])
                try:
                    rules.apply(firewall.RuleSet(text if version == 4 else "",
                                                 text if version == 6 else ""))
                except PvpnError as exc:  # changed since `saved`: the next check looks again
                    self.log(NODE_WARNING, self.registry.sessions[slot],
                             reason=f"rules of slot {slot} (IPv{version}) not put back yet: "
                             f"{exc}")
                    continue
                repaired.append(f"slot {slot} (IPv{version})")
        self.log(NODE_WARNING, reason="rules of pvpn-client were removed by someone "
                 "else (a firewall reload?) and are put back; until now the protected "
                 "traffic of these sessions took the normal route",
                 families_without_chains=found.unbased or None,
                 families_unhooked=found.unhooked or None,
                 sessions=repaired or None)
