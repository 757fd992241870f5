"""One session's path along the chain, hop by hop, from the nodes' JSON-line records.

Every pvpn node logs one JSON object per line (docs/design.md: time, role, node, event,
session, user, uid, peer, reason, counters), and every hop of a chain logs the same session
id, so a session's life along the chain is the union of the nodes' records for that id.
This module is the pure part of ``pvpn trace``: lines in, records out
(:func:`parse_lines`), records grouped by session (:func:`group_by_session`), and per session
a :class:`SessionTrace`: one :class:`HopSummary` per node in chain order (client, gateways,
server) and the merged timeline, with every time relative to the session's first record.
:func:`format_trace` prints it for a terminal, :func:`trace_to_json` for machines.  Reading
files is the caller's business (``pvpn.cli.trace``).

What each role logs at the end of a session, and how it reads here ("up" is towards the
target, "down" towards the user):

- client ``session:closed``: ``packets_out``/``bytes_out`` (up), ``packets_in``/``bytes_in``
  (down), ``drops`` (reason -> count);
- gateway ``session:closed``: ``bytes_to_next``, ``envelopes_from_user`` → ``envelopes_to_next``
  (up), ``bytes_from_next``, ``envelopes_from_next`` → ``envelopes_to_user`` (down): a gateway
  counts the next hop's ciphertext, so its bytes exceed the inner packets';
- server ``session:closed``: ``packets_out``/``bytes_out`` (sent on to the target, up),
  ``packets_in``/``bytes_in`` (replies, down), ``drops``.

A gateway that relays a session again after the chain was rebuilt logs a new
``session:opened`` / ``session:closed`` pair: its counters are summed.  Drops are the larger of
the ``drops`` totals at the close and the highest ``count`` of the ``packet:dropped`` records
(logged at powers of two).  Lines that are not a JSON object with a finite numeric ``time``
(a traceback, a line cut by rotation) are skipped, never fatal, and so are records whose
identifiers are not what a node writes (a session id of 32 hex digits, a user, node and role
name of the usual characters and length): a forged or mangled line joins no session.  What
the terminal view prints has every non-printable character escaped (the strings come from
other users: a user name from an unauthenticated HELLO, a peer's reason).
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pvpn.names import (
    LINK_DEAD, PACKET_DROPPED, SESSION_ATTACHED, SESSION_CLOSED, SESSION_DETACHED, SESSION_HELD,
    SESSION_OPENED, SESSION_REATTACHED, SESSION_RESUMED,
)
from pvpn.records import NODE_NAME
from pvpn.text import printable

LogRecord = dict[str, Any]

# Events that tell of a tunnel going down and coming back, at any hop.
RECONNECT_EVENTS = frozenset({
    SESSION_RESUMED, SESSION_HELD, SESSION_REATTACHED, SESSION_DETACHED, LINK_DEAD,
})
RESUME_EVENTS = frozenset({SESSION_OPENED, SESSION_RESUMED, SESSION_ATTACHED,
                           SESSION_REATTACHED})
ROLE_RANK = {"client": 0, "gateway": 1, "server": 2}

# The fields shown after the event in the timeline, in this order, when a record has them
# (a gateway logs the hop it relays to as next_hop); counters whose name starts with "bytes"
# (bytes, bytes_in, bytes_to_next, ...) follow.
DETAIL_FIELDS: tuple[str, ...] = ("user", "uid", "peer", "next_hop", "reason", "count",
                                  "path")

# Counters of a session:closed record, by direction: (field, what it counts).
UP_COUNTERS = {"bytes": ("bytes_out", "bytes_to_next"), "packets": ("packets_out",),
               "envelopes_in": ("envelopes_from_user",), "envelopes_out": ("envelopes_to_next",)}
DOWN_COUNTERS = {"bytes": ("bytes_in", "bytes_from_next"), "packets": ("packets_in",),
                 "envelopes_in": ("envelopes_from_next",), "envelopes_out": ("envelopes_to_user",)}


# ---------------------------------------------------------------- lines -> records


def record_time(record: Mapping[str, Any]) -> float | None:
    """The record's ``time`` as a float, or None when it has no finite numeric one."""
    value = record.get("time")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# A user name as any hop logs it: a node's (records.USER_NAME) or a client host's local login
