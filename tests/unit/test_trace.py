"""pvpn.lab.trace: one session's records from several JSON-line logs, as a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pvpn.lab.trace import format_records, session_records

ALICE = "a1" * 16
BOB = "b2" * 16


def write(path: Path, *lines: str | dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def logs(tmp_path: Path) -> list[Path]:
    client = write(
        tmp_path / "pvpn-client.log",
        {"time": 100.0, "role": "client", "node": "client", "event": "node:started"},
        {"time": 100.5, "role": "client", "node": "client", "event": "session:registered",
         "session": ALICE, "user": "alice", "uid": 1001, "slot": 1},
        {"time": 100.6, "role": "client", "node": "client", "event": "session:registered",
         "session": BOB, "user": "bob", "uid": 1002},
        {"time": 109.0, "role": "client", "node": "client", "event": "session:closed",
         "session": ALICE, "user": "alice", "uid": 1001, "reason": "ended by the user",
         "bytes_out": 1234},
    )
    gw1 = write(
        tmp_path / "gw1" / "pvpn-gateway.log",
        "Traceback (most recent call last):",
        '{"time": 101.0, "node": "gw1", "event": "link:opened", "session": "' + ALICE + '"',
        "[1, 2, 3]",
        {"time": "yesterday", "node": "gw1", "event": "bad:time", "session": ALICE},
        {"time": 101.2, "role": "gateway", "node": "gw1", "event": "session:relaying",
         "session": ALICE.upper(), "user": "alice", "uid": 1001, "peer": "10.77.0.1:50000",
         "next_hop": "10.77.1.2:4433", "bytes_in": 10, "bytes_out": 20, "envelopes_in": 3},
        "",
    )
    server = write(
        tmp_path / "pvpn-server.log",
        {"time": 101.5, "role": "server", "node": "server", "event": "session:opened",
         "session": ALICE, "user": "alice", "uid": 1001, "peer": "10.77.1.1:40000"},
        {"time": 101.5, "role": "server", "node": "server", "event": "session:opened",
         "session": BOB, "user": "bob"},
        {"time": 108.25, "role": "server", "node": "server", "event": "session:closed",
         "session": ALICE, "user": "alice", "reason": "closed by the user: ended by the user",
         "bytes_in": 5000, "bytes_out": 7000, "packets_in": 7},
    )
    return [client, gw1, server]


def test_selects_one_session_across_files_in_time_order(tmp_path: Path) -> None:
    records = session_records(logs(tmp_path), ALICE)
    assert [(r["node"], r["event"]) for r in records] == [
        ("client", "session:registered"),
        ("gw1", "session:relaying"),
        ("server", "session:opened"),
        ("server", "session:closed"),
        ("client", "session:closed"),
    ]
    assert [r["user"] for r in session_records(logs(tmp_path), BOB)] == ["bob", "bob"]


def test_malformed_lines_and_missing_files_are_skipped(tmp_path: Path) -> None:
    paths = [*logs(tmp_path), tmp_path / "no-such.log", tmp_path]
    (tmp_path / "binary.log").write_bytes(b"\xff\xfe{not json\n" + json.dumps(
        {"time": 102, "node": "x", "event": "e", "session": ALICE}).encode() + b"\n")
    records = session_records([*paths, tmp_path / "binary.log"], ALICE)
    assert [r["node"] for r in records] == ["client", "gw1", "server", "x", "server", "client"]
    assert session_records(paths, "") == []
    assert session_records(paths, "ff" * 16) == []


def test_table_is_aligned_and_shows_the_interesting_fields(tmp_path: Path) -> None:
    table = format_records(session_records(logs(tmp_path), ALICE))
    lines = table.splitlines()
    assert len(lines) == 6
    assert lines[0].split() == ["TIME", "NODE", "EVENT", "DETAILS"]
    assert lines[1].split()[:3] == ["+0.000s", "client", "session:registered"]
    assert "user=alice uid=1001" in lines[1] and "slot" not in lines[1]
    assert lines[2].split()[:3] == ["+0.700s", "gw1", "session:relaying"]
    assert lines[2].endswith(
        "peer=10.77.0.1:50000 next_hop=10.77.1.2:4433 bytes_in=10 bytes_out=20")
    assert lines[4].split()[:3] == ["+7.750s", "server", "session:closed"]
    assert 'reason="closed by the user: ended by the user"' in lines[4]
    assert "bytes_in=5000 bytes_out=7000" in lines[4] and "packets_in" not in lines[4]
    # The columns line up: every node name starts, and every event starts, at one column.
    node_cols = {line.index(node) for line, node in zip(lines[1:], (
        "client", "gw1", "server", "server", "client"))}
    event_cols = {line.index("session:") for line in lines[1:]}
    assert len(node_cols) == 1 and len(event_cols) == 1
    assert not table.endswith("\n")


def test_table_of_nothing() -> None:
    assert format_records([]) == "(no records)"
    table = format_records([{"time": 5, "event": "x:y", "role": "gateway"}])
    assert table.splitlines()[1].split() == ["+0.000s", "gateway", "x:y"]
