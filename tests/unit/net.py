"""One in-memory network for the unit tests, after aioquic's ``transfer()``.

Real nodes (ServerNode, GatewayNode, with real TLS on memory BIOs and real RSA) and what
is at the far end of each of their links: a user's UserLink or UserChain, a stranger's bare
TlsSession, or a gateway's onward connection to another node. ``Network.settle()`` moves
the peers' bytes to the nodes and carries out the nodes' commands, as the daemons'
dispatchers do, until nothing moves; ``transfer()`` does the same for two bare TLS sessions
back to back. Beside it: the PKI a test world needs, fakes of what the daemons open in the
kernel (an NFQUEUE binding, a TUN device, the raw socket), and the client host's side: its
policy (ClientHost) on a faked kernel, the local processes on its socket, and the scripted
chain a user's tunnel process (UserTunnel) drives.

Test files import it as ``net`` (tests/unit/conftest.py puts this folder on sys.path).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar, Union

from cryptography.hazmat.primitives.asymmetric import rsa

from pvpn import auth, firewall, pki, tls
from pvpn.commands import (
    CapturePacket, CloseLink, CloseNext, Command, InjectPacket, LogRecord, OpenNextHop,
    SendBytes, SendNext,
)
from pvpn.config import ClientConfig, NodeLimits, load_client_config
from pvpn.envelope import MsgType, decode_control
from pvpn.errors import PvpnError
from pvpn.events import ChainFailed
from pvpn.local import LocalChannel
from pvpn.nodes.client import ClientHost, CloseLocal, LocalPeer, RuleRunner, SlotSession
from pvpn.nodes.gateway import GatewayNode
from pvpn.nodes.server import ServerNode
from pvpn.packet import FlowKey
from pvpn.records import Record
from pvpn.user import Signer, UserChain, UserLink, UserTunnel

Node = Union[ServerNode, GatewayNode]


@dataclass(frozen=True)
class NextHop:
    """A gateway's onward connection as the node it reaches sees it: what that node sends
    on it is the gateway's ``next_data``."""

    gateway: str
    link: int


#: What is at the far end of a node's link.
Peer = Union[UserLink, UserChain, tls.TlsSession, NextHop]


@dataclass
class Ends:
    """The far ends of one node's links, by link id, and what the node told them."""

    peers: dict[int, Peer] = field(default_factory=dict)
    events: dict[int, list[Any]] = field(default_factory=dict)  # what each user's end made of it
    closed: set[int] = field(default_factory=set)  # the node closed it, or the test says it is lost
    unread: set[int] = field(default_factory=set)  # slow readers: what is sent to them waits
    logs: list[Record] = field(default_factory=list)


