"""Which user holds which session slot on the client host: pure bookkeeping, no I/O.

A slot gives a session its NFQUEUE number, its connection mark and its TUN device name. The uid
of every request comes from the kernel (SO_PEERCRED), never from the message.

What one local user may take is bounded (docs/design.md, "Limits and defences: the client
host"): sessions and prefixes per uid, flows per session, and how long a session is kept
without its tunnel process: briefly if it never came up, ``held_timeout`` if it did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pvpn.config import ClientConfig, Network
from pvpn.drops import Drop, DropCounter
from pvpn.errors import PolicyError
from pvpn.packet import FlowKey
from pvpn.text import quoted

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


@dataclass(slots=True)
class SlotSession:
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
    # to be a new one (ClientDaemon.reset_connections), so ATTACHes cannot repeat it at will.
    probed_at: float = float("-inf")
    packets_out: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    drops: DropCounter = field(default_factory=DropCounter)

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
            "tun": self.tun, "packets_out": self.packets_out, "packets_in": self.packets_in,
            "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
            "drops": self.drops.as_dict(), "flows": len(self.flows),
            "flows_evicted": self.flows_evicted,
        }

    def drop(self, code: Drop, now: float) -> int:
        """Count a drop; its count so far if it should be logged, else 0 (rate-limited)."""
        return self.drops.count(code, now)

    def note_flow(self, key: FlowKey, now: float) -> None:
        """Remember a flow this session sent (the packet path inlines the same steps)."""
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
                              held_since=now)
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
