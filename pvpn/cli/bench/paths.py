"""The network paths the bench compares, each set up in a lab of its own.

Every path answers the same two questions for the measurements: how to run a command on the
client host as the bench's user (``BenchPath.run``), and which address the target has; and
it knows how to undo itself (``BenchPath.teardown``, last step first).

- ``direct``: a lab without pvpn nodes (``--no-nodes``) in which :func:`route_through` turns
  on IP forwarding on the hosts between client and target and adds the routes back to the
  client, so the client reaches the target by plain routing;
- ``pvpn`` / ``pvpn-2gw``: the lab's own nodes, and alice's ``pvpn connect --background``;
- ``openvpn-udp`` / ``openvpn-tcp``: OpenVPN point-to-point in TLS mode (a small PKI made
  at bench time, AES-256-GCM), tun devices on the client and the server hosts, the client
  routing the target's subnet into its tun, the server forwarding and the target routing the
  tunnel's subnet back to the server;
- ``wireguard-go``: Debian's wireguard-go (userspace WireGuard over a TUN device; the
  kernel's WireGuard is not used) on the client and the server hosts, configured with
  ``wg setconf`` and keys made at bench time, with OpenVPN's routes on a tunnel /24 of its
  own;
- ``sshuttle``: sshuttle (``--method nat``) run by root on the client, through an sshd
  started on the server host for the bench, logging in as alice with her lab ssh key.

Peers that cannot be installed or set up raise :class:`PathUnavailable` with the reason; the
bench reports them as skipped and goes on.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pvpn.errors import PvpnError
from pvpn.cli.lab import lab, netns, services
from pvpn.cli.lab import users as lab_users
from pvpn.cli.lab.commands import find_program, run, wait_until
from pvpn.cli.lab.topology import PVPN_PORT, Topology

Say = Callable[[str], None]

BENCH_USER = "alice"
OPENVPN_PORT = 1194
OPENVPN_NET = "10.78.0"  # the tunnel's /24: .1 on the server, .2 on the client
WIREGUARD_PORT = 51820
WIREGUARD_NET = "10.79.0"  # the tunnel's /24: .1 on the server, .2 on the client
WIREGUARD_SOCKETS = Path("/var/run/wireguard")  # wireguard-go's UAPI sockets, by device
SSH_PORT = 22
SETUP_TIMEOUT = 30.0
INSTALL_TIMEOUT = 600.0
STOP_GRACE = 5.0


class PathUnavailable(PvpnError):
    """A path could not be set up; the message says why (shown as the path's note)."""


@dataclass
class BenchPath:
    """One way from the client host to the target, ready to carry the bench's traffic."""

    name: str
    lab: str
    topology: Topology
    target4: str
    hops: int  # VPN hops a packet crosses (0 for direct; pvpn: 1 + gateways)
    udp: bool = True  # carries UDP (sshuttle's nat method does not)
    icmp: bool = True
    notes: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    # role -> a function listing the pids of that role's processes (for CPU accounting)
    processes: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)  # shown when the path stops working
    revive: Callable[[], None] | None = None  # sets the path up again after it broke

    def argv(self, command: list[str], user: str = BENCH_USER) -> tuple[list[str], Path]:
        """The argument list running ``command`` on the client host as ``user``."""
        return lab.exec_argv(self.lab, "client", user, command)

    def run(self, command: list[str], *, timeout: float, user: str = BENCH_USER
            ) -> subprocess.CompletedProcess[bytes]:
        """Run ``command`` on the client as ``user``; a non-zero exit is returned."""
        return lab.run_as(self.lab, "client", user, command, timeout=timeout)

    def namespace(self, role: str) -> str:
        return self.topology.host(role).namespace

    def on_teardown(self, what: str, step: Callable[[], None]) -> None:
        self.undo.append((what, step))

    def teardown(self) -> list[str]:
        """Undo every step, last first; returns warnings, never raises."""
        warnings: list[str] = []
        while self.undo:
            what, step = self.undo.pop()
            try:
                step()
            except (PvpnError, OSError, subprocess.SubprocessError) as exc:
                warnings.append(f"{self.name}: {what}: {exc}")
        return warnings


# --- small helpers -----------------------------------------------------------------------