class Network:
    """Nodes by name (an address, where their peers dial them) and the ends of their links.

    A gateway's OpenNextHop reaches the node of that name; a name in ``silent`` takes the
    connection and never says a word; any other name has no route. With ``hold_next`` the
    OpenNextHop commands wait in ``held`` for the test to answer."""

    def __init__(self, now: float = 100.0, rounds: int = 50) -> None:
        self.now = now
        self.rounds = rounds  # a network that has not settled by then is a bug
        self.nodes: dict[str, Node] = {}
        self.contexts: dict[str, Any] = {}  # each node's TLS server context
        self.ends: dict[str, Ends] = {}
        self.ids = 0  # the highest link id in use, over all nodes
        self.injected: list[bytes] = []
        self.inject_commands: list[InjectPacket] = []  # with their offload, if any
        self.captured: list[CapturePacket] = []
        self.logs: list[tuple[str, Record]] = []  # every node's records, with its name
        self.seen_by_gateways: list[bytes] = []  # what the gateways relayed, both ways
        self.downstream: dict[tuple[str, int], tuple[str, int]] = {}  # gateway link -> next
        self.hold_next = False
        self.held: list[tuple[str, OpenNextHop]] = []
        self.silent: set[str] = set()

    def add(self, name: str, node: Node, context: Any) -> Ends:
        self.nodes[name], self.contexts[name] = node, context
        self.ends[name] = Ends()
        return self.ends[name]

    def open(self, name: str, peer: Peer | None = None, source: str = "peer",
             link: int | None = None, lazily: bool = False) -> int:
        """A TCP connection to ``name`` from ``source``; its TLS session made now, or by the
        node on the first bytes (``lazily``). The link's id (the next one, unless given)."""
        link = self.ids + 1 if link is None else link
        self.ids = max(self.ids, link)
        context = self.contexts[name]

        def make() -> tls.TlsSession:
            return tls.TlsSession(context, server_side=True)

        self.nodes[name].link_opened(link, make if lazily else make(), source, self.now)
        if peer is not None:
            self.attach(name, link, peer)
        return link

    def attach(self, name: str, link: int, peer: Peer) -> list[Any]:
        """``peer`` at the far end of ``link`` of ``name``: the list of what it will hear."""
        ends = self.ends[name]
        ends.peers[link] = peer
        ends.events[link] = []
        return ends.events[link]

    def gateway(self, name: str) -> GatewayNode:
        node = self.nodes[name]
        assert isinstance(node, GatewayNode), f"{name} is not a gateway"
        return node

    # -- moving bytes
    def settle(self) -> None:
        for _ in range(self.rounds):
            if not self.step():
                return
        raise AssertionError(f"the network did not settle in {self.rounds} rounds")

    def step(self) -> bool:
        """Every peer's bytes to its node, then every node's commands carried out; whether
        anything moved."""
        moved = False
        for name, ends in self.ends.items():
            for link, peer in list(ends.peers.items()):
                data = b"" if link in ends.closed else output_of(peer, self.now)
                if data:
                    moved = True
                    self.nodes[name].receive_data(link, data, self.now)
        for name, node in self.nodes.items():
            node.flush(self.now)
            commands, node.commands = node.commands, []
            for command in commands:
                moved = True
                self.carry_out(name, command)
        return moved

    def carry_out(self, name: str, command: Command) -> None:
        """What ``name``'s daemon does with ``command``."""
        ends = self.ends[name]
        if isinstance(command, SendBytes):
            assert command.link not in ends.closed, f"{name} sent on closed link {command.link}"
            peer = ends.peers.get(command.link)
            if peer is not None and command.link not in ends.unread:
                self.deliver(name, command.link, peer, command.data)
        elif isinstance(command, CloseLink):
            ends.closed.add(command.link)
        elif isinstance(command, LogRecord):
            ends.logs.append(command.record)
            self.logs.append((name, command.record))
        elif isinstance(command, InjectPacket):
            self.injected.append(command.packet)
            self.inject_commands.append(command)
        elif isinstance(command, CapturePacket):
            self.captured.append(command)
        elif isinstance(command, OpenNextHop):
            self.open_next(name, command)
        elif isinstance(command, SendNext):
            self.seen_by_gateways.append(command.data)
            down = self.downstream.get((name, command.link))
            if down is not None:  # else held, silent or gone: nobody reads it
                self.nodes[down[0]].receive_data(down[1], command.data, self.now)
        elif not isinstance(command, CloseNext):
            raise AssertionError(f"{name} asked for {command!r}")
        # A CloseNext is left undone: the next node's link goes when a test says it is lost.

    def deliver(self, name: str, link: int, peer: Peer, data: bytes) -> None:
        if isinstance(peer, NextHop):
            self.seen_by_gateways.append(data)
            self.gateway(peer.gateway).next_data(peer.link, data, self.now)
        elif isinstance(peer, tls.TlsSession):
            try:
                peer.receive_data(data)
            except PvpnError:
                pass  # a stranger's TLS end giving up is the stranger's business
        else:
            self.ends[name].events.setdefault(link, []).extend(peer.receive_data(data, self.now))

    def open_next(self, name: str, command: OpenNextHop) -> None:
        gateway = self.gateway(name)
        if self.hold_next:
            self.held.append((name, command))
        elif command.host in self.silent:
            gateway.next_opened(command.link, self.now)
        elif command.host in self.nodes:
            down = self.open(command.host, NextHop(name, command.link))
            self.downstream[(name, command.link)] = (command.host, down)
            gateway.next_opened(command.link, self.now)
        else:
            gateway.next_failed(command.link, "no route", self.now)

    # -- time
    def pass_time(self, seconds: float, step: float | None = None) -> None:
        """Time passes (in steps of ``step`` seconds, or at once): every user's end and every
        node handles its timer, and the network settles after each step."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(self.now + (step or seconds), end)
            for ends in self.ends.values():
                for peer in ends.peers.values():
                    if isinstance(peer, (UserLink, UserChain)):
                        peer.handle_timer(self.now)
            for node in self.nodes.values():
                node.handle_timer(self.now)
            self.settle()


def output_of(peer: Peer, now: float) -> bytes:
    if isinstance(peer, NextHop):
        return b""  # a gateway's onward bytes leave as SendNext commands
    if isinstance(peer, tls.TlsSession):
        return peer.data_to_send()
    return peer.data_to_send(now)


class OneNode:
    """A network of one node, its side of the books under the short names a test of that
    node reads (``links``: the far end of each link)."""

    def __init__(self, node: Node, context: Any, now: float = 100.0,
                 name: str = "server") -> None:
        self.node, self.name = node, name
        self.net = Network(now)
        ends = self.net.add(name, node, context)
        self.links, self.events, self.closed, self.logs = (ends.peers, ends.events, ends.closed,
                                                           ends.logs)
        self.injected = self.net.injected

    @property
    def now(self) -> float:
        return self.net.now

    @now.setter
    def now(self, value: float) -> None:
        self.net.now = value

    def settle(self) -> None:
        self.net.settle()


def limits(**settings: float) -> NodeLimits:
    """A node's limits with ``settings`` changed, the others at their defaults."""
    return NodeLimits(**settings)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the users' ends