# name (useradd's default NAME_REGEX, upper case and a trailing '$' allowed).
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")
_ROLE = re.compile(r"[a-z]{1,16}")
_SESSION = re.compile(r"[0-9a-f]{32}")


def identifiers_valid(record: Mapping[str, Any]) -> bool:
    """Whether the record's session, user, node and role (those it has) look like what a node
    writes: a session id of 32 hex digits (any case), names of the usual characters and
    length. Anything else is a forged or mangled record."""
    for name, pattern in (("user", _USER), ("node", NODE_NAME), ("role", _ROLE)):
        value = record.get(name)
        if value is not None and value != "" and not (
                isinstance(value, str) and pattern.fullmatch(value)):
            return False
    sid = record.get("session")
    if sid is None or sid == "":
        return True
    return isinstance(sid, str) and _SESSION.fullmatch(sid.strip().lower()) is not None


def parse_line(line: str) -> LogRecord | None:
    """One log line as a record, or None for anything but a JSON object with a time and
    valid identifiers."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:  # includes a line cut in the middle, and bad unicode escapes
        return None
    if not isinstance(record, dict) or record_time(record) is None:
        return None
    if not identifiers_valid(record):
        return None
    return record


def parse_lines(lines: Iterable[str]) -> Iterator[LogRecord]:
    """The records among ``lines``, in order; malformed lines are skipped."""
    for line in lines:
        record = parse_line(line)
        if record is not None:
            yield record


def session_of(record: Mapping[str, Any]) -> str:
    """The record's session id, lower-case hex, or "" when it has none."""
    sid = record.get("session")
    return sid.strip().lower() if isinstance(sid, str) else ""


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ordered(records: Iterable[LogRecord]) -> list[LogRecord]:
    """By time; equal times keep their input order (files, then lines)."""
    timed: list[tuple[float, int, LogRecord]] = []
    for index, record in enumerate(records):
        when = record_time(record)
        if when is not None:
            timed.append((when, index, record))
    timed.sort(key=lambda item: (item[0], item[1]))
    return [record for _when, _index, record in timed]


def group_by_session(records: Iterable[LogRecord]) -> dict[str, list[LogRecord]]:
    """Session id -> its records ordered by time; records without a session are left out."""
    groups: dict[str, list[LogRecord]] = {}
    for record in records:
        sid = session_of(record)
        if sid:
            groups.setdefault(sid, []).append(record)
    return {sid: _ordered(group) for sid, group in groups.items()}


def select_session(records: Iterable[LogRecord], session: str) -> list[LogRecord]:
    """The records of ``session`` (its full hex id, any case), ordered by time."""
    wanted = session.strip().lower()
    if not wanted:
        return []
    return _ordered(r for r in records if session_of(r) == wanted)


def match_sessions(sessions: Iterable[str], prefix: str) -> list[str]:
    """The ids among ``sessions`` that start with ``prefix`` (any case), sorted."""
    wanted = prefix.strip().lower()
    if not wanted:
        return []
    return sorted({s for s in sessions if s.startswith(wanted)})


# ---------------------------------------------------------------- per-hop summaries


@dataclass(slots=True)
class Traffic:
    """What one hop counted in one direction; None where the hop logs no such counter (or
    logged no end of the session yet)."""

    bytes: int | None = None
    packets: int | None = None
    envelopes_in: int | None = None
    envelopes_out: int | None = None

    def to_json(self) -> dict[str, int | None]:
        return {"bytes": self.bytes, "packets": self.packets,
                "envelopes_in": self.envelopes_in, "envelopes_out": self.envelopes_out}


@dataclass(slots=True)
class HopEvent:
    """A notable moment at a hop: a reconnect, a resume, a dead link."""

    time: float
    event: str
    reason: str = ""


