"""pvpn-server: accepts users' sessions, re-injects their packets, returns each reply to the
session whose flow it answers (the flow table), and logs every hop event as a JSON line."""

from __future__ import annotations

import errno
import os
import time
from typing import Callable

# Super-packets' checksums (pvpn.packet.chunk_sums, imported there when first used): a
# missing numpy fails the daemon at its start, not each super-packet later.
import numpy  # noqa: F401

from pvpn import auth, firewall
from pvpn.addresses import Local
from pvpn.commands import CapturePacket, InjectPacket, ResumeElsewhere, SessionClosed
from pvpn.config import ServerConfig, load_server_config
from pvpn.errors import ConfigError, PvpnError, StateError
from pvpn.flowtable import FlowTable
from pvpn.fragments import Reassembler
from pvpn.names import NODE_CLEANUP, NODE_STATE_RESTORED, NODE_STOPPED, NODE_WARNING
from pvpn.nodes.server import ServerNode
from pvpn.packet import destination_address
from pvpn.io import rules
from pvpn.io.nfqueue import F_GSO, BatchedQueue
from pvpn.io.loop import answers, daemon_main, install_signals
from pvpn.io.node import LinkProtocol, NodeDaemon
from pvpn.io.pcap import SessionCaptures
from pvpn.io.rawsock import PathMtu, RawSender, SourceAddresses
from pvpn.io.statefile import StateFile, StateKeeper
from pvpn.io.tun import VNET_HDR_LEN, open_tun, read_copies
from pvpn.records import Record, RecordWriter
from pvpn.state import decode_state
from pvpn.workers import worker_config, worker_path
from pvpn.server import workers
from pvpn.server.uploads import WholeUploads