def signer(key: rsa.RSAPrivateKey, user: str) -> Signer:
    """Signs what a node asks as ``user`` with ``key`` (someone else's, in a forger's hand)."""
    return lambda nonce, binding, node: auth.sign_challenge(key, nonce, binding, user, node)


E = TypeVar("E")


def first(events: list[Any], kind: type[E]) -> E:
    """The first event of ``kind`` a user's end heard (there must be one)."""
    found = [e for e in events if isinstance(e, kind)]
    assert found, f"no {kind.__name__} in {events}"
    return found[0]


def client_tls(context: Any, server_name: str) -> tls.TlsSession:
    """A client's TLS session to ``server_name``, its ClientHello ready to send."""
    session = tls.TlsSession(context, server_side=False, server_name=server_name)
    session.start()
    return session


def transfer(a: tls.TlsSession, b: tls.TlsSession, *, rounds: int = 20) -> None:
    """Move ciphertext between two TLS sessions back to back until neither has anything to
    send."""
    for _ in range(rounds):
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_b and not to_a:
            return
        if to_b:
            b.receive_data(to_b)
        if to_a:
            a.receive_data(to_a)
    raise AssertionError(f"no quiescence after {rounds} rounds")


# ---------------------------------------------------------------- the PKI of a test world


def make_pki(directory: Path, nodes: dict[str, str]) -> dict[str, tuple[Path, Path]]:
    """A CA in ``directory/ca`` and, for each node (name: its IP address), a certificate and
    key in ``directory/name``."""
    pki.create_ca(directory / "ca")
    return {name: pki.issue_certificate(directory / "ca", name, directory / name, ips=[ip])
            for name, ip in nodes.items()}


def user_keys(*names: str) -> dict[str, rsa.RSAPrivateKey]:
    return {name: auth.generate_user_key(2048) for name in names}