@dataclass(slots=True)
class HopSummary:
    """One node's part in a session: who, when, how much each way, what it dropped and why."""

    role: str
    node: str
    first: float  # time of its first record of the session
    last: float  # and of its last
    user: str = ""
    uid: int | None = None
    peer: str = ""  # where the session came from (the previous hop, or the user's process)
    next_hop: str = ""  # where a gateway relayed it
    opened: int = 0  # session:opened records (a gateway logs one per chain built through it)
    closed: bool = False
    close_reason: str = ""
    up: Traffic = field(default_factory=Traffic)
    down: Traffic = field(default_factory=Traffic)
    counters: dict[str, int] = field(default_factory=dict)  # summed session:closed counters
    drops: dict[str, int] = field(default_factory=dict)
    reconnects: list[HopEvent] = field(default_factory=list)
    records: int = 0
    path_length: int | None = None  # nodes before it, as its session:opened says

    @property
    def name(self) -> str:
        return self.node or self.role or "?"

    @property
    def drops_total(self) -> int:
        return sum(self.drops.values())


@dataclass(slots=True)
class SessionTrace:
    """A session's hops in chain order and its merged timeline."""

    session: str
    start: float
    end: float
    hops: list[HopSummary]
    timeline: list[LogRecord]
    foreign: list[str] = field(default_factory=list)  # others' records with this id, left out

    @property
    def user(self) -> str:
        for hop in self.hops:
            if hop.user:
                return hop.user
        return ""

    @property
    def uid(self) -> int | None:
        for hop in self.hops:
            if hop.uid is not None:
                return hop.uid
        return None

    @property
    def closed(self) -> bool:
        return any(hop.closed for hop in self.hops if hop.role in ("client", "server"))


def _hop_key(record: Mapping[str, Any]) -> tuple[str, str]:
    return _text(record, "role"), _text(record, "node")


def _summarise(role: str, node: str, records: Sequence[LogRecord]) -> HopSummary:
    times = [record_time(r) or 0.0 for r in records]
    hop = HopSummary(role=role, node=node, first=min(times), last=max(times),
                     records=len(records))
    ended = False
    logged_drops: dict[str, int] = {}
    closed_drops: dict[str, int] = {}
    for record, when in zip(records, times):
        event = _text(record, "event")
        if not hop.user and _text(record, "user"):
            hop.user = _text(record, "user")
        uid = _int(record.get("uid"))
        if hop.uid is None and uid is not None and uid >= 0:
            hop.uid = uid
        if _text(record, "peer") and not hop.peer:
            hop.peer = _text(record, "peer")
        if _text(record, "next_hop") and not hop.next_hop:
            hop.next_hop = _text(record, "next_hop")
        if (event in RECONNECT_EVENTS and not ended) or (
                event == SESSION_OPENED and hop.opened):
            hop.reconnects.append(HopEvent(when, event, _text(record, "reason")))
        # A link that goes after its session ended (a server logs session:detached then)
        # is the end, not a reconnect.
        ended = event == SESSION_CLOSED or (ended and event not in RESUME_EVENTS)
        if event == SESSION_OPENED:
            hop.opened += 1
            path = record.get("path")
            if hop.path_length is None and isinstance(path, list):
                hop.path_length = len(path)
        if event == PACKET_DROPPED:
            reason = _text(record, "reason") or "(no reason given)"
            count = _int(record.get("count")) or 1
            logged_drops[reason] = max(logged_drops.get(reason, 0), count)
        if event == SESSION_CLOSED:
            hop.closed = True
            hop.close_reason = _text(record, "reason")
            for name, value in record.items():
                number = _int(value)
                if number is not None and name not in ("time", "uid", "slot", "pid", "count"):
                    hop.counters[name] = hop.counters.get(name, 0) + number
            drops = record.get("drops")
            if isinstance(drops, dict):
                for reason, count in drops.items():
                    number = _int(count)
                    if isinstance(reason, str) and number is not None:
                        closed_drops[reason] = closed_drops.get(reason, 0) + number
    for reason in {*logged_drops, *closed_drops}:
        hop.drops[reason] = max(logged_drops.get(reason, 0), closed_drops.get(reason, 0))
    for traffic, names in ((hop.up, UP_COUNTERS), (hop.down, DOWN_COUNTERS)):
        for attribute, fields in names.items():
            values = [hop.counters[f] for f in fields if f in hop.counters]
            if values:
                setattr(traffic, attribute, sum(values))
    return hop


