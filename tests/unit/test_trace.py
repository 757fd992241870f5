"""pvpn.trace and `pvpn trace`: one session's records from several JSON-line logs, summarised
hop by hop in chain order, on one timeline, as text and as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pvpn.cli import trace as trace_cli
from pvpn.cli.main import main as pvpn_main
from pvpn.errors import ConfigError
from pvpn.trace import (
    format_records, format_trace, group_by_session, parse_lines, select_session,
    sessions_of_user, trace_session, trace_to_json,
)
from pvpn.cli.trace import log_files, read_records, resolve_logs

ALICE = "a1" * 16
BOB = "b2" * 16


def write(path: Path, *lines: str | dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def session_records(paths: list[Path], session: str) -> list[dict[str, Any]]:
    return select_session(read_records(paths), session)


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
    paths = [*logs(tmp_path), tmp_path / "no-such.log"]
    (tmp_path / "binary.log").write_bytes(b"\xff\xfe{not json\n" + json.dumps(
        {"time": 102, "node": "x", "event": "e", "session": ALICE}).encode() + b"\n")
    records = session_records([*paths, tmp_path / "binary.log"], ALICE)
    assert [r["node"] for r in records] == ["client", "gw1", "server", "x", "server", "client"]
    assert session_records(paths, "") == []
    assert session_records(paths, "ff" * 16) == []
    lines = [line.replace('"a"', f'"{ALICE}"') for line in (
        '{"time": NaN, "session": "a"}', '{"time": 1e999, "session": "a"}',
        '{"time": true, "session": "a"}', '{"time": 1, "session": "a"}', '{"time": 1,')]
    assert [r["time"] for r in parse_lines(lines)] == [1]


def test_directories_are_searched_for_log_files(tmp_path: Path) -> None:
    paths = logs(tmp_path)
    (tmp_path / "gw1" / "pvpn-gateway.log.1").write_text("")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "big").write_bytes(b"\0" * 100)  # not a log: never read
    found = log_files([tmp_path])
    assert sorted(found) == sorted([*paths, tmp_path / "gw1" / "pvpn-gateway.log.1"])
    with pytest.raises(ConfigError, match="no-such"):
        log_files([tmp_path / "no-such"])


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


# ---------------------------------------------------------------- a chain of four nodes

S = "5e55" * 8  # alice's session
OTHER = "5e56" * 8  # bob's, with the same first digits


def rec(t: float, role: str, node: str, event: str, **fields: Any) -> dict[str, Any]:
    return {"time": 1_700_000_000 + t, "role": role, "node": node, "event": event, **fields}


def chain_logs(tmp_path: Path) -> Path:
    """Logs as the nodes write them for one session through client > gw1 > gw2 > server,
    with drops, a gateway that died and a rebuilt chain resumed at the server.  gw2's clock
    runs 0.3 s early: the order of the hops must not depend on it."""
    me = {"session": S, "user": "alice", "uid": 1001}
    write(tmp_path / "client" / "pvpn-client.log",
          rec(0.0, "client", "client", "node:started"),
          rec(0.1, "client", "client", "session:registered", user="alice", uid=1001, slot=1),
          rec(0.9, "client", "client", "session:attached", slot=1, pid=4242, **me),
          rec(5.0, "client", "client", "packet:dropped", slot=1, count=1,
              reason="tunnel down (fail closed)", **me),
          rec(5.5, "client", "client", "packet:dropped", slot=1, count=2,
              reason="tunnel down (fail closed)", **me),
          "pvpn-client: a line of stderr, not JSON",
          rec(6.0, "client", "client", "session:held", slot=1,
              reason="tunnel process gone", **me),
          rec(7.0, "client", "client", "session:reattached", slot=1, **me),
          rec(20.0, "client", "client", "session:closed", slot=1,
              reason="ended by the user: ended by the user", packets_out=120, packets_in=200,
              bytes_out=9_000, bytes_in=300_000,
              drops={"tunnel down (fail closed)": 3, "TUN device full": 1}, **me),
          rec(20.5, "client", "client", "session:attached", session=OTHER, user="bob"))
    write(tmp_path / "gw1" / "pvpn-gateway.log",
          rec(0.2, "gateway", "gw1", "link:opened", peer="10.77.0.1:50000"),
          rec(0.3, "gateway", "gw1", "splice:connecting", next_hop="10.77.1.2:4433",
              peer="10.77.0.1:50000", **me),
          rec(0.4, "gateway", "gw1", "session:opened", path=[], client="c",
              prev_hop="10.77.0.1:50000", next_hop="10.77.1.2:4433",
              peer="10.77.0.1:50000", **me),
          '{"time": 1700000004.0, "role": "gateway", "node": "gw1", "event": "sess',
          rec(7.5, "gateway", "gw1", "session:opened", path=[], peer="10.77.0.1:50002",
              next_hop="10.77.1.2:4433", **me),
          rec(19.8, "gateway", "gw1", "session:closed", reason="closed by the user: bye",
              bytes_to_next=6_000, bytes_from_next=250_000, envelopes_from_user=50,
              envelopes_to_user=60, envelopes_to_next=45, envelopes_from_next=70, **me))
    write(tmp_path / "gw2" / "pvpn-gateway.log",
          rec(0.15, "gateway", "gw2", "splice:connecting", next_hop="10.77.2.2:4433",
              peer="10.77.1.1:41000", **me),
          rec(0.2, "gateway", "gw2", "session:opened", path=["gw1"],
              peer="10.77.1.1:41000", next_hop="10.77.2.2:4433", **me),
          rec(4.0, "gateway", "gw2", "link:dead", reason="no word for 30 s (keepalive)",
              peer="10.77.1.1:41000", **me),
          rec(4.1, "gateway", "gw2", "session:closed", reason="previous hop gone: dead",
              bytes_to_next=1_000, bytes_from_next=40_000, envelopes_from_user=10,
              envelopes_to_user=12, envelopes_to_next=9, envelopes_from_next=14, **me),
          rec(7.6, "gateway", "gw2", "session:opened", path=["gw1"],
              peer="10.77.1.1:41002", next_hop="10.77.2.2:4433", **me),
          rec(19.7, "gateway", "gw2", "session:closed", reason="closed by the user: bye",
              bytes_to_next=5_500, bytes_from_next=240_000, envelopes_from_user=40,
              envelopes_to_user=50, envelopes_to_next=38, envelopes_from_next=60, **me))
    write(tmp_path / "server" / "pvpn-server.log",
          rec(0.6, "server", "server", "session:opened", path=["gw1", "gw2"],
              peer="10.77.2.1:42000", allow=["10.77.4.0/24"], **me),
          rec(1.0, "server", "server", "packet:dropped", flow="tcp 10.77.0.1:1 > 192.0.2.1:80",
              reason="destination not allowed", count=1, **me),
          rec(1.1, "server", "server", "packet:dropped", flow="tcp 10.77.0.1:1 > 192.0.2.1:80",
              reason="destination not allowed", count=2, **me),
          rec(4.2, "server", "server", "session:detached", reason="connection lost", **me),
          rec(4.5, "server", "server", "packet:dropped",
              reason="session detached (user reconnecting)", count=1, **me),
          rec(7.8, "server", "server", "session:resumed", peer="10.77.2.1:42002", **me),
          rec(19.9, "server", "server", "session:closed",
              reason="closed by the user: ended by the user", packets_in=190, packets_out=110,
              bytes_in=290_000, bytes_out=8_500, flows=3,
              drops={"destination not allowed": 2, "session detached (user reconnecting)": 5},
              **me),
          # The link goes after the session ended: the end, not a reconnect.
          rec(19.95, "server", "server", "session:detached", reason="connection closed", **me),
          rec(20.2, "server", "server", "session:opened", session=OTHER, user="bob"))
    return tmp_path


def test_four_hops_in_chain_order_with_their_numbers(tmp_path: Path) -> None:
    groups = group_by_session(read_records(log_files([chain_logs(tmp_path)])))
    assert set(groups) == {S, OTHER}
    trace = trace_session(groups[S], S)
    assert [(h.role, h.node) for h in trace.hops] == [
        ("client", "client"), ("gateway", "gw1"), ("gateway", "gw2"), ("server", "server")]
    client, gw1, gw2, server = trace.hops
    assert trace.user == "alice" and trace.uid == 1001 and trace.closed
    assert trace.start == 1_700_000_000.15  # gw2's early clock: the first record
    assert client.first - trace.start == pytest.approx(0.75)
    assert client.last - trace.start == pytest.approx(19.85)

    assert (client.up.bytes, client.up.packets) == (9_000, 120)
    assert (client.down.bytes, client.down.packets) == (300_000, 200)
    assert client.up.envelopes_in is None
    assert client.drops == {"tunnel down (fail closed)": 3, "TUN device full": 1}
    assert client.close_reason == "ended by the user: ended by the user"
    assert [e.event for e in client.reconnects] == ["session:held", "session:reattached"]

    assert gw1.peer == "10.77.0.1:50000" and gw1.next_hop == "10.77.1.2:4433"
    assert (gw1.up.bytes, gw1.up.envelopes_in, gw1.up.envelopes_out) == (6_000, 50, 45)
    assert (gw1.down.bytes, gw1.down.envelopes_in, gw1.down.envelopes_out) == (250_000, 70, 60)
    assert gw1.opened == 2 and [e.event for e in gw1.reconnects] == ["session:opened"]
    assert gw1.drops == {}

    # gw2 relayed the session twice: its counters are the sum of both closes.
    assert (gw2.up.bytes, gw2.down.bytes) == (6_500, 280_000)
    assert (gw2.up.envelopes_in, gw2.down.envelopes_out) == (50, 62)
    assert gw2.counters["envelopes_from_next"] == 74
    assert [e.event for e in gw2.reconnects] == ["link:dead", "session:opened"]

    assert (server.up.bytes, server.up.packets) == (8_500, 110)
    assert (server.down.bytes, server.down.packets) == (290_000, 190)
    assert server.drops == {"destination not allowed": 2,
                            "session detached (user reconnecting)": 5}
    assert server.drops_total == 7
    assert [e.event for e in server.reconnects] == ["session:detached", "session:resumed"]
    assert server.counters["flows"] == 3


def test_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chain_logs(tmp_path)
    assert pvpn_main(["trace", S[:12], "--logs", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["session"] == S and data["user"] == "alice" and data["uid"] == 1001
    assert data["chain"] == ["client", "gw1", "gw2", "server"]
    assert data["closed"] is True and data["duration"] == pytest.approx(19.85)
    hop = data["hops"][3]
    assert set(hop) >= {"role", "node", "user", "uid", "peer", "next_hop", "first", "last",
                        "first_time", "last_time", "opened", "closed", "close_reason", "up",
                        "down", "counters", "drops", "drops_total", "reconnects", "records"}
    assert hop["up"] == {"bytes": 8_500, "packets": 110, "envelopes_in": None,
                         "envelopes_out": None}
    assert hop["first"] == pytest.approx(0.45)
    assert [r["event"] for r in hop["reconnects"]] == ["session:detached", "session:resumed"]
    assert hop["reconnects"][1]["offset"] == pytest.approx(7.65)
    timeline = data["timeline"]
    assert [r["offset"] for r in timeline] == sorted(r["offset"] for r in timeline)
    assert timeline[0]["offset"] == 0 and timeline[0]["node"] == "gw2"
    assert all(r["session"] == S for r in timeline)
    assert len(timeline) == 24  # client 6, gw1 4, gw2 6, server 8
    assert trace_to_json(trace_session([], S))["hops"] == []


def test_terminal_view(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chain_logs(tmp_path)
    assert pvpn_main(["trace", S, "--logs", str(tmp_path / "client"), "--logs",
                      str(tmp_path / "gw1"), "--logs", str(tmp_path / "gw2" / "pvpn-gateway.log"),
                      "--logs", str(tmp_path / "server")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"session {S}  user alice (uid 1001)"
    assert "chain: client > gw1 > gw2 > server" in out
    blocks = [line for line in lines if line.startswith("[")]
    assert [b.split()[:2] for b in blocks] == [
        ["[1]", "client"], ["[2]", "gw1"], ["[3]", "gw2"], ["[4]", "server"]]
    assert blocks[1].endswith("+0.150s .. +19.650s")
    assert "    up   (to the target)  9,000 B, 120 packets" in lines
    assert "    down (to the user)    250,000 B, envelopes 70 in, 60 out" in lines
    assert "    drops 4: tunnel down (fail closed) x3, TUN device full x1" in lines
    assert "    +7.350s session:opened (again)" in lines
    assert "    +3.850s link:dead: no word for 30 s (keepalive)" in lines
    assert "    drops: none" in lines
    timeline = lines[lines.index("timeline:") + 1:]
    assert timeline[0].split() == ["TIME", "NODE", "EVENT", "DETAILS"]
    assert len(timeline) == 1 + 24
    assert timeline[1].split()[:3] == ["+0.000s", "gw2", "splice:connecting"]
    assert "bob" not in out
    assert pvpn_main(["trace", S, "--logs", str(tmp_path), "--no-timeline"]) == 0
    assert "timeline:" not in capsys.readouterr().out


def test_a_session_still_open(tmp_path: Path) -> None:
    write(tmp_path / "s.log", rec(0, "server", "server", "session:opened", session=S,
                                  user="alice"))
    trace = trace_session(read_records([tmp_path / "s.log"]), S)
    assert not trace.closed and trace.hops[0].up.bytes is None
    view = format_trace(trace)
    assert "no end logged" in view and "up   (" not in view


def test_user_listing_and_tracing_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    chain_logs(tmp_path)
    assert pvpn_main(["trace", "--user", "alice", "--logs", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SESSION", "FIRST", "DURATION", "STATE", "NODES"]
    assert len(out) == 2 and out[1].startswith(S) and "client > gw1 > gw2 > server" in out[1]
    assert pvpn_main(["trace", "--user", "bob", "--logs", str(tmp_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [s["session"] for s in listing["sessions"]] == [OTHER]
    assert listing["sessions"][0]["nodes"] == ["client", "server"]
    assert pvpn_main(["trace", "--user", "alice", "--all", "--logs", str(tmp_path),
                      "--json"]) == 0
    traced = json.loads(capsys.readouterr().out)
    assert [t["session"] for t in traced["traces"]] == [S]
    assert pvpn_main(["trace", "--user", "carol", "--logs", str(tmp_path)]) == 1
    assert "no sessions of carol" in capsys.readouterr().out
    groups = group_by_session(read_records(log_files([tmp_path])))
    assert [s.session for s in sessions_of_user(groups, "alice")] == [S]


def test_mistakes_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    chain_logs(tmp_path)
    assert pvpn_main(["trace", "5e5", "--logs", str(tmp_path)]) == 2
    assert "start of 2 sessions" in capsys.readouterr().err
    assert pvpn_main(["trace", "ffff", "--logs", str(tmp_path)]) == 1
    assert "no records of session ffff in" in capsys.readouterr().err
    assert pvpn_main(["trace", "not-hex", "--logs", str(tmp_path)]) == 2
    assert "is not a session id" in capsys.readouterr().err
    assert pvpn_main(["trace", "--logs", str(tmp_path)]) == 2
    assert "name a session" in capsys.readouterr().err
    assert pvpn_main(["trace", S, "--logs", str(tmp_path / "nope")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err


def test_which_logs_without_logs_or_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setattr(trace_cli, "labs_up", lambda: [])
    with pytest.raises(ConfigError, match="--logs PATH.*--lab NAME"):
        resolve_logs([], None)
    monkeypatch.setattr(trace_cli, "labs_up", lambda: ["l1", "l2"])
    with pytest.raises(ConfigError, match=r"2 labs are up \(l1, l2\).*--lab NAME"):
        resolve_logs([], None)
    asked: list[str] = []

    def lab_logs(name: str) -> list[Path]:
        asked.append(name)
        return [tmp_path / f"{name}.log"]

    monkeypatch.setattr(trace_cli, "lab_log_files", lab_logs)
    assert resolve_logs([], "l2") == [tmp_path / "l2.log"]
    monkeypatch.setattr(trace_cli, "labs_up", lambda: ["only"])
    assert resolve_logs([], None) == [tmp_path / "only.log"]
    assert asked == ["l2", "only"]
    (tmp_path / "rot.log").write_text("")
    (tmp_path / "rot.log.1").write_text("")
    (tmp_path / "rot.log.old").write_text("")
    assert trace_cli.with_rotated(tmp_path / "rot.log") == [tmp_path / "rot.log.1",
                                                            tmp_path / "rot.log"]


def test_records_with_invalid_identifiers_are_ignored(tmp_path: Path) -> None:
    """Issue 9 point 9: identifiers in records are validated; a record whose session id,
    user, node or role is not what a node writes (a forged line, a name that would mislead
    root) joins no trace."""
    base = {"time": 5.0, "role": "server", "node": "server", "event": "session:opened",
            "session": ALICE, "user": "alice"}
    good = [base, {**base, "session": ALICE.upper()}, {**base, "user": "Bob$"},
            {**base, "session": ""}]
    bad = [{**base, "session": "a" * 31}, {**base, "session": ALICE + "0"},
           {**base, "session": 12}, {**base, "user": "alice\x1b[2J"}, {**base, "user": "x" * 40},
           {**base, "node": "gw 1"}, {**base, "node": ["server"]}, {**base, "role": "Server!"}]
    parsed = list(parse_lines(json.dumps(r) for r in good + bad))
    assert len(parsed) == len(good)


def test_the_terminal_view_escapes_what_others_chose(tmp_path: Path) -> None:
    """Issue 9 point 9: strings other users choose reached root's terminal with escape
    sequences intact (pvpn trace: reasons, peers, next hops...)."""
    evil = "\x1b]0;owned\x07\x1b[2J\u202e"
    path = write(tmp_path / "pvpn-server.log",
                 {"time": 1.0, "role": "server", "node": "server", "event": "session:opened",
                  "session": ALICE, "user": "alice", "peer": evil, "next_hop": evil},
                 {"time": 2.0, "role": "server", "node": "server", "event": "packet:dropped",
                  "session": ALICE, "user": "alice", "reason": evil, "count": 1},
                 {"time": 3.0, "role": "server", "node": "server", "event": "session:closed",
                  "session": ALICE, "user": "alice", "reason": evil, "drops": {evil: 1}})
    records = session_records([path], ALICE)
    text = format_trace(trace_session(records, ALICE))
    assert "owned" in text
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert all(line.isprintable() for line in text.splitlines())


def test_another_users_records_under_this_session_id_at_a_gateway_are_left_out(
        tmp_path: Path) -> None:
    """An authenticated user can propose any session id at a gateway (the server alone makes
    ids unique). mallory proposed alice's at a third gateway: those records must not join
    alice's trace (they did), and the view says they were left out."""
    chain_logs(tmp_path)
    write(tmp_path / "gw9" / "pvpn-gateway.log",
          rec(3.0, "gateway", "gw9", "session:opened", path=[], peer="10.66.0.1:1",
              next_hop="10.77.2.2:4433", session=S, user="mallory", uid=1003),
          rec(3.5, "gateway", "gw9", "session:closed", reason="closed by the user: x",
              bytes_to_next=1, bytes_from_next=1, session=S, user="mallory", uid=1003))
    trace = trace_session(read_records(log_files([tmp_path])), S)
    assert [hop.name for hop in trace.hops] == ["client", "gw1", "gw2", "server"]
    assert all(r.get("user") != "mallory" for r in trace.timeline)
    assert trace.foreign == ["2 record(s) of user mallory at gw9 carry this session id; the "
                             "server's session is alice's, so they are not shown"]
    assert "warning: 2 record(s) of user mallory at gw9" in format_trace(trace)
    assert trace_to_json(trace)["foreign"] == trace.foreign