def authorized(users: Path, keys: dict[str, rsa.RSAPrivateKey]) -> Path:
    """``users`` made, with each user's public key in it as a node reads them."""
    users.mkdir()
    for name, key in keys.items():
        auth.save_public_key(key, users / f"{name}.pub", name)
    return users


# ---------------------------------------------------------------- the kernel, faked


class FakeQueue:
    """An NFQUEUE binding as a daemon holds one: pollable (one end of a socket pair nobody
    writes to), its callback kept for the test to call as the kernel's packets would."""

    def __init__(self, number: int, callback: Callable[..., "bool | int"],
                 flags: int = 0) -> None:
        self.number, self.callback, self.flags = number, callback, flags
        self.ends = socket.socketpair()
        self.closed = False

    def fileno(self) -> int:
        return self.ends[0].fileno()

    def drain(self) -> None:
        pass

    def set_flags(self, flags: int) -> None:
        self.flags = flags  # as BatchedQueue.set_flags (issue 12's F_GSO)

    def close(self) -> None:
        self.closed = True  # its sockets stay open until the test ends: no fd is reused


class FakeQueues:
    """What stands in for BatchedQueue (``BatchedQueue(number, callback, max_len)``): it
    binds FakeQueues, or refuses while ``busy`` as a queue bound by another process does;
    ``close_all()`` at the end of the test."""

    def __init__(self) -> None:
        self.opened: list[FakeQueue] = []
        self.busy = False

    def __call__(self, number: int, callback: Callable[..., "bool | int"],
                 max_len: int, flags: int = 0, segment_to: int | None = None) -> FakeQueue:
        if self.busy:
            raise PvpnError("the queue is bound by another process")
        self.opened.append(FakeQueue(number, callback, flags))
        return self.opened[-1]

    def of(self, number: int) -> FakeQueue:
        """The open queue ``number`` (the last bound)."""
        return [q for q in self.opened if q.number == number and not q.closed][-1]

    def close_all(self) -> None:
        for queue in self.opened:
            for end in queue.ends:
                end.close()


def fake_tun(others: list[int]) -> int:
    """A TUN device's fd as open_tun gives one: pollable and writable (what is written goes
    to the other end, kept in ``others`` for the test to close), with nothing to read."""
    ours, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    others.append(other.detach())
    return ours.detach()


class FakeRaw:
    """The server's raw socket (what stands in for RawSender): what it was given to send."""

    BROKEN = b"boom"  # a packet it fails to send, as a broken raw socket does

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, packet: bytes) -> None:
        if packet == self.BROKEN:
            raise OSError("raw socket broke")
        self.sent.append(packet)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the client host, its kernel faked

#: The server's id of the session a test brings up.
SID = bytes(range(16))