def _ip(topology: Topology, role: str, *args: str) -> None:
    run(["ip", "-n", topology.host(role).namespace, *args], timeout=10)


def _sysctl(topology: Topology, role: str, setting: str) -> str:
    out = run(lab.host_command(topology, role, "sysctl", "-n", setting), timeout=10)
    return out.stdout.decode().strip()


def _set_sysctl(topology: Topology, role: str, setting: str, value: str) -> None:
    run(lab.host_command(topology, role, "sysctl", "-q", "-w", f"{setting}={value}"), timeout=10)


def _forwarding(path: BenchPath, role: str) -> None:
    """Turn on IPv4 and IPv6 forwarding on ``role``; restore the old values at teardown."""
    topology = path.topology
    for setting in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        old = _sysctl(topology, role, setting)
        _set_sysctl(topology, role, setting, "1")
        path.on_teardown(f"{setting} on {role}",
                         functools.partial(_set_sysctl, topology, role, setting, old))


def _route(path: BenchPath, role: str, prefix: str, via: str) -> None:
    """Add a route on ``role``; delete it at teardown."""
    family = ["-6"] if ":" in prefix else []
    _ip(path.topology, role, *family, "route", "add", prefix, "via", via)
    path.on_teardown(f"route {prefix} on {role}",
                     lambda: _ip(path.topology, role, *family, "route", "del", prefix,
                                 "via", via))


def route_through(path: BenchPath) -> None:
    """Plain routing from the client to the target through every host in between.

    The lab's hosts route by default to their right-hand neighbour and forward nothing
    (docs/design.md "Lab addressing"); here every host between client and target forwards,
    and every host right of link 1 gets routes back to the links on its left, via its left
    neighbour.  Everything is undone at teardown (the lab's namespaces go at ``down``, too).
    """
    topology = path.topology
    for host in topology.hosts[1:-1]:
        _forwarding(path, host.role)
    for host in topology.hosts[2:]:
        left = topology.left_link(host.role)
        if left is None:
            continue
        for link in topology.links[:left.index]:
            _route(path, host.role, str(link.subnet4), str(left.left4))
            _route(path, host.role, str(link.subnet6), str(left.left6))


def processes_matching(*needles: str, uid: int | None = None) -> list[int]:
    """Pids whose command line contains every needle (and run as ``uid``), with their
    descendants (a daemon's worker processes count as its own)."""
    found: list[int] = []
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            owner = entry.stat().st_uid
        except OSError:
            continue
        parents[pid] = int(stat[stat.rindex(")") + 2:].split()[1])
        if pid != os.getpid() and all(n in cmdline for n in needles) and (
                uid is None or owner == uid):
            found.append(pid)
    return _with_descendants(found, parents)


def _with_descendants(roots: list[int], parents: dict[int, int]) -> list[int]:
    result = list(roots)
    seen = set(roots)
    for _ in range(8):  # a bounded number of generations
        children = [pid for pid, ppid in parents.items() if ppid in seen and pid not in seen]
        if not children:
            break
        result += children
        seen.update(children)
    return result


def _pids_of(*procs: subprocess.Popen[bytes]) -> Callable[[], list[int]]:
    def pids() -> list[int]:
        roots = [p.pid for p in procs if p.poll() is None]
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        return _with_descendants(roots, parents)
    return pids


def _namespace_pids_of_uid(namespace: str, uid: int) -> Callable[[], list[int]]:
    def pids() -> list[int]:
        result = []
        for pid in netns.namespace_pids(namespace):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}").stat().st_uid == uid:
                    result.append(pid)
        return result
    return pids


def _start(path: BenchPath, what: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a long-running helper (its own session, so a Ctrl-C reaches the bench first and
    the helper is stopped in order); stopped at teardown, TERM then KILL."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_GRACE)

    path.on_teardown(f"stop {what}", stop)
    return proc


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_log(proc: subprocess.Popen[bytes], log: Path, marker: str, what: str,
              timeout: float = SETUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        with contextlib.suppress(OSError):
            if marker in log.read_text(errors="replace"):
                return
        if proc.poll() is not None:
            raise PathUnavailable(f"{what} exited ({proc.returncode}): {_tail(log)}")
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise PathUnavailable(f"{what} not ready after {timeout:g} s: {_tail(log)}")


def check_reaches(path: BenchPath) -> None:
    """The target's web server answers the bench's user over the path, else the path is
    unusable."""
    url = f"http://{path.target4}/0"
    result = path.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "5", url], timeout=15)
    if result.returncode != 0:
        raise PathUnavailable(f"{BENCH_USER} cannot reach {url} over {path.name}: "
                              f"{result.stderr.decode(errors='replace').strip()}")


