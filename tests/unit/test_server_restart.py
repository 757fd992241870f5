"""pvpn-server's real serve() across a stop and a start, with the kernel faked (queue, raw
socket, iptables): an orderly stop keeps the sessions saved and the NAT ports' rules in the
kernel; a start puts them back before anything is served and replaces the rules in place; a
start that fails before it takes the state over leaves it, and the rules, to the next
server (issue 10 section 2)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

from pvpn import firewall
from pvpn.config import ServerConfig, UserPolicy, parse_prefix
from pvpn.errors import PvpnError
from pvpn.flowtable import STATE_REPLIED, SavedFlow
from pvpn.io.statefile import StateFile
from pvpn.packet import PROTO_TCP, FlowKey
from pvpn.state import SavedSession, ServerState, decode_state, encode_state, token_hash

from net import FakeQueues, FakeRaw, authorized, make_pki, user_keys


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("restart")
    ((crt, key),) = make_pki(d, {"server": "127.0.0.1"}).values()
    return {"crt": crt, "key": key, "users": authorized(d / "users", user_keys("alice"))}


class NoWholeUploads:
    """server.uploads.WholeUploads on a host whose kernel forwards nothing whole."""

    versions: frozenset[int] = frozenset()

    def __init__(self, *args: Any) -> None:
        pass

    def tick(self) -> None:
        pass


class Kernel:
    def __init__(self) -> None:
        self.applied: list[firewall.RuleSet] = []
        self.removed = 0
        self.queues = FakeQueues()


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    from pvpn.server import daemon

    k = Kernel()

    def remove_instance(instance: str) -> list[str]:
        k.removed += 1
        return []

    monkeypatch.setattr(daemon, "BatchedQueue", k.queues)
    monkeypatch.setattr(daemon, "RawSender", FakeRaw)
    monkeypatch.setattr(daemon.rules, "apply", k.applied.append)
    monkeypatch.setattr(daemon.rules, "ensure_only_jumps", lambda instance, jumps: [])
    monkeypatch.setattr(daemon.rules, "remove_instance", remove_instance)
    monkeypatch.setattr(daemon, "check_nat_ports", lambda config: None)
    monkeypatch.setattr(daemon, "install_signals", lambda loop, stop, reload=None: None)
    monkeypatch.setattr(daemon, "WholeUploads", NoWholeUploads)  # no host sysctl, no iptables
    yield k
    k.queues.close_all()


def saved_alice() -> ServerState:
    flow = SavedFlow(FlowKey(PROTO_TCP, bytes([10, 0, 0, 2]), 40000, bytes([127, 0, 0, 9]), 80),
                     bytes([127, 0, 0, 1]), 61000, 1.0, STATE_REPLIED, 0.0)
    return ServerState("server", 0.0, 1, (SavedSession(
        b"a" * 16, token_hash(b"t" * 16), "alice", 1001, "client", "10.0.0.2:1",
        ("127.0.0.0/8",), 10.0, None, (0, 0, 0, 0), (flow,)),))


def serve_once(config: ServerConfig, stream: io.StringIO,
               monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() until it has started, then an orderly stop (the task cancelled: its finally
    is the SIGTERM path)."""
    from pvpn.server import daemon

    real_writer = daemon.RecordWriter
    monkeypatch.setattr(daemon, "RecordWriter", lambda role, node, clock: real_writer(
        role, node, stream, clock=clock))

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(daemon.serve(config))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if '"node:started"' in stream.getvalue() or task.done():
                break
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, PvpnError):
            pass

    asyncio.run(scenario())


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def make_config(certs: dict[str, Path], tmp_path: Path) -> ServerConfig:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return ServerConfig(tmp_path / "s.toml", "server", [("127.0.0.1", port)], certs["crt"],
                        certs["key"], certs["users"], 0, (61000, 61999), "pvpns",
                        users={"alice": UserPolicy([parse_prefix("127.0.0.0/8")])},
                        control=tmp_path / "server.ctl",
                        state_file=tmp_path / "state" / "server.state")


def test_a_restart_puts_the_sessions_back_and_keeps_the_nat_ports_rules(
        certs: dict[str, Path], tmp_path: Path, kernel: Kernel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(certs, tmp_path)
    assert config.state_file is not None
    StateFile(config.state_file).write(encode_state(saved_alice()))
    stream = io.StringIO()
    serve_once(config, stream, monkeypatch)
    names = [r["event"] for r in events(stream)]
    # Put back before the server was started (served anything).
    assert names.index("session:restored") < names.index("node:started")
    (restored,) = [r for r in events(stream) if r["event"] == "node:state-restored"]
    assert restored["sessions"] == 1 and restored["flows"] == 1
    # The orderly stop: no session ended, all saved again, the NAT ports' rules stay (only
    # the ICMP ones go: one restore declaring the chain with TCP and UDP rules alone).
    assert "session:closed" not in names and kernel.removed == 0
    again = decode_state(config.state_file.read_bytes())
    assert [s.id for s in again.sessions] == [b"a" * 16] and len(again.sessions[0].flows) == 1
    assert kernel.applied[0] == firewall.server_rules("pvpns", 0, (61000, 61999))
    assert kernel.applied[-1] == firewall.server_rules("pvpns", 0, (61000, 61999), icmp=False)
    assert "icmp" not in kernel.applied[-1].v4 and "--dport 61000:61999" in kernel.applied[-1].v4
    (stopped,) = [r for r in events(stream) if r["event"] == "node:stopped"]
    assert stopped["state"].startswith("saved")


def test_a_start_that_fails_before_taking_the_state_over_leaves_it(
        certs: dict[str, Path], tmp_path: Path, kernel: Kernel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(certs, tmp_path)
    assert config.state_file is not None
    data = encode_state(saved_alice())
    StateFile(config.state_file).write(data)
    kernel.queues.busy = True
    serve_once(config, io.StringIO(), monkeypatch)
    assert config.state_file.read_bytes() == data and kernel.removed == 0


def test_a_stop_with_no_session_to_keep_leaves_nothing(
        certs: dict[str, Path], tmp_path: Path, kernel: Kernel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(certs, tmp_path)
    assert config.state_file is not None
    stream = io.StringIO()
    serve_once(config, stream, monkeypatch)
    assert not config.state_file.exists() and kernel.removed == 1
    assert [r["event"] for r in events(stream)][0] == "node:state"  # "no saved state"
