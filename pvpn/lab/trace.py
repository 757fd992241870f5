"""One session's records from the nodes' JSON-line logs, as a hop-by-hop table.

Every pvpn node logs one JSON object per line (docs/design.md), and every hop of a chain logs
the same session id, so a session's life along the chain is the union of the nodes' records
for that id, ordered by time.  :func:`session_records` collects them, :func:`format_records`
prints them as a small aligned table.  The lab's demo uses both; a ``pvpn trace`` command can
grow from them.

Log files are read as they are: a missing file (a node that never ran) and lines that are not
a JSON object with a numeric ``time`` (a traceback on stderr, a line cut by rotation) are
skipped, never fatal.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

# The fields shown after the event, in this order, when a record has them (a gateway logs
# the hop it relays to as next_hop); counters whose name starts with "bytes" (bytes,
# bytes_in, bytes_to_next, ...) follow.
DETAIL_FIELDS: tuple[str, ...] = ("user", "uid", "peer", "next_hop", "reason")


def _records_in(path: str | os.PathLike[str]) -> Iterable[dict[str, Any]]:
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return
    with handle:
        for line in handle:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def _time(record: dict[str, Any]) -> float | None:
    value = record.get("time")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def session_records(
    paths: Iterable[str | os.PathLike[str]], session: str
) -> list[dict[str, Any]]:
    """The records of ``session`` (its hex id) in the log files ``paths``, ordered by time.

    A record belongs to the session when its ``session`` field equals the id (ignoring case
    and surrounding blanks).  Records without a numeric ``time`` cannot be placed and are
    left out; records with equal times keep the order of ``paths`` and of their lines.
    """
    wanted = session.strip().lower()
    if not wanted:
        return []
    found: list[tuple[float, int, dict[str, Any]]] = []
    for path in paths:
        for record in _records_in(path):
            sid = record.get("session")
            if not isinstance(sid, str) or sid.strip().lower() != wanted:
                continue
            when = _time(record)
            if when is None:
                continue
            found.append((when, len(found), record))
    found.sort(key=lambda item: (item[0], item[1]))
    return [record for _when, _index, record in found]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value) if (not value or any(c.isspace() for c in value)
                                     or '"' in value) else value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _details(record: dict[str, Any], fields: Sequence[str]) -> str:
    names = [f for f in fields if f in record]
    names += sorted(k for k in record if k.startswith("bytes") and k not in names)
    return " ".join(f"{name}={_show(record[name])}" for name in names
                    if record[name] is not None and record[name] != "")


def format_records(
    records: Sequence[dict[str, Any]], fields: Sequence[str] = DETAIL_FIELDS
) -> str:
    """A table of ``records`` (as :func:`session_records` returns them): seconds since the
    first record, node, event, and ``fields`` plus any ``bytes*`` counters as NAME=VALUE.

    No trailing newline; ``"(no records)"`` for an empty list.
    """
    if not records:
        return "(no records)"
    times = [_time(r) for r in records]
    start = min((t for t in times if t is not None), default=0.0)
    rows = [("TIME", "NODE", "EVENT", "DETAILS")]
    for record, when in zip(records, times):
        offset = "?" if when is None else f"+{when - start:.3f}s"
        node = record.get("node") or record.get("role") or "?"
        rows.append((offset, str(node), str(record.get("event", "?")),
                     _details(record, fields)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row in rows:
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                 row[3]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
