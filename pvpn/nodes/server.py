"""The server node, sans-IO: authenticates users over the shared handshake
(:mod:`pvpn.nodes.base`), NATs their packets and routes each reply to its session through the
flow table. Inputs carry ``now``; outputs are commands collected in ``commands``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Any, Callable, Iterable

from pvpn import fragments
from pvpn import packet as pk
from pvpn.addresses import Destinations, Local, exclusion
from pvpn.commands import CapturePacket, InjectPacket, ResumeElsewhere, SessionClosed
from pvpn.config import Network, ServerConfig, UserPolicy, parse_prefix
from pvpn.drops import Drop
from pvpn.envelope import (
    GSO_ECN, GSO_TCPV4, GSO_TCPV6, MIN_GSO_SIZE, MsgType, Offload, bare_packet,
    encode_control, encode_envelope, encode_offload, is_offloaded, split_offload,
)
from pvpn.errors import (
    AuthError, ConfigError, FlowTableFull, MalformedFrame, MalformedPacket, PvpnError,
)
from pvpn.flowtable import FlowRefused, FlowTable
from pvpn.names import (
    LINK_CLOSED, PACKET_DROPPED, SESSION_CLOSED, SESSION_DETACHED, SESSION_NARROWED,
    SESSION_OPENED, SESSION_RESTORED, SESSION_RESUMED,
)
from pvpn.nodes.base import KeyLookup, NodeBase, NodeLink, NodeLinkState, Session, Verifier
from pvpn.reset import tcp_reset
from pvpn.state import MAX_SESSIONS, SavedSession, ServerState, token_hash
from pvpn.workers import token_worker, worker_token


# ---------------------------------------------------------------- the server


class ServerNode(NodeBase):
    """The server: authenticates users, NATs their packets, routes each reply to its session.

    Inputs: :meth:`link_opened`, :meth:`receive_data`, :meth:`link_lost`,
    :meth:`receive_reply` (a packet captured on its way back), :meth:`handle_timer`.
    Outputs: :attr:`commands`, and :meth:`flush` for the ciphertext of every link.
    """

    role = "server"
    # The server's own addresses (pvpn.io.localaddrs), kept out of every session's
    # destinations unless its policy names them; set with set_local_addresses.
    local_addresses: Local = frozenset()

    def __init__(
        self,
        config: ServerConfig,
        keys: KeyLookup,
        verify: Verifier,
        source_for: Callable[[bytes], bytes],
        random: Callable[[int], bytes] = os.urandom,
        flows: FlowTable | None = None,
        mtu_for: Callable[[bytes], int] | None = None,
        offload: bool = False,
    ) -> None:
        super().__init__(config.name, keys, verify, random, config.keepalive, config.dead_after,
                         config.limits)
        self.config = config
        # Super-packets to users whose end offers them (the reply queue hands them over whole).
        self.takes_offload = offload
        # The IP versions whose upload super-packets the daemon hands the kernel whole, to
        # forward and segment (pvpn.forwarding); the others are segmented here.
        self.forward_whole: frozenset[int] = frozenset()
        self._own_hosts: frozenset[bytes] = frozenset()  # local_addresses, for the packet path
        self._own_networks: list[tuple[int, int, int]] = []
        self._source_for = source_for
        # The MTU towards a destination (pvpn.io.rawsock.PathMtu); None: nothing is too big.
        self._mtu_for = mtu_for
        self.too_big_reports = fragments.PacketTooBigReports()
        self._ident4 = int.from_bytes(random(2), "big")  # IPv4 fragment ids, one per datagram
        self.flows = flows or FlowTable.for_config(config)
        self.sessions: dict[bytes, Session] = {}
        # Emit CapturePacket for every inner packet: what the user sent, the replies returned.
        self.capture = False
        # Sessions made, resumed, detached, narrowed or ended (with the flow table's own
        # count: state_version), so the daemon saves only a state that changed.
        self._changes = 0

    def state_version(self) -> int:
        """Changes so far to what a snapshot holds (never counted per packet)."""
        return self._changes + self.flows.changes

    def _authorized(self, link: NodeLink, now: float) -> None:
        if link.next_hop is not None:
            self._refuse(link, "not-a-gateway", f"{self.name} is a server, not a gateway: it "
                         f"can't forward to {link.next_hop}; put it last in the chain",
                         "asked to forward")
            return
        policy: UserPolicy | None = self.config.users.get(link.user)
        if policy is None or not policy.allow:
            self._refuse(link, "no-destinations",
                         f"user {link.user!r} may reach no destination through {self.name}; "
                         "ask its administrator to add a [users.NAME] allow list",
                         "no [users] policy")
            return
        denied = [str(n) for n in link.want if not policy.permits(n)]
        if denied or not link.want:
            allowed = ", ".join(str(n) for n in policy.allow)
            self._refuse(link, "destination-not-allowed",
                         f"{', '.join(denied) or 'no destination'} not allowed for "
                         f"{link.user!r} at {self.name} (allowed: {allowed})",
                         f"denied destinations {denied}")
            return
        excluded = [why for why in (exclusion(n, policy.allow, self.local_addresses)
                                    for n in link.want) if why is not None]
        if excluded:
            self._refuse(link, "destination-not-allowed",
                         f"{'; '.join(excluded)}: {self.name} takes no user there unless the "
                         f"allow list of {link.user!r} names it", f"special destinations {excluded}")
            return
        allow = Destinations(link.want, policy.allow, self.local_addresses)
        session, resumed = None, False
        old = self.sessions.get(link.session_id)
        if old is not None and link.token is not None:
            if old.user == link.user and hmac.compare_digest(old.token_hash,
                                                             token_hash(link.token)):
                session, resumed = old, True
                old.token = link.token  # a session put back after a restart kept its hash
                if old.link is not None and old.link in self.links:
                    self._close_link(self.links[old.link])
                # What it asks for now (and the policy now allows); mappings outside it go.
                self._narrow(old, policy, link.want)
        if old is None and self._elsewhere(link):
            return
        if session is None and not self._room_for_session(link):
            return
        if session is None:
            # The user's proposed id (so all hops log the same one), unless it is taken.
            sid = link.session_id
            if len(sid) != 16 or sid in self.sessions:
                sid = self._random(16)
            token = worker_token(self._random(16), self.config.worker, self.config.workers)
            session = Session(
                id=sid, token=token, user=link.user, uid=link.uid,
                client=link.client, peer=link.peer, allow=allow, opened=now,
                token_hash=token_hash(token),
            )
            self.sessions[session.id] = session
        self._changes += 1
        session.link, session.detached_since, session.peer = link.id, None, link.peer
        link.session = session
        self._accept(link, session.id, session.token, [str(n) for n in link.want], resumed)
        self._log(SESSION_RESUMED if resumed else SESSION_OPENED, session=session,
                  client=link.client, allow=[str(n) for n in link.want], path=link.path,
                  tls=getattr(link.tls, "version", ""))

    def _elsewhere(self, link: NodeLink) -> bool:
        """A resume of a session another worker made (its token names it): that worker is
        asked to take the link's source's next connection (ResumeElsewhere). This worker
        never sees that session, nor can it: the owner checks the token as always."""
        owner = token_worker(link.token, self.config.workers)
        if owner is None or owner == self.config.worker:
            return False
        self._log(LINK_CLOSED, link, None, reason=f"resuming a session of worker {owner}: "
                  f"handed to worker {owner}")
        self.commands.append(ResumeElsewhere(link.id, owner))
        return True

    def hand_off(self, link_id: int, now: float) -> None:
        """Close a link handed to another worker (ResumeElsewhere) as a lost one: TLS's
        close_notify and no CLOSE, so its user's process reconnects and resumes."""
        self._now = now
        link = self.links.get(link_id)
        if link is not None and link.session is None:
            self._close_politely(link, "resumed by another worker", tell=False)

    def _room_for_session(self, link: NodeLink) -> bool:
        """At most ``sessions_per_user`` sessions per user (OpenSSH's MaxSessions default, 10):
        a new one ends the user's session detached longest ago, or is refused if all are live.
        A user reconnecting without resuming so cannot pile up sessions, mappings or captures,
        and never locks themselves out."""
        limit = self.config.sessions_per_user
        mine = [s for s in self.sessions.values() if s.user == link.user]
        if len(mine) < limit:
            return True
        detached = sorted((s for s in mine if s.detached_since is not None),
                          key=lambda s: s.detached_since or 0.0)
        excess = len(mine) - limit + 1
        if len(detached) < excess:
            self._refuse(link, "too-many-sessions",
                         f"user {link.user!r} has {len(mine)} sessions at {self.name}, the most "
                         "one user may have; end one (pvpn disconnect) and try again",
                         f"{len(mine)} sessions already")
            return False
        for session in detached[:excess]:
            self._end_session(session, f"replaced by a new session of {session.user!r}, who had "
                              f"{len(mine)} sessions, the most one user may have")
        return True

    def _on_close(self, link: NodeLink, reason: str, now: float) -> None:
        if link.session is not None:
            self._end_session(link.session, f"closed by the user: {reason}")

    def _on_link_lost(self, link: NodeLink, now: float, reason: str) -> None:
        self._detach(link, now, reason)

    def _detach(self, link: NodeLink, now: float, reason: str) -> None:
        """The session ``link`` carries waits for its user's resume (``resume_grace``)."""
        session = link.session
        if session is not None and session.link == link.id:
            session.link = None
            session.detached_since = now
            self._changes += 1
            self._log(SESSION_DETACHED, session=session, reason=reason)

    def _end_link(self, link: NodeLink, reason: str) -> None:
        if link.session is not None:
            self._end_session(link.session, reason)

    def _reauthenticate_detached(self, now: float) -> None:
        # A detached session could only come back through a full HELLO / AUTH, but one whose
        # user has no key left is over now, not at the end of resume_grace.
        for session in list(self.sessions.values()):
            if session.link is not None:
                continue
            try:
                if not self._keys.keys_for(session.user):
                    raise AuthError(f"user {session.user!r} has no authorised keys")
            except AuthError as exc:
                self._end_session(session, f"revoked: no key left: {exc}")

    def _on_packet(self, link: NodeLink, packet: bytes, now: float) -> None:
        if link.session is None:
            return
        if is_offloaded(packet):
            self._super_packet_from_user(link, link.session, packet, now)
        else:
            self._packet_from_user(link.session, packet, now)

    def _super_packet_from_user(self, link: NodeLink, session: Session, body: bytes,
                                now: float) -> None:
        """A TCP super-packet of the user's (pvpn.envelope.OFFLOAD), only on a link that
        said it takes them: its header must tell the truth about it (else it is dropped,
        counted and logged); then it is judged and NATed as any packet, and leaves as the
        segments it stands for, each at most the path MTU, their checksums computed."""
        try:
            if not link.offload:
                raise MalformedFrame("offload header on a link that did not offer them")
            offload, packet = split_offload(body)
        except MalformedFrame as exc:
            self._drop(session, Drop.MALFORMED_OFFLOAD, now, detail=str(exc))
            return
        self._packet_from_user(session, packet, now, offload)

    def _end_session(self, session: Session, reason: str) -> None:
        self._changes += 1
        self.sessions.pop(session.id, None)
        session.link = None  # ended, not detached: its link closing later changes nothing
        flows = self.flows.drop_session(session.id)
        self._log(SESSION_CLOSED, session=session, reason=reason,
                  packets_in=session.packets_in, packets_out=session.packets_out,
                  bytes_in=session.bytes_in, bytes_out=session.bytes_out,
                  drops=session.drops.as_dict(), flows=len(flows))
        self._capture_ends(session)

    def _capture_ends(self, session: Session) -> None:
        """After a session's ``session:closed`` record: its capture ends with it."""
        if self.capture:
            self.commands.append(SessionClosed(session.id))

    def _drop(self, session: Session, drop: Drop, now: float, flow: pk.FlowKey | None = None,
              detail: str = "") -> None:
        """Count a dropped packet under its fixed code; log it if the session's drop counter
        says so (the first of each code, then a few per second). The flow, which the user
        chooses, goes in the record's own field, described only when it is logged."""
        count = session.drops.count(drop, now)
        if not count:
            return
        extra: dict[str, Any] = {"count": count}
        unlogged = session.drops.take_unlogged()
        if unlogged:
            extra["unlogged"] = unlogged
        if detail:
            extra["detail"] = detail
        self._log(PACKET_DROPPED, session=session, reason=drop.value,
                  flow=flow.describe() if flow is not None else "", **extra)

    # -- the packet path
    def _packet_from_user(self, session: Session, packet: bytes, now: float,
                          offload: Offload | None = None) -> None:
        if self.capture:  # as the user sent it: before the checks and the NAT
            self.commands.append(CapturePacket(session.id, packet))
        try:
            flow, flags, error = pk.classify(packet, True)
        except pk.IpOptions:
            self._drop(session, Drop.IP_OPTIONS, now)
            return
        except MalformedPacket as exc:
            self._drop(session, Drop.MALFORMED_PACKET, now, detail=str(exc))
            return
        mtu = 0
        if error:
            # The client host's kernel answering a reply it could not deliver (a closed port):
            # it quotes the reply, so the flow it is about is the quote's, reversed. Only a
            # flow the session already has may carry it; it never opens one. It is judged on
            # what it is (type, length, outer addresses), not only on the flow it names.
            mine = flow.reversed()
            refusal = pk.sent_icmp_error_refusal(packet)
            if refusal is not None:
                self._drop(session, Drop.ICMP_ERROR_REFUSED, now, mine, refusal)
                return
            entry = self.flows.lookup(session.id, mine)
            if entry is None:
                self._drop(session, Drop.ICMP_ERROR_NO_FLOW, now, mine)
                return
        elif not session.allow.contains(flow.dst):
            self._drop(session, Drop.DESTINATION_SPECIAL if session.allow.covers(flow.dst)
                       else Drop.DESTINATION_NOT_ALLOWED, now, flow)
            return
        else:
            if offload is not None:  # it leaves in segments that fit: never too big
                mtu = self._segment_mtu(flow.dst)
            else:
                mtu = self._path_mtu(packet, flow.dst)
                if mtu and self._too_big(session, packet, flow, mtu, now):
                    return
            try:
                entry = self.flows.outbound(session.id, flow, self._source_for(flow.dst), now,
                                            flags, session.user)
            except FlowRefused as exc:
                if exc.drop is Drop.TCP_NO_MAPPING:
                    self._reset(session, packet, flow, now)
                    return
                self._drop(session, exc.drop, now, flow, str(exc))
                return
            except FlowTableFull as exc:
                self._drop(session, Drop.FLOW_TABLE_FULL, now, flow, str(exc))
                return
            except OSError as exc:
                self._drop(session, Drop.NO_ROUTE, now, flow, str(exc.strerror or exc))
                return
        session.count_out(len(packet))
        sent = pk.rewrite_source(packet, entry.nat_src, entry.nat_port)
        if offload is not None:
            session.super_out += 1
            headers = pk.tcp_headers_length(sent)
            mss = mtu - headers
            if offload.gso_size:
                mss = min(mss, offload.gso_size)
            mss = max(MIN_GSO_SIZE, mss)
            l4 = pk.l4_offset(sent)
            if (len(sent) - headers > mss and self._forwards_whole(flow.dst)
                    and not sent[l4 + 13] & (pk.TCP_SYN | pk.TCP_RST)
                    and sent[8 if sent[0] >> 4 == 4 else 7]):
                # The kernel segments it as we would have (the same size), in C; CWR
                # (ECN) only on the first segment, as segment_tcp does. Never a SYN (the
                # raw socket's packet opens every connection, so the host's NAT and
                # filter rules see it as they always did) nor a hop limit of 0 (the
                # kernel's forwarding would drop it, which the check would blame on
                # the host's FORWARD rules).
                ecn = GSO_ECN if sent[l4 + 13] & pk.TCP_CWR else 0
                self.commands.append(InjectPacket(bytes(pk.to_forward(sent)), Offload(
                    (GSO_TCPV4 if sent[0] >> 4 == 4 else GSO_TCPV6) | ecn, mss, l4, 16,
                    headers)))
                return
            for segment in pk.segment_tcp(sent, mss):
                self.commands.append(InjectPacket(segment))
        elif not error and mtu and len(sent) > mtu:
            self._inject_fragments(sent, mtu)
        else:
            self.commands.append(InjectPacket(sent))

    # -- datagrams larger than the next link (docs/design.md "Datagrams of any size")
    def _path_mtu(self, packet: bytes, destination: bytes) -> int:
        """The MTU towards ``destination`` if ``packet`` might not fit it, else 0. Every
        IPv4 path carries 576 bytes in practice and every IPv6 link 1280 (RFC 8200 5), so
        smaller packets need no look-up; an unroutable destination is the NAT's to refuse."""
        if self._mtu_for is None or len(packet) <= (
                576 if packet[0] >> 4 == 4 else fragments.IPV6_MIN_MTU):
            return 0
        try:
            return self._mtu_for(destination)
        except OSError:
            return 0

    def _too_big(self, session: Session, packet: bytes, flow: pk.FlowKey, mtu: int,
                 now: float) -> bool:
        """Answer a packet that must not be fragmented and does not fit with the ICMP error
        of path MTU discovery (then it is dropped): an IPv4 packet with DF (RFC 1191), an
        IPv6 one its sender's kernel would have sent whole (fragments.PacketTooBigReports).
        The error comes from the server's own address towards the destination, the router
        where the MTU drops, and reaches the session as any reply does."""
        if len(packet) <= mtu:
            return False
        if packet[0] >> 4 == 4:
            if not fragments.dont_fragment(packet):
                return False
        elif not self.too_big_reports.must_report((session.id, flow.src, flow.dst),
                                                  len(packet), mtu, now):
            return False
        self._drop(session, Drop.TOO_BIG, now, flow, f"{len(packet)} bytes, mtu {mtu}")
        try:
            source = self._source_for(flow.dst)
        except OSError:
            return True
        self._to_session(session, fragments.too_big(packet, mtu, source), now)
        return True

    def _inject_fragments(self, packet: bytes, mtu: int) -> None:
        """Send ``packet`` as fragments that fit ``mtu``: the raw socket sends what it is given
        (IP_HDRINCL) and refuses more than the link's MTU. IPv4 ids count up from a random
        start, one per datagram (none repeats within 65,536 of the server's fragmented
        datagrams); IPv6 ids are random 32-bit values (RFC 7739)."""
        if packet[0] >> 4 == 4:
            self._ident4 = self._ident4 % 0xFFFF + 1  # 1..65535: 0 would be replaced
            ident = self._ident4
        else:
            ident = int.from_bytes(self._random(4), "big")
        for piece in fragments.fragment(packet, mtu, ident):
            self.commands.append(InjectPacket(piece))

    def _to_session(self, session: Session, packet: bytes, now: float) -> None:
        """A packet the server itself sends to a session (an ICMP error), as replies go."""
        link = self.links.get(session.link) if session.link is not None else None
        if link is None or link.closed:
            self._drop(session, Drop.SESSION_DETACHED, now)
            return
        if link.congested:
            self._drop(session, Drop.LINK_CONGESTED, now)
            return
        self._send_to_user(session, link, packet)

    def _send_to_user(self, session: Session, link: NodeLink, packet: bytes) -> None:
        """A packet on its way to the session's user, over ``link`` (open, not congested):
        captured as the user gets it, counted in, queued for the next flush."""
        if self.capture:  # a super-packet as the user's kernel will get it
            self.commands.append(CapturePacket(session.id, bare_packet(packet)))
        session.count_in(len(packet))
        link.pending.append(
            encode_envelope(MsgType.PACKET, session.id, session.uid, link.seq.take(), packet))
        self._dirty.add(link.id)

    def _reset(self, session: Session, packet: bytes, flow: pk.FlowKey, now: float) -> None:
        """A TCP segment of a connection the server has no mapping for: it can reach nobody
        (its NAT port is gone with the mapping), so the user's TCP gets the reset a host
        answers such a segment with (pvpn.reset), at once, instead of a silent hang."""
        reset = tcp_reset(packet)
        link = self.links.get(session.link) if session.link is not None else None
        if reset is None or link is None or link.closed or link.congested:
            self._drop(session, Drop.TCP_NO_MAPPING, now, flow)
            return
        self._drop(session, Drop.TCP_NO_MAPPING, now, flow, "answered with a reset")
        self._send_to_user(session, link, reset)

    def receive_reply(self, packet: bytes, now: float, info: int = 0) -> bool:
        """A packet captured on its way in. True if it was ours (the adapter drops it from the
        kernel's path); False if it belongs to someone else on this host (accept it), and for
        a path MTU error handed on to a session, which the server's kernel learns from too.
        ``info``: the queue's offload state of the packet (pvpn.packet.SKB_*; a queue with
        NFQA_CFG_F_GSO hands over super-packets and unfinished checksums)."""
        try:
            flow, flags, error = pk.classify(packet, True)
        except pk.IpOptions:
            return self._refused_reply(packet, Drop.IP_OPTIONS, now)
        except MalformedPacket:
            return False
        if error:  # about a packet the server sent for a session: the quote is that packet
            entry = self.flows.find_reply(flow.proto, flow.dst, flow.dport, flow.src, flow.sport)
            if entry is None:
                return False
            refusal = pk.received_icmp_error_refusal(packet)
            if refusal is not None:
                owner = self.sessions.get(entry.session_id)
                if owner is not None:
                    self._drop(owner, Drop.REPLY_ICMP_REFUSED, now, entry.original, refusal)
                return True
        else:
            if ((flow.proto == pk.PROTO_ICMP or flow.proto == pk.PROTO_ICMPV6)
                    and pk.icmp_type(packet) not in pk.ECHO_REPLIES):
                # An echo request to the NAT address and id of a user's ping is the server's
                # own to answer (conntrack: NEW, not the mapping's reply), not a way for the
                # remote end to ping the user's host back through the tunnel.
                return False
            entry = self.flows.inbound(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                                       now, flags)
        if entry is None:
            return False
        session = self.sessions.get(entry.session_id)
        if session is None:
            return True
        if session.link is None:
            self._drop(session, Drop.SESSION_DETACHED, now, entry.original)
            return True
        link = self.links.get(session.link)
        if link is None or link.closed:  # closed, not yet lost: its output is over
            self._drop(session, Drop.SESSION_DETACHED, now, entry.original)
            return True
        if link.congested:
            self._drop(session, Drop.LINK_CONGESTED, now, entry.original)
            return True
        # Captured as returned to the user: after the un-NAT.
        rewritten = pk.rewrite_destination(packet, entry.original.src, entry.original.sport)
        if info & pk.SKB_GSO and not error:
            self._offloaded_reply(session, link, rewritten, flow, now)
            return True
        if info & pk.SKB_CSUMNOTREADY and not error:
            # A packet (a pure ACK, say) whose checksum the kernel left undone: summed here,
            # at less cost than an offload header on it would take both ends.
            rewritten = bytes(pk.complete_checksum(rewritten))
        self._send_to_user(session, link, rewritten)
        # A path MTU error goes to the user and to the server's own kernel as well: the MTU
        # it learns is what the server fragments its users' datagrams to (rawsock.PathMtu).
        return not (error and fragments.is_path_mtu_error(packet))

    def _offloaded_reply(self, session: Session, link: NodeLink, packet: bytes,
                         flow: pk.FlowKey, now: float) -> None:
        """A super-packet the queue handed over whole (GRO's, or a GSO segment of a local
        sender's), its checksum done or not. A TCP one reaches a user's end that takes
        them whole, with an offload header (its checksum field the pseudo-header's sum, for
        the client host's kernel to complete); any other end gets it as segments of the
        remote end's size, checksums computed."""
        if flow.proto != pk.PROTO_TCP:  # UDP GSO: no segment size comes with it
            self._drop(session, Drop.OFFLOAD_UNSUPPORTED, now, flow)
            return
        headers = pk.tcp_headers_length(packet)
        mss = self._reply_mss(packet, flow.src)
        if len(packet) - headers <= mss:
            self._send_to_user(session, link, bytes(pk.complete_checksum(packet)))
        elif link.offload:
            session.super_in += 1
            self._send_to_user(session, link, encode_offload(
                Offload(GSO_TCPV4 if packet[0] >> 4 == 4 else GSO_TCPV6, mss,
                        pk.l4_offset(packet), 16, headers),
                bytes(pk.partial_checksum(packet))))
        else:
            for segment in pk.segment_tcp(packet, mss):
                self._send_to_user(session, link, segment)

    def _forwards_whole(self, destination: bytes) -> bool:
        """Whether a super-packet to ``destination`` may go whole to the kernel's forwarding
        (:attr:`forward_whole`): not to one of the server's own addresses, which forwarding
        would deliver as arrived on the TUN device, not as the raw socket's are."""
        if (4 if len(destination) == 4 else 6) not in self.forward_whole:
            return False
        if destination in self._own_hosts:
            return False
        if self._own_networks:
            value = int.from_bytes(destination, "big")
            return not any(value & mask == network and len(destination) == size
                           for network, mask, size in self._own_networks)
        return True

    def _segment_mtu(self, destination: bytes) -> int:
        """The MTU a super-packet's segments towards ``destination`` must fit."""
        if self._mtu_for is not None:
            try:
                return self._mtu_for(destination)
            except OSError:
                pass
        return 1500

    def _reply_mss(self, packet: bytes, remote: bytes) -> int:
        """The segment size a super-packet from ``remote`` stands for: the link's MTU
        towards it, less this packet's IP and TCP headers (the remote end's MSS counts them
        the same way), at least MIN_GSO_SIZE."""
        return max(MIN_GSO_SIZE, self._segment_mtu(remote) - pk.tcp_headers_length(packet))

    def _refused_reply(self, packet: bytes, drop: Drop, now: float) -> bool:
        """A packet the strict parse refused: ours (counted and dropped) if it answers a NAT
        mapping, else someone else's on this host (accepted)."""
        try:
            flow, _, error = pk.classify(packet)
        except MalformedPacket:
            return False
        if error:
            entry = self.flows.find_reply(flow.proto, flow.dst, flow.dport, flow.src, flow.sport)
        else:
            entry = self.flows.find_reply(flow.proto, flow.src, flow.sport, flow.dst, flow.dport)
        if entry is None:
            return False
        session = self.sessions.get(entry.session_id)
        if session is not None:
            self._drop(session, drop, now, entry.original)
        return True

    def apply_policy(self, users: dict[str, UserPolicy], now: float) -> None:
        """A reload's [users] apply to the live sessions too, not only to new ones: a session
        whose user has no allow list left ends (the user is told why, in a CLOSE); the others
        keep only what the new allow list still covers (less what it now excludes), and
        their mappings to destinations no longer allowed are dropped."""
        self.config.users = users
        for session in list(self.sessions.values()):
            policy = users.get(session.user)
            if policy is None or not policy.allow:
                self._end_live(session, f"the [users] policy of {session.user!r} at "
                               f"{self.name} was removed")
                continue
            kept = [n for n in _within(session.allow.networks, policy.allow)
                    if exclusion(n, policy.allow, self.local_addresses) is None]
            if not kept:
                self._end_live(session, f"none of its destinations is allowed any more at "
                               f"{self.name}")
                continue
            before = session.allow.networks
            flows = self.flows.sessions_flows(session.id)
            self._narrow(session, policy, kept)
            dropped = flows - self.flows.sessions_flows(session.id)
            if kept != _within(before, before) or dropped:
                self._log(SESSION_NARROWED, session=session, allow=[str(n) for n in kept],
                          was=[str(n) for n in before], flows=dropped,
                          reason="the [users] policy changed")

    def _end_live(self, session: Session, reason: str) -> None:
        """End a session the node no longer serves, telling its user why."""
        link = self.links.get(session.link) if session.link is not None else None
        if link is not None and link.state is NodeLinkState.ESTABLISHED:
            self._send(link, MsgType.CLOSE, session.id, encode_control({"reason": reason}))
        self._end_session(session, reason)
        if link is not None:
            self._close_link(link)

    def set_local_addresses(self, addresses: Local) -> None:
        """The server's own addresses changed (read at start, on reload, periodically):
        every session's destinations are computed again, mappings to an address that became
        the server's own are dropped, and so are mappings from an address it no longer has."""
        if addresses == self.local_addresses:
            return
        # Addresses the server had and lost (renumbered, a failover address moved to another
        # host): a mapping sending from one would go on with a source the server no longer
        # owns (the raw socket does not check), and its replies would reach whoever has it now.
        gone = {n.network_address.packed for n in self.local_addresses - addresses
                if n.num_addresses == 1}
        self.local_addresses = addresses
        self._own_hosts = frozenset(n.network_address.packed for n in addresses
                                    if n.num_addresses == 1)
        self._own_networks = [(int(n.network_address), int(n.netmask), n.max_prefixlen // 8)
                              for n in addresses if n.num_addresses > 1]
        for session in list(self.sessions.values()):
            policy = self.config.users.get(session.user)
            if policy is not None:
                self._narrow(session, policy, session.allow.networks)
            if gone:
                self.flows.drop_flows([f for f in self.flows.session_flows(session.id)
                                       if f.nat_src in gone])

    def _narrow(self, session: Session, policy: UserPolicy, networks: list[Network]) -> None:
        """Give ``session`` these prefixes under ``policy`` and the current own addresses,
        and drop its mappings to destinations it may no longer reach."""
        session.allow = Destinations(networks, policy.allow, self.local_addresses)
        self._changes += 1
        allow = session.allow
        self.flows.drop_flows([f for f in self.flows.session_flows(session.id)
                               if not allow.contains(f.original.dst)])

    def handle_timer(self, now: float) -> None:
        self._link_timers(now)
        grace = self.config.resume_grace
        for session in list(self.sessions.values()):
            if session.detached_since is not None and now - session.detached_since > grace:
                self._end_session(session, f"not resumed within {grace:.0f} s")
        self.flows.expire(now)
        self.flush(now)

    def close_all(self, reason: str) -> None:
        """Shutdown for good (no state is kept): every session ends, its user told why."""
        for link in list(self.links.values()):
            self._close_politely(link, reason)
        for session in list(self.sessions.values()):
            self._end_session(session, reason)

    def detach_all(self, reason: str, now: float) -> None:
        """Shutdown to come back (the state is saved): every link closes with TLS's
        close_notify but no CLOSE, so each user's process holds its protected traffic and
        resumes the same session from the next server; the sessions are detached, not
        ended, and the snapshot taken after this keeps them with their mappings."""
        self._now = now
        for link in list(self.links.values()):
            self._detach(link, now, reason)
            self._close_politely(link, reason, tell=False)

    # -- across a restart (pvpn.state; the daemon reads and writes the file)
    def snapshot(self, now: float) -> ServerState:
        """What a restarted server needs to resume every session with its mappings; the
        sessions active most recently first, within pvpn.state's bounds. ``saved_at`` is
        left 0 for the adapter, which reads the wall clock."""
        def recency(session: Session) -> float:
            return now if session.link is not None else session.detached_since or 0.0

        sessions = sorted(self.sessions.values(), key=recency, reverse=True)[:MAX_SESSIONS]
        return ServerState(self.name, 0.0, self.flows.cursor, tuple(
            SavedSession(
                s.id, s.token_hash, s.user, s.uid, s.client, s.peer,
                tuple(str(n) for n in s.allow.networks), max(0.0, now - s.opened),
                None if s.detached_since is None else max(0.0, now - s.detached_since),
                (s.packets_in, s.packets_out, s.bytes_in, s.bytes_out),
                tuple(self.flows.saved_flows(s.id, now)))
            for s in sessions))

    def restore(self, state: ServerState, now: float, downtime: float) -> dict[str, Any]:
        """Put back the sessions and mappings of a snapshot taken ``downtime`` seconds of
        server absence ago, judged by the settings, policies, keys and addresses of now.
        Each session comes back detached, waiting for its user's resume (a full HELLO and
        AUTH with the user's key, and the token), and is written as ``session:restored``;
        one that cannot come back is written as ``session:closed`` with the reason: its
        grace ran out while the server was away (the downtime counts as detached time), its
        user has no policy or no key left (revoked), nothing it asked for is allowed now, its
        user already has ``sessions_per_user``. Its mappings come back with their ports and
        states, each checked as the table checks its own (and its destination against the
        session's allow list, its NAT address against the server's); the mappings' ages are
        those of the snapshot, so a connection that was alive does not expire because the
        server was away. Returns what was done, for the summary record."""
        self._now = now
        grace = self.config.resume_grace
        report: dict[str, Any] = {"sessions": 0, "flows": 0, "skipped": {}}
        skipped: dict[str, int] = report["skipped"]
        if state.node != self.name:
            raise ValueError(f"it was written by node {state.node!r}, not {self.name!r}")
        self.flows.restore_cursor(state.cursor)
        per_user: dict[str, int] = {}
        restored: list[tuple[Session, SavedSession]] = []
        # The sessions detached last first, so a lowered sessions_per_user keeps the freshest.
        for saved in sorted(state.sessions, key=lambda s: s.detached or 0.0):
            detached_for = (saved.detached or 0.0) + downtime
            session = Session(
                id=saved.id, token=b"", user=saved.user, uid=saved.uid, client=saved.client,
                peer=saved.peer, allow=Destinations([], [], self.local_addresses),
                opened=now - saved.age - downtime, detached_since=now - detached_for,
                packets_in=saved.counters[0], packets_out=saved.counters[1],
                bytes_in=saved.counters[2], bytes_out=saved.counters[3],
                token_hash=saved.token_hash)
            why = self._unrestorable(session, saved, detached_for, grace, per_user)
            if why is not None:
                skipped[why[0]] = skipped.get(why[0], 0) + 1
                self._log(SESSION_CLOSED, session=session, reason=why[1],
                          packets_in=session.packets_in, packets_out=session.packets_out,
                          bytes_in=session.bytes_in, bytes_out=session.bytes_out,
                          flows=len(saved.flows))
                self._capture_ends(session)
                continue
            per_user[session.user] = per_user.get(session.user, 0) + 1
            self.sessions[session.id] = session
            restored.append((session, saved))
        # The mappings oldest first: the table's idle queues are ordered by last use.
        flows = sorted(((f.idle, i, f) for i, (_, saved) in enumerate(restored)
                        for f in saved.flows), key=lambda item: (-item[0], item[1]))
        counts = [0] * len(restored)
        for _, index, flow in flows:
            session = restored[index][0]
            refused = self._flow_refusal(session, flow.key.dst, flow.nat_src)
            if refused is None:
                try:
                    self.flows.restore_flow(session.id, session.user, flow, now)
                except (FlowTableFull, ValueError) as exc:
                    refused = str(exc)
            if refused is not None:
                skipped[f"mapping: {refused}"] = skipped.get(f"mapping: {refused}", 0) + 1
                continue
            counts[index] += 1
        for (session, saved), count in zip(restored, counts):
            self._log(SESSION_RESTORED, session=session, client=session.client,
                      allow=[str(n) for n in session.allow.networks], flows=count,
                      reason=f"put back after the server's restart; detached "
                             f"{now - (session.detached_since or now):.0f} s, waiting for "
                             "its user's resume")
        report["sessions"], report["flows"] = len(restored), sum(counts)
        self._changes += 1
        return report

    def _unrestorable(self, session: Session, saved: SavedSession, detached_for: float,
                      grace: float, per_user: dict[str, int]) -> tuple[str, str] | None:
        """Why a saved session does not come back (a short kind and the record's reason),
        or None; a session that does gets its destinations under today's policy."""
        if saved.id in self.sessions:
            return "duplicate", "not restored: a session of that id is up already"
        if detached_for > grace:
            return "expired", (f"not resumed within {grace:.0f} s (the server was away "
                               f"{detached_for - (saved.detached or 0.0):.0f} s)")
        policy = self.config.users.get(saved.user)
        if policy is None or not policy.allow:
            return "revoked", (f"revoked: the [users] policy of {saved.user!r} at {self.name} "
                               "is gone")
        try:
            if not self._keys.keys_for(saved.user):
                raise AuthError(f"user {saved.user!r} has no authorised keys")
        except AuthError as exc:
            return "revoked", f"revoked: no key left: {exc}"
        if per_user.get(saved.user, 0) >= self.config.sessions_per_user:
            return "too-many", (f"not restored: {saved.user!r} has "
                                f"{self.config.sessions_per_user} sessions, the most one "
                                "user may have")
        try:
            wanted = [parse_prefix(text) for text in saved.allow]
        except ConfigError:
            return "invalid", "not restored: a prefix that is not one"
        kept = [n for n in _within(wanted, policy.allow)
                if exclusion(n, policy.allow, self.local_addresses) is None]
        if not kept:
            return "revoked", f"none of its destinations is allowed any more at {self.name}"
        session.allow = Destinations(kept, policy.allow, self.local_addresses)
        return None

    def _flow_refusal(self, session: Session, destination: bytes, nat_src: bytes) -> str | None:
        """Why a saved mapping of ``session`` does not come back (beyond the table's own
        checks), or None: its destination must be one the session may reach now, and its
        NAT address the one the server sends from towards it, or one of its own."""
        if not session.allow.contains(destination):
            return "its destination is not allowed now"
        try:
            if self._source_for(destination) == nat_src:
                return None
        except (OSError, PvpnError):
            return "no route to its destination"
        if any(n.num_addresses == 1 and n.network_address.packed == nat_src
               for n in self.local_addresses):
            return None
        return "its NAT address is not the server's"

    def describe(self, now: float) -> list[dict[str, Any]]:
        """The sessions, for `pvpn status` on this node."""
        return [{
            "session": s.id.hex(), "user": s.user, "uid": s.uid, "client": s.client,
            "peer": s.peer, "age": round(now - s.opened, 1),
            "state": "up" if s.link is not None else "detached (waiting for a resume)",
            **s.traffic(), "flows": self.flows.sessions_flows(s.id),
            "allow": [str(n) for n in s.allow.networks], "excluded": s.allow.excluded(),
        } for s in self.sessions.values()]


def _within(networks: Iterable[Network], allowed: Iterable[Network]) -> list[Network]:
    """What of ``networks`` lies within ``allowed``: each network, or the allowed prefixes
    inside it, collapsed."""
    allowed = list(allowed)
    out: list[Network] = []
    for network in networks:
        for entry in allowed:
            if network.version != entry.version:
                continue
            if network.subnet_of(entry):  # type: ignore[arg-type]
                out.append(network)
            elif entry.subnet_of(network):  # type: ignore[arg-type]
                out.append(entry)
    v4 = [n for n in out if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in out if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