def _chain_order(hop: HopSummary) -> tuple[int, int, float]:
    # The role tells client < gateways < server; among gateways, the number of nodes before
    # a hop (its session:opened 'path'), else who saw the session first: the chain is built
    # from the user outwards, so the nearer hop always logs it first.
    rank = ROLE_RANK.get(hop.role, 1)
    path = hop.path_length if hop.path_length is not None else 1 << 16
    return rank, path, hop.first


def _owner(records: Sequence[LogRecord]) -> str:
    """The user the server authenticated for this session id ("" if no server logged one).

    The server alone makes the id unique (it replaces a proposed id that is taken), so its
    user is the session's; a gateway takes the id an authenticated user proposes."""
    for record in records:
        if (_text(record, "role") == "server" and _text(record, "user")
                and _text(record, "event") in (SESSION_OPENED, SESSION_RESUMED)):
            return _text(record, "user")
    return ""


def _foreign(records: Sequence[LogRecord]) -> tuple[list[LogRecord], list[str]]:
    """``records`` without a gateway's records of another user than the session's owner (a
    user who proposed someone else's session id at a gateway), and what was left out."""
    owner = _owner(records)
    if not owner:
        return list(records), []
    kept: list[LogRecord] = []
    left: dict[tuple[str, str], int] = {}
    for record in records:
        user = _text(record, "user")
        if _text(record, "role") == "gateway" and user and user != owner:
            key = (_text(record, "node"), user)
            left[key] = left.get(key, 0) + 1
            continue
        kept.append(record)
    return kept, [f"{count} record(s) of user {user} at {node or 'a gateway'} carry this "
                  f"session id; the server's session is {owner}'s, so they are not shown"
                  for (node, user), count in sorted(left.items())]


def trace_session(records: Iterable[LogRecord], session: str) -> SessionTrace:
    """The trace of ``session`` (full hex id) from any records (others' are ignored).

    A gateway's records of a user other than the one the server authenticated for this id
    are left out (and said so in ``foreign``): an authenticated user can propose any session
    id at a gateway, and must not write into another user's trace."""
    mine, foreign = _foreign(select_session(records, session))
    by_hop: dict[tuple[str, str], list[LogRecord]] = {}
    for record in mine:
        by_hop.setdefault(_hop_key(record), []).append(record)
    hops = sorted((_summarise(role, node, group) for (role, node), group in by_hop.items()),
                  key=_chain_order)
    times = [record_time(r) or 0.0 for r in mine]
    return SessionTrace(session=session.strip().lower(),
                        start=min(times, default=0.0), end=max(times, default=0.0),
                        hops=hops, timeline=mine, foreign=foreign)


@dataclass(slots=True)
class SessionListing:
    """One line of ``pvpn trace --user``: a session, when, where, whose."""

    session: str
    first: float
    last: float
    nodes: list[str]
    users: list[str]
    closed: bool

    def to_json(self) -> dict[str, Any]:
        return {"session": self.session, "first": self.first, "last": self.last,
                "duration": round(self.last - self.first, 6), "nodes": self.nodes,
                "users": self.users, "closed": self.closed}


def sessions_of_user(groups: Mapping[str, Sequence[LogRecord]], user: str
                     ) -> list[SessionListing]:
    """The sessions in ``groups`` (as :func:`group_by_session` makes them) in which any hop
    logged ``user``, oldest first."""
    found: list[SessionListing] = []
    for sid, records in groups.items():
        users = sorted({_text(r, "user") for r in records if _text(r, "user")})
        if user not in users:
            continue
        trace = trace_session(records, sid)
        found.append(SessionListing(sid, trace.start, trace.end,
                                    [hop.name for hop in trace.hops], users, trace.closed))
    found.sort(key=lambda s: (s.first, s.session))
    return found


