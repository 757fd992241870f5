"""`pvpn status --node`: root reads what others chose (a user's client host name, a peer, a
next hop, drop reasons); nothing in it reaches the terminal as an escape sequence (issue 9
point 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvpn.cli import main as cli
from pvpn.envelope import MsgType

EVIL = "\x1b]0;owned\x07\x1b[2J\u202e\n  forged line"


def test_node_status_escapes_every_string(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    sessions = [{"session": "ab" * 16, "user": EVIL, "uid": 1001, "client": EVIL, "peer": EVIL,
                 "age": 3.0, "state": EVIL, "next_hop": EVIL, "drops": {EVIL: 2},
                 EVIL: EVIL}]

    def ask(path: Path, mtype: MsgType, fields: dict[str, Any]) -> tuple[MsgType, Any]:
        return MsgType.STATUS_REPLY, {"sessions": sessions}

    monkeypatch.setattr(cli, "node_control", lambda config: ("gateway", Path("/x.ctl")))
    monkeypatch.setattr(cli, "ask_daemon", ask)
    assert cli.main(["status", "--node", "/etc/pvpn/gateway.toml"]) == 0
    out = capsys.readouterr().out
    assert "owned" in out and "forged line" in out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    lines = out.splitlines()
    assert all(line.isprintable() for line in lines)
    assert not any(line.startswith("  forged line") for line in lines), "no line of its own"
