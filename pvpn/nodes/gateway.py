"""The gateway: splices a user's link from the previous hop to a connection to the next hop.

After the user is authenticated over *this* hop's TLS session and the gateway's policy allows
the next hop, the gateway connects onwards and from then on relays opaque bytes: DATA
envelopes from the user go out to the next hop as they are, bytes from the next hop come back
in DATA envelopes. Those bytes are the user's own TLS session with the next hop (like SSH
ProxyJump), so the gateway can neither read nor alter what is inside, and holds no per-flow
state: if it restarts, the user rebuilds the chain and resumes the session at the server.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Callable

from pvpn.addresses import Local
from pvpn.commands import CloseNext, OpenNextHop, SendNext
from pvpn.config import GatewayConfig, GatewayPolicy, parse_endpoint
from pvpn.envelope import MAX_PACKET, MsgType, encode_control, encode_envelope
from pvpn.errors import ConfigError
from pvpn.names import SESSION_CLOSED, SESSION_OPENED, SPLICE_CONNECTING
from pvpn.nodes.base import MAX_REASON, KeyLookup, NodeBase, NodeLink, NodeLinkState, Verifier
from pvpn.text import clip


@dataclass(slots=True)
class Splice:
    """One spliced session: the previous hop's link and its connection to the next hop."""

    next_hop: str
    opened: float
    connected: bool = False
    bytes_to_next: int = 0
    bytes_from_next: int = 0
    # DATA envelopes relayed each way (the next hop's side is the user's raw TLS stream).
    envelopes_to_next: int = 0
    envelopes_from_next: int = 0


