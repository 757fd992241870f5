"""pvpn-client: the client host's packet interception (root).

Users' `pvpn connect` processes register over a unix socket; the kernel tells us their uid
(SO_PEERCRED). For each session we install owner-match rules feeding the session's own NFQUEUE,
hand every queued packet to that user's process (which holds the user's key and TLS session),
and deliver the replies it returns through the session's TUN device."""

from __future__ import annotations

import asyncio
import os
import pwd
from typing import Any, Callable


from pvpn import firewall
from pvpn import packet as pk
from pvpn.config import ClientConfig, load_client_config, parse_prefixes
from pvpn.envelope import (
    EnvelopeDecoder, MsgType, Sequencer, decode_control, encode_control, encode_envelope,
    status_pages,
)
from pvpn.errors import ConfigError, MalformedPacket, PolicyError, PvpnError, RemoteProtocolError
from pvpn.io import rules
from pvpn.io.nfqueue import BatchedQueue
from pvpn.io.loop import (
    WRITE_HIGH_WATER, daemon_main, install_signals, peer_credentials, prepare_unix_socket,
)
from pvpn.io.tun import open_tun, strict_rp_filter
from pvpn.records import Record, RecordWriter, session_hex
from pvpn.client.registry import MAX_FLOWS_PER_SESSION, Registry, SlotSession

def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class LocalLink(asyncio.Protocol):
    """One `pvpn connect` (or `pvpn status`/`disconnect`) process on the unix socket."""

    def __init__(self, daemon: "ClientDaemon") -> None:
        self.daemon = daemon
        self.transport: asyncio.Transport | None = None
        self.uid = -1
        self.pid = -1
        self.decoder = EnvelopeDecoder()
        self.seq = Sequencer()
        self.pending: list[bytes] = []
        self.session: SlotSession | None = None
        self.unregistered = False
        self.congested = False

    # -- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.pid, self.uid, _ = peer_credentials(transport)

    def pause_writing(self) -> None:
        self.congested = True

    def resume_writing(self) -> None:
        self.congested = False

    def data_received(self, data: bytes) -> None:
        try:
            for envelope in self.decoder.feed(data):
                if envelope.type is MsgType.PACKET:
                    self.daemon.inject(self, envelope.body)
                else:
                    self.daemon.local_control(self, envelope)
        except RemoteProtocolError as exc:
            self.daemon.log_event("local:error", self.session, uid=self.uid,
                                  reason=f"{type(exc).__name__}: {exc}")
            self.close()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.daemon.local_lost(self)

    # -- output
    def send_control(self, mtype: MsgType, fields: dict[str, Any]) -> None:
        session = self.session.session_id if self.session else b""
        self.pending.append(encode_envelope(mtype, session, self.uid, self.seq.take(),
                                            encode_control(fields)))

    def send_status(self, sessions: list[dict[str, Any]]) -> None:
        """STATUS_REPLY in as many pages as the sessions need."""
        for page in status_pages(sessions):
            self.send_control(MsgType.STATUS_REPLY, page)

    def flush(self) -> None:
        if self.pending and self.transport is not None:
            self.transport.write(b"".join(self.pending))
            self.pending.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()


