"""No exception a peer can cause ends a daemon (issue 9 point 2): the daemons' guard
(pvpn.io.loop.Guard) logs what escapes the core as a JSON record with its traceback, closes
only the link concerned, and the daemon serves on. Tried on the real daemon objects with fake
transports (no sockets, no root)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from pvpn import tls
from pvpn.commands import InjectPacket, LogRecord, SendBytes
from pvpn.config import GatewayConfig, ServerConfig
from pvpn.records import Record

from net import FakeRaw, authorized, make_pki


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("10.0.0.2", 40000)) -> None:
        super().__init__()
        self.peer = peer
        self.written: list[bytes] = []
        self.closed = False
        self.fail_writes = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: D102
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:  # type: ignore[override]
        if self.fail_writes:
            raise RuntimeError("write failed")
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("guard")
    ((crt, key),) = make_pki(d, {"node": "10.0.0.1"}).values()
    return {"crt": crt, "key": key, "users": authorized(d / "users", {}),
            "ca": d / "ca" / "ca.crt"}


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_guard_logs_the_traceback_closes_that_link_and_rate_limits() -> None:
    from pvpn.io.loop import Guard

    written: list[Record] = []
    closed: list[tuple[int, str]] = []
    guard = Guard(written.append, lambda link, reason: closed.append((link, reason)))

    def bug() -> None:
        raise KeyError("a bug a peer found")

    assert not guard.call("timer", bug)
    (record,) = written
    assert record.event == "node:error" and "KeyError" in record.reason
    assert "a bug a peer found" in record.extra["traceback"] and record.extra["where"] == "timer"
    for _ in range(200):
        try:
            bug()
        except KeyError as exc:
            guard.failed("data_received", exc, 7)
    assert closed == [(7, "internal error in data_received: KeyError")] * 200
    logged = [r for r in written if r.extra.get("where") == "data_received"]
    assert 10 < len(logged) < 20, "the first ten, then at powers of two"


def test_the_gateway_survives_a_bug_in_a_links_callback(certs: dict[str, Path]) -> None:
    from pvpn.gateway.daemon import Gateway, PrevHopProtocol

    config = GatewayConfig(Path("g.toml"), "gw1", [], certs["crt"], certs["key"], certs["users"],
                           5.0)

    async def scenario() -> None:
        gateway = Gateway(config)
        stream = io.StringIO()
        gateway.log.stream = stream
        alice, bob = FakeTransport(), FakeTransport(("10.0.0.3", 40001))
        protocols = [PrevHopProtocol(gateway), PrevHopProtocol(gateway)]
        protocols[0].connection_made(alice)  # type: ignore[arg-type]
        protocols[1].connection_made(bob)  # type: ignore[arg-type]
        real = gateway.node.receive_data

        def buggy(link_id: int, data: bytes, now: float) -> None:
            if link_id == protocols[0].id:
                raise RuntimeError("a bug alice's bytes reach")
            real(link_id, data, now)

        gateway.node.receive_data = buggy  # type: ignore[method-assign]
        protocols[0].data_received(b"\x16\x03\x01")  # must not raise
        hello = tls.TlsSession(tls.make_client_context(ca_file=str(certs["ca"])),
                               server_side=False, server_name="10.0.0.1")
        hello.start()
        protocols[1].data_received(hello.data_to_send())  # bob is served on
        gateway.dispatch()
        errors = [r for r in records(stream) if r["event"] == "node:error"]
        assert errors and "a bug alice's bytes reach" in errors[0]["traceback"]
        assert errors[0]["link"] == protocols[0].id and errors[0]["where"] == "data_received"
        assert alice.closed and not bob.closed
        assert gateway.node.links[protocols[0].id].closed
        # A command whose carrying out fails costs its own link, not the rest of the batch.
        bob_link = gateway.node.links[protocols[1].id]
        bob.fail_writes = True
        gateway.node.commands += [SendBytes(bob_link.id, b"x"),
                                  LogRecord(Record("test:after"))]
        gateway.dispatch()
        assert any(r["event"] == "test:after" for r in records(stream))
        assert bob.closed

    asyncio.run(scenario())


def test_the_server_survives_a_bug_in_a_reply_or_a_command(
        certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from pvpn.server import daemon

    monkeypatch.setattr(daemon, "RawSender", FakeRaw)
    config = ServerConfig(Path("s.toml"), "server", [], certs["crt"], certs["key"],
                          certs["users"], 0, (61000, 61999), "t")

    async def scenario() -> None:
        server = daemon.Server(config)
        stream = io.StringIO()
        server.log.stream = stream

        def buggy(packet: bytes, now: float) -> bool:
            raise ValueError("a bug in the reply path")

        server.node.receive_reply = buggy  # type: ignore[method-assign]
        assert server.take_reply(b"\x45" + bytes(19)) is True  # dropped: fail closed
        server.node.commands += [InjectPacket(b"boom"), InjectPacket(b"fine")]
        server.dispatch()
        assert server.raw.sent == [b"fine"]  # type: ignore[attr-defined]
        wheres = [r.get("where") for r in records(stream) if r["event"] == "node:error"]
        assert wheres == ["reply", "dispatch InjectPacket"]

    asyncio.run(scenario())


def test_a_weak_key_reaches_the_gateways_log(certs: dict[str, Path], tmp_path: Path) -> None:
    """Issue 9 point 9: a key under 2048 bits is skipped with a warning in the node's log."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pvpn import auth
    from pvpn.gateway.daemon import Gateway

    users = tmp_path / "users"
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    strong = auth.generate_user_key(2048)
    users.mkdir()
    (users / "alice.pub").write_bytes(b"".join(
        k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH) + b"\n"
        for k in (weak, strong)))
    config = GatewayConfig(Path("g.toml"), "gw1", [], certs["crt"], certs["key"], users, 5.0)

    async def scenario() -> None:
        gateway = Gateway(config)
        stream = io.StringIO()
        gateway.log.stream = stream
        assert len(gateway.node._keys.keys_for("alice")) == 1
        (skipped,) = [r for r in records(stream) if r["event"] == "auth:key-skipped"]
        assert skipped["user"] == "alice" and "1024 bits" in skipped["reason"]

    asyncio.run(scenario())


