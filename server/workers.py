"""pvpn-server with ``[server] workers = N`` (N > 1): the parent that supervisord runs, and
what a worker needs from it (docs/design.md "Server workers").

The parent is the one place that owns the host's share of the server: it installs the NAT
ports' rules (each worker's slice to its queue, pvpn.firewall.server_worker_rules), makes the
listening sockets (SO_REUSEPORT, one group per listen address, worker ``i``'s socket the
``i``-th of each group), starts the workers (``python -m pvpn.server.daemon`` with the config,
their number and sockets in PVPN_SERVER_WORKER), starts again one that dies (its socket, kept
open here, holds its connections meanwhile), forwards SIGHUP, and on SIGTERM stops them and
leaves the host as the one-process server does. It also keeps the program that routes a
source address's next connection to a named worker, for a resume that reached another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from pvpn import firewall, workers
from pvpn.config import ServerConfig
from pvpn.errors import ConfigError, PvpnError
from pvpn.io import rules
from pvpn.io.loop import LISTEN_BACKLOG
from pvpn.names import NODE_CLEANUP, NODE_ERROR, NODE_STARTED, NODE_STOPPED, NODE_WARNING
from pvpn.records import Record, RecordWriter

ENV = "PVPN_SERVER_WORKER"
STOP_WAIT = 12.0  # for the workers' last saves after SIGTERM (supervisord waits 15 s)


# ---------------------------------------------------------------- the worker's side

@dataclass(slots=True)
class WorkerHandle:
    """What a worker process was given: its number, the channel to the parent, its
    listening sockets."""

    index: int
    channel: socket.socket
    sockets: list[socket.socket]


def this_worker() -> WorkerHandle | None:
    """The worker this process is (PVPN_SERVER_WORKER, set by the parent), or None."""
    text = os.environ.pop(ENV, "")
    if not text:
        return None
    try:
        index, channel, fds = text.split(";")
        return WorkerHandle(int(index), socket.socket(fileno=int(channel)),
                            [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd])
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{ENV}={text!r} is not what pvpn-server's parent sets: {exc}") \
            from None


def ask_redirect(channel: socket.socket, link: int, address: str, worker: int) -> None:
    """Ask the parent to route ``address``'s next connection to ``worker``; the answer (the
    link's id) comes back on the channel."""
    with contextlib.suppress(OSError):  # the parent is gone: the link closes all the same
        channel.send(f"R {link} {worker} {address}".encode())


def say_serving(channel: socket.socket) -> None:
    """Tell the parent this worker serves: from now on it takes a SIGHUP (until then the
    signal's default action would end it, so the parent holds a reload for it)."""
    with contextlib.suppress(OSError):
        channel.send(b"S")


def read_answers(channel: socket.socket) -> list[int]:
    """The links whose redirect the parent has put in place."""
    done: list[int] = []
    for _ in range(64):
        try:
            data = channel.recv(256)
        except (BlockingIOError, InterruptedError):
            break
        if not data:
            break
        with contextlib.suppress(ValueError):
            done.append(int(data.split()[1]))
    return done


# ---------------------------------------------------------------- the parent

def listening_groups(config: ServerConfig) -> list[list[socket.socket]]:
    """For each listen address, ``config.workers`` sockets in one SO_REUSEPORT group, listened
    on in worker order (the group's index of a socket is its worker's number)."""
    groups: list[list[socket.socket]] = []
    try:
        for host, port in config.listen:
            for family, kind, proto, _, address in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                group: list[socket.socket] = []
                groups.append(group)
                for _ in range(config.workers):
                    sock = socket.socket(family, kind, proto)
                    group.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
                    sock.listen(LISTEN_BACKLOG)
                    sock.set_inheritable(True)
    except OSError as exc:
        for group in groups:
            for sock in group:
                sock.close()
        raise PvpnError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
    return groups


def attach_program(groups: list[list[socket.socket]], redirects: list[tuple[str, int]]) -> None:
    """Give every listening group the program routing ``redirects`` (SO_ATTACH_REUSEPORT_CBPF
    on one socket of the group sets the group's)."""
    code = workers.encode_program(workers.redirect_program(redirects))
    count = len(code) // 8
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.c_buffer(16)
    ctypes.memmove(fprog, count.to_bytes(2, sys.byteorder), 2)
    ctypes.memmove(ctypes.addressof(fprog) + 8,
                   ctypes.addressof(buffer).to_bytes(8, sys.byteorder), 8)
    for group in groups:
        group[0].setsockopt(socket.SOL_SOCKET, workers.SO_ATTACH_REUSEPORT_CBPF, fprog.raw)