class GatewayNode(NodeBase):
    """Inputs: the NodeBase link inputs plus :meth:`next_opened`, :meth:`next_failed`,
    :meth:`next_data`, :meth:`next_lost` from the next-hop connection. Outputs: commands,
    among them OpenNextHop / SendNext / CloseNext for the adapter."""

    role = "gateway"
    # The gateway's own addresses (pvpn.io.localaddrs), refused as next hops unless a rule
    # names them; set with set_local_addresses.
    local_addresses: Local = frozenset()

    def __init__(self, config: GatewayConfig, keys: KeyLookup, verify: Verifier,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        super().__init__(config.name, keys, verify, random, config.keepalive, config.dead_after,
                         config.limits)
        self.config = config
        self.splices: dict[int, Splice] = {}

    def _authorized(self, link: NodeLink, now: float) -> None:
        policy = self.config.users.get(link.user)
        if policy is None or not policy.next:
            self._refuse(link, "user-not-allowed",
                         f"user {link.user!r} may not pass through gateway {self.name}; ask its "
                         "administrator to add a [users.NAME] next list", "no [users] policy")
            return
        if link.next_hop is None:
            self._refuse(link, "no-next-hop", f"{self.name} is a gateway: it only forwards; "
                         "name the next hop after it (pvpn connect --via ... SERVER)",
                         "no next hop named")
            return
        if link.hops <= 0:
            self._refuse(link, "hop-limit", f"hop limit reached at {self.name}; the chain is too "
                         "long", "hop limit reached")
            return
        try:
            host, port = parse_endpoint(link.next_hop, 4433, "next hop")
            ipaddress.ip_address(host)
        except (ConfigError, ValueError):
            self._refuse(link, "bad-next-hop", f"next hop {link.next_hop!r} must be an IP "
                         "address with a port", "bad next hop")
            return
        if not policy.permits(host, port):
            allowed = ", ".join(str(r) for r in policy.next)
            self._refuse(link, "next-hop-not-allowed",
                         f"{self.name} may not forward {link.user!r} to {link.next_hop} "
                         f"(allowed: {allowed})", f"next hop {link.next_hop} not allowed")
            return
        excluded = policy.exclusion(host, port, self.local_addresses)
        if excluded is not None:
            self._refuse(link, "next-hop-not-allowed",
                         f"{self.name} may not forward {link.user!r} to {link.next_hop}: "
                         f"{excluded}, which no next rule of the user names",
                         f"next hop {link.next_hop} special: {excluded}")
            return
        limit = self.config.sessions_per_user
        mine = self._splices_of(link.user)
        if mine >= limit:
            # Else one user's splices could take every link of the gateway (MAX_LINKS) and
            # every connection it may open onward, and no other user would get in.
            self._refuse(link, "too-many-sessions",
                         f"user {link.user!r} has {mine} sessions through {self.name}, the most "
                         "one user may have; end one (pvpn disconnect) and try again",
                         f"{mine} sessions already")
            return
        if len(link.session_id) != 16:
            link.session_id = self._random(16)
        self.splices[link.id] = Splice(link.next_hop, now)
        self.commands.append(OpenNextHop(link.id, host, port, self.config.connect_timeout))
        self._log(SPLICE_CONNECTING, link, next_hop=link.next_hop)

    def _splices_of(self, user: str) -> int:
        """The splices of ``user`` whose link is open, connecting ones included."""
        links = self.links
        return sum(1 for link_id in self.splices
                   if (other := links.get(link_id)) is not None and not other.closed
                   and other.user == user)

    def set_local_addresses(self, addresses: Local) -> None:
        """The gateway's own addresses (read at start, on reload, periodically): a splice to
        an address that became the gateway's own ends, unless a rule names it."""
        if addresses != self.local_addresses:
            self.local_addresses = addresses
            self.apply_policy(self.config.users, 0.0)

    def apply_policy(self, users: dict[str, GatewayPolicy], now: float) -> None:
        """A reload's [users] apply to the live splices too: one whose user has no next rules
        left, or whose next hop no rule permits any more, ends (the user is told why)."""
        self.config.users = users
        for link_id, splice in list(self.splices.items()):
            link = self.links.get(link_id)
            if link is None or link.closed:
                continue
            policy = users.get(link.user)
            if policy is None or not policy.next:
                code = "user-not-allowed"
                reason = f"user {link.user!r} may no longer pass through gateway {self.name}"
            else:
                host, port = parse_endpoint(splice.next_hop, 4433, "next hop")
                excluded = policy.exclusion(host, port, self.local_addresses)
                if policy.permits(host, port) and excluded is None:
                    continue
                code = "next-hop-not-allowed"
                reason = (f"{self.name} may no longer forward {link.user!r} to "
                          f"{splice.next_hop}" + (f": {excluded}" if excluded else ""))
            if not splice.connected:  # still connecting: refused like at login
                self.splices.pop(link_id, None)
                self.commands.append(CloseNext(link_id))
                self._refuse(link, code, reason, f"policy changed: {reason}")
                continue
            self._send(link, MsgType.CLOSE, link.session_id, encode_control({"reason": reason}))
            self._end(link, f"policy changed: {reason}")
            self._close_link(link)

    # -- the next hop
    def next_opened(self, link_id: int, now: float) -> None:
        link, splice = self.links.get(link_id), self.splices.get(link_id)
        if (link is None or splice is None or splice.connected
                or link.state is not NodeLinkState.AUTHENTICATED):
            self.commands.append(CloseNext(link_id))
            return
        splice.connected = True
        self._accept(link, link.session_id, b"", [], False)
        self._log(SESSION_OPENED, link, client=link.client, prev_hop=link.peer,
                  next_hop=splice.next_hop, path=link.path, tls=getattr(link.tls, "version", ""))
        self.flush_link(link, now)

    def next_failed(self, link_id: int, reason: str, now: float) -> None:
        link = self.links.get(link_id)
        splice = self.splices.pop(link_id, None)
        if link is None or splice is None or link.closed:
            return  # the user's side is gone already: nobody to tell
        self._refuse(link, "next-hop-unreachable",
                     f"{self.name} cannot reach the next hop {splice.next_hop}: {reason}",
                     f"next hop {splice.next_hop} unreachable: {reason}")

    def next_data(self, link_id: int, data: bytes, now: float) -> None:
        link, splice = self.links.get(link_id), self.splices.get(link_id)
        if link is None or splice is None or link.state is not NodeLinkState.ESTABLISHED:
            return
        splice.bytes_from_next += len(data)
        pending, sid, uid, seq = link.pending, link.session_id, link.uid, link.seq
        for start in range(0, len(data), MAX_PACKET):
            pending.append(encode_envelope(MsgType.DATA, sid, uid, seq.take(),
                                           data[start:start + MAX_PACKET]))
            link.envelopes_out += 1
            splice.envelopes_from_next += 1
        self.flush_link(link, now)

    def next_lost(self, link_id: int, reason: str, now: float) -> None:
        link = self.links.get(link_id)
        if link is None or link_id not in self.splices:
            return
        if link.state is NodeLinkState.ESTABLISHED:
            self._send(link, MsgType.CLOSE, link.session_id, encode_control(
                {"reason": clip(f"next hop closed at {self.name}: {reason}", MAX_REASON)}))
        self._end(link, f"next hop closed: {reason}")
        self._close_link(link)

    # -- the previous hop
    def _on_data(self, link: NodeLink, data: bytes, now: float) -> None:
        splice = self.splices.get(link.id)
        if splice is None or not splice.connected:
            return
        splice.bytes_to_next += len(data)
        splice.envelopes_to_next += 1
        self.commands.append(SendNext(link.id, data))

    def _on_close(self, link: NodeLink, reason: str, now: float) -> None:
        self._end(link, f"closed by the user: {reason}")

    def _on_link_lost(self, link: NodeLink, now: float, reason: str) -> None:
        self._end(link, f"previous hop gone: {reason}")

    def _end_link(self, link: NodeLink, reason: str) -> None:
        self._end(link, reason)

    def _end(self, link: NodeLink, reason: str) -> None:
        splice = self.splices.pop(link.id, None)
        if splice is None:
            return
        self.commands.append(CloseNext(link.id))
        if splice.connected:
            self._log(SESSION_CLOSED, link, reason=reason, prev_hop=link.peer,
                      next_hop=splice.next_hop, bytes_to_next=splice.bytes_to_next,
                      bytes_from_next=splice.bytes_from_next,
                      envelopes_from_user=link.envelopes_in, envelopes_to_user=link.envelopes_out,
                      envelopes_to_next=splice.envelopes_to_next,
                      envelopes_from_next=splice.envelopes_from_next)

    def describe(self, now: float) -> list[dict[str, Any]]:
        """The spliced sessions, for `pvpn status` on this node."""
        out: list[dict[str, Any]] = []
        for link_id, splice in self.splices.items():
            link = self.links.get(link_id)
            if link is None:
                continue
            out.append({
                "session": link.session_id.hex(), "user": link.user, "uid": link.uid,
                "client": link.client, "peer": link.peer, "next_hop": splice.next_hop,
                "age": round(now - splice.opened, 1),
                "state": "up" if splice.connected else "connecting",
                "bytes_to_next": splice.bytes_to_next, "bytes_from_next": splice.bytes_from_next,
                "envelopes_from_user": link.envelopes_in, "envelopes_to_user": link.envelopes_out,
            })
        return out

    # -- time and shutdown
    def handle_timer(self, now: float) -> None:
        self._link_timers(now)
        self.flush(now)

    def close_all(self, reason: str) -> None:
        for link in list(self.links.values()):
            self._end(link, reason)
            self._close_politely(link, reason)