def reaches(path: BenchPath) -> str:
    """"" if the target still answers over the path, else what went wrong."""
    try:
        check_reaches(path)
    except PvpnError as exc:
        return str(exc)
    return ""


def log_tails(path: BenchPath, lines: int = 4) -> str:
    """The last lines of the path's logs, for the report of a path that broke."""
    return " || ".join(f"{log.name}: {_tail(log, lines)}" for log in path.logs)


def _new_path(name: str, topology: Topology, hops: int) -> BenchPath:
    return BenchPath(name=name, lab=topology.name, topology=topology,
                     target4=str(topology.target_link.right4), hops=hops)


@contextlib.contextmanager
def _undone_on_failure(path: BenchPath, what: str | None = None) -> Iterator[None]:
    """Tear the path down if its set-up fails. With ``what``, a failure of ours other than
    PathUnavailable becomes one ("WHAT set-up failed: ..."): the peer is skipped, not the run."""
    try:
        yield
    except BaseException as exc:
        path.teardown()
        if what is not None and isinstance(exc, PvpnError) and not isinstance(exc, PathUnavailable):
            raise PathUnavailable(f"{what} set-up failed: {exc}") from exc
        raise


# --- direct ------------------------------------------------------------------------------


def setup_direct(topology: Topology) -> BenchPath:
    """Plain routing, no VPN, in a lab built without pvpn nodes."""
    path = _new_path("direct", topology, 0)
    with _undone_on_failure(path):
        route_through(path)
        check_reaches(path)
    path.notes.append("routed: IP forwarding on the hosts in between, no VPN")
    return path


# --- pvpn --------------------------------------------------------------------------------


def _supervisorctl(topology: Topology, role: str, *args: str) -> str:
    supervisorctl = find_program("supervisorctl")
    if supervisorctl is None:
        raise PathUnavailable("supervisorctl not found")
    conf = topology.host_dir(role) / "supervisord.conf"
    out = run([supervisorctl, "-c", str(conf), *args], check=False, timeout=60)
    return out.stdout.decode(errors="replace")


def server_for_bench(topology: Topology, nat_ports: str | None) -> None:
    """The lab's server writes every session's packets to pcap files (a debugging aid no
    production server runs by default); the bench measures the data path without that: drop
    ``pcap_dir`` from server.toml (and set ``nat_ports`` if asked), restart pvpn-server."""
    config = services.node_config(topology, "server")
    text = config.read_text()
    kept = []
    for line in text.splitlines():
        if line.startswith(("pcap_dir", "pcap_max_bytes")):
            continue
        if nat_ports is not None and line.startswith("nat_ports"):
            line = f'nat_ports = "{nat_ports}"'
        kept.append(line)
    config.write_text("\n".join(kept) + "\n")
    _supervisorctl(topology, "server", "restart", "pvpn-server")
    try:
        wait_until("pvpn-server to listen again", lambda: lab.listening(topology, "server", "-t",
                                                                   PVPN_PORT),
                   timeout=SETUP_TIMEOUT)
    except PvpnError as exc:
        raise PathUnavailable(f"pvpn-server did not come back after the restart: {exc}: "
                              f"{_tail(services.node_log(topology, 'server'))}") from exc