# ---------------------------------------------------------------- JSON


def _offset(value: float, start: float) -> float:
    return round(value - start, 6)


def hop_to_json(hop: HopSummary, start: float) -> dict[str, Any]:
    return {
        "role": hop.role, "node": hop.node, "user": hop.user, "uid": hop.uid,
        "peer": hop.peer, "next_hop": hop.next_hop,
        "first": _offset(hop.first, start), "last": _offset(hop.last, start),
        "first_time": hop.first, "last_time": hop.last,
        "opened": hop.opened, "closed": hop.closed, "close_reason": hop.close_reason,
        "up": hop.up.to_json(), "down": hop.down.to_json(), "counters": dict(hop.counters),
        "drops": dict(hop.drops), "drops_total": hop.drops_total,
        "reconnects": [{"offset": _offset(e.time, start), "time": e.time, "event": e.event,
                        "reason": e.reason} for e in hop.reconnects],
        "records": hop.records,
    }


def trace_to_json(trace: SessionTrace) -> dict[str, Any]:
    """The trace as JSON data: ``session``, ``user``, ``uid``, ``start``/``end`` (epoch
    seconds), ``duration``, ``closed``, ``hops`` (chain order; times as ``first``/``last``
    offsets from ``start``, and epoch ``first_time``/``last_time``) and ``timeline`` (every
    record, with its ``offset``)."""
    return {
        "session": trace.session, "user": trace.user, "uid": trace.uid,
        "start": trace.start, "end": trace.end,
        "duration": _offset(trace.end, trace.start), "closed": trace.closed,
        "chain": [hop.name for hop in trace.hops], "foreign": list(trace.foreign),
        "hops": [hop_to_json(hop, trace.start) for hop in trace.hops],
        "timeline": [{"offset": _offset(record_time(r) or trace.start, trace.start), **r}
                     for r in trace.timeline],
    }


