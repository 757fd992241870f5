"""pvpn-client: the client host's packet interception (root).

Users' `pvpn connect` processes register over a unix socket; the kernel tells us their uid
(SO_PEERCRED). For each session we install owner-match rules feeding the session's own NFQUEUE,
hand every queued packet to that user's process (which holds the user's key and TLS session),
and deliver the replies it returns through the session's TUN device.

Stopping (SIGTERM) or restarting pvpn-client leaves every session's rules in the kernel: the
kernel drops their packets while nobody reads the queues, and the next pvpn-client picks them
up (held) until their users' tunnel processes register again. Protection ends only by the
user's `pvpn disconnect` (or their `pvpn connect` ending), root's `pvpn disconnect --all`, a
documented timeout, or `pvpn-client --config FILE --remove-sessions` on a host whose
pvpn-client is stopped.

The policy (what a queued packet or a reply becomes, the local control protocol, held
sessions) is pvpn.nodes.client.ClientHost, sans-IO; this program is its adapter: sockets,
NFQUEUE, TUN, iptables, conntrack and sock_diag, and the commands the host asks for."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import os
import pwd
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pvpn import firewall
from pvpn import packet as pk
from pvpn.config import ClientConfig, load_client_config
from pvpn.drops import Drop
from pvpn.envelope import Envelope, MsgType
from pvpn.errors import ConfigError, PvpnError, RemoteProtocolError
from pvpn.io import conntrack, rules, sockdiag
from pvpn.io.nfqueue import BatchedQueue
from pvpn.io.sockdiag import SocketOwners
from pvpn.io.loop import (
    EX_CONFIG, WRITE_HIGH_WATER, Guard, guarded, install_signals, peer_credentials,
    prepare_unix_socket, run_daemon,
)
from pvpn.io.tun import open_tun, read_copies, strict_rp_filter
from pvpn.fragments import Reassembler
from pvpn.commands import LogRecord
from pvpn.names import (
    LOCAL_ERROR, NODE_CLEANUP, NODE_RECOVER_FAILED, NODE_RELOADED, NODE_STARTED, NODE_STOPPED,
    NODE_WARNING, SESSION_CONNECTIONS_RESET, SESSION_RECOVERED, SLOT_QUARANTINED,
)
from pvpn.records import RecordWriter
from pvpn.reset import tcp_probe
from pvpn.nodes.client import (
    LOCAL_LOG_EVERY as LOCAL_LOG_EVERY, RECORD_EVERY as RECORD_EVERY, ClientHost, CloseLocal, LocalPeer, SlotSession, WriteTun,
)
from pvpn.text import clip

TICK = 5.0
#: A session's TCP connections are probed (reset_connections) at most this often (seconds):
#: a round costs a sock_diag question per flow, up to max_flows_per_session of them.
PROBE_EVERY = 30.0
#: How often the kernel's rules are compared with the sessions held (seconds): someone else's
#: firewall reload or `iptables -t mangle -F` takes them away; they are put back within this.
RULES_CHECK_EVERY = 5.0


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class LocalLink(LocalPeer, asyncio.Protocol):
    """One `pvpn connect` (or `pvpn status`/`disconnect`) process on the unix socket."""

    def __init__(self, daemon: "ClientDaemon") -> None:
        super().__init__(next(daemon.link_ids))
        self.daemon = daemon
        self.guard = daemon.guard
        self.transport: asyncio.Transport | None = None

    # -- asyncio; what escapes a callback goes to the guard, which closes this connection only
    @property
    def guard_link(self) -> int:
        return self.id

    @guarded("local connection_made")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.daemon.by_id[self.id] = self
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.pid, self.uid, _ = peer_credentials(transport)
        self.last_active = self.daemon.loop.time()
        self.daemon.admit(self)

    @guarded("local pause_writing")
    def pause_writing(self) -> None:
        self.congested = True

    @guarded("local resume_writing")
    def resume_writing(self) -> None:
        self.congested = False

    @guarded("local data_received")
    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        self.last_active = self.daemon.loop.time()
        try:
            for envelope in self.channel.receive(data):
                if envelope.type is MsgType.PACKET:
                    self.daemon.inject(self, envelope.body)
                else:
                    self.daemon.local_control(self, envelope)
                    self.flush()  # so the next question sees whether this answer is read
        except RemoteProtocolError as exc:
            self.daemon.local_record(LOCAL_ERROR, self, self.session,
                                     reason=clip(f"{type(exc).__name__}: {exc}"))
            self.close()
        self.flush()

    @guarded("local connection_lost")
    def connection_lost(self, exc: Exception | None) -> None:
        self.daemon.by_id.pop(self.id, None)
        self.daemon.local_lost(self)

    # -- output
    def flush(self) -> None:
        if self.pending and self.transport is not None:
            self.transport.write(b"".join(self.pending))
            self.pending.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()


class ClientDaemon:
    """The adapter of one ClientHost: drives it from the event loop (local connections,
    queues, TUN copies, the timer), carries out its commands (:meth:`run`) and answers its
    questions to the kernel (the HostKernel methods: install, uninstall, attach_devices,
    has_devices, slot_usable, abort_connections, forget_marks, write_id,
    reset_connections)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.log = RecordWriter("client", config.name, clock=time.time)
        self.loop = asyncio.get_running_loop()
        self.owners = SocketOwners()  # whose socket a reply would reach
        self.host: ClientHost[LocalLink] = ClientHost(config, self.owners, user_name, self)
        self.registry = self.host.registry
        # No exception a local user or a packet can cause ends pvpn-client: the guard logs it
        # (node:error, with the traceback) and closes only the connection concerned.
        self.guard = Guard(self.log.write, self._close_failed_link)
        self.link_ids = itertools.count(1)
        self.by_id: dict[int, LocalLink] = {}
        # Bumped by every change pvpn-client makes to its rules: a check of the kernel's
        # rules that began before a change is not acted on (it would "repair" that change).
        self.rules_epoch = 0
        self.queues: dict[int, BatchedQueue] = {}
        self.tun_fds: dict[int, int] = {}
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
        commands, self.host.commands = self.host.commands, []
        for cmd in commands:
            if type(cmd) is LogRecord:
                self.log.write(cmd.record)
            elif type(cmd) is WriteTun:
                try:
                    os.write(self.tun_fds[cmd.session.slot], cmd.packet)
                except BlockingIOError:
                    self.host.tun_refused(cmd, Drop.TUN_FULL, self.loop.time())
                except OSError:
                    self.host.tun_refused(cmd, Drop.TUN_WRITE_FAILED, self.loop.time())
            elif type(cmd) is CloseLocal:
                assert isinstance(cmd.peer, LocalLink)  # the host is given only these
                cmd.peer.close()
            else:
                raise TypeError(f"pvpn-client cannot carry out {type(cmd).__name__}")
        if self.host.commands:  # a refused write's drop record
            self.run()

    # -- local connections: bounded per uid and in all (root is never refused)
    def admit(self, link: LocalLink) -> None:
        self.host.admit(link, self.loop.time())
        self.run()

    def local_record(self, event: str, link: LocalLink, session: SlotSession | None = None,
                     **kw: Any) -> None:
        self.host.local_record(event, link, self.loop.time(), session, **kw)
        self.run()

    # -- sessions
    def install(self, session: SlotSession) -> None:
        """TUN device, queue, then rules: the rules go in last, fully formed, in one step."""
        self.attach_devices(session)
        self.rules_epoch += 1
        rules.apply(firewall.client_session(
            self.config.instance, session.slot, session.uid, session.networks, session.queue,
            session.mark, self.config.mark_mask, session.tun))

    def attach_devices(self, session: SlotSession) -> None:
        fd = open_tun(session.tun)
        self.tun_fds[session.slot] = fd
        take = self._queue_callback(session)
        try:
            queue = BatchedQueue(session.queue, take, max_len=4096)
        except OSError as exc:  # the queue is bound by someone else, say
            os.close(self.tun_fds.pop(session.slot))
            raise PvpnError(f"cannot bind NFQUEUE {session.queue}: {exc}") from None
        except BaseException:
            os.close(self.tun_fds.pop(session.slot))
            raise
        self.queues[session.slot] = queue

        def drain() -> None:
            # A packet whose handling failed is dropped (fail closed), the rest go on.
            self.guard.call("queue drain", queue.drain)
            self.guard.call("flush", self.flush)

        self.loop.add_reader(queue.fileno(), drain)
        copies = Reassembler()

        def read_big() -> None:
            # The session's datagrams too large for a queue message: the kernel's copies,
            # out of its TUN device (firewall.tee), handled as the queue's packets are.
            self.guard.call("tun copies", self._take_copies, fd, copies, take)
            self.guard.call("flush", self.flush)

        self.loop.add_reader(fd, read_big)

    def _take_copies(self, fd: int, copies: Reassembler, take: Callable[[bytes], bool]) -> None:
        # The kernel's copy carries DF (nf_dup_ipv4 sets it); its sender set none.
        for datagram in read_copies(fd, copies, self.loop.time(), 0, True):
            take(datagram)

    def recover(self) -> None:
        """Pick up what an earlier pvpn-client left (stopped, killed or an older version): its
        sessions' rules stayed in the kernel (protection never lapsed, the kernel dropped their
        packets); bind their queues and TUN devices again and hold them until their users'
        tunnel processes come back. Jumps of the older format are converted in place."""
        instance = self.config.instance
        p = firewall.chain_prefix(instance)
        self.rules_epoch += 1
        texts = [rules.saved(4), rules.saved(6)]
        installed, broken = firewall.parse_installed_sessions(instance, texts)
        missing = [f":{p}-OUT " not in text or f":{p}-IN " not in text for text in texts]
        if any(missing) and not installed:  # a first start, or a half-made one
            rules.remove_instance(instance)
            rules.apply(firewall.client_base(instance))
            return
        if any(missing):
            # Someone removed one family's chains (a firewall reload, say): they are put back
            # there first (the sessions' jumps are repaired into them below), and nothing of
            # what the other family still holds goes.
            base = firewall.client_base(instance)
            rules.apply(firewall.RuleSet(base.v4 if missing[0] else "",
                                         base.v6 if missing[1] else ""))
            self.log_event(NODE_WARNING, reason="the instance's hook chains were missing in "
                           + " and ".join(f for f, m in zip(("IPv4", "IPv6"), missing) if m)
                           + "; put back")
        now = self.loop.time()
        for found in installed:
            # A session whose rules predate the record of its id (legacy) may have been up:
            # it is held as long as one that was.
            session = self.registry.adopt(
                found.slot, found.uid, user_name(found.uid), found.networks, found.queue,
                found.mark, found.tun, now, session_id=found.session_id,
                ever_up=bool(found.session_id) or found.legacy)
            try:
                self.attach_devices(session)
            except PvpnError as exc:
                # Its rules stay: with nobody reading its queue the kernel drops its packets.
                # Ending it here would let them out in clear though nobody said stop; its
                # devices are tried again when its user's tunnel process registers.
                self.log_event(NODE_RECOVER_FAILED, session, reason=f"{exc}; held, its rules "
                               "kept; tried again when its tunnel process registers")
            repair = firewall.client_jumps_repair(instance, found, self.config.mark_mask)
            if repair is not None:
                try:
                    rules.apply(repair)
                except PvpnError as exc:  # the jumps found still feed the queue
                    self.log_event(NODE_WARNING, session, reason=f"jumps not converted: {exc}")
            self.log_event(SESSION_RECOVERED, session, reason="rules kept across a restart; "
                           "held until the user's tunnel process registers again",
                           prefixes=[str(n) for n in found.networks],
                           converted="legacy" if found.legacy else bool(repair))
        if broken:
            self.log_event(NODE_CLEANUP, reason="incomplete session rules removed",
                           chains=broken)
            rules.remove_chains(broken, f"{p}-OUT")
            rules.remove_chains(broken, f"{p}-IN")
        rules.ensure_jump("OUTPUT", f"{p}-OUT")
        rules.ensure_jump("PREROUTING", f"{p}-IN")
        # Rules made before datagrams of any size lack it: no user's socket may send out of
        # a session's TUN device, which pvpn-client now reads.
        rules.ensure_rule(firewall.tun_guard(f"{p}-OUT", f"{instance}+"))

    def uninstall(self, session: SlotSession) -> list[str]:
        p = firewall.chain_prefix(self.config.instance)
        self.rules_epoch += 1
        errors = rules.remove(firewall.client_session_removal(
            self.config.instance, session.slot, session.uid, session.mark,
            self.config.mark_mask, session.tun))
        if errors:  # a jump of another shape (say, one an older version left): find them all
            chains = list(firewall.session_chains(self.config.instance, session.slot))
            errors = rules.remove_chains(chains, f"{p}-OUT") + rules.remove_chains(
                chains, f"{p}-IN")
        queue = self.queues.pop(session.slot, None)
        if queue is not None:
            self.loop.remove_reader(queue.fileno())
            queue.close()
        fd = self.tun_fds.pop(session.slot, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)
        return errors

    def end_session(self, session: SlotSession, reason: str) -> None:
        self.host.end_session(session, reason)
        self.run()

    def forget_marks(self, session: SlotSession) -> int | str:
        """The marks the session's connections carry are forgotten (conntrack)."""
        try:
            return conntrack.forget_marked(session.mark, self.config.mark_mask)
        except PvpnError as exc:  # the slot is checked again before it is given out
            return f"failed: {exc}"

    def has_devices(self, session: SlotSession) -> bool:
        return session.slot in self.queues

    def abort_connections(self, session: SlotSession) -> int | str:
        """The session ends (revoked, expired, disconnected, its VPN over): its TCP
        connections went through a tunnel that is gone, by addresses the server gave them, and
        cannot go on. Where there is no other route they would wait in silence for data that
        never comes; each connection of the session's user is aborted instead (SOCK_DESTROY,
        by the cookie that names exactly that socket), so the application's next call fails
        with ECONNABORTED. This runs while the session's rules still hold: the reset the
        kernel sends as it aborts goes into the session's queue, never out in clear. Listeners
        and other users' sockets on the same ports are left alone."""
        aborted = 0
        for flow in [f for f in session.flows if f.proto == pk.PROTO_TCP]:
            try:
                found = self.owners.find(flow)
                if found.uid != session.uid or found.state not in sockdiag.TCP_CONNECTION:
                    continue
                self.owners.abort(flow, found.cookie)
            except PvpnError as exc:
                return f"failed after {aborted}: {exc}"
            aborted += 1
        return aborted

    def slot_usable(self, slot: int) -> bool:
        """Whether no connection carries the slot's mark any more (asked before the slot goes
        to a new session). Marks left behind (a failed clean-up, a crash in between) are
        forgotten and asked again; a slot that still has some is skipped (quarantined)."""
        mark, mask = self.registry.mark_for(slot), self.config.mark_mask
        try:
            if conntrack.count_marked(mark, mask) == 0:
                return True
            conntrack.forget_marked(mark, mask)
            left = conntrack.count_marked(mark, mask)
        except PvpnError as exc:
            self.log_event(SLOT_QUARANTINED, slot=slot, reason=f"cannot ask conntrack: {exc}")
            return False
        if left:
            self.log_event(SLOT_QUARANTINED, slot=slot, connections=left,
                           reason="connections of its last holder still carry its mark")
        return left == 0

    # -- the packet path: queue -> user's process
    def _queue_callback(self, session: SlotSession) -> Callable[[bytes], bool]:
        host, loop_time = self.host, self.loop.time

        def on_packet(payload: bytes) -> bool:
            # Always taken (dropped by the queue): it never leaves this host in clear.
            host.queued(session, payload, loop_time())
            if host.commands:
                self.run()
            return True

        return on_packet

    def flush(self) -> None:
        for link in self.host.dirty:
            link.flush()
        self.host.dirty.clear()

    # -- the packet path: user's process -> TUN
    def inject(self, link: LocalLink, packet: bytes) -> None:
        self.host.reply(link, packet, self.loop.time())
        self.run()

    # -- local control
    def local_control(self, link: LocalLink, envelope: Envelope) -> None:
        self.host.control(link, envelope, self.loop.time())
        self.run()

    def reset_connections(self, session: SlotSession) -> None:
        """The server's session is a new one: none of its NAT mappings carried this session's
        TCP connections, and those wait for data that will never come (a download sends
        nothing by itself), until the application gives up. Each connected socket of the
        session's user gets a probe written to the TUN device as if from its remote end
        (pvpn.reset.tcp_probe); it answers with a challenge ACK, which goes through the new
        session to the server, which has no mapping for it and answers with a reset: the
        application's connection fails within a round trip, explicitly. Only sockets of the
        session's user in a synchronized state are probed (a connecting one would take the
        SYN for a simultaneous open), at most once per PROBE_EVERY."""
        now = self.loop.time()
        fd = self.tun_fds.get(session.slot)
        if fd is None or now - session.probed_at < PROBE_EVERY:
            return
        session.probed_at = now
        probed = 0
        for flow in [f for f in session.flows if f.proto == pk.PROTO_TCP]:
            try:
                uid, state = self.owners.socket(flow)
            except PvpnError:
                continue
            if uid != session.uid or state not in sockdiag.TCP_SYNCHRONIZED:
                continue
            try:
                os.write(fd, tcp_probe(flow, int.from_bytes(os.urandom(4), "big")))
            except OSError:
                break
            probed += 1
        if probed:
            self.log_event(SESSION_CONNECTIONS_RESET, session, count=probed,
                           reason="the server's session is a new one: its TCP connections "
                                  "are made to answer, and the server resets them")

    def write_id(self, session: SlotSession) -> str | None:
        """Write the session's id into its rules (a restarted pvpn-client reads it); why not."""
        self.rules_epoch += 1
        try:
            rules.apply(firewall.client_session_attached(
                self.config.instance, session.slot, session.mark, self.config.mark_mask,
                session.session_id))
        except PvpnError as exc:
            return str(exc)
        return None

    def local_lost(self, link: LocalLink) -> None:
        self.host.lost(link, self.loop.time())
        self.run()

    def tick(self) -> None:
        now = self.loop.time()
        self.host.tick(now)
        self.run()

    def shutdown(self, reason: str) -> None:
        """An orderly stop: the tunnel processes are let go and every session stays, rules and
        all (held): the kernel drops its packets until the next pvpn-client picks it up and the
        user's `pvpn connect` registers again."""
        self.host.shutdown(reason)
        self.run()

    # -- the kernel's rules, watched
    def held_rules(self) -> list[firewall.InstalledSession]:
        """Every session's rules as pvpn-client installs them (what the kernel must hold)."""
        return [firewall.InstalledSession(s.slot, s.uid, list(s.networks), s.queue, s.mark,
                                          s.tun, s.recorded)
                for s in self.registry.sessions.values()]

    def check_rules(self, saved: list[str], epoch: int) -> None:
        """Put back what someone else took from the sessions' rules (a firewall reload, a
        flush of the mangle table): ``saved`` is iptables-save of each family, taken while
        the rules were at ``epoch``. Until then the session's packets went the normal route,
        so this is logged as a warning naming what was missing."""
        if epoch != self.rules_epoch:
            return  # pvpn-client changed them since: the next check looks again
        instance, mask = self.config.instance, self.config.mark_mask
        found = firewall.check_rules(instance, saved, self.held_rules(), mask)
        if not found:
            return
        self.rules_epoch += 1
        p = firewall.chain_prefix(instance)
        base = firewall.client_base(instance)
        for version in found.unbased:
            # Chains and hooks of this family anew (nothing of it is left to flush).
            rules.apply(firewall.RuleSet(base.v4 if version == 4 else "",
                                         base.v6 if version == 6 else ""))
        if found.unhooked:
            rules.ensure_jump("OUTPUT", f"{p}-OUT")
            rules.ensure_jump("PREROUTING", f"{p}-IN")
        repaired = []
        for version, slots in found.broken.items():
            for slot in slots:
                session = self.registry.sessions[slot]
                # What is left of the session in this family goes, then it is whole again.
                rules.run_each(firewall.client_session_removal(
                    instance, slot, session.uid, session.mark, mask, session.tun), (version,))
                whole = firewall.client_session(instance, slot, session.uid, session.networks,
                                                session.queue, session.mark, mask, session.tun,
                                                session.recorded)
                rules.apply(firewall.RuleSet(whole.v4 if version == 4 else "",
                                             whole.v6 if version == 6 else ""))
                repaired.append(f"slot {slot} (IPv{version})")
        self.log_event(NODE_WARNING, reason="rules of pvpn-client were removed by someone "
                       "else (a firewall reload?) and are put back; until now the protected "
                       "traffic of these sessions took the normal route",
                       families_without_chains=found.unbased or None,
                       families_unhooked=found.unhooked or None,
                       sessions=repaired or None)

    async def watch_rules(self, stop: asyncio.Event) -> None:
        """Every RULES_CHECK_EVERY seconds: the kernel's rules against the sessions held.
        iptables-save runs in a thread of its own, so the packet path does not wait for it;
        the thread is made at once and lives as long as the daemon (one, whatever happens)."""
        reader = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="rules")
        reader.submit(lambda: None).result()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=RULES_CHECK_EVERY)
                    return
                except asyncio.TimeoutError:
                    pass
                if not self.registry.sessions:
                    continue
                epoch = self.rules_epoch
                try:
                    saved = await self.loop.run_in_executor(reader, _saved_rules)
                except (PvpnError, OSError, subprocess.SubprocessError) as exc:
                    self.log_event(NODE_WARNING, reason=f"cannot read the rules: {exc}")
                    continue
                self.guard.call("rules check", self.check_rules, saved, epoch)
        finally:
            reader.shutdown(wait=False)

    def release_host(self) -> list[str]:
        """After the stop: with no session left the instance's rules go (the host is left as
        found); with sessions, everything stays for the next pvpn-client."""
        if self.registry.sessions:
            return []
        return rules.remove_instance(self.config.instance)


