"""pvpn-server's state file on disk (pvpn.io.statefile, issue 10 section 2): replaced
atomically, never half-written, read only if root's alone; the keeper saves at a bounded
rate, only what changed, and says why it refuses a file."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pvpn.errors import ConfigError, StateError
from pvpn.flowtable import STATE_REPLIED, SavedFlow
from pvpn.io import statefile
from pvpn.io.statefile import StateFile, StateKeeper
from pvpn.packet import PROTO_TCP, FlowKey
from pvpn.records import Record
from pvpn.state import SavedSession, ServerState, decode_state, encode_state, token_hash


def sessions() -> tuple[SavedSession, ...]:
    flow = SavedFlow(FlowKey(PROTO_TCP, bytes([10, 0, 0, 2]), 40000, bytes([10, 9, 0, 5]), 80),
                     bytes([10, 9, 0, 1]), 61000, 0.25, STATE_REPLIED, 0.0)
    return (SavedSession(b"a" * 16, token_hash(b"secret-token-a!!"), "alice", 1001, "client",
                         "10.0.0.2:40000", ("10.9.0.0/24",), 120.5, None, (1, 2, 3, 4), (flow,)),)


def state(**changes: Any) -> ServerState:
    fields: dict[str, Any] = {"node": "server", "saved_at": 1_800_000_000.5, "cursor": 5,
                              "sessions": sessions()}
    fields.update(changes)
    return ServerState(**fields)


# -- the file on disk


def test_a_write_replaces_the_file_whole_and_root_alone_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "server.state"
    store = StateFile(path)
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert store.read() is None
    store.write(b"first")
    store.write(b"second")
    data, mtime = store.read() or (b"", 0.0)
    assert data == b"second" and abs(mtime - time.time()) < 60
    assert (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["server.state"]


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_or_crashed_write_never_replaces_a_good_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    path = tmp_path / "server.state"
    store = StateFile(path)
    good = encode_state(state())
    store.write(good)
    real = getattr(os, failing)
    calls = {"n": 0}

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if failing == "write" and calls["n"] == 1:
            real(args[0], bytes(args[1])[:100])  # half of it went out, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statefile.os, failing, broken)
    with pytest.raises(StateError, match="No space left"):
        store.write(encode_state(state(cursor=6)))
    monkeypatch.undo()
    assert store.read() == (good, path.stat().st_mtime)
    assert not store.tmp.exists(), "no half-written file is left"
    # A crash in the middle (the process killed): the temporary file is left, the good one
    # is untouched, and the next write takes its place.
    store.tmp.write_bytes(good[:50])
    assert decode_state(store.read()[0]) == state()  # type: ignore[index]
    store.write(encode_state(state(cursor=7)))
    assert decode_state(store.read()[0]).cursor == 7  # type: ignore[index]
    assert not store.tmp.exists()


def test_a_file_someone_else_could_have_written_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server.state"
    store = StateFile(path)
    store.write(b"x")
    os.chmod(path, 0o622)
    with pytest.raises(StateError, match="writable by other users"):
        store.read()
    path.unlink()
    (tmp_path / "elsewhere").write_bytes(encode_state(state()))
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match="symlink"):
        store.read()
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(StateError, match="not a regular file"):
        store.read()
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        StateFile(open_dir / "server.state")


# -- the keeper


class Node:
    """What the keeper asks of a server node."""

    def __init__(self) -> None:
        self.version = 0
        self.snapshots = 0

    def snapshot(self, now: float) -> ServerState:
        self.snapshots += 1
        return state(saved_at=0.0)


def keeper(tmp_path: Path, node: Node, logs: list[Record]) -> StateKeeper:
    return StateKeeper(StateFile(tmp_path / "server.state"), node.snapshot,
                       lambda: node.version, logs.append, interval=2.0)


def test_the_keeper_saves_what_changed_at_a_bounded_rate_then_touches(tmp_path: Path) -> None:
    node, logs = Node(), []
    keep = keeper(tmp_path, node, logs)

    async def run() -> None:
        for now in (0.0, 0.5, 1.0, 1.9):  # changes every moment: one save within 2 s
            node.version += 1
            keep.tick(now)
            await asyncio.sleep(0.05)
        assert (node.snapshots, keep.saves) == (1, 1)
        node.version += 1
        keep.tick(2.0)
        await asyncio.sleep(0.05)
        assert keep.saves == 2
        os.utime(keep.store.path, (1.0, 1.0))
        keep.tick(4.0)  # nothing changed: only touched, the server is alive
        assert node.snapshots == 2 and keep.store.path.stat().st_mtime > 1000
        keep.store.path.unlink()
        keep.tick(6.0)  # the file went away: written again next time
        keep.tick(8.0)
        await asyncio.sleep(0.05)
        assert keep.store.path.exists() and node.snapshots == 3
        assert await keep.final(9.0) and node.snapshots == 4

    asyncio.run(run())
    saved = decode_state(keep.store.read()[0])  # type: ignore[index]
    assert abs(saved.saved_at - time.time()) < 60 and saved.sessions == sessions()
    assert logs == []


class SlowStore(StateFile):
    """A disk that takes its time: each write waits in its thread until ``go`` is set, between
    the temporary file and its rename."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.go = threading.Event()
        self.started = threading.Event()

    def write(self, data: bytes) -> None:
        self.started.set()
        self.go.wait(5)
        super().write(data)