def set_server_workers(topology: Topology, workers: int, sessions: int) -> None:
    """Restart the lab's pvpn-server with ``[server] workers = workers`` and wait until it
    serves ``sessions`` sessions again (the users' processes reconnect by themselves)."""
    config = services.node_config(topology, "server")
    lines = [line for line in config.read_text().splitlines()
             if not line.startswith("workers =")]
    at = lines.index("[server]") + 1
    config.write_text("\n".join([*lines[:at], f"workers = {workers}", *lines[at:]]) + "\n")
    _supervisorctl(topology, "server", "restart", "pvpn-server")
    pvpn = find_program("pvpn")
    if pvpn is None:
        raise PathUnavailable("the pvpn command is not found")

    def up() -> bool:
        status = run([pvpn, "status", "--node", str(config), "--json"], check=False,
                     timeout=30)
        if status.returncode != 0:
            return False
        try:
            (node,) = json.loads(status.stdout)["nodes"]
        except (ValueError, KeyError, TypeError):
            return False
        return sum(1 for s in node.get("sessions", [])
                   if isinstance(s, dict) and s.get("state") == "up") >= sessions

    try:
        wait_until(f"{sessions} sessions up again at pvpn-server ({workers} workers)", up,
                   timeout=120, interval=1.0)
    except PvpnError as exc:
        raise PathUnavailable(f"{exc}: {_tail(services.node_log(topology, 'server'))}") from exc


def node_processes(topology: Topology, user: str = BENCH_USER
                   ) -> dict[str, Callable[[], list[int]]]:
    """pvpn's processes of a lab, by role: pvpn-client, the user's `pvpn connect`, each
    gateway, pvpn-server (found by the lab's config paths in their command lines)."""
    root = str(topology.root)
    uid = lab_users.require_user(user).uid
    sock = str(services.client_socket(topology))
    out: dict[str, Callable[[], list[int]]] = {
        "pvpn-client": functools.partial(daemon_processes, "pvpn-client", root, "client"),
        "pvpn connect": lambda: processes_matching("connect", sock, uid=uid),
    }
    for role in topology.gateway_roles:
        out[f"pvpn-gateway {role}"] = functools.partial(
            daemon_processes, "pvpn-gateway", root, role)
    out["pvpn-server"] = functools.partial(daemon_processes, "pvpn-server", root, "server")
    return out


def daemon_processes(program: str, root: str, host: str) -> list[int]:
    """A lab host's daemon, by its ``--config`` in the host's directory: the program's name
    and the directory alone also match `pvpn connect` and `pvpn disconnect`, whose
    ``--socket`` is ``.../client/pvpn-client.sock`` (the bench counted their CPU as
    pvpn-client's too)."""
    return processes_matching(program, f"--config {root}/{host}/")


def connect_argv(topology: Topology, user: str, key: Path, log: Path) -> list[str]:
    """``pvpn connect --background`` for ``user`` through the lab's chain."""
    argv = services.connect_argv(topology, user)
    key_at = argv.index("--key")
    argv[key_at + 1] = str(key)
    return [*argv, "--background", "--log", str(log)]


SESSION_RE = re.compile(r"session ([0-9a-f]{32}) is up")


def pvpn_connect(topology: Topology, user: str, key: Path, log: Path,
                 timeout: float = SETUP_TIMEOUT) -> str:
    """Open ``user``'s VPN in the background; returns the session id."""
    argv, cwd = lab.exec_argv(topology.name, "client", user,
                              connect_argv(topology, user, key, log))
    result = run(argv, timeout=timeout, check=False, cwd=cwd)
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    match = SESSION_RE.search(out)
    if result.returncode != 0 or match is None:
        raise PathUnavailable(f"pvpn connect as {user} failed ({result.returncode}): "
                              f"{out.strip()[-400:]}")
    return match[1]


def pvpn_disconnect(topology: Topology, user: str) -> None:
    argv, cwd = lab.exec_argv(topology.name, "client", user, [
        "pvpn", "disconnect", "--socket", str(services.client_socket(topology))])
    run(argv, timeout=30, check=False, cwd=cwd)


def setup_pvpn(topology: Topology, name: str, nat_ports: str | None = None) -> BenchPath:
    """alice's personal VPN through the lab's chain (0 or more gateways)."""
    path = _new_path(name, topology, 1 + topology.gateways)
    with _undone_on_failure(path):
        server_for_bench(topology, nat_ports)
        key = services.user_key(topology, BENCH_USER)
        log = key.parent / "connect.log"
        session = pvpn_connect(topology, BENCH_USER, key, log)
        path.on_teardown("pvpn disconnect", lambda: pvpn_disconnect(topology, BENCH_USER))
        check_reaches(path)
    path.processes = node_processes(topology)
    path.logs = [services.node_log(topology, role)
                 for role in ("client", *topology.chain_roles)] + [log]

    def revive() -> None:
        pvpn_disconnect(topology, BENCH_USER)
        path.settings["session"] = pvpn_connect(topology, BENCH_USER, key, log)
        # iperf3 serves one test at a time and waits for a client that vanished with the
        # old tunnel (minutes of retransmissions); start it afresh.
        _supervisorctl(topology, "target", "restart", "iperf3")
        check_reaches(path)

    path.revive = revive
    path.settings = {"session": session,
                     "chain": " -> ".join(["client", *topology.chain_roles]),
                     "server pcap": "off (the lab's default capture is disabled)",
                     "nat_ports": nat_ports or services.NAT_PORTS}
    return path