def _saved_rules() -> list[str]:
    return [rules.saved(4), rules.saved(6)]


def unsafe_directory(directory: Path) -> str | None:
    """Why ``directory`` (an existing one), or one above it, may be changed by someone other
    than root, or None. A sticky directory (/tmp) is safe: nobody renames what root made in it.
    As OpenSSH's StrictModes (``safe_path``), on the real path."""
    real = directory.resolve()
    for d in (real, *real.parents):
        st = d.stat()
        if st.st_uid != 0:
            return f"{d} is owned by uid {st.st_uid}, not root"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{d} is writable by other users"
    return None


def ensure_socket_dir(path: Path) -> str | None:
    """The socket's directory, made if missing (0711: every user reaches the socket by name,
    nobody lists the directory). A warning if an existing one is not traversable by users.

    ConfigError if the directory, or one above it, is not root's alone: pvpn-client makes the
    socket 0666 with chmod, which follows symlinks, so whoever may change the directory could
    swap the new socket for a link to /etc/shadow between bind and chmod."""
    parent = path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    unsafe = unsafe_directory(existing)
    if unsafe is not None:
        raise ConfigError(f"{unsafe}; whoever may change it could swap {path.name} for a "
                          "symlink that pvpn-client would make 0666: give [client] socket a "
                          "directory that only root may change (/run/pvpn, 0711)")
    if existing != parent:
        made = [d for d in (parent, *parent.parents) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        for d in made:
            os.chmod(d, 0o711)  # explicit: supervisord's umask 077 would make them 0700
        return None
    if not parent.stat().st_mode & 0o001:
        return (f"{parent} is not traversable by other users, so they cannot reach "
                f"{path.name}; chmod o+x {parent} (0711)")
    return None


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
    prepare_unix_socket(
        config.socket,
        f"{config.socket} exists and is not a socket; remove it or change [client] socket",
        f"another pvpn-client already listens on {config.socket}")
    stop = asyncio.Event()
    listener: asyncio.AbstractServer | None = None
    daemon.guard.install(loop)
    try:
        daemon.recover()
        listener = await loop.create_unix_server(lambda: LocalLink(daemon), str(config.socket))
        os.chmod(config.socket, 0o666)  # anyone may ask; the kernel tells us who asked
        # pvpn-client holds no keys or user lists (the users' processes do): a SIGHUP only
        # says so in the log, instead of ending the daemon (the signal's default action).
        install_signals(loop, stop, lambda: daemon.log_event(
            NODE_RELOADED, reason="nothing to reload: keys live in the users' processes"))
        daemon.log_event(NODE_STARTED, socket=str(config.socket))
        watcher = loop.create_task(daemon.watch_rules(stop))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=TICK)
            except asyncio.TimeoutError:
                pass
            daemon.guard.call("timer", daemon.tick)
        await watcher
    finally:
        if listener is not None:
            listener.close()
        daemon.guard.call("shutdown", daemon.shutdown, "pvpn-client stopping")
        await asyncio.sleep(0.05)  # the links' ends are logged (session:held)
        errors = daemon.release_host()
        try:
            config.socket.unlink()
        except FileNotFoundError:
            pass
        daemon.log_event(NODE_STOPPED, reason="; ".join(errors) or "clean",
                         held=len(daemon.registry.sessions))


# ---------------------------------------------------------------- offline administration


def remove_sessions(config: ClientConfig, out: Callable[[str], None]) -> int:
    """`pvpn-client --config FILE --remove-sessions`: with pvpn-client stopped (a host being
    decommissioned, say), remove every session it left, naming each, and its marks."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(config.socket))
    except OSError:
        pass
    else:
        out(f"pvpn-client is running (it answers on {config.socket}); end sessions through it "
            "with `pvpn disconnect --all` as root, or stop it first")
        return 1
    finally:
        probe.close()
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
    parser = argparse.ArgumentParser(prog="pvpn-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the node's TOML config")
    parser.add_argument("--remove-sessions", action="store_true",
                        help="with pvpn-client stopped: remove every session it left in the "
                        "kernel (each is named), ending their protection")
    args = parser.parse_args(argv)
    if args.remove_sessions:
        try:
            return remove_sessions(load_client_config(args.config), print)
        except ConfigError as exc:
            print(f"pvpn-client: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
        except PvpnError as exc:
            print(f"pvpn-client: {exc}", file=sys.stderr)
            return 1

    async def run() -> None:
        await serve(load_client_config(args.config))

    return run_daemon("pvpn-client", run)


if __name__ == "__main__":
    raise SystemExit(main())
