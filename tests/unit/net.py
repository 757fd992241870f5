"""One in-memory network for the unit tests, after aioquic's ``transfer()``.

Real nodes (ServerNode, GatewayNode, with real TLS on memory BIOs and real RSA) and what
is at the far end of each of their links: a user's UserLink or UserChain, a stranger's bare
TlsSession, or a gateway's onward connection to another node. ``Network.settle()`` moves
the peers' bytes to the nodes and carries out the nodes' commands, as the daemons'
dispatchers do, until nothing moves; ``transfer()`` does the same for two bare TLS sessions
back to back. Beside it: the PKI a test world needs, and fakes of what the daemons open in
the kernel (an NFQUEUE binding, a TUN device, the raw socket).

Test files import it as ``net`` (tests/unit/conftest.py puts this folder on sys.path).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar, Union

from cryptography.hazmat.primitives.asymmetric import rsa

from pvpn import auth, pki, tls
from pvpn.commands import (
    CapturePacket, CloseLink, CloseNext, Command, InjectPacket, LogRecord, OpenNextHop,
    SendBytes, SendNext,
)
from pvpn.config import NodeLimits
from pvpn.errors import PvpnError
from pvpn.nodes.gateway import GatewayNode
from pvpn.nodes.server import ServerNode
from pvpn.records import Record
from pvpn.user import Signer, UserChain, UserLink

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

    def __init__(self, number: int, callback: Callable[[bytes], bool]) -> None:
        self.number, self.callback = number, callback
        self.ends = socket.socketpair()
        self.closed = False

    def fileno(self) -> int:
        return self.ends[0].fileno()

    def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True  # its sockets stay open until the test ends: no fd is reused


class FakeQueues:
    """What stands in for BatchedQueue (``BatchedQueue(number, callback, max_len)``): it
    binds FakeQueues, or refuses while ``busy`` as a queue bound by another process does;
    ``close_all()`` at the end of the test."""

    def __init__(self) -> None:
        self.opened: list[FakeQueue] = []
        self.busy = False

    def __call__(self, number: int, callback: Callable[[bytes], bool],
                 max_len: int) -> FakeQueue:
        if self.busy:
            raise PvpnError("the queue is bound by another process")
        self.opened.append(FakeQueue(number, callback))
        return self.opened[-1]

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