# --- installing the peers ----------------------------------------------------------------


def _installed(name: str) -> str | None:
    return find_program(name) or shutil.which(name)


def ensure_program(program: str, *, apt: str | None, pip: str | None, say: Say,
                   apt_recommends: bool = True) -> str:
    """The path of ``program``, installing it first (pip into pvpn's environment, else
    apt-get, with the package's recommendations unless ``apt_recommends`` is False) when
    missing; :class:`PathUnavailable` when it can't be had."""
    found = _installed(program)
    if found:
        return found
    tried: list[str] = []
    if pip is not None:
        say(f"bench: installing {pip} with pip into {sys.prefix}")
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", pip],
                                capture_output=True, timeout=INSTALL_TIMEOUT, check=False)
        found = _installed(program)
        if found:
            return found
        tried.append(f"pip install {pip}: {result.stderr.decode(errors='replace')[-300:]}")
    if apt is not None and shutil.which("apt-get"):
        say(f"bench: installing {apt} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        extra = [] if apt_recommends else ["--no-install-recommends"]
        result = subprocess.run(["apt-get", "install", "-y", "-q", *extra, apt],
                                capture_output=True,
                                timeout=INSTALL_TIMEOUT, check=False, env=env)
        found = _installed(program)
        if found:
            return found
        tried.append(f"apt-get install {apt}: {result.stderr.decode(errors='replace')[-300:]}")
    raise PathUnavailable(f"{program} is not installed and could not be installed: "
                          + "; ".join(tried or ["no installer available"]))


def program_version(argv: list[str]) -> str:
    """The first line a program prints for its version, or '?'."""
    try:
        out = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (out.stdout or out.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "?"


# --- OpenVPN -----------------------------------------------------------------------------


def setup_openvpn(topology: Topology, proto: str, say: Say) -> BenchPath:
    """OpenVPN over UDP (``proto="udp"``) or TCP, AES-256-GCM, in a lab without pvpn nodes."""
    from pvpn import pki

    openvpn = ensure_program("openvpn", apt="openvpn", pip=None, say=say)
    path = _new_path(f"openvpn-{proto}", topology, 1)
    work = topology.root / "bench-openvpn"
    server4 = str(topology.server_link.right4)
    with _undone_on_failure(path, f"OpenVPN ({proto})"):
        # A small PKI: the CA, a server and a client certificate (EC P-256, from pvpn.pki).
        pki.create_ca(work / "ca", name=f"bench {topology.name} OpenVPN CA")
        pki.issue_certificate(work / "ca", "ovpn-server", work, ips=[server4])
        pki.issue_certificate(work / "ca", "ovpn-client", work)
        common = [openvpn, "--dev", "tun", "--dev-type", "tun", "--ca", str(work / "ca/ca.crt"),
                  "--dh", "none", "--data-ciphers", "AES-256-GCM", "--cipher", "AES-256-GCM",
                  "--auth-nocache", "--verb", "3", "--ping", "10", "--ping-exit", "120"]
        server_proto = "udp" if proto == "udp" else "tcp-server"
        client_proto = "udp" if proto == "udp" else "tcp-client"
        if proto != "udp":
            # OpenVPN leaves Nagle on for its TCP link by default; with it, each small
            # request waits for a delayed ACK (~170 ms a request).  Its manual recommends
            # TCP_NODELAY for latency, which pvpn sets on its own tunnel sockets too.
            common += ["--socket-flags", "TCP_NODELAY"]
        server_log, client_log = work / "server.log", work / "client.log"
        server = _start(path, "openvpn server", lab.host_command(
            topology, "server", *common, "--tls-server",
            "--cert", str(work / "ovpn-server.crt"), "--key", str(work / "ovpn-server.key"),
            "--proto", server_proto, "--local", server4, "--lport", str(OPENVPN_PORT),
            "--ifconfig", f"{OPENVPN_NET}.1", f"{OPENVPN_NET}.2"), server_log)
        _forwarding(path, "server")
        # The target answers the tunnel's addresses through the server.
        _route(path, "target", f"{OPENVPN_NET}.0/24", str(topology.target_link.left4))
        if proto != "udp":
            try:
                wait_until("the OpenVPN server to listen",
                           lambda: lab.listening(topology, "server", "-t", OPENVPN_PORT),
                           timeout=SETUP_TIMEOUT)
            except PvpnError as exc:
                raise PathUnavailable(f"{exc}: {_tail(server_log)}") from exc
        link = topology.target_link
        client = _start(path, "openvpn client", lab.host_command(
            topology, "client", *common, "--tls-client", "--remote-cert-tls", "server",
            "--cert", str(work / "ovpn-client.crt"), "--key", str(work / "ovpn-client.key"),
            "--proto", client_proto, "--remote", server4, str(OPENVPN_PORT), "--nobind",
            "--ifconfig", f"{OPENVPN_NET}.2", f"{OPENVPN_NET}.1",
            "--route", str(link.subnet4.network_address), str(link.subnet4.netmask)),
            client_log)
        _wait_log(client, client_log, "Initialization Sequence Completed",
                  f"OpenVPN client ({proto})")
        check_reaches(path)
    path.processes = {"openvpn client": _pids_of(client), "openvpn server": _pids_of(server)}
    path.logs = [client_log, server_log]
    path.settings = {"version": program_version([openvpn, "--version"]),
                     "mode": f"p2p TLS, {proto}, AES-256-GCM, tun, default MTU and mssfix"
                             + (", TCP_NODELAY" if proto != "udp" else ""),
                     "reply path": "server forwards; target routes the tunnel subnet back"}
    return path


# --- wireguard-go ------------------------------------------------------------------------


def wireguard_public_key(private_key: str) -> str:
    """The public key of a base64 Curve25519 private key, as ``wg pubkey`` gives it."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key, validate=True))
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def wireguard_keypair() -> tuple[str, str]:
    """A fresh (private, public) key pair, base64 as ``wg genkey`` / ``wg pubkey`` write it."""
    key = bytearray(secrets.token_bytes(32))
    # Clamped as wg genkey clamps (RFC 7748 section 5; X25519 clamps again on use).
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    private_key = base64.b64encode(bytes(key)).decode()
    return private_key, wireguard_public_key(private_key)


def wireguard_config(private_key: str, peer_public_key: str, allowed_ips: list[str], *,
                     listen_port: int | None = None, endpoint: str | None = None) -> str:
    """The ``wg setconf`` file of one end of the tunnel: its key and its one peer (wg's own
    format, not wg-quick's: addresses, MTU and routes are set with ip)."""
    lines = ["[Interface]", f"PrivateKey = {private_key}"]
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    lines += ["", "[Peer]", f"PublicKey = {peer_public_key}",
              f"AllowedIPs = {', '.join(allowed_ips)}"]
    if endpoint is not None:
        lines.append(f"Endpoint = {endpoint}")
    return "\n".join(lines) + "\n"


def wireguard_interface(lab_name: str, role: str) -> str:
    """The TUN device of ``role``'s end, named after the lab (at most 10 characters) so that
    wireguard-go's UAPI socket, one directory for every namespace, is the run's own."""
    return f"{lab_name}-wg{role[0]}"


MTU_RE = re.compile(r"\bmtu (\d+)\b")


def link_mtu(ip_link_show: str) -> int | None:
    """The MTU in the output of ``ip link show DEV``, or None."""
    match = MTU_RE.search(ip_link_show)
    return int(match[1]) if match else None


def _write_secret(file: Path, text: str) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _kernel_wireguard(topology: Topology) -> str:
    """Whether this kernel has WireGuard (the bench measures wireguard-go either way)."""
    probe = f"{topology.name}-wgk"
    result = run(["ip", "-n", topology.host("client").namespace, "link", "add", probe,
                  "type", "wireguard"], check=False, timeout=10)
    if result.returncode != 0:
        return "absent from this kernel"
    _ip(topology, "client", "link", "del", probe)
    return "present in this kernel, not used"


def _wireguard_end(path: BenchPath, wireguard_go: str, wg: str, role: str, config: str,
                   address: str, work: Path) -> subprocess.Popen[bytes]:
    """wireguard-go on ``role``, configured with wg and given the tunnel ``address``; its
    TUN device (with the routes through it) goes when it stops at teardown."""
    topology = path.topology
    interface = wireguard_interface(topology.name, role)
    socket = WIREGUARD_SOCKETS / f"{interface}.sock"
    # A wireguard-go that had to be killed leaves its UAPI socket behind.
    path.on_teardown(f"remove {socket}", lambda: socket.unlink(missing_ok=True))
    log = work / f"{role}.log"
    # WG_PROCESS_FOREGROUND keeps it a child of ours that TERM stops, not a daemon.
    proc = _start(path, f"wireguard-go {role}", lab.host_command(
        topology, role, "env", "WG_PROCESS_FOREGROUND=1", "LOG_LEVEL=verbose", wireguard_go,
        interface), log)
    try:
        wait_until(f"wireguard-go's socket on {role}",
                   lambda: socket.exists() or proc.poll() is not None, timeout=SETUP_TIMEOUT)
    except PvpnError as exc:
        raise PathUnavailable(f"{exc}: {_tail(log)}") from exc
    if proc.poll() is not None:
        raise PathUnavailable(f"wireguard-go on {role} exited ({proc.returncode}): "
                              f"{_tail(log)}")
    conf = work / f"{role}.conf"
    _write_secret(conf, config)
    run(lab.host_command(topology, role, wg, "setconf", interface, str(conf)), timeout=10)
    _ip(topology, role, "address", "add", f"{address}/24", "dev", interface)
    _ip(topology, role, "link", "set", interface, "up")
    return proc


def setup_wireguard(topology: Topology, say: Say) -> BenchPath:
    """wireguard-go (userspace WireGuard over TUN) between the client and the server hosts,
    configured with wg, in a lab without pvpn nodes; the same links and routes as OpenVPN's."""
    wireguard_go = ensure_program("wireguard-go", apt="wireguard-go", pip=None, say=say)
    # wireguard-tools recommends the kernel's module, which apt would bring as a whole
    # kernel image; only wg itself is needed.
    wg = ensure_program("wg", apt="wireguard-tools", pip=None, say=say, apt_recommends=False)
    path = _new_path("wireguard-go", topology, 1)
    work = topology.root / "bench-wireguard"
    server4 = str(topology.server_link.right4)
    target_subnet = str(topology.target_link.subnet4)
    server_key, server_public = wireguard_keypair()
    client_key, client_public = wireguard_keypair()
    client_interface = wireguard_interface(topology.name, "client")
    with _undone_on_failure(path, "wireguard-go"):
        work.mkdir(mode=0o700, parents=True, exist_ok=True)
        kernel = _kernel_wireguard(topology)
        server = _wireguard_end(path, wireguard_go, wg, "server", wireguard_config(
            server_key, client_public, [f"{WIREGUARD_NET}.2/32"], listen_port=WIREGUARD_PORT),
            f"{WIREGUARD_NET}.1", work)
        _forwarding(path, "server")
        # The target answers the tunnel's addresses through the server.
        _route(path, "target", f"{WIREGUARD_NET}.0/24", str(topology.target_link.left4))
        client = _wireguard_end(path, wireguard_go, wg, "client", wireguard_config(
            client_key, server_public, [f"{WIREGUARD_NET}.0/24", target_subnet],
            endpoint=f"{server4}:{WIREGUARD_PORT}"), f"{WIREGUARD_NET}.2", work)
        # The client routes the target's subnet into the tunnel, as OpenVPN's --route does.
        _ip(topology, "client", "route", "add", target_subnet, "dev", client_interface)
        check_reaches(path)
        shown = run(["ip", "-n", path.namespace("client"), "link", "show", client_interface],
                    timeout=10)
        mtu = link_mtu(shown.stdout.decode(errors="replace"))
    path.processes = {"wireguard-go client": _pids_of(client),
                      "wireguard-go server": _pids_of(server)}
    path.logs = [work / "client.log", work / "server.log"]
    path.settings = {
        "version": program_version([wireguard_go, "--version"]),
        "wg": program_version([wg, "--version"]),
        "mode": "userspace: wireguard-go over a TUN device on the client and the server "
                f"host, configured with wg setconf, UDP port {WIREGUARD_PORT}",
        "kernel WireGuard": f"not used ({kernel})",
        "cipher": "ChaCha20-Poly1305 (fixed by WireGuard; Noise IK, Curve25519 keys made "
                  "for the run)",
        "mtu": f"{mtu if mtu is not None else '?'} (wireguard-go's default; none set)",
        "tunnel": f"{WIREGUARD_NET}.2 (client) to {WIREGUARD_NET}.1 (server), /24; the client "
                  f"routes {target_subnet} into it",
        "reply path": "server forwards; target routes the tunnel subnet back",
    }
    return path


# --- sshuttle ----------------------------------------------------------------------------


def _sshd_config(topology: Topology, work: Path) -> str:
    return "\n".join([
        f"# sshd for the bench's sshuttle path in {topology.name}-server",
        f"Port {SSH_PORT}",
        f"ListenAddress {topology.server_link.right4}",
        f"HostKey {work}/ssh_host_ed25519_key",
        f"PidFile {work}/sshd.pid",
        f"AuthorizedKeysFile {topology.root}/ssh/%u.pub",
        f"AllowUsers {BENCH_USER}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        "UsePAM yes",
        "PrintMotd no",
        "X11Forwarding no",
        "",
    ])


def setup_sshuttle(topology: Topology, say: Say) -> BenchPath:
    """sshuttle from the client to an sshd the bench runs on the server host."""
    sshuttle = ensure_program("sshuttle", apt="sshuttle", pip="sshuttle", say=say)
    sshd = _installed("sshd")
    if sshd is None:
        raise PathUnavailable("sshd is not installed (openssh-server)")
    path = _new_path("sshuttle", topology, 1)
    path.udp = False
    path.icmp = False
    work = topology.root / "bench-sshuttle"
    work.mkdir(mode=0o755, parents=True, exist_ok=True)
    server4 = str(topology.server_link.right4)
    with _undone_on_failure(path, "sshuttle"):
        host_key = work / "ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)])
        (work / "sshd_config").write_text(_sshd_config(topology, work))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        _start(path, "sshd", lab.host_command(topology, "server", sshd, "-D", "-e", "-f",
                                 str(work / "sshd_config")), work / "sshd.log")
        try:
            wait_until("the bench's sshd to listen",
                       lambda: lab.listening(topology, "server", "-t", SSH_PORT), timeout=SETUP_TIMEOUT)
        except PvpnError as exc:
            raise PathUnavailable(f"{exc}: {_tail(work / 'sshd.log')}") from exc
        pub = Path(f"{host_key}.pub").read_text().split()
        known = work / "known_hosts"
        known.write_text(f"{server4} {pub[0]} {pub[1]}\n")
        key = services.ssh_key(topology, BENCH_USER)
        ssh = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", f"UserKnownHostsFile={known}",
               "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
               "-o", "BatchMode=yes"]
        probe = run(lab.host_command(topology, "client", *ssh, f"{BENCH_USER}@{server4}", "true"),
                    check=False, timeout=20)
        if probe.returncode != 0:
            raise PathUnavailable(f"ssh {BENCH_USER}@{server4} from the client failed: "
                                  f"{probe.stderr.decode(errors='replace').strip()}")
        log = work / "sshuttle.log"
        client = _start(path, "sshuttle", lab.host_command(
            topology, "client", sshuttle, "--method", "nat", "-e", shlex.join(ssh),
            "-r", f"{BENCH_USER}@{server4}", str(topology.target_link.subnet4)), log)
        _wait_log(client, log, "Connected to server", "sshuttle")
        check_reaches(path)
    uid = lab_users.require_user(BENCH_USER).uid
    path.logs = [log]
    path.processes = {"sshuttle client": _pids_of(client),
                      "sshuttle server": _namespace_pids_of_uid(path.namespace("server"), uid)}
    path.settings = {"version": program_version([sshuttle, "--version"]),
                     "mode": "--method nat, ssh to an sshd on the server host as alice"}
    path.notes.append("sshuttle carries TCP only: no UDP or ICMP figures")
    return path