class ClientDaemon:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.log = RecordWriter("client", config.name)
        self.registry = Registry(config)
        self.loop = asyncio.get_running_loop()
        self.queues: dict[int, BatchedQueue] = {}
        self.tun_fds: dict[int, int] = {}
        self.links: dict[int, LocalLink] = {}  # slot -> attached link
        self._dirty: set[LocalLink] = set()

    def log_event(self, event: str, session: SlotSession | None = None, **kw: Any) -> None:
        rec = Record(event)
        if session is not None:
            rec.session, rec.user, rec.uid = session_hex(session.session_id), session.user, session.uid
            rec.extra["slot"] = session.slot
        for key, value in kw.items():
            if key in ("reason", "flow", "peer", "user", "uid", "bytes"):
                setattr(rec, key, value)
            else:
                rec.extra[key] = value
        self.log.write(rec)

    # -- sessions
    def _install(self, session: SlotSession) -> None:
        """TUN device, queue, then rules: the rules go in last, fully formed, in one step."""
        self._attach_devices(session)
        rules.apply(firewall.client_session(
            self.config.instance, session.slot, session.uid, session.networks, session.queue,
            session.mark, self.config.mark_mask, session.tun))

    def _attach_devices(self, session: SlotSession) -> None:
        fd = open_tun(session.tun)
        self.tun_fds[session.slot] = fd
        queue = BatchedQueue(session.queue, self._queue_callback(session), max_len=4096)
        self.queues[session.slot] = queue

        def drain() -> None:
            queue.drain()
            self.flush()

        self.loop.add_reader(queue.fileno(), drain)

    def recover(self) -> None:
        """Pick up what an earlier pvpn-client left: its sessions' rules stayed in the kernel
        (protection never lapsed, the kernel dropped their packets); bind their queues and
        TUN devices again and hold them until their users' tunnel processes come back."""
        instance = self.config.instance
        p = firewall.chain_prefix(instance)
        texts = [rules.saved(4), rules.saved(6)]
        installed, broken = firewall.parse_installed_sessions(instance, texts)
        now = self.loop.time()
        for found in installed:
            session = self.registry.adopt(found.slot, found.uid, user_name(found.uid),
                                          found.networks, found.queue, found.mark, found.tun, now)
            try:
                self._attach_devices(session)
            except PvpnError as exc:
                self.log_event("node:recover-failed", session, reason=str(exc))
                self.end_session(session, f"could not recover: {exc}")
                continue
            self.log_event("session:recovered", session, reason="rules kept across a restart; "
                           "held until the user's tunnel process registers again",
                           prefixes=[str(n) for n in found.networks])
        if broken:
            self.log_event("node:cleanup", reason="incomplete session rules removed",
                           chains=broken)
            rules.remove_chains(broken, f"{p}-OUT")
            rules.remove_chains(broken, f"{p}-IN")
        if f":{p}-OUT " in texts[0] and f":{p}-OUT " in texts[1]:
            rules.ensure_jump("OUTPUT", f"{p}-OUT")
            rules.ensure_jump("PREROUTING", f"{p}-IN")
        else:
            rules.remove_instance(instance)
            rules.apply(firewall.client_base(instance))

    def _uninstall(self, session: SlotSession) -> list[str]:
        errors = rules.remove(firewall.client_session_removal(
            self.config.instance, session.slot, session.tun))
        queue = self.queues.pop(session.slot, None)
        if queue is not None:
            self.loop.remove_reader(queue.fileno())
            queue.close()
        fd = self.tun_fds.pop(session.slot, None)
        if fd is not None:
            os.close(fd)
        return errors

    def end_session(self, session: SlotSession, reason: str) -> None:
        self.registry.release(session.slot)
        link = self.links.pop(session.slot, None)
        if link is not None:
            link.session = None
        errors = self._uninstall(session)
        self.log_event("session:closed", session, reason=reason, packets_out=session.packets_out,
                       packets_in=session.packets_in, bytes_out=session.bytes_out,
                       bytes_in=session.bytes_in, drops=dict(session.drops),
                       rule_errors=errors or None)

    # -- the packet path: queue -> user's process
    def _queue_callback(self, session: SlotSession) -> Callable[[bytes], bool]:
        slot, uid, flows = session.slot, session.uid, session.flows
        parse_flow, loop_time = pk.parse_flow, self.loop.time
        dirty = self._dirty
        links = self.links

        def on_packet(payload: bytes) -> bool:
            # Always taken (dropped by the queue): it never leaves this host in clear.
            link = links.get(slot)
            if link is None or not session.session_id:
                count = session.drop("tunnel down (fail closed)")
                if count == 1 or count & (count - 1) == 0:
                    self.log_event("packet:dropped", session, reason="tunnel down (fail closed)",
                                   count=count)
                return True
            if link.congested:
                session.drop("tunnel process not keeping up")
                return True
            try:
                if len(flows) < MAX_FLOWS_PER_SESSION:
                    flows[parse_flow(payload)] = loop_time()
            except MalformedPacket:
                pass  # e.g. a locally generated ICMP error; it still belongs to this session
            session.packets_out += 1
            session.bytes_out += len(payload)
            link.pending.append(encode_envelope(MsgType.PACKET, session.session_id, uid,
                                                link.seq.take(), payload))
            dirty.add(link)
            return True

        return on_packet

    def flush(self) -> None:
        for link in self._dirty:
            link.flush()
        self._dirty.clear()

    # -- the packet path: user's process -> TUN
    def inject(self, link: LocalLink, packet: bytes) -> None:
        session = link.session
        if session is None or not session.session_id:
            raise RemoteProtocolError("PACKET before the session is attached")
        try:
            flow, _, error = pk.classify(packet)  # one pass over the headers
            sent = flow if error else flow.reversed()  # an error quotes the packet as sent
        except MalformedPacket as exc:
            session.drop(f"malformed reply: {exc}")
            return
        # Only replies to flows this session sent may enter the host: a user's process must not
        # be able to forge packets from protected addresses to other local sockets.
        if sent not in session.flows:
            count = session.drop("reply to no flow of this session")
            if count == 1 or count & (count - 1) == 0:
                self.log_event("packet:dropped", session, flow=sent.describe(),
                               reason="reply to no flow of this session", count=count)
            return
        try:
            os.write(self.tun_fds[session.slot], packet)
        except BlockingIOError:
            session.drop("TUN device full")
            return
        except OSError as exc:
            session.drop(f"TUN write failed: {exc.strerror}")
            return
        session.packets_in += 1
        session.bytes_in += len(packet)

    # -- local control
    def local_control(self, link: LocalLink, envelope: Any) -> None:
        mtype = envelope.type
        fields = decode_control(envelope)
        now = self.loop.time()
        if mtype is MsgType.REGISTER:
            self._register(link, fields, now)
        elif mtype is MsgType.ATTACH and link.session is not None:
            link.session.session_id = fields["session"]
            self.log_event("session:attached", link.session, pid=link.pid,
                           server=link.session.server)
        elif mtype is MsgType.UNREGISTER and link.session is not None:
            link.unregistered = True
            session = link.session
            self.end_session(session, f"ended by the user: {fields['reason']}")
            # Answer only once the rules are gone, so `pvpn connect` exits with nothing left.
            link.send_status([session.describe(now)])
            link.close()
        elif mtype is MsgType.STATUS:
            link.send_status([s.describe(now) for s in self.registry.visible_to(link.uid)])
        elif mtype is MsgType.DISCONNECT:
            try:
                found = self.registry.find_for_disconnect(link.uid, fields["session"])
            except PolicyError as exc:
                link.send_control(MsgType.ERROR, {"code": "not-found", "reason": str(exc)})
                return
            described = [s.describe(now) for s in found]
            for session in found:
                holder = self.links.get(session.slot)
                if holder is not None:
                    holder.send_control(MsgType.ERROR, {
                        "code": "disconnected",
                        "reason": f"disconnected by {user_name(link.uid)} (pvpn disconnect)"})
                    holder.unregistered = True
                    holder.close()
                self.end_session(session, f"pvpn disconnect by uid {link.uid}")
            link.send_status(described)
        else:
            raise RemoteProtocolError(f"unexpected {mtype.name} on the local socket")

    def _register(self, link: LocalLink, fields: dict[str, Any], now: float) -> None:
        if link.session is not None:
            raise RemoteProtocolError("REGISTER twice on one connection")
        try:
            if not all(isinstance(p, str) for p in fields["prefixes"]):
                raise ConfigError("prefixes must be strings")
            networks = parse_prefixes(fields["prefixes"])
            session = self.registry.find_held(link.uid, networks)
            if session is None:
                session = self.registry.allocate(link.uid, user_name(link.uid), fields["server"],
                                                 networks, now)
                try:
                    self._install(session)
                except PvpnError:
                    self._uninstall(session)
                    self.registry.release(session.slot)
                    raise
                self.log_event("session:registered", session, pid=link.pid,
                               prefixes=[str(n) for n in networks])
            else:
                self.log_event("session:reattached", session, pid=link.pid)
        except (ConfigError, PolicyError, PvpnError) as exc:
            link.send_control(MsgType.ERROR, {"code": "refused", "reason": str(exc)})
            return
        session.attached = True
        session.server = fields["server"]
        link.session = session
        self.links[session.slot] = link
        link.send_control(MsgType.REGISTERED, {"slot": session.slot, "queue": session.queue,
                                               "uid": link.uid, "user": session.user})

    def local_lost(self, link: LocalLink) -> None:
        self._dirty.discard(link)
        session = link.session
        if session is None or link.unregistered:
            return
        if self.links.get(session.slot) is link:
            del self.links[session.slot]
        session.attached = False
        # The VPN is still up: its packets keep being queued and dropped until the user
        # reconnects or runs `pvpn disconnect` (fail closed).
        self.log_event("session:held", session, reason="tunnel process gone; dropping its "
                       "packets until it reconnects or `pvpn disconnect`")

    def tick(self) -> None:
        now = self.loop.time()
        for session in self.registry.sessions.values():
            session.prune_flows(now)

    def shutdown(self, reason: str) -> None:
        for session in list(self.registry.sessions.values()):
            link = self.links.get(session.slot)
            if link is not None:
                link.send_control(MsgType.ERROR, {"code": "daemon-stopping", "reason": reason})
                link.unregistered = True
                link.close()
            self.end_session(session, reason)