def test_the_gateway_serves_on_through_a_failing_timer_and_shuts_down_through_anything(
        certs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real serve() loop (a gateway needs no root): a timer that raises every second is
    logged and the daemon goes on; a shutdown whose close_all raises still stops cleanly."""
    import socket

    from pvpn.gateway import daemon
    from pvpn.nodes.gateway import GatewayNode

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = GatewayConfig(Path("g.toml"), "gw1", [("127.0.0.1", port)], certs["crt"],
                           certs["key"], certs["users"], 5.0, control=tmp_path / "gw.ctl")
    stream = io.StringIO()

    def broken_timer(self: GatewayNode, now: float) -> None:
        raise RuntimeError("the timer broke")

    def broken_close(self: GatewayNode, reason: str) -> None:
        raise RuntimeError("closing broke")

    monkeypatch.setattr(GatewayNode, "handle_timer", broken_timer)
    monkeypatch.setattr(GatewayNode, "close_all", broken_close)
    monkeypatch.setattr(daemon, "install_signals", lambda loop, stop, reload=None: None)
    real_writer = daemon.RecordWriter
    monkeypatch.setattr(daemon, "RecordWriter",
                        lambda role, node, clock: real_writer(role, node, stream, clock=clock))

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(daemon.serve(config))
        for _ in range(60):  # up to 3 s for two timer ticks
            await asyncio.sleep(0.05)
            if sum(1 for r in records(stream) if r.get("where") == "timer") >= 2:
                break
        assert not task.done(), "the gateway kept serving"
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # and still accepts
        writer.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    events = [(r["event"], r.get("where")) for r in records(stream)]
    assert ("node:error", "timer") in events and ("node:error", "shutdown") in events
    assert events[-1] == ("node:stopped", None)


def test_the_gateway_tells_the_node_when_a_users_link_stops_reading(
        certs: dict[str, Path]) -> None:
    """pvpn-gateway passes the user's socket's back-pressure on to the node, which then
    answers no KEEPALIVE on that link (a peer that does not read can't fill its memory)."""
    from pvpn.gateway.daemon import Gateway, PrevHopProtocol

    config = GatewayConfig(Path("g.toml"), "gw1", [], certs["crt"], certs["key"], certs["users"],
                           5.0)

    async def scenario() -> None:
        gateway = Gateway(config)
        gateway.log.stream = io.StringIO()
        protocol = PrevHopProtocol(gateway)
        protocol.connection_made(FakeTransport())  # type: ignore[arg-type]
        protocol.pause_writing()
        assert gateway.node.links[protocol.id].congested
        protocol.resume_writing()
        assert not gateway.node.links[protocol.id].congested

    asyncio.run(scenario())


def test_the_server_forgets_its_source_addresses_when_its_addresses_change(
        certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's choice of source address per destination was cached for good: after an
    address moved away the server went on sending new flows from it."""
    from pvpn.io.localaddrs import LocalAddressWatch
    from pvpn.server import daemon

    monkeypatch.setattr(daemon, "RawSender", FakeRaw)
    config = ServerConfig(Path("s.toml"), "server", [], certs["crt"], certs["key"],
                          certs["users"], 0, (61000, 61999), "t")

    async def scenario() -> None:
        server = daemon.Server(config)
        server.log.stream = io.StringIO()
        sources = server.node._source_for
        sources._cache[bytes(4)] = bytes([10, 9, 0, 1])  # type: ignore[attr-defined]
        server.addresses = LocalAddressWatch(lambda: frozenset())
        server.refresh_addresses(force=True)
        assert not sources._cache  # type: ignore[attr-defined]

    asyncio.run(scenario())