def check_nat_ports(config: ServerConfig) -> None:
    """The NAT range must not overlap the ports the kernel hands to local sockets."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(x) for x in handle.read().split())
    except OSError:
        return
    nat_low, nat_high = config.nat_ports
    if nat_low <= high and low <= nat_high:
        raise ConfigError(
            f"{config.path}: [server] nat_ports {nat_low}-{nat_high} overlaps the local port "
            f"range {low}-{high} (net.ipv4.ip_local_port_range); choose ports above {high}")


class Server(NodeDaemon[ServerConfig, ServerNode]):
    """Wires the sans-IO ServerNode to sockets, NFQUEUE and the raw socket."""

    def __init__(self, config: ServerConfig, worker: workers.WorkerHandle | None = None) -> None:
        super().__init__(config, RecordWriter("server", config.name, clock=time.time))
        # One of several workers (pvpn.server.workers): its parent's channel and sockets.
        self.worker = worker
        self.handing_off: dict[int, float] = {}  # link -> when its redirect was asked for
        self.sources = SourceAddresses()
        self.mtus = PathMtu()  # what the server fragments its users' datagrams to
        self.node = ServerNode(config, self.keys, auth.verify_signature, self.sources,
                               mtu_for=self.mtus)
        # [server] pcap_dir: every session's inner packets to <pcap_dir>/<session>.pcap.
        self.captures = (None if config.pcap_dir is None else SessionCaptures(
            config.pcap_dir, config.pcap_max_bytes, self.log.write,
            max_total_bytes=config.pcap_max_total_bytes, max_files=config.pcap_max_files))
        self.node.capture = self.captures is not None
        self.raw = RawSender()
        # Upload super-packets go whole into the TUN device (server.uploads), in the IP
        # versions it says; until it is set up, and in the others, in segments.
        self.uploads: WholeUploads | None = None
        self.seen = 0.0  # one capture timestamp per batch
        self.dispatcher.on(InjectPacket, self._inject)
        self.dispatcher.on(CapturePacket, self._capture)
        self.dispatcher.on(SessionClosed, self._session_closed)
        self.dispatcher.on(ResumeElsewhere, self._resume_elsewhere)
        self.refresh_addresses(force=True)
        # [server] state_file: sessions and NAT mappings survive a restart (ConfigError now for
        # an unsafe directory).
        self.keeper = None if config.state_file is None else StateKeeper(
            StateFile(config.state_file), self.node.snapshot, self.node.state_version,
            self.log.write, config.state_interval)

    def load_config(self) -> ServerConfig:
        config = load_server_config(self.config.path)
        return config if self.worker is None else worker_config(config, self.worker.index)

    def addresses_changed(self, addresses: Local) -> None:
        self.sources.clear()  # a source address the kernel chose may be gone
        self.node.set_local_addresses(addresses)

    def dispatch(self) -> None:
        if not self.node.commands:
            return
        self.seen = time.time()
        super().dispatch()
        if self.captures is not None:
            self.guard.call("capture flush", self.captures.flush)

    def _inject(self, cmd: InjectPacket) -> None:
        if cmd.offload is not None and self.uploads is not None:
            self.uploads.write(cmd)
            self.node.forward_whole = self.uploads.versions
        elif self.raw.send(cmd.packet) == errno.EMSGSIZE:  # the link's MTU changed
            self.mtus.forget(destination_address(cmd.packet))

    def reload(self) -> None:
        super().reload()
        if self.uploads is not None:
            self.guard.call("forwarding", self._forward_again)

    def _forward_again(self) -> None:
        assert self.uploads is not None
        self.uploads.start()
        self.node.forward_whole = self.uploads.versions

    def _capture(self, cmd: CapturePacket) -> None:
        if self.captures is not None:
            self.captures.write(cmd.session, cmd.packet, self.seen)

    def _session_closed(self, cmd: SessionClosed) -> None:
        if self.captures is not None:
            self.captures.close(cmd.session)

    def _resume_elsewhere(self, cmd: ResumeElsewhere) -> None:
        """Ask the parent to route this link's source to the session's worker; the link closes
        when that is done (hand_over) or, the parent silent, within 2 s (tick)."""
        transport = self.links.get(cmd.link)
        peer = transport.get_extra_info("peername") if transport is not None else None
        if self.worker is None or not peer:
            self.node.hand_off(cmd.link, self.loop.time())
            return
        self.handing_off[cmd.link] = self.loop.time()
        workers.ask_redirect(self.worker.channel, cmd.link, str(peer[0]), cmd.worker)

    def hand_over(self, links: list[int]) -> None:
        now = self.loop.time()
        for link in links:
            if self.handing_off.pop(link, None) is not None:
                self.node.hand_off(link, now)
        self.node.flush(now)
        self.dispatch()

    def take_reply(self, packet: bytes, info: int = 0) -> bool:
        """A queued packet: True if it was a session's reply (the queue drops the original).
        ``info``: its offload state (pvpn.packet.SKB_*)."""
        try:
            return self.node.receive_reply(packet, self.loop.time(), info)
        except Exception as exc:  # noqa: BLE001 - the guard's; the packet is dropped (fail closed)
            self.guard.failed("reply", exc)
            return True

    def take_copies(self, fd: int, reassembler: Reassembler) -> None:
        """Replies too large for a queue message, as the kernel's copies brought them out of
        the server's TUN device; a copy made as the reply arrived lost one hop (as if
        forwarded), given back here."""
        for datagram in read_copies(fd, reassembler, self.loop.time(), 1, True,
                                    header=VNET_HDR_LEN):
            self.take_reply(datagram)

    def tick(self) -> None:
        super().tick()
        late = [link for link, asked in self.handing_off.items() if self.loop.time() - asked > 2]
        if late:
            self.guard.call("hand-off", self.hand_over, late)
        if self.keeper is not None:
            self.guard.call("state", self.keeper.tick, self.loop.time())
        if self.uploads is not None:
            self.guard.call("forwarding", self.uploads.tick)
            self.node.forward_whole = self.uploads.versions


def restore_state(server: Server, keeper: StateKeeper) -> None:
    """Put back the sessions and mappings the last server saved (pvpn.state), before the
    first link or reply is served."""
    node = server.node
    try:
        loaded = keeper.load(server.config.resume_grace)
        if loaded is None:
            return
        state, downtime = loaded
        report = node.restore(state, server.loop.time(), downtime)
    except ValueError as exc:  # another node's state
        keeper.refuse(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - a bug must not keep the server from starting
        server.guard.failed("state restore", exc)
        node.sessions.clear()  # nothing half put back
        node.flows = FlowTable.for_config(server.config)
        keeper.refuse(f"restoring it failed: {type(exc).__name__}")
        return
    server.dispatch()  # the session:restored and session:closed records
    server.log.write(Record(NODE_STATE_RESTORED, reason=f"the server was away "
                            f"{downtime:.1f} s", extra={**report, "path": str(keeper.store.path),
                                                         "downtime": round(downtime, 3)}))


async def serve(config: ServerConfig) -> None:
    """pvpn-server: one process (``workers = 1``), the parent of its workers, or a worker."""
    worker = workers.this_worker()
    if worker is not None:
        await serve_one(worker_config(config, worker.index), worker)
    elif config.workers > 1:
        check_nat_ports(config)
        await workers.supervise(config)
    else:
        await serve_one(config)


async def serve_one(config: ServerConfig, worker: workers.WorkerHandle | None = None) -> None:
    """One server process: the whole server, or worker ``worker`` of several, whose rules
    its parent owns."""
    if worker is None:
        check_nat_ports(config)
    server = Server(config, worker)
    loop = server.loop
    # Before the rules: a SIGTERM while the server starts (restoring its state can take a
    # while) ends in the clean-up below, not in Python's default exit (start_serving
    # installs them again, with SIGHUP's reload).
    install_signals(loop, server.stop)
    keeper = server.keeper
    kept = False  # the state was saved at the stop: the NAT ports' rules stay
    # This run has taken the state over (put it back): until then a failure to start leaves
    # an earlier server's state and rules to the next one.
    took_over = keeper is None
    queue: BatchedQueue | None = None
    copies: int | None = None
    try:
        try:
            queue = BatchedQueue(config.queue, server.take_reply, max_len=8192)
        except OSError as exc:
            raise PvpnError(f"cannot bind NFQUEUE {config.queue}: {exc}; another program "
                            "(an earlier pvpn-server still running?) holds it, or set "
                            "[server] queue to a free one") from None
        # Super-packets whole (the users' ends that take them get them so), if the kernel
        # hands them over; else it segments them and finishes their checksums, as before.
        try:
            queue.set_flags(F_GSO)
            server.node.takes_offload = True
        except OSError as exc:
            server.log.write(Record(NODE_WARNING, reason=f"no super-packets: {exc}"))
        # Replies too large for a queue message: the kernel's copies, out of this device.
        tun_name = firewall.server_tun(config.instance, None if worker is None else worker.index)
        copies = open_tun(tun_name)
        if worker is None:
            # Replaced in place, with no moment without them: a packet of a NAT flow that
            # reached the host's own stack while the server restarts would be answered with
            # a reset, and end the connection a resumed session was to carry on.
            rules.apply(firewall.server_rules(config.instance, config.queue, config.nat_ports))
            stale = rules.ensure_only_jumps(config.instance,
                                            firewall.server_jumps(config.instance))
            if stale:
                server.log.write(Record(NODE_CLEANUP, reason="rules left by an earlier run",
                                        extra={"rules": stale}))
        # After the rules: it counts by one of them.
        try:
            if config.forward_uploads:
                server.uploads = WholeUploads(copies, tun_name, config.instance,
                                              config.nat_ports, loop, server.log.write)
                server.node.forward_whole = server.uploads.versions
        except Exception as exc:  # noqa: BLE001 - the guard's; uploads go in segments
            server.guard.failed("forwarding", exc)
        if keeper is not None:
            restore_state(server, keeper)
            took_over = True

        guard = server.guard
        reassembler = Reassembler()

        def read_big_replies(fd: int = copies) -> None:
            guard.call("copies", server.take_copies, fd, reassembler)
            guard.call("flush", server.node.flush, loop.time())
            guard.call("dispatch", server.dispatch)

        def drain_queue(queue: BatchedQueue = queue) -> None:
            guard.call("queue drain", queue.drain)
            guard.call("flush", server.node.flush, loop.time())
            guard.call("dispatch", server.dispatch)

        loop.add_reader(queue.fileno(), drain_queue)  # bound above, so removable below
        loop.add_reader(copies, read_big_replies)
        if worker is not None:
            channel = worker.channel
            channel.setblocking(False)
            loop.add_reader(channel.fileno(), lambda: guard.call(
                "hand-off", server.hand_over, workers.read_answers(channel)))
        await server.start_serving(lambda: LinkProtocol(server), install_signals,
                                   queue=config.queue,
                                   sockets=None if worker is None else worker.sockets,
                                   **({} if worker is None else {"worker": worker.index}))
        if worker is not None:
            workers.say_serving(worker.channel)
        await server.run_until_stopped()
    finally:
        # Shutdown goes on whatever happens here. With a state file the sessions are kept
        # for the next server: detached (their users' processes hold and resume them), saved
        # with their mappings; without one they end, their users told why.
        if not took_over:
            server.guard.call("shutdown", server.node.close_all, "server shutting down")
        elif keeper is not None and server.node.sessions:
            now = loop.time()
            server.guard.call("shutdown", server.node.detach_all, "server stopping; the "
                              "session is kept for its resume", now)
            try:
                kept = await keeper.final(now)
            except Exception as exc:  # noqa: BLE001 - the guard's; the stop goes on
                server.guard.failed("shutdown state", exc)
            if not kept:  # the sessions end: a file of an earlier save must not bring them back
                server.guard.call("shutdown", server.node.close_all, "server shutting down")
                await discard_state(server, keeper)
        elif keeper is not None:  # nothing to keep: the host as it was found
            server.guard.call("shutdown", server.node.close_all, "server shutting down")
            await discard_state(server, keeper)
        else:
            server.guard.call("shutdown", server.node.close_all, "server shutting down")
        server.guard.call("shutdown dispatch", server.dispatch)
        if server.captures is not None:
            server.guard.call("shutdown captures", server.captures.close_all)
        await server.stop_serving()
        if queue is not None:
            loop.remove_reader(queue.fileno())
            queue.close()
        if copies is not None:
            loop.remove_reader(copies)
            os.close(copies)
        errors: list[str] = []
        if worker is not None:  # the parent owns the rules
            loop.remove_reader(worker.channel.fileno())
            worker.channel.close()
        elif not took_over:
            errors.append("it stopped before it took the saved state over: the state and the "
                          "rules stay for the next server")
        elif kept:
            # The NAT ports' rules stay (nobody reads the queue: the kernel drops, and the
            # remote ends retransmit to the next server), the ICMP ones go.
            try:
                rules.apply(firewall.server_rules(config.instance, config.queue,
                                                  config.nat_ports, icmp=False))
            except PvpnError as exc:
                errors.append(str(exc))
        else:
            errors = rules.remove_instance(config.instance)
        server.raw.close()
        server.log.write(Record(NODE_STOPPED, reason="; ".join(errors) or "clean", extra={
            "state": "saved: the sessions are kept for the next server" if kept else
                     "none kept: the sessions ended"}))


async def discard_state(server: Server, keeper: StateKeeper) -> None:
    try:
        await keeper.discard()
    except OSError as exc:
        server.guard.failed("shutdown state", exc)


def remove_sessions(config: ServerConfig, out: Callable[[str], None]) -> int:
    """`pvpn-server --config FILE --remove-sessions`: with pvpn-server stopped (for good, say),
    forget the sessions it kept for the next server (naming each) and the rules it left for
    their connections."""
    controls = [config.control, *(worker_path(config.control, i) for i in range(config.workers)
                                  if config.workers > 1)]
    running = [str(path) for path in controls if answers(path)]
    if running:
        out(f"pvpn-server is running (it answers on {', '.join(running)}); stop it first")
        return 1
    errors: list[str] = []
    paths = [] if config.state_file is None else [config.state_file, *(
        worker_path(config.state_file, i) for i in range(config.workers) if config.workers > 1)]
    for path in paths:
        store = StateFile(path)
        try:
            found = store.read()
            saved = None if found is None else decode_state(found[0])
        except StateError as exc:
            out(f"{path}: {exc}; removing it all the same")
            saved = None
        for session in saved.sessions if saved is not None else ():
            out(f"forgetting session {session.id.hex()} of {session.user} "
                f"({len(session.flows)} NAT mappings)")
        try:
            if store.remove():
                out(f"removed {path}")
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    errors += rules.remove_instance(config.instance)
    for error in errors:
        out(f"error: {error}")
    out(f"the rules of instance {config.instance} are gone; the next pvpn-server starts "
        "without sessions")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    return daemon_main(
        "pvpn-server", __doc__, load_server_config, serve, argv, remove_sessions,
        "with pvpn-server stopped: forget the sessions it kept for the next server "
        "([server] state_file) and the rules it left for them")


if __name__ == "__main__":
    raise SystemExit(main())
