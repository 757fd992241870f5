"""Per-hop log records: one JSON object per line, joined across hops by the session id.

The core builds records as data; an adapter (:class:`RecordWriter`) writes them. Records never
carry keys or payload bytes: only who, where, how much and why.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO


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


def session_hex(session: bytes) -> str:
    return session.hex() if session else ""


class RecordWriter:
    """Writes records as JSON lines with the time, hop role and node name filled in."""

    def __init__(
        self,
        role: str,
        node: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.role = role
        self.node = node
        self.stream = stream if stream is not None else sys.stdout
        self._clock = clock

    def write(self, record: Record) -> None:
        obj: dict[str, Any] = {
            "time": round(self._clock(), 6),
            "role": self.role,
            "node": self.node,
            "event": record.event,
        }
        for name in ("session", "user", "peer", "flow", "reason"):
            value = getattr(record, name)
            if value:
                obj[name] = value
        if record.uid is not None:
            obj["uid"] = record.uid
        if record.bytes is not None:
            obj["bytes"] = record.bytes
        obj.update(record.extra)
        self.stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.stream.flush()
