"""A session's chain held by pvpn-client, sans-IO: the user's process is its agent.

pvpn-client, which already sees and judges every packet of every user as root, holds each
session's TLS sessions (:class:`pvpn.user.UserChain`) and its TCP connection to the first
hop, so a protected packet crosses one Python process on the client host instead of two. The
user's `pvpn connect` stays connected as the session's agent (like ssh-agent): it registered
with what the chain needs (:class:`ChainSpec`, the trust anchors as PEM *contents* it read:
root never opens a path a user chose) and it signs every challenge itself
(:class:`pvpn.user.SigningAgent`); its private key never leaves it. pvpn-client checks every
hop by the CA or pinned certificate the user's process gave.

:class:`HostedTunnel` is one session's chain as pvpn-client drives it: built, up, down and
rebuilt with backoff (what `pvpn connect` did before), its SIGN requests and NOTICEs for the
agent, its packets both ways. Its commands (:class:`OpenHop`, :class:`CloseHop`,
:class:`RetryIn`) are carried out by client/daemon.py. Inputs carry ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pvpn import tls
from pvpn.commands import Command
from pvpn.config import DEFAULT_DEAD_AFTER, DEFAULT_KEEPALIVE
from pvpn.envelope import DEFAULT_HOPS, MsgType
from pvpn.errors import ConfigError
from pvpn.events import ChainFailed, ChainUp, PacketsReceived, SignatureWanted
from pvpn.records import NODE_NAME
from pvpn.user import UserChain, UserLink

#: How long one chain may take to come up, per hop and once more (what `pvpn connect` waited).
CONNECT_TIMEOUT = 10.0
#: The longest wait between two tries to build a chain again (it starts at MIN_BACKOFF).
MIN_BACKOFF = 0.5
MAX_BACKOFF = 10.0
#: Bounds of what a REGISTER may ask for.
MAX_NAME = 255
MIN_KEEPALIVE, MAX_KEEPALIVE = 1.0, 3600.0


def endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class ChainSpec:
    """What a user's process asked pvpn-client to build for its session (checked, bounded)."""

    hops: list[tuple[str, int]]  # gateways in order, the server last
    server_name: str | None
    user: str
    client_name: str
    keepalive: float
    dead_after: float
    context: Any  # the TLS client context trusting exactly the user's CA or pin
    prefixes: list[str]
    capture: bool = False

    @property
    def names(self) -> list[str]:
        return [endpoint_text(*hop) for hop in self.hops]


