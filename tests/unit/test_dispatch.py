"""The one dispatcher (pvpn.io.loop.Dispatcher) every program carries out its core's commands
with, and the one command line of the daemons (pvpn.io.loop.daemon_main)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvpn.commands import CloseLink, Command, LogRecord, SendBytes
from pvpn.errors import ConfigError, PvpnError
from pvpn.io.loop import EX_CONFIG, Dispatcher, Guard, daemon_main
from pvpn.records import Record


class Core:
    def __init__(self) -> None:
        self.commands: list[Command] = []


def test_each_command_by_its_handler_in_order_begotten_ones_too_in_bounded_rounds() -> None:
    written: list[Record] = []
    closed: list[int] = []
    guard = Guard(written.append, lambda link, reason: closed.append(link))
    dispatcher = Dispatcher(guard)
    core = Core()
    done: list[Any] = []

    def send(cmd: SendBytes) -> None:
        if cmd.data == b"boom":
            raise OSError("the socket broke")
        done.append(cmd.data)

    def again(cmd: LogRecord) -> None:  # each record begets another: never settles
        done.append(cmd.record.event)
        core.commands.append(LogRecord(Record("test:again")))

    dispatcher.on(SendBytes, send)
    dispatcher.on(LogRecord, again)
    core.commands += [SendBytes(1, b"a"), SendBytes(2, b"boom"), CloseLink(3),
                      SendBytes(1, b"b"), LogRecord(Record("test:first"))]
    dispatcher.run(core)
    assert done[:3] == [b"a", b"b", "test:first"]
    assert len(done) == 2 + Dispatcher.ROUNDS and len(core.commands) == 1  # bounded
    failures = [(r.extra["where"], r.extra.get("link"), r.reason) for r in written]
    assert failures == [("dispatch SendBytes", 2, "OSError: the socket broke"),
                        ("dispatch CloseLink", 3, "TypeError: nothing carries out CloseLink")]
    assert all("Traceback" in r.extra["traceback"] for r in written)
    assert closed == [2, 3]  # each failure costs its own link only


@pytest.mark.parametrize("error, status, said", [
    (ConfigError("no such file"), EX_CONFIG, "pvpn-test: configuration error: no such file"),
    (PvpnError("rules failed"), 1, "pvpn-test: rules failed"),
])
def test_the_command_line_says_an_error_and_exits_with_its_status(
        error: PvpnError, status: int, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    def load(path: Path) -> Path:
        raise error

    async def serve(config: Any) -> None:
        raise AssertionError("not reached")

    def remove(config: Any, out: Any) -> int:
        raise error

    for argv in (["--config", "x.toml"], ["--config", "x.toml", "--remove-sessions"]):
        assert daemon_main("pvpn-test", None, load, serve, argv, remove, "help") == status
        assert capsys.readouterr().err == said + "\n"


def test_remove_sessions_prints_what_it_does_and_its_status_is_the_exit(
        capsys: pytest.CaptureFixture[str]) -> None:
    def remove(config: Path, out: Any) -> int:
        out(f"removing {config.name}")
        return 1

    async def serve(config: Any) -> None:
        raise AssertionError("not reached")

    assert daemon_main("pvpn-test", None, Path, serve, ["--config", "x.toml",
                                                         "--remove-sessions"], remove, "h") == 1
    assert capsys.readouterr().out == "removing x.toml\n"
