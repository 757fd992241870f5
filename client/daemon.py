"""pvpn-client: the client host's packet interception (root).

Users' `pvpn connect` processes register over a unix socket; the kernel tells us their uid
(SO_PEERCRED). For each session we install owner-match rules feeding the session's own NFQUEUE,
hold the session's chain (its TLS sessions and the TCP connection to the first hop: pvpn.hosted,
pvpn.io.chainlink), write every queued packet straight into it, and deliver the replies
through the session's TUN device after anti-spoofing. The user's process is the session's
agent (like ssh-agent): it holds the user's key and signs each node's challenge when asked;
the VPN lives as long as it stays connected.

Stopping (SIGTERM) or restarting pvpn-client leaves every session's rules in the kernel: the
kernel drops their packets while nobody reads the queues, and the next pvpn-client picks them
up (held) until their users' tunnel processes register again. Protection ends only by the
user's `pvpn disconnect` (or their `pvpn connect` ending), root's `pvpn disconnect --all`, a
documented timeout, or `pvpn-client --config FILE --remove-sessions` on a host whose
pvpn-client is stopped.

The policy (what a queued packet or a reply becomes, the local control protocol, held
sessions, what a restart recovers, rules put back) is pvpn.nodes.client.ClientHost, sans-IO;
this program is its adapter: the sockets, NFQUEUE and TUN devices on the event loop, the
kernel's answers (iptables, sock_diag: pvpn.io.hostkernel; conntrack), and the commands the
host asks for."""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import pwd
import time
from typing import Any, Callable, Iterator

# Super-packets' checksums (pvpn.packet.chunk_sums, imported there when first used): a
# missing numpy fails the daemon at its start, not each super-packet later.
import numpy  # noqa: F401

from pvpn import firewall
from pvpn.commands import LogRecord
from pvpn.config import ClientConfig, load_client_config
from pvpn.drops import Drop
from pvpn.envelope import Envelope
from pvpn.errors import PvpnError
from pvpn.hosted import CloseHop, HostedTunnel, OpenHop, RetryIn
from pvpn.io import conntrack, hostkernel, localserver, rules, sockdiag
from pvpn.io.chainlink import HopConnections
from pvpn.io.hostkernel import ClientKernel, InstanceRules
from pvpn.io.localserver import LocalLink, ensure_socket_dir
from pvpn.io.loop import (
    WRITE_HIGH_WATER as WRITE_HIGH_WATER, Dispatcher, Guard, answers, daemon_main,
    install_signals, tick_until,
)
from pvpn.io.nfqueue import requeue_verdict
from pvpn.io.sessiondevices import SessionDevices
from pvpn.io.sockdiag import SocketOwners
from pvpn.io.tun import strict_rp_filter, vnet_header
from pvpn.names import NODE_RELOADED, NODE_STARTED, NODE_STOPPED, NODE_WARNING
from pvpn.nodes.client import (
    LOCAL_LOG_EVERY as LOCAL_LOG_EVERY, RECORD_EVERY as RECORD_EVERY, ClientHost, CloseLocal,
    Queued, SlotSession, WriteTun,
)
from pvpn.packet import segment_tcp
from pvpn.records import RecordWriter