def _die_with_parent() -> None:
    """In the worker, before it runs: SIGKILL when the parent dies (the parent killed with
    SIGKILL: its workers go as a one-process server would, and a new parent's sockets never
    share a listening group with old workers')."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


@dataclass(slots=True)
class Worker:
    index: int
    channel: socket.socket  # the parent's end
    child: socket.socket  # the worker's end (inherited)
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    failed_starts: int = 0  # in a row (pvpn.workers.after_end)
    ever_served: bool = False  # it said it serves once at least, since the parent started
    serving: bool = False  # it said so (say_serving): it takes a SIGHUP
    reload_held: bool = False  # a SIGHUP came while it started: sent once it serves


@dataclass(slots=True)
class Parent:
    config: ServerConfig
    log: RecordWriter
    groups: list[list[socket.socket]]
    workers: list[Worker] = field(default_factory=list)
    redirects: dict[str, tuple[int, float]] = field(default_factory=dict)
    stopping: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str = ""  # why the parent gave up (a worker that cannot start)

    def rule_set(self, icmp: bool = True) -> firewall.RuleSet:
        config = self.config
        slices = workers.port_slices(config.nat_ports, config.workers)
        return firewall.server_worker_rules(
            config.instance, [(config.queue + i, s) for i, s in enumerate(slices)], icmp)

    async def start(self, worker: Worker) -> None:
        fds = ",".join(str(group[worker.index].fileno()) for group in self.groups)
        # PYTHONSAFEPATH (-P): started in a directory that holds a pvpn/ (a source
        # checkout), `python -m` imported that one and no worker could start. The parent's
        # directory is kept: relative paths in the config mean what they meant to it.
        env = {**os.environ, ENV: f"{worker.index};{worker.child.fileno()};{fds}",
               "PYTHONSAFEPATH": "1"}
        passed = [worker.child.fileno(), *(group[worker.index].fileno() for group in self.groups)]
        worker.serving = worker.reload_held = False  # it reads the config as it starts
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvpn.server.daemon", "--config", str(self.config.path),
            env=env, pass_fds=passed, stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
        worker.started = time.monotonic()

    async def watch(self, worker: Worker) -> None:
        """Start the worker again whenever it ends, until the parent stops."""
        while not self.stopping:
            process = worker.process
            if process is None:
                return
            status = await process.wait()
            if self.stopping:
                return
            served = worker.serving
            worker.ever_served = worker.ever_served or served
            worker.failed_starts, delay = workers.after_end(
                worker.failed_starts, served, worker.ever_served)
            if delay is None:
                self.failure = (f"worker {worker.index} ended {worker.failed_starts} times in "
                                "a row before it served (last status "
                                f"{status}): its output says why; the server stops")
                self.log.write(Record(NODE_ERROR, reason=self.failure,
                                      extra={"worker": worker.index}))
                self.stop.set()
                return
            worker.restarts += 1
            self.log.write(Record(
                NODE_WARNING if served else NODE_ERROR,
                reason=f"worker {worker.index} ended (status {status})"
                + ("" if served else " before it served") + "; starting it again in "
                f"{delay:g} s", extra={"worker": worker.index, "restarts": worker.restarts}))
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - worker.started)))
            if not self.stopping:
                await self.start(worker)

    def answer(self, worker: Worker) -> None:
        """A worker's requests: ``R LINK WORKER ADDRESS`` (route ADDRESS's next connection)."""
        for _ in range(64):
            try:
                data = worker.channel.recv(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            if data == b"S":
                worker.serving = True
                if worker.reload_held:
                    worker.reload_held = False
                    send_signal(worker, signal.SIGHUP)
                continue
            try:
                kind, link_text, target_text, address = data.decode().split()
                link, target = int(link_text), int(target_text)
                if kind != "R" or not 0 <= target < self.config.workers:
                    raise ValueError(kind)
                text = str(ipaddress.ip_address(address))
            except ValueError:
                continue
            self.redirects.pop(text, None)
            self.redirects[text] = (target, time.monotonic() + workers.REDIRECT_TTL)
            while len(self.redirects) > workers.MAX_REDIRECTS:
                self.redirects.pop(next(iter(self.redirects)))
            self.reprogram()
            with contextlib.suppress(OSError):
                worker.channel.send(f"A {link}".encode())

    def expire(self) -> None:
        now = time.monotonic()
        gone = [a for a, (_, until) in self.redirects.items() if until < now]
        for address in gone:
            del self.redirects[address]
        if gone:
            self.reprogram()

    def reprogram(self) -> None:
        try:
            attach_program(self.groups, [(a, w) for a, (w, _) in self.redirects.items()])
        except OSError as exc:
            self.log.write(Record(NODE_WARNING, reason="cannot route resumes to their "
                                  f"workers: {exc.strerror or exc}"))


async def supervise(config: ServerConfig) -> None:
    """The parent of ``config.workers`` workers, until SIGTERM or SIGINT."""
    log = RecordWriter("server", config.name, clock=time.time)
    loop = asyncio.get_running_loop()
    groups = listening_groups(config)
    parent = Parent(config, log, groups)
    stop = parent.stop
    tasks: list[asyncio.Task[None]] = []
    # First of all: a SIGTERM while the workers start (supervisord stopping a parent it has
    # just restarted) must end in the clean-up below, not in Python's default exit, which
    # left every rule behind.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A SIGHUP goes to the workers that serve, and to the others once they do (its default
    # action ended the parent, rules and all, or a worker still importing).
    loop.add_signal_handler(signal.SIGHUP, lambda: forward_reload(parent))
    try:
        # The one-process server's rules (instance chain) are replaced in place, atomically.
        rules.apply(parent.rule_set())
        stale = rules.ensure_only_jumps(config.instance, firewall.server_jumps(config.instance))
        if stale:
            log.write(Record(NODE_CLEANUP, reason="rules left by an earlier run",
                             extra={"rules": stale}))
        for index in range(config.workers):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            mine.setblocking(False)
            theirs.set_inheritable(True)
            worker = Worker(index, mine, theirs)
            parent.workers.append(worker)
            loop.add_reader(mine.fileno(), parent.answer, worker)
        for worker in parent.workers:
            await parent.start(worker)
            tasks.append(loop.create_task(parent.watch(worker)))
        log.write(Record(NODE_STARTED, extra={
            "listen": [f"{h}:{p}" for h, p in config.listen], "workers": config.workers,
            "pids": [w.process.pid for w in parent.workers if w.process is not None]}))
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            parent.expire()
    finally:
        parent.stopping = True
        await stop_workers(parent)
        for task in tasks:
            task.cancel()
        for worker in parent.workers:
            loop.remove_reader(worker.channel.fileno())
            worker.channel.close()
            worker.child.close()
        for group in groups:
            for sock in group:
                sock.close()
        errors: list[str] = []
        kept = config.state_file is not None and any(
            workers.worker_path(config.state_file, i).exists() for i in range(config.workers))
        try:
            if kept:  # a worker saved sessions: their NAT ports' rules stay, ICMP goes
                rules.apply(parent.rule_set(icmp=False))
            else:
                errors = rules.remove_instance(config.instance)
        except PvpnError as exc:
            errors.append(str(exc))
        log.write(Record(NODE_STOPPED, reason="; ".join(errors) or "clean", extra={
            "workers": config.workers,
            "state": "saved: the sessions are kept for the next server" if kept else
                     "none kept: the sessions ended"}))
    if parent.failure:
        raise PvpnError(parent.failure)


def send_signal(worker: Worker, sig: int) -> None:
    if worker.process is not None and worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(sig)


def parent_signal(parent: Parent, sig: int) -> None:
    for worker in parent.workers:
        send_signal(worker, sig)


def forward_reload(parent: Parent) -> None:
    for worker in parent.workers:
        if worker.serving:
            send_signal(worker, signal.SIGHUP)
        else:
            worker.reload_held = True


async def stop_workers(parent: Parent) -> None:
    """SIGTERM to every worker (each detaches and saves its sessions), SIGKILL after
    STOP_WAIT."""
    parent_signal(parent, signal.SIGTERM)
    running = [w.process for w in parent.workers
               if w.process is not None and w.process.returncode is None]
    if not running:
        return
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), STOP_WAIT)
    except asyncio.TimeoutError:
        for process in running:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        await asyncio.gather(*(p.wait() for p in running))