def test_a_stop_with_nothing_to_keep_removes_the_file_even_with_a_save_under_way(
        tmp_path: Path) -> None:
    """The save of the timer, in its thread, finished after the stop had removed the file and
    put it back: a file of ended sessions stayed (the parent of workers then kept its rules,
    seen in CI, and the next server would restore those sessions)."""
    node, logs = Node(), []
    store = SlowStore(tmp_path / "server.state")
    keep = StateKeeper(store, node.snapshot, lambda: node.version, logs.append, interval=2.0)

    async def run() -> bool:
        node.version += 1
        keep.tick(0.0)  # a save under way, held in its thread
        assert await asyncio.get_running_loop().run_in_executor(None, store.started.wait, 5)
        discard = asyncio.ensure_future(keep.discard())
        await asyncio.sleep(0.1)
        assert not discard.done(), "the removal waits for the save"
        store.go.set()
        removed = await discard
        node.version += 1
        keep.tick(10.0)  # stopped: no more saves
        await asyncio.sleep(0.1)
        return removed

    assert asyncio.run(run()), "the file the save wrote was removed"
    assert not store.path.exists() and not store.tmp.exists()
    assert logs == [] and keep.saves == 1


def test_a_save_that_outlasts_the_stops_wait_still_leaves_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop waits SETTLE_WAIT for a save under way, then removes the file; a save that
    lands after that removes its own file (found in review: it put back a file of ended
    sessions, as before the wait)."""
    monkeypatch.setattr(statefile, "SETTLE_WAIT", 0.05)
    node, logs = Node(), []
    store = SlowStore(tmp_path / "server.state")
    keep = StateKeeper(store, node.snapshot, lambda: node.version, logs.append, interval=2.0)

    async def run() -> None:
        node.version += 1
        keep.tick(0.0)
        assert await asyncio.get_running_loop().run_in_executor(None, store.started.wait, 5)
        assert not await keep.discard()  # it gave up waiting: nothing there yet
        store.go.set()
        for _ in range(100):  # the late save lands, and goes
            if keep._writing is None:  # noqa: SLF001 - the save's end is what is tested
                break
            await asyncio.sleep(0.02)

    asyncio.run(run())
    assert not store.path.exists() and not store.tmp.exists()


def test_a_refused_file_is_said_and_set_aside_and_a_stale_one_expires(tmp_path: Path) -> None:
    node, logs = Node(), []
    keep = keeper(tmp_path, node, logs)
    keep.store.write(encode_state(state())[:-3] + b"abc")
    assert keep.load(grace=120) is None
    (record,) = logs
    assert record.event == "node:state-refused" and "checksum" in record.reason
    assert "server.state.refused" in record.reason and not keep.store.path.exists()
    assert keep.store.refused.exists()
    logs.clear()
    keep.store.write(encode_state(state(saved_at=time.time() - 1000)))
    os.utime(keep.store.path, (time.time() - 1000, time.time() - 1000))
    assert keep.load(grace=120) is None
    (record,) = logs
    assert record.event == "node:state-refused" and record.reason.startswith("stale: saved")
    logs.clear()
    keep.store.write(encode_state(state(saved_at=time.time() - 1000)))  # touched since
    loaded = keep.load(grace=120)
    assert loaded is not None and loaded[1] < 60 and logs == []
    keep.store.remove()
    assert keep.load(grace=120) is None and logs[0].event == "node:state"


def test_remove_sessions_forgets_what_a_stopped_server_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pvpn-server --remove-sessions`, for a server stopped for good: its kept sessions are
    named and forgotten, and the rules it left for their connections go; refused while the
    server answers on its control socket."""
    import socket

    from pvpn.config import ServerConfig
    from pvpn.server import daemon

    removed: list[str] = []
    monkeypatch.setattr(daemon.rules, "remove_instance",
                        lambda instance: removed.append(instance) or [])
    config = ServerConfig(tmp_path / "s.toml", "server", [], Path("c"), Path("k"), Path("u"),
                          0, (61000, 61999), "pvpns", control=tmp_path / "server.ctl",
                          state_file=tmp_path / "state" / "server.state")
    StateFile(tmp_path / "state" / "server.state").write(encode_state(state()))
    said: list[str] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "server.ctl"))
    listener.listen(1)
    try:
        assert daemon.remove_sessions(config, said.append) == 1 and "running" in said[0]
    finally:
        listener.close()
    assert removed == [] and (tmp_path / "state" / "server.state").exists()
    said.clear()
    assert daemon.remove_sessions(config, said.append) == 0
    assert said[0] == f"forgetting session {'61' * 16} of alice (1 NAT mappings)"
    assert not (tmp_path / "state" / "server.state").exists() and removed == ["pvpns"]