TICK = 5.0
#: The held chains' timer (keepalives, dead nodes, hops that do not answer).
CHAIN_TICK = 1.0


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class ClientDaemon:
    """The adapter of one ClientHost: drives it from the event loop (local connections,
    queues, TUN copies, the timer) and carries out its commands (:meth:`run`); its questions
    to the kernel go to pvpn.io.hostkernel.ClientKernel."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.log = RecordWriter("client", config.name, clock=time.time)
        self.loop = asyncio.get_running_loop()
        # No exception a local user or a packet can cause ends pvpn-client: the guard logs it
        # (node:error, with the traceback) and closes only the connection concerned.
        self.guard: Guard = Guard(self.log.write, self._close_failed_link)
        self.rules = InstanceRules(config.instance, config.mark_mask)
        devices = SessionDevices(self.loop, self.guard, self.flush)
        self.queues, self.tun_fds = devices.queues, devices.tun_fds  # by slot
        self.vnet_fds = devices.vnet  # the TUN fds that take a virtio_net_hdr
        owners = SocketOwners()  # whose socket a reply would reach
        kernel = ClientKernel(self.rules, devices, owners, self._queue_callback)
        self.host: ClientHost[LocalLink] = ClientHost(config, owners, user_name, kernel)
        self.registry = self.host.registry
        self.link_ids: Iterator[int] = itertools.count(1)
        self.by_id: dict[int, LocalLink] = {}
        # The chains pvpn-client holds for its users' agents: their TCP connections.
        self.hops = HopConnections(self.loop, self.guard, self.host, self._after_chain,
                                   self._hold_queues)
        self.devices = devices
        # The host's bookkeeping, as the tests and the shutdown read it.
        self.local = self.host.local  # every admitted connection on the socket
        self._session_logged = self.host.session_logged

    def _close_failed_link(self, link_id: int, reason: str) -> None:
        link = self.by_id.get(link_id)
        if link is not None:
            link.close()

    def log_event(self, event: str, session: SlotSession | None = None, **kw: Any) -> None:
        # In turn with what the host asked for so far (its records among them).
        self.host.log(event, session, **kw)
        self.run()

    def run(self) -> None:
        """Carry out what the host asked for, in order."""
        self.dispatcher.run(self.host)

    @functools.cached_property
    def dispatcher(self) -> Dispatcher:
        dispatcher = Dispatcher(self.guard)
        dispatcher.on(LogRecord, lambda cmd: self.log.write(cmd.record))
        dispatcher.on(WriteTun, self._write_tun)
        dispatcher.on(CloseLocal, self._close_local)
        dispatcher.on(OpenHop, lambda cmd: self.hops.open(cmd.tunnel, cmd.host, cmd.port,
                                                           cmd.tunnel.uid))
        dispatcher.on(CloseHop, lambda cmd: self.hops.close(cmd.tunnel))
        dispatcher.on(RetryIn, lambda cmd: self.hops.retry_in(cmd.tunnel, cmd.delay))
        return dispatcher

    def _hold_queues(self, tunnel: HostedTunnel, held: bool) -> None:
        """A chain's writes wait above their high-water mark (or drained): its session's
        queues are not read meanwhile (SessionDevices.hold)."""
        link = self.host.links.get(tunnel.slot)
        if not held or (link is not None and link.tunnel is tunnel):
            self.devices.hold(tunnel.slot, held, tunnel)  # ended only by the chain that asked

    def _after_chain(self) -> None:
        self.run()
        self.flush()

    def _write_tun(self, cmd: WriteTun) -> None:
        try:
            fd = self.tun_fds[cmd.session.slot]
            if fd in self.vnet_fds:  # a super-packet whole, the kernel segments it
                os.writev(fd, (vnet_header(cmd.offload), cmd.packet))
            elif cmd.offload is not None:  # a device without the header: segments
                for segment in segment_tcp(cmd.packet, cmd.offload.gso_size or 0xFFFF):
                    os.write(fd, segment)
            else:
                os.write(fd, cmd.packet)
        except BlockingIOError:
            self.host.tun_refused(cmd, Drop.TUN_FULL, self.loop.time())
        except OSError:
            self.host.tun_refused(cmd, Drop.TUN_WRITE_FAILED, self.loop.time())

    @staticmethod
    def _close_local(cmd: CloseLocal) -> None:
        assert isinstance(cmd.peer, LocalLink)  # the host is given only these
        cmd.peer.close()

    # -- local connections: bounded per uid and in all (root is never refused)
    def admit(self, link: LocalLink) -> None:
        self.host.admit(link, self.loop.time())
        self.run()

    def local_record(self, event: str, link: LocalLink, session: SlotSession | None = None,
                     **kw: Any) -> None:
        self.host.local_record(event, link, self.loop.time(), session, **kw)
        self.run()

    # -- sessions
    def recover(self) -> None:
        """Pick up the sessions an earlier pvpn-client left in the kernel (ClientHost.recover)."""
        saved = self.rules.saved()
        try:
            self.host.recover(saved, self.loop.time())
        finally:
            self.run()

    # -- the packet path: queue -> user's process
    def _queue_callback(self, session: SlotSession) -> Callable[..., bool | int]:
        host, loop_time = self.host, self.loop.time
        # None: its queue has no F_GSO, so the host never asks to segment (True: dropped).
        segment = requeue_verdict(session.segmenting_queue) \
            if session.segmenting_queue >= 0 else True

        def on_packet(payload: bytes, info: int = 0) -> bool | int:
            # Always taken (dropped by the queue): it never leaves this host in clear; or
            # handed to the session's segmenting queue, which the kernel drops from if
            # nobody reads it.
            queued = host.queued(session, payload, loop_time(), info)
            if host.commands:
                self.run()
            return True if queued is Queued.TAKEN else segment

        return on_packet

    def flush(self) -> None:
        """After a batch: one write per chain (the queue's packets straight into it), then
        one per local connection."""
        host = self.host
        if host.dirty_tunnels:
            write = self.hops.write
            for tunnel in host.dirty_tunnels:
                write(tunnel)
            host.dirty_tunnels.clear()
        for link in host.dirty:
            link.flush()
        host.dirty.clear()

    # -- the packet path: user's process -> TUN
    def inject(self, link: LocalLink, packet: bytes) -> None:
        """A reply from a tunnel process: judged now, written with the rest of the read
        (the link calls :meth:`run` once per read)."""
        self.host.reply(link, packet, self.loop.time())

    # -- local control
    def local_control(self, link: LocalLink, envelope: Envelope) -> None:
        self.host.control(link, envelope, self.loop.time())
        self.run()
        if self.host.dirty_tunnels:  # a signature for a chain, say
            self.flush()

    def local_lost(self, link: LocalLink) -> None:
        self.host.lost(link, self.loop.time())
        self.run()

    def tick(self) -> None:
        now = self.loop.time()
        self.host.tick(now)
        self.run()

    def chain_tick(self) -> None:
        self.host.chain_timers(self.loop.time())
        self._after_chain()

    def shutdown(self, reason: str) -> None:
        """An orderly stop: the tunnel processes are let go and every session stays, rules and
        all (held): the kernel drops its packets until the next pvpn-client picks it up and the
        user's `pvpn connect` registers again."""
        self.host.shutdown(reason)
        self.run()

    # -- the kernel's rules, watched
    @property
    def rules_epoch(self) -> int:
        return self.rules.epoch

    def check_rules(self, saved: list[str], epoch: int) -> None:
        self.host.check_rules(saved, epoch)
        self.run()

    async def watch_rules(self, stop: asyncio.Event) -> None:
        await hostkernel.watch_rules(
            self.rules, stop, lambda: bool(self.registry.sessions),
            lambda saved, epoch: self.guard.call("rules check", self.check_rules, saved, epoch),
            lambda reason: self.log_event(NODE_WARNING, reason=reason))

    def release_host(self) -> list[str]:
        return self.host.release_host()


async def serve(config: ClientConfig) -> None:
    conntrack.check()  # ConfigError now, not when the first session ends
    sockdiag.check()  # ... not a silent "nobody's socket" for every reply
    daemon = ClientDaemon(config)
    loop = daemon.loop
    if strict_rp_filter():
        daemon.log_event(NODE_WARNING, reason="net.ipv4.conf.all.rp_filter=1 drops replies "
                         "arriving on TUN devices; set it to 0 or 2")
    warning = ensure_socket_dir(config.socket)
    if warning:
        daemon.log_event(NODE_WARNING, reason=warning)
    localserver.prepare_socket(config.socket)
    stop = asyncio.Event()
    listener: asyncio.AbstractServer | None = None
    daemon.guard.install(loop)
    try:
        daemon.recover()
        listener = await localserver.listen(config.socket, lambda: LocalLink(daemon))
        # pvpn-client holds no keys or user lists (the users' processes do): a SIGHUP only
        # says so in the log, instead of ending the daemon (the signal's default action).
        install_signals(loop, stop, lambda: daemon.log_event(
            NODE_RELOADED, reason="nothing to reload: keys live in the users' processes"))
        daemon.log_event(NODE_STARTED, socket=str(config.socket))
        watcher = loop.create_task(daemon.watch_rules(stop))
        chains = loop.create_task(tick_until(
            stop, CHAIN_TICK, lambda: daemon.guard.call("chain timer", daemon.chain_tick)))
        await tick_until(stop, TICK, lambda: daemon.guard.call("timer", daemon.tick))
        await watcher
        await chains
    finally:
        if listener is not None:
            listener.close()
        daemon.guard.call("shutdown", daemon.shutdown, "pvpn-client stopping")
        daemon.flush()
        daemon.hops.close_all()
        await asyncio.sleep(0.05)  # the links' ends are logged (session:held)
        errors = daemon.release_host()
        localserver.remove_socket(config.socket)
        daemon.log_event(NODE_STOPPED, reason="; ".join(errors) or "clean",
                         held=len(daemon.registry.sessions))


# ---------------------------------------------------------------- offline administration


def remove_sessions(config: ClientConfig, out: Callable[[str], None]) -> int:
    """`pvpn-client --config FILE --remove-sessions`: with pvpn-client stopped (a host being
    decommissioned, say), remove every session it left, naming each, and its marks."""
    if answers(config.socket):
        out(f"pvpn-client is running (it answers on {config.socket}); end sessions through it "
            "with `pvpn disconnect --all` as root, or stop it first")
        return 1
    installed, broken = firewall.parse_installed_sessions(
        config.instance, [rules.saved(4), rules.saved(6)])
    for s in installed:
        out(f"removing session {s.session_id.hex() or '(no id recorded)'} of "
            f"{user_name(s.uid)} (uid {s.uid}) in slot {s.slot}: "
            f"{', '.join(str(n) for n in s.networks)}")
    if broken:
        out(f"removing incomplete session chains: {', '.join(broken)}")
    errors = rules.remove_instance(config.instance)
    for s in installed:
        try:
            conntrack.forget_marked(s.mark, config.mark_mask)
        except PvpnError as exc:
            errors.append(str(exc))
    for error in errors:
        out(f"error: {error}")
    out(f"removed {len(installed)} session(s) of instance {config.instance}; their users' "
        "protected traffic now takes the normal route" if installed else
        f"no sessions of instance {config.instance} on this host; its rules are gone")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    return daemon_main(
        "pvpn-client", __doc__, load_client_config, serve, argv, remove_sessions,
        "with pvpn-client stopped: remove every session it left in the kernel (each is "
        "named), ending their protection", argparse.RawDescriptionHelpFormatter)


if __name__ == "__main__":
    raise SystemExit(main())
