"""Per-hop log records: one JSON object per line, joined across hops by the session id.

The core builds records as data; an adapter (:class:`RecordWriter`) writes them. Records never
carry keys or payload bytes: only who, where, how much and why.

Many fields come from someone else (a user name from an unauthenticated HELLO, a peer's reason
for closing, an exception's message that quotes a field): the writer bounds every string, list
and map, and the whole line, so no frame can write a record larger than :data:`MAX_RECORD`
(issue 9: one malformed frame used to write 160 KB, and 1,300 connections rotated a node's
whole log history away).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from pvpn.text import clip

#: What a record keeps of one string (a peer's reason, a name, an exception's message).
MAX_FIELD = 1024
#: ... and of the fields that are longer by nature.
LONG_FIELDS = {"traceback": 8192}
#: Items kept of one list or map (the rest is counted), and how deep a value may nest.
MAX_ITEMS = 256
MAX_DEPTH = 4
#: One record, as written; above it, only the fields that say who and what are kept.
MAX_RECORD = 16384
_CORE_FIELDS = ("time", "role", "node", "event", "session", "user", "uid", "peer", "flow",
                "bytes", "reason")


# Identifiers as nodes take them from a HELLO and write them into records; `pvpn trace` skips a
# record whose identifiers don't fit (a forged line, or a name that would mislead root).
SESSION_ID = re.compile(r"[0-9a-f]{32}")
#: A user name at a node, taken with ``fullmatch``: useradd's NAME_REGEX, shortened (no "/",
#: no "..", no upper case, so a name off the wire never leaves the authorized-keys directory).
USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
#: A node's name ([server] / [gateway] / [client] name), as the chain's ``path`` lists them.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: The client host's name a user's process gives (pvpn.user.UserLink makes it fit).
CLIENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A next hop as a HELLO names it: ADDRESS:PORT or [V6]:PORT.
ENDPOINT = re.compile(r"[0-9A-Za-z.:\[\]_-]{1,64}")


@dataclass(slots=True)
class Record:
    """One event at one hop. ``event`` is ``category:name``, e.g. ``session:opened``."""

    event: str
    session: str = ""
    user: str = ""
    uid: int | None = None
    peer: str = ""
    flow: str = ""
    bytes: int | None = None
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# The fields a record has by name; every other one a builder is given goes into ``extra``.
_NAMED_FIELDS = frozenset(("event", "session", "user", "uid", "peer", "flow", "bytes", "reason"))


def with_fields(record: Record, fields: dict[str, Any]) -> Record:
    """``record`` with each of ``fields`` set: a field the record names as itself, any other
    into ``extra`` (after what it holds already, in the order given)."""
    for key, value in fields.items():
        if key in _NAMED_FIELDS:
            setattr(record, key, value)
        else:
            record.extra[key] = value
    return record


class RecordBudget:
    """A token bucket deciding which of a kind of record are written: a burst, then ``rate``
    a second; what it holds back is counted in :attr:`unlogged`. Time is passed in."""

    __slots__ = ("unlogged", "_burst", "_rate", "_tokens", "_refilled")

    def __init__(self, burst: float, rate: float) -> None:
        self.unlogged = 0
        self._burst, self._rate = burst, rate
        self._tokens, self._refilled = burst, 0.0

    def take(self, now: float, always: bool = False) -> bool:
        """Whether this record is written: while tokens last, or ``always`` (it then takes a
        token if there is one). One held back is counted in :attr:`unlogged`."""
        tokens = min(self._burst, self._tokens + max(0.0, now - self._refilled) * self._rate)
        self._refilled = now
        if tokens >= 1.0 or always:
            self._tokens = max(0.0, tokens - 1.0)
            return True
        self._tokens = tokens
        self.unlogged += 1
        return False

    def take_unlogged(self) -> int:
        """How many records were held back since the last call (for the next record)."""
        unlogged, self.unlogged = self.unlogged, 0
        return unlogged


def session_hex(session: bytes) -> str:
    return session.hex() if session else ""


def bounded(value: Any, limit: int = MAX_FIELD, depth: int = 0) -> Any:
    """``value`` as JSON data no larger than the bounds above: strings clipped, lists and maps
    cut to :data:`MAX_ITEMS` (saying how many more), nesting cut at :data:`MAX_DEPTH`, and
    anything that is not JSON data written as its clipped ``str``."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return clip(value, limit)
    if depth >= MAX_DEPTH:
        return clip(str(value), 64)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value) if not isinstance(value, (set, frozenset)) else sorted(value, key=str)
        out: list[Any] = [bounded(v, limit, depth + 1) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            out.append(f"...({len(items) - MAX_ITEMS} more)")
        return out
    if isinstance(value, dict):
        kept: dict[str, Any] = {}
        for number, (key, item) in enumerate(value.items()):
            if number >= MAX_ITEMS:
                kept["..."] = f"({len(value) - MAX_ITEMS} more)"
                break
            kept[clip(str(key), 64)] = bounded(item, limit, depth + 1)
        return kept
    return clip(str(value), limit)


class RecordWriter:
    """Writes records as JSON lines with the time, hop role and node name filled in."""

    def __init__(
        self,
        role: str,
        node: str,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float],  # the daemon's wall clock: the core reads none itself
    ) -> None:
        self.role = role
        self.node = node
        self.stream = stream if stream is not None else sys.stdout
        self._clock = clock

    def write(self, record: Record) -> None:
        self.stream.write(self.line(record))
        self.stream.flush()

    def line(self, record: Record) -> str:
        """The record as one JSON line, every field bounded (see :func:`bounded`)."""
        obj: dict[str, Any] = {
            "time": round(self._clock(), 6),
            "role": self.role,
            "node": self.node,
            "event": clip(str(record.event), 64),
        }
        for name in ("session", "user", "peer", "flow", "reason"):
            value = getattr(record, name)
            if value:
                obj[name] = bounded(value)
        if record.uid is not None:
            obj["uid"] = bounded(record.uid)
        if record.bytes is not None:
            obj["bytes"] = bounded(record.bytes)
        for number, (key, value) in enumerate(record.extra.items()):
            if number >= MAX_ITEMS:
                break
            if key not in ("time", "role", "node", "event"):  # what the writer vouches for
                obj[clip(str(key), 64)] = bounded(value, LONG_FIELDS.get(key, MAX_FIELD))
        text = json.dumps(obj, separators=(",", ":"))
        if len(text) > MAX_RECORD:
            # Still too large (many long fields): keep who and what, say how much was left out.
            core = {k: obj[k] for k in _CORE_FIELDS if k in obj}
            core = {k: bounded(v, 256) for k, v in core.items()}
            core["truncated"] = len(text)
            text = json.dumps(core, separators=(",", ":"))
        return text + "\n"