def _name(value: object, what: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        raise ConfigError(f"{what} must be printable and 1 to {limit} characters")
    return value


def parse_chain_spec(fields: Mapping[str, Any]) -> ChainSpec | None:
    """The chain a REGISTER asks pvpn-client to hold (None: the user's process holds its own),
    or ConfigError saying what is wrong, before anything is allocated for it."""
    hops_field = fields.get("hops")
    if hops_field is None:
        return None
    if not isinstance(hops_field, list) or not 0 < len(hops_field) <= DEFAULT_HOPS:
        raise ConfigError(f"hops must be 1 to {DEFAULT_HOPS} [host, port] pairs")
    hops: list[tuple[str, int]] = []
    for hop in hops_field:
        if not (isinstance(hop, list) and len(hop) == 2 and isinstance(hop[1], int)
                and not isinstance(hop[1], bool) and 0 < hop[1] < 65536):
            raise ConfigError("each hop must be [host, port] with a port of 1 to 65535")
        hops.append((_name(hop[0], "a hop's host"), hop[1]))
    server_name = fields.get("server_name")
    if server_name is not None:
        server_name = _name(server_name, "server_name")
    user = _name(fields.get("user"), "the remote user name", 64)
    if not NODE_NAME.fullmatch(user):
        raise ConfigError("the remote user name is not one (letters, digits, . _ -)")
    client_name = _name(fields.get("client", "client"), "the client name")
    keepalive = float(fields.get("keepalive", DEFAULT_KEEPALIVE))
    dead_after = float(fields.get("dead_after", DEFAULT_DEAD_AFTER))
    if not (MIN_KEEPALIVE <= keepalive <= MAX_KEEPALIVE
            and keepalive < dead_after <= 10 * MAX_KEEPALIVE):
        raise ConfigError(f"keepalive must be {MIN_KEEPALIVE:g} to {MAX_KEEPALIVE:g} s and "
                          "dead_after longer than it")
    ca, pin = fields.get("ca_pem"), fields.get("pin_pem")
    if (ca is None) == (pin is None):
        raise ConfigError("give exactly one of the CA's PEM (ca_pem) or a pinned "
                          "certificate's (pin_pem)")
    pem = ca if ca is not None else pin
    assert isinstance(pem, bytes)
    if len(pem) > tls.MAX_PEM:
        raise ConfigError(f"the trust anchors' PEM is {len(pem)} bytes; at most {tls.MAX_PEM}")
    label = _name(fields.get("trust_name", "(given by pvpn connect)"), "trust_name", 4096)
    if ca is not None:
        context = tls.make_client_context(ca_file=label, pem=pem)
    else:
        context = tls.make_client_context(pinned_certificate=label, pem=pem)
    return ChainSpec(hops, server_name, user, client_name, keepalive, dead_after, context,
                     [str(p) for p in fields["prefixes"]], bool(fields.get("capture", False)))


# ---------------------------------------------------------------- what the adapter does


@dataclass(slots=True)
class OpenHop(Command):
    """Open the TCP connection to the chain's first hop; tell :meth:`HostedTunnel.connected`
    or :meth:`HostedTunnel.connect_failed`."""

    tunnel: "HostedTunnel"
    host: str
    port: int


@dataclass(slots=True)
class CloseHop(Command):
    """Write what the chain still has to send (a CLOSE), then close its TCP connection."""

    tunnel: "HostedTunnel"


@dataclass(slots=True)
class RetryIn(Command):
    """Call :meth:`HostedTunnel.retry` after ``delay`` seconds."""

    tunnel: "HostedTunnel"
    delay: float


@dataclass(slots=True)
class HostedEvents:
    """What one input of a HostedTunnel gave its owner (ClientHost): replies for the TUN
    device, a chain up (to ATTACH), notices and SIGN requests for the agent."""

    packets: list[bytes]
    up: ChainUp | None = None


class HostedTunnel:
    """One session's chain, held by pvpn-client for its agent (the user's `pvpn connect`).

    Driven by :meth:`start`, :meth:`connected` / :meth:`connect_failed` (the TCP connection),
    :meth:`receive_data`, :meth:`signed` (the agent's SIGNED), :meth:`handle_timer`,
    :meth:`connection_lost`, :meth:`retry`, :meth:`send_packets` and :meth:`end`; its bytes for
    the first hop from :meth:`data_to_send`; what the agent is to be told in
    :attr:`to_agent` (type and fields of each envelope), the adapter's commands in
    :attr:`commands`."""

    def __init__(self, spec: ChainSpec, session: bytes, token: bytes, uid: int = -1) -> None:
        self.spec = spec
        self.session = session  # proposed, then the server's
        self.token = token
        self.chain: UserChain | None = None
        # With a token the VPN was up before (its agent registers again with a restarted
        # pvpn-client): a chain that fails is rebuilt, as after any chain that was up.
        self.ever_up = bool(token)
        self.started = 0.0
        self.delay = MIN_BACKOFF
        self.connecting = False  # OpenHop asked, not answered
        self.ended = False
        self.to_agent: list[tuple[MsgType, dict[str, Any]]] = []
        self.commands: list[Command] = []
        self._sign_ids = 0
        self._asked: dict[int, tuple[UserChain, int]] = {}  # SIGN id -> its chain and hop
        self.congested = False  # its TCP connection's writes wait above the high-water mark
        self.outbox: list[bytes] = []  # packets for the chain, written once per queue drain
        self.slot = -1  # the session's, set by ClientHost
        # Its user's, in every envelope, and the kernel counts the first hop's connection as
        # theirs (pvpn.io.chainlink.user_socket).
        self.uid = uid

    @property
    def up(self) -> bool:
        return self.chain is not None and self.chain.up

    @property
    def takes_offload(self) -> bool:
        """Its server said it takes super-packets (ACCEPT's "offload")."""
        link = self.chain.server_link if self.chain is not None else None
        return link is not None and link.offload

    # -- building
    def _link(self, index: int, nodes_before: list[str]) -> UserLink:
        spec = self.spec
        host, _ = spec.hops[index]
        last = index == len(spec.hops) - 1
        name = (spec.server_name or host) if last else host
        session = tls.TlsSession(spec.context, server_side=False, server_name=name)
        session.start()
        return UserLink(
            session, user=spec.user, uid=self.uid, signer=lambda nonce, binding, node: None,
            want=spec.prefixes if last else [], client_name=spec.client_name, session=self.session,
            token=self.token if last and self.token else None,
            next_hop=None if last else endpoint_text(*spec.hops[index + 1]),
            path=nodes_before, hops=DEFAULT_HOPS - index,
            keepalive=spec.keepalive, dead_after=spec.dead_after)

    def start(self, now: float) -> None:
        """Build a chain: its TCP connection first."""
        if self.ended or self.connecting:
            return
        spec = self.spec
        self.chain = UserChain(self._link, len(spec.hops), spec.names)
        self._asked.clear()
        self.connecting = True
        self.started = now
        host, port = spec.hops[0]
        self.commands.append(OpenHop(self, host, port))

    def connected(self, now: float) -> None:
        self.connecting = False
        if self.chain is not None and not self.ended:
            self.chain.start(now)

    def connect_failed(self, reason: str, now: float) -> None:
        self.connecting = False
        first = "the first hop " if len(self.spec.hops) > 1 else ""
        self._failed(f"cannot reach {first}{self.spec.names[0]}: {reason}", False, now)

    def _failed(self, reason: str, fatal: bool, now: float) -> None:
        """This chain is down: the agent is told, and it is built again unless it cannot
        help (fatal) or it never came up (the agent's `pvpn connect` says so and ends)."""
        self.commands.append(CloseHop(self))
        if self.ended:
            return
        if fatal or not self.ever_up:
            self.ended = True
            self.to_agent.append((MsgType.NOTICE, {"event": "failed", "reason": reason,
                                                    "fatal": fatal}))
            return
        self.to_agent.append((MsgType.NOTICE, {
            "event": "retry" if self._retrying else "down", "reason": reason}))
        self._retrying = True
        self.commands.append(RetryIn(self, self.delay))
        self.delay = min(self.delay * 2, MAX_BACKOFF)

    _retrying = False

    def retry(self, now: float) -> None:
        if not self.ended:
            self.start(now)

    # -- input
    def receive_data(self, data: bytes, now: float) -> HostedEvents:
        out = HostedEvents([])
        if self.chain is not None:
            self._events(self.chain, self.chain.receive_data(data, now), now, out)
        return out

    def _events(self, chain: UserChain, events: Iterable[object], now: float,
                out: HostedEvents) -> None:
        for event in events:
            if type(event) is PacketsReceived:
                out.packets += event.packets
            elif type(event) is SignatureWanted:
                self._sign_ids += 1
                self._asked[self._sign_ids] = (chain, event.hop)
                self.to_agent.append((MsgType.SIGN, {
                    "id": self._sign_ids, "challenge": event.challenge,
                    "binding": event.binding, "node": event.node, "user": self.spec.user}))
            elif type(event) is ChainUp:
                accept = event.accept
                self.session, self.token = accept.session, accept.token
                self.ever_up = True
                self.delay = MIN_BACKOFF
                self._retrying = False
                out.up = event
                self.to_agent.append((MsgType.NOTICE, {
                    "event": "up", "reason": "", "session": accept.session,
                    "token": accept.token, "allow": list(accept.allow),
                    "nodes": list(event.nodes), "resumed": accept.resumed}))
            elif type(event) is ChainFailed:
                if chain is self.chain:
                    self._failed(f"{event.where}: {event.reason}", event.fatal, now)

    def signed(self, fields: Mapping[str, Any], now: float) -> None:
        """The agent's SIGNED: the signature goes to the hop that asked (a refusal fails the
        chain); an answer to nothing asked, or to an old chain, is ignored."""
        asked = self._asked.pop(fields["id"], None)
        if asked is None or asked[0] is not self.chain:
            return
        chain, hop = asked
        if fields["refused"]:
            failure = chain.connection_lost(f"your pvpn connect refused to sign: "
                                            f"{fields['refused']}")
            if failure is not None:
                self._failed(f"{failure.where}: {failure.reason}", True, now)
            return
        chain.signed(hop, fields["signature"])

    def handle_timer(self, now: float) -> HostedEvents:
        out = HostedEvents([])
        chain = self.chain
        if chain is None or chain.failed is not None or self.ended or self.connecting:
            return out
        if not chain.up:
            waited = CONNECT_TIMEOUT * (1 + len(self.spec.hops))
            if now - self.started > waited:
                failure = chain.connection_lost(chain.silent_hop(waited))
                if failure is not None:
                    self._failed(failure.reason, False, now)
                return out
        self._events(chain, chain.handle_timer(now), now, out)
        return out

    def connection_lost(self, reason: str, now: float) -> None:
        chain = self.chain
        if chain is None:
            return
        failure = chain.connection_lost(reason)
        if failure is not None:
            self._failed(f"{failure.where}: {failure.reason}", False, now)

    # -- output
    def send_packets(self, packets: list[bytes]) -> None:
        chain = self.chain
        if chain is not None and chain.up:
            chain.links[-1].send_packets(packets)

    def data_to_send(self, now: float) -> bytes:
        return self.chain.data_to_send(now) if self.chain is not None else b""

    def end(self, reason: str, orderly: bool) -> None:
        """The VPN ends (``orderly``: CLOSE to the server, through the chain) or its agent is
        gone (the connection just closes: the server holds the session for a resume)."""
        if self.ended and self.chain is None:
            return
        self.ended = True
        if orderly and self.chain is not None and self.chain.up:
            self.chain.close(reason)
        self.commands.append(CloseHop(self))