def client_config(directory: Path, **settings: Any) -> ClientConfig:
    """pvpn-client's config as it reads ``directory/client.toml``: ``settings``, the rest at
    their defaults."""
    lines = ["[client]", 'name = "client"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path = directory / "client.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_client_config(path)


class FakeOwners:
    """Whose socket each flow reaches, as sock_diag would say (None: no process's); what
    stands in for OwnerLookup."""

    def __init__(self) -> None:
        self.of: dict[FlowKey, int | None] = {}
        self.mss: dict[FlowKey, tuple[int, bool]] = {}  # the TCP sockets' segment sizes
        self.mss_asked = 0
        self.broken = False

    def owner(self, flow: FlowKey) -> int | None:
        if self.broken:
            raise PvpnError("sock_diag: no answer")
        return self.of.get(flow)

    def send_mss(self, flow: FlowKey) -> tuple[int, bool] | None:
        self.mss_asked += 1
        if self.broken:
            raise PvpnError("sock_diag: no answer")
        return self.mss.get(flow)


class FakeRules:
    """The instance's iptables rules (what stands in for RuleRunner): what the policy ran, in
    order; every change counted."""

    def __init__(self) -> None:
        self.epoch = 0
        self.ran: list[tuple[str, Any]] = []

    def change(self, what: str, detail: Any) -> None:
        self.epoch += 1
        self.ran.append((what, detail))

    def apply(self, ruleset: firewall.RuleSet) -> None:
        self.change("apply", ruleset)

    def run_each(self, commands: list[list[str]], versions: tuple[int, ...]) -> list[str]:
        self.change("run_each", versions)
        return []

    def remove_chains(self, chains: list[str], referring: str) -> list[str]:
        self.change("remove_chains", (chains, referring))
        return []

    def ensure_jump(self, builtin: str, chain: str) -> None:
        self.change("ensure_jump", (builtin, chain))

    def ensure_rule(self, rule: str) -> None:
        self.change("ensure_rule", rule)

    def remove_instance(self) -> list[str]:
        self.change("remove_instance", None)
        return []


class FakeHostKernel:
    """The host's kernel as the policy sees it (what stands in for HostKernel): what it was
    asked, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.devices: set[int] = set()
        self.install_fails = False
        self.connections: dict[int, int] = {}  # mark -> connections carrying it (conntrack)
        self.stuck: set[int] = set()  # marks conntrack will not forget
        # Typed as the port (its attribute is settable, so it is invariant); a FakeRules all
        # the same, for the tests to read.
        self.rules: RuleRunner = FakeRules()

    def install(self, session: SlotSession) -> None:
        self.calls.append(("install", session.slot))
        if self.install_fails:
            raise PvpnError("cannot bind NFQUEUE 1: busy")
        self.devices.add(session.slot)

    def uninstall(self, session: SlotSession) -> list[str]:
        self.calls.append(("uninstall", session.slot))
        self.devices.discard(session.slot)
        return []

    def attach_devices(self, session: SlotSession) -> None:
        self.calls.append(("attach_devices", session.slot))
        self.devices.add(session.slot)

    def has_devices(self, session: SlotSession) -> bool:
        return session.slot in self.devices

    def marked(self, mark: int) -> int:
        return self.connections.get(mark, 0)

    def forget_marked(self, mark: int) -> int:
        self.calls.append(("forget_marked", mark))
        return self.connections.pop(mark, 0) if mark not in self.stuck else 0

    def abort_connections(self, session: SlotSession) -> int | str:
        self.calls.append(("abort_connections", session.slot))
        return 0

    def forget_marks(self, session: SlotSession) -> int | str:
        self.calls.append(("forget_marks", session.slot))
        return 0

    def write_id(self, session: SlotSession) -> str | None:
        self.calls.append(("write_id", session.slot))
        return None

    def reset_connections(self, session: SlotSession) -> int:
        self.calls.append(("reset_connections", session.slot))
        return 0  # none made to answer: the host records nothing


def make_host(directory: Path, kernel: FakeHostKernel | None = None,
              **settings: Any) -> tuple[ClientHost[LocalPeer], FakeOwners]:
    """A client host with ``settings`` (see client_config) on ``kernel`` (a fresh one unless
    given), and the owner lookup it asks; uid N is user "userN"."""
    owners = FakeOwners()
    return ClientHost(client_config(directory, **settings), owners, lambda uid: f"user{uid}",
                      kernel or FakeHostKernel()), owners


def host_and_kernel(directory: Path) -> tuple[ClientHost[LocalPeer], FakeHostKernel]:
    """A host and the kernel it asks, for the tests that read what it asked."""
    kernel = FakeHostKernel()
    host, _ = make_host(directory, kernel)
    return host, kernel


def connect(host: ClientHost[LocalPeer], uid: int, now: float = 0.0,
            id: int = 1) -> LocalPeer:
    """A process of ``uid`` (pid 4000 + ``id``) connects to the host's socket: the host's
    peer for it, admitted or refused."""
    peer = LocalPeer(id)
    peer.uid, peer.pid = uid, 4000 + id
    host.admit(peer, now)
    return peer


class LocalEnd:
    """The far end of a connection on pvpn-client's socket, as a test holds it: its channel,
    which numbers what it says, and what it makes of what it was sent (each envelope's type,
    with a PACKET's bytes or a control message's fields)."""

    def __init__(self, uid: int) -> None:
        self.channel, self.uid = LocalChannel(), uid

    def control(self, mtype: MsgType, fields: dict[str, Any], session: bytes = b"") -> bytes:
        return self.channel.control(mtype, session, self.uid, fields)

    def read(self, data: bytes) -> list[tuple[MsgType, Any]]:
        return [(e.type, e.body if e.type is MsgType.PACKET else decode_control(e))
                for e in self.channel.receive(data)]


class LocalProcess:
    """A local process on the host's socket (`pvpn connect`, `pvpn status`, ...): its end of
    the channel, and the host's peer for it."""

    def __init__(self, host: ClientHost[LocalPeer], uid: int, id: int = 1) -> None:
        self.host, self.end = host, LocalEnd(uid)
        self.peer = connect(host, uid, id=id)

    def ask(self, mtype: MsgType, fields: dict[str, Any], now: float = 1.0,
            session: bytes = b"") -> list[tuple[MsgType, Any]]:
        """One question in, as the adapter hands it over; every answer pending since out."""
        for envelope in self.peer.channel.receive(self.end.control(mtype, fields, session)):
            self.host.control(self.peer, envelope, now)
        return self.answers()

    def answers(self) -> list[tuple[MsgType, Any]]:
        data = b"".join(self.peer.pending)
        self.peer.pending.clear()
        return self.end.read(data)

    def register(self, prefixes: list[str], **fields: Any) -> tuple[MsgType, Any]:
        (answer,) = self.ask(MsgType.REGISTER, {"prefixes": prefixes,
                                                "server": "vpn.example:4433", **fields})
        return answer

    def bring_up(self) -> None:
        """Its session up: registered for 10.77.1.0/24 and attached with SID."""
        self.register(["10.77.1.0/24"])
        self.ask(MsgType.ATTACH, {"session": SID})

    def closed(self) -> bool:
        return CloseLocal(self.peer) in self.host.commands


# ---------------------------------------------------------------- a user's tunnel process


class DaemonEnd:
    """pvpn-client's end of a tunnel process's unix connection (pvpn.user.UserTunnel's local
    side)."""

    def __init__(self, uid: int) -> None:
        self.end = LocalEnd(uid)
        self.channel = self.end.channel

    def heard(self, tunnel: UserTunnel) -> list[tuple[MsgType, Any]]:
        return self.end.read(tunnel.local_to_send())

    def say(self, tunnel: UserTunnel, mtype: MsgType, fields: dict[str, Any]) -> None:
        tunnel.receive_local(self.end.control(mtype, fields))


class ScriptedChain:
    """The chain as a tunnel process sees it (what stands in for UserChain): the events it
    gives are the test's ``events``, what it was asked is kept."""

    def __init__(self) -> None:
        self.up = False
        self.failed: ChainFailed | None = None
        self.nodes: list[str] = []
        self.sent: list[bytes] = []
        self.closed: str | None = None
        self.events: list[Any] = []

    def send_packets(self, packets: list[bytes]) -> None:
        self.sent += packets

    def close(self, reason: str) -> None:
        self.closed = reason

    def data_to_send(self, now: float) -> bytes:
        return b""

    def receive_data(self, data: bytes, now: float) -> list[Any]:
        events, self.events = self.events, []
        return events

    def handle_timer(self, now: float) -> list[Any]:
        return self.receive_data(b"", now)

    def connection_lost(self, reason: str) -> ChainFailed | None:
        if self.failed is not None:
            return None
        self.up = False
        self.failed = ChainFailed(0, "server", reason, False)
        return self.failed