# ---------------------------------------------------------------- the terminal view


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value) if (not value or any(c.isspace() for c in value)
                                     or '"' in value) else printable(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _p(value: Any) -> str:
    """A string someone else chose, as the terminal shows it: nothing it would obey."""
    return printable(str(value))


def _details(record: Mapping[str, Any], fields: Sequence[str]) -> str:
    names = [f for f in fields if f in record]
    names += sorted(k for k in record if k.startswith("bytes") and k not in names)
    return " ".join(f"{name}={_show(record[name])}" for name in names
                    if record[name] is not None and record[name] != "")


def format_records(
    records: Sequence[Mapping[str, Any]], fields: Sequence[str] = DETAIL_FIELDS,
    start: float | None = None,
) -> str:
    """A table of ``records``: seconds since ``start`` (default: the first record), node,
    event, and ``fields`` plus any ``bytes*`` counters as NAME=VALUE.

    No trailing newline; ``"(no records)"`` for an empty list.
    """
    if not records:
        return "(no records)"
    times = [record_time(r) for r in records]
    if start is None:
        start = min((t for t in times if t is not None), default=0.0)
    rows = [("TIME", "NODE", "EVENT", "DETAILS")]
    for record, when in zip(records, times):
        offset = "?" if when is None else f"+{when - start:.3f}s"
        node = record.get("node") or record.get("role") or "?"
        rows.append((offset, _p(node), _p(record.get("event", "?")),
                     _details(record, fields)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row in rows:
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                 row[3]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_time(when: float) -> str:
    """An epoch time as local ISO time with milliseconds and the zone offset."""
    try:
        moment = datetime.datetime.fromtimestamp(when).astimezone()
    except (OverflowError, OSError, ValueError):
        return f"{when:.3f}"
    return moment.isoformat(sep=" ", timespec="milliseconds")


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _traffic(traffic: Traffic) -> str:
    parts = [f"{_number(traffic.bytes)} B"]
    if traffic.packets is not None:
        parts.append(f"{_number(traffic.packets)} packets")
    if traffic.envelopes_in is not None or traffic.envelopes_out is not None:
        parts.append(f"envelopes {_number(traffic.envelopes_in)} in, "
                     f"{_number(traffic.envelopes_out)} out")
    return ", ".join(parts)


def format_hop(index: int, hop: HopSummary, start: float) -> list[str]:
    role = f" ({_p(hop.role)})" if hop.role and hop.role != hop.node else ""
    span = f"+{hop.first - start:.3f}s .. +{hop.last - start:.3f}s"
    lines = [f"[{index}] {_p(hop.name)}{role}   {span}"]
    who = f"user {_p(hop.user or '?')}" + (f" (uid {hop.uid})" if hop.uid is not None else "")
    where = []
    if hop.peer:
        where.append(f"from {_p(hop.peer)}")
    if hop.next_hop:
        where.append(f"to {_p(hop.next_hop)}")
    lines.append("    " + "   ".join([who, *where]))
    state = f"closed: {_p(hop.close_reason or '(no reason)')}" if hop.closed else (
        "no end logged (still open, or the node stopped without closing it)")
    if hop.opened > 1:
        state += f"; opened {hop.opened} times"
    lines.append(f"    {state}")
    if hop.closed:
        lines.append(f"    up   (to the target)  {_traffic(hop.up)}")
        lines.append(f"    down (to the user)    {_traffic(hop.down)}")
    if hop.drops:
        listed = ", ".join(f"{_p(reason)} x{count}" for reason, count in
                           sorted(hop.drops.items(), key=lambda item: (-item[1], item[0])))
        lines.append(f"    drops {hop.drops_total}: {listed}")
    else:
        lines.append("    drops: none")
    for event in hop.reconnects:
        reason = f": {_p(event.reason)}" if event.reason else ""
        again = " (again)" if event.event == SESSION_OPENED else ""
        lines.append(f"    +{event.time - start:.3f}s {_p(event.event)}{again}{reason}")
    return lines


def format_trace(trace: SessionTrace, timeline: bool = True, extra: Sequence[str] = ()
                 ) -> str:
    """The terminal view: a header, one block per hop in chain order, ``extra`` lines (the
    captures' flows, with ``--packets``), then the timeline."""
    if not trace.hops:
        return f"session {trace.session}: no records"
    uid = f" (uid {trace.uid})" if trace.uid is not None else ""
    lines = [
        f"session {_p(trace.session)}  user {_p(trace.user or '?')}{uid}",
        f"  {format_time(trace.start)} .. +{trace.end - trace.start:.3f}s   "
        f"{'closed' if trace.closed else 'open (no end logged by the client or server)'}",
        f"  chain: {' > '.join(_p(hop.name) for hop in trace.hops)}",
        *(f"  warning: {_p(line)}" for line in trace.foreign),
        "",
    ]
    for index, hop in enumerate(trace.hops, 1):
        lines += format_hop(index, hop, trace.start)
        lines.append("")
    if extra:
        lines += [*extra, ""]
    if timeline:
        # The session's user and uid are in the header; a record says them only if it differs.
        same = {"user": trace.user, "uid": trace.uid}
        shown = [{k: v for k, v in r.items() if not (k in same and v == same[k])}
                 for r in trace.timeline]
        lines.append("timeline:")
        lines += ["  " + line for line in format_records(shown, start=trace.start).splitlines()]
    return "\n".join(lines).rstrip()


def format_listing(user: str, sessions: Sequence[SessionListing]) -> str:
    """``pvpn trace --user``: one line per session."""
    if not sessions:
        return f"no sessions of {_p(user)} in these logs"
    rows = [("SESSION", "FIRST", "DURATION", "STATE", "NODES")]
    for s in sessions:
        rows.append((_p(s.session), format_time(s.first), f"{s.last - s.first:.3f}s",
                     "closed" if s.closed else "open", " > ".join(_p(n) for n in s.nodes)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([*(row[i].ljust(widths[i]) for i in range(4)), row[4]]).rstrip()
                     for row in rows)
