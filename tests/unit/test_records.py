"""Hop records: whatever a peer put into a field, a record stays small (issue 9 point 7: one
unauthenticated frame used to write a 160 KB record, and 1,300 connections rotated a node's
whole log history away)."""

from __future__ import annotations

import io
import json

from pvpn.records import Record, RecordWriter

MAX_RECORD = 16384  # pvpn.records.MAX_RECORD: what one record may take, as written
MAX_ITEMS = 256  # pvpn.records.MAX_ITEMS: items kept of one list


def written(record: Record) -> tuple[str, dict[str, object]]:
    stream = io.StringIO()
    RecordWriter("server", "server", stream, clock=lambda: 1.0).write(record)
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    return line, json.loads(line)


def test_every_string_is_clipped_and_the_record_bounded() -> None:
    huge = "A" * 160_000
    line, obj = written(Record("link:error", user=huge, reason=huge, peer=huge, flow=huge,
                               extra={"client": huge, "path": [huge] * 10,
                                      "drops": {huge: 1}}))
    assert len(line) <= MAX_RECORD + 1
    assert obj["event"] == "link:error" and obj["role"] == "server" and obj["node"] == "server"
    assert str(obj["reason"]).startswith("AAAA") and "more characters" in str(obj["reason"])


def test_long_lists_and_maps_say_how_much_was_left_out() -> None:
    _, obj = written(Record("node:reloaded", extra={"users": [f"u{n}" for n in range(1000)],
                                                    "nested": [[[[["deep"]]]]]}))
    users = obj["users"]
    assert isinstance(users, list) and len(users) == MAX_ITEMS + 1
    assert users[-1] == f"...({1000 - MAX_ITEMS} more)"
    assert "deep" in json.dumps(obj["nested"])


def test_a_traceback_keeps_more_and_the_writer_s_own_fields_win() -> None:
    _, obj = written(Record("node:error", extra={"traceback": "x" * 6000, "node": "forged",
                                                 "time": 0, "role": "client"}))
    assert len(str(obj["traceback"])) == 6000
    assert obj["node"] == "server" and obj["role"] == "server" and obj["time"] == 1.0


def test_ordinary_records_are_written_as_before() -> None:
    _, obj = written(Record("session:opened", session="ab" * 16, user="alice", uid=1001,
                            peer="10.0.0.2:4000", extra={"allow": ["10.9.0.0/24"], "resumed": False}))
    assert obj == {"time": 1.0, "role": "server", "node": "server", "event": "session:opened",
                   "session": "ab" * 16, "user": "alice", "peer": "10.0.0.2:4000", "uid": 1001,
                   "allow": ["10.9.0.0/24"], "resumed": False}


def test_every_event_name_is_one_category_and_name_spelled_once() -> None:
    from pvpn import names

    constants = {key: value for key, value in vars(names).items() if key.isupper() and key != "ALL"}
    assert set(constants.values()) == names.ALL and len(constants) == len(names.ALL)
    for key, value in constants.items():
        category, _, name = value.partition(":")
        assert category and name and type(value) is str
        assert key == value.replace(":", "_").replace("-", "_").upper()
    _, obj = written(Record(names.SESSION_OPENED))
    assert obj["event"] == "session:opened"