async def serve(config: ClientConfig) -> None:
    daemon = ClientDaemon(config)
    loop = daemon.loop
    if strict_rp_filter():
        daemon.log_event("node:warning", reason="net.ipv4.conf.all.rp_filter=1 drops replies "
                         "arriving on TUN devices; set it to 0 or 2")
    prepare_unix_socket(
        config.socket,
        f"{config.socket} exists and is not a socket; remove it or change [client] socket",
        f"another pvpn-client already listens on {config.socket}")
    stop = asyncio.Event()
    listener: asyncio.AbstractServer | None = None
    try:
        daemon.recover()
        listener = await loop.create_unix_server(lambda: LocalLink(daemon), str(config.socket))
        os.chmod(config.socket, 0o666)  # anyone may ask; the kernel tells us who asked
        # pvpn-client holds no keys or user lists (the users' processes do): a SIGHUP only
        # says so in the log, instead of ending the daemon (the signal's default action).
        install_signals(loop, stop, lambda: daemon.log_event(
            "node:reloaded", reason="nothing to reload: keys live in the users' processes"))
        daemon.log_event("node:started", socket=str(config.socket))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                pass
            daemon.tick()
    finally:
        try:
            daemon.shutdown("pvpn-client shutting down")
        except PvpnError as exc:  # shutdown goes on: the rules must go whatever happened
            daemon.log_event("node:error", reason=f"while closing sessions: {exc}")
        if listener is not None:
            listener.close()
        await asyncio.sleep(0.05)
        errors = rules.remove_instance(config.instance)
        try:
            config.socket.unlink()
        except FileNotFoundError:
            pass
        daemon.log_event("node:stopped", reason="; ".join(errors) or "clean")


def main(argv: list[str] | None = None) -> int:
    return daemon_main("pvpn-client", __doc__, load_client_config, serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