def test_a_restore_that_fails_leaves_a_server_that_starts_without_sessions(
        tmp_path: Path) -> None:
    """Whatever goes wrong putting a state back (a bug), the server starts, without any of
    it, saying so: a state file must never keep a node from starting."""
    from types import SimpleNamespace

    from pvpn.config import ServerConfig
    from pvpn.io.loop import Guard
    from pvpn.server import daemon

    logs: list[Record] = []
    config = ServerConfig(tmp_path / "s.toml", "server", [], Path("c"), Path("k"), Path("u"),
                          0, (61000, 61999), "pvpns")

    class Node:
        sessions = {b"x" * 16: object()}
        flows = None

        def restore(self, *args: Any) -> dict[str, Any]:
            raise RuntimeError("a bug")

        def snapshot(self, now: float) -> ServerState:
            return state()

    node = Node()

    class Loop:
        def time(self) -> float:
            return 1.0

    server = SimpleNamespace(config=config, node=node, loop=Loop(), log=SimpleNamespace(
        write=logs.append), guard=Guard(logs.append), dispatch=lambda: None)
    keep = StateKeeper(StateFile(tmp_path / "server.state"), node.snapshot, lambda: 0,
                       logs.append, 2.0)
    keep.store.write(encode_state(state(saved_at=time.time())))
    daemon.restore_state(server, keep)  # type: ignore[arg-type]
    assert node.sessions == {} and node.flows is not None
    assert [r.event for r in logs] == ["node:error", "node:state-refused"]
    assert "restoring it failed: RuntimeError" in logs[1].reason
    assert keep.store.refused.exists() and not keep.store.path.exists()
