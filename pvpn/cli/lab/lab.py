"""``pvpn lab up | down | exec | info``: build, use and remove a lab.

A lab named NAME is the network namespaces NAME-client, NAME-gw1.., NAME-server and
NAME-target, the local users alice, bob and carol, and everything under /run/pvpn-lab/NAME:
a CA, the gateways' and the server's certificates, the users' keys, the nodes'
configurations and one supervisord per host.  ``down`` finds every piece by name, so it also
cleans up after a crash.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from pvpn.cli.lab import netns, services, users
from pvpn.cli.lab.commands import (
    find_program,
    quote,
    require_program,
    run,
    search_path,
    spawn,
    succeeds,
    venv_bin,
    wait_until,
)
from pvpn.cli.lab.errors import LabError
from pvpn.cli.lab.topology import (
    AUTHORIZED_USERS,
    ECHO_PORT,
    HTTP_PORT,
    IPERF_PORT,
    LAB_ROOT,
    LAB_USERS,
    PVPN_PORT,
    SSH_PORT,
    Topology,
    build_topology,
    check_name,
)

Say = Callable[[str], None]

STATE_FILE = "lab.json"
SERVICES_TIMEOUT = 30.0  # target services answering from the server
NODES_TIMEOUT = 30.0  # pvpn-server and pvpn-gateways listening, pvpn-client's socket present
SHUTDOWN_TIMEOUT = 25.0  # supervisord stopping its programs (pvpn nodes get stopwaitsecs=15)

# The target's supervisord runs these; a pvpn node's runs services.node_program(role), with
# the host's copy of its program section from supervisord.d/.
TARGET_PROGRAMS = ("nginx", "iperf3", "socat", "sshd")
REQUIRED_PROGRAMS = ("ip", "sysctl", "setpriv", "useradd", "userdel", "ssh-keygen",
                     "ssh-keyscan", "ss",
                     "curl", *TARGET_PROGRAMS, "supervisord", "supervisorctl")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "pvpn lab must run as root: it creates network namespaces, veth links and "
            "local users (try: sudo pvpn lab ...)"
        )


# --- state -----------------------------------------------------------------------------------


def load_topology(name: str) -> Topology:
    """The topology of a lab that is up, from its state file."""
    check_name(name)
    state = LAB_ROOT / name / STATE_FILE
    try:
        data = json.loads(state.read_text())
        gateways = int(data["gateways"])
    except FileNotFoundError:
        raise LabError(f"lab {name} is not up (no {state}); start it with "
                       f"`pvpn lab up --name {name}`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"{state} is damaged ({exc}); run `pvpn lab down --name {name}`") from exc
    return build_topology(name, gateways)


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(data)
    os.chmod(path, mode)


def _chown(path: Path, user: users.LabUser) -> None:
    os.chown(path, user.uid, user.gid)


# --- pieces of `up` --------------------------------------------------------------------------


def _make_credentials(topology: Topology, lab_users: dict[str, users.LabUser]) -> None:
    """CA, a certificate for every gateway and the server, the users' pvpn keys (alice and
    bob authorised at every node, carol nowhere)."""
    # Imported here so `down` works even while these modules are broken or missing.
    from pvpn import auth, pki

    ca_dir = topology.root / "ca"
    pki.create_ca(ca_dir, name=f"pvpn lab {topology.name} CA")
    os.chmod(ca_dir, 0o755)  # ca.crt must be readable by the users; ca.key stays 0600
    authorized_dirs: list[Path] = []
    for role in topology.chain_roles:
        # Each node's certificate names the addresses it listens on (its left link) and
        # NAME-<role>, so the user's process can check every hop by address or name.
        link = topology.listen_link(role)
        node_dir = topology.host_dir(role)
        pki.issue_certificate(ca_dir, role, node_dir,
                              ips=[str(link.right4), str(link.right6)],
                              dns_names=[f"{topology.name}-{role}"])
        authorized = node_dir / "users"
        authorized.mkdir(mode=0o755, parents=True, exist_ok=True)
        authorized_dirs.append(authorized)
    for name, user in lab_users.items():
        user_dir = topology.root / "users" / name
        user_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = auth.generate_user_key()
        private = services.user_key(topology, name)
        public = private.with_name("id_rsa.pub")
        auth.save_private_key(key, private)
        auth.save_public_key(key, public, f"{name}@{topology.name}")
        for path in (user_dir, private, public):
            _chown(path, user)
        os.chmod(user_dir, 0o700)
        if name in AUTHORIZED_USERS:
            for authorized in authorized_dirs:
                shutil.copyfile(public, authorized / f"{name}.pub")
                os.chmod(authorized / f"{name}.pub", 0o644)


def _write_www(topology: Topology) -> dict[str, str]:
    www = topology.host_dir("target") / "www"
    www.mkdir(mode=0o755, parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    for name, size in services.WWW_FILES.items():
        digest = hashlib.sha256()
        with open(www / name, "wb") as handle:
            left = size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                handle.write(chunk)
                digest.update(chunk)
                left -= len(chunk)
        os.chmod(www / name, 0o644)
        digests[name] = digest.hexdigest()
    _write(www / "SHA256SUMS", services.sha256sums(digests))
    return digests


def _make_ssh(topology: Topology, lab_users: dict[str, users.LabUser]) -> None:
    """Host key of the target, per-user ssh keys, known_hosts for the users' ssh clients."""
    target_dir = topology.host_dir("target")
    host_key = target_dir / "ssh_host_ed25519_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{topology.name}-target",
         "-f", str(host_key)])
    ssh_dir = topology.root / "ssh"
    ssh_dir.mkdir(mode=0o755, exist_ok=True)
    for name, user in lab_users.items():
        key = services.ssh_key(topology, name)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@{topology.name}",
             "-f", str(key)])
        # sshd reads <user>.pub as the AuthorizedKeysFile: owned by root, not writable by
        # others (StrictModes).  The private key belongs to the user alone.
        os.replace(Path(f"{key}.pub"), ssh_dir / f"{name}.pub")
        os.chmod(ssh_dir / f"{name}.pub", 0o644)
        _chown(key, user)
        os.chmod(key, 0o600)
    link = topology.target_link
    host_pub = Path(f"{host_key}.pub").read_text().split()
    names = ",".join([str(link.right4), str(link.right6), f"{topology.name}-target"])
    _write(services.known_hosts(topology), f"{names} {host_pub[0]} {host_pub[1]}\n")
    # sshd's privilege separation directory; normally made by systemd-tmpfiles.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def _nginx_user() -> str:
    for user, group in (("www-data", "www-data"), ("nobody", "nogroup")):
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            continue
        return f"{user} {group}"
    raise LabError("neither user www-data nor nobody exists to run nginx's worker")


def _write_configs(topology: Topology) -> None:
    target_dir = topology.host_dir("target")
    programs = {name: require_program(name) for name in TARGET_PROGRAMS}
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (target_dir / "nginx" / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
    _write(target_dir / "nginx.conf", services.nginx_conf(topology, _nginx_user()))
    _write(target_dir / "sshd_config", services.sshd_config(topology))
    _write(target_dir / "supervisord.conf", services.target_supervisord_conf(topology, programs))
    _write(services.node_config(topology, "client"), services.client_toml(topology))
    _write(services.node_config(topology, "server"), services.server_toml(topology))
    for role in topology.gateway_roles:
        _write(services.node_config(topology, role), services.gateway_toml(topology, role))
    for role in ("client", *topology.chain_roles):
        program = services.node_program(role)
        assert program is not None
        _write(topology.host_dir(role) / f"{program}.conf",
               services.node_program_conf(topology, role, program))
        _write(topology.host_dir(role) / "supervisord.conf",
               services.node_supervisord_conf(topology, role, program))


def _supervisord_env() -> dict[str, str]:
    # No PVPN_* variables: the lab's copies of the shipped files name the host's directory.
    return {
        "PATH": search_path(),
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }


def _start_supervisord(topology: Topology, role: str) -> None:
    host_dir = topology.host_dir(role)
    supervisord = require_program("supervisord")
    command = [supervisord, "-c", str(host_dir / "supervisord.conf")]
    if services.node_program(role) is not None:
        # As on a real node (supervisord.d/supervisord.conf): under umask 077, so the log
        # supervisord opens before applying its own umask setting is root's too.
        command = ["sh", "-c", 'umask 077 && exec "$0" "$@"', *command]
    # supervisord daemonizes (nodaemon=false): this returns once it has forked; the daemon
    # stays in the host's namespace.
    run(netns.ns_exec(topology.host(role).namespace, *command),
        env=_supervisord_env(), cwd=host_dir, timeout=30)


def host_command(topology: Topology, role: str, *cmd: str) -> list[str]:
    """``cmd`` run as root in the namespace of the lab host ``role``."""
    return netns.ns_exec(topology.host(role).namespace, *cmd)


def listening(topology: Topology, role: str, proto: str, port: int) -> bool:
    """Whether something listens on ``port`` (``proto``: ss's -t or -u) on host ``role``."""
    result = run(host_command(topology, role, "ss", "-H", "-l", "-n", proto, "sport", "=", f":{port}"),
                 check=False, timeout=10)
    return result.returncode == 0 and bool(result.stdout.strip())


def _echo_answers(topology: Topology, address: str, family: str) -> bool:
    payload = b"pvpn-lab-echo\n"
    try:
        # -t: how long socat waits for the answer after its input ends (0.5 s by default,
        # twice a lab); a late answer only means another try.
        result = run(host_command(topology, "server", "socat", "-T", "2", "-t", "0.2", "STDIO",
                         f"{family}:{address}:{ECHO_PORT}"),
                     input=payload, check=False, timeout=5)
    except LabError:
        return False
    return result.stdout == payload


def _ssh_answers(topology: Topology, address: str) -> bool:
    try:
        result = run(host_command(topology, "server", "ssh-keyscan", "-T", "2", "-t", "ed25519",
                         "-p", str(SSH_PORT), address), check=False, timeout=5)
    except LabError:
        return False
    return b"ssh-ed25519" in result.stdout


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _wait_target(topology: Topology) -> None:
    """Wait until every target service answers from the server's namespace."""
    link = topology.target_link
    target_dir = topology.host_dir("target")
    v4, v6 = str(link.right4), f"[{link.right6}]"
    probes: list[tuple[str, str, Callable[[], bool]]] = [
        ("http on IPv4", "nginx", lambda: succeeds(host_command(
            topology, "server", "curl", "-sS", "-o", "/dev/null", "--max-time", "2",
            f"http://{v4}:{HTTP_PORT}/0"))),
        ("http on IPv6", "nginx", lambda: succeeds(host_command(
            topology, "server", "curl", "-sS", "-o", "/dev/null", "--max-time", "2",
            f"http://{v6}:{HTTP_PORT}/0"))),
        ("iperf3", "iperf3", lambda: listening(topology, "target", "-t", IPERF_PORT)),
        ("UDP echo on IPv4", "echo4", lambda: _echo_answers(topology, v4, "UDP4")),
        ("UDP echo on IPv6", "echo6", lambda: _echo_answers(topology, v6, "UDP6")),
        # ssh-keyscan gets the host key: sshd answers, not just listens.
        ("sshd", "sshd", lambda: _ssh_answers(topology, str(link.right4))),
    ]
    deadline = time.monotonic() + SERVICES_TIMEOUT
    for what, program, probe in probes:
        left = max(1.0, deadline - time.monotonic())
        try:
            wait_until(f"the target's {what} to answer from {topology.name}-server",
                       probe, timeout=left)
        except LabError as exc:
            log = target_dir / f"{program}.log"
            raise LabError(f"{exc}\nlast lines of {log}:\n{_tail(log)}") from None


def _wait_nodes(topology: Topology, started: list[str]) -> None:
    """Wait (bounded, one deadline for all) until every started node is ready: the server
    and the gateways listening on port 4433, pvpn-client's socket present."""
    deadline = time.monotonic() + NODES_TIMEOUT
    for role in started:
        log = services.node_log(topology, role)
        program = services.node_program(role)
        what: str
        probe: Callable[[], bool]
        if role == "client":
            sock = services.client_socket(topology)
            what, probe = f"pvpn-client's socket {sock}", sock.exists
        else:
            what = f"{program} to listen on port {PVPN_PORT} in {topology.name}-{role}"
            probe = functools.partial(listening, topology, role, "-t", PVPN_PORT)
        try:
            wait_until(what, probe, timeout=max(1.0, deadline - time.monotonic()))
        except LabError as exc:
            raise LabError(f"{exc}\nlast lines of {log}:\n{_tail(log)}") from None


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Make SIGTERM behave like Ctrl-C, so an interrupted `up` (or bench) tears down what it
    made."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def up(name: str, gateways: int = 0, *, nodes: bool = True, say: Say = _say) -> Topology:
    """Build lab ``name``; on any failure (or Ctrl-C) tear down what was made and raise."""
    require_root()
    topology = build_topology(name, gateways)
    missing = [p for p in REQUIRED_PROGRAMS if find_program(p) is None]
    if missing:
        raise LabError(f"missing programs: {', '.join(missing)}; install them with "
                       "`bash scripts/run test` from the pvpn checkout")
    exists = LabError(f"lab {name} exists already; remove it first with "
                      f"`pvpn lab down --name {name}`")
    if netns.lab_namespaces(name):
        raise exists
    # Claiming the directory is atomic: of two concurrent `up`s of one name, one fails here,
    # before it could tear down the other's lab.
    if not users.create_lab_dir(topology.root):
        raise exists
    try:
        with sigterm_interrupts():
            _build(topology, nodes, say)
    except BaseException:
        say(f"pvpn lab: building lab {name} failed; removing what was made")
        for warning in down(name, say=lambda _m: None):
            say(f"pvpn lab: warning: {warning}")
        raise
    return topology


def _build(topology: Topology, nodes: bool, say: Say) -> None:
    name = topology.name
    _write(topology.root / STATE_FILE,
           json.dumps({"name": name, "gateways": topology.gateways}) + "\n")
    say(f"lab {name}: network namespaces " + ", ".join(h.namespace for h in topology.hosts))
    netns.build(topology)
    say(f"lab {name}: users " + ", ".join(LAB_USERS))
    lab_users = users.acquire(name, LAB_USERS)
    say(f"lab {name}: CA, node certificates, user keys")
    _make_credentials(topology, lab_users)
    say(f"lab {name}: target files and services")
    _write_www(topology)
    _make_ssh(topology, lab_users)
    _write_configs(topology)
    _start_supervisord(topology, "target")
    _wait_target(topology)
    node_roles = ("client", *topology.chain_roles)
    started: list[str] = []
    if not nodes:
        say(f"lab {name}: pvpn nodes not started (--no-nodes); their configs are in "
            f"{topology.root}/{{{','.join(node_roles)}}}")
    else:
        # From the server towards the client: each hop is up before the one that leads to it.
        for role in reversed(node_roles):
            program = services.node_program(role)
            assert program is not None
            if find_program(program) is None:
                say(f"lab {name}: {program} is not installed; {name}-{role} runs no pvpn node")
                continue
            _start_supervisord(topology, role)
            started.append(role)
        if started:
            say(f"lab {name}: waiting for " + ", ".join(
                f"{services.node_program(r)} on {r}" for r in started))
        _wait_nodes(topology, started)
    say(f"lab {name} is up; `pvpn lab info --name {name}` describes it")


# --- down ------------------------------------------------------------------------------------


def _supervisord_pid(host_dir: Path) -> int | None:
    try:
        pid = int((host_dir / "supervisord.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    # After a crash the pid may have been reused: only a supervisord of this host counts.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"supervisord" in cmdline and str(host_dir).encode() in cmdline else None


def _children(pid: int) -> list[int]:
    """The live (not zombie) child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _signal(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _stop_supervisords(root: Path, warnings: list[str]) -> None:
    """Stop every host's programs, each as its stopsignal would, and then its supervisord.

    supervisord acts once a second (its poll's timeout): a `supervisorctl shutdown` took 2-3 s
    a host, in every test's teardown. Instead each supervisord is frozen (SIGSTOP: it can
    restart nothing), its programs (each leads its own process group) get SIGTERM and are
    waited for, bounded, as supervisord would (the pvpn nodes stop as on any SIGTERM:
    sessions saved or released, rules removed), then SIGKILL for what is left and for the
    frozen supervisord. The namespaces' removal after this kills anything else."""
    hosts: list[tuple[Path, int, list[int]]] = []
    if not root.is_dir():
        return
    for host_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        pid = _supervisord_pid(host_dir)
        if pid is None or not _alive(pid):
            continue
        _signal(pid, signal.SIGSTOP)
        hosts.append((host_dir, pid, _children(pid)))
    for _, _, programs in hosts:
        for program in programs:
            _signal(program, signal.SIGTERM, group=True)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    waiting = [(d, p) for d, _, programs in hosts for p in programs]
    while waiting and time.monotonic() < deadline:
        waiting = [(d, p) for d, p in waiting if _alive(p)]
        if waiting:
            time.sleep(0.05)
    for host_dir, program in waiting:
        warnings.append(f"a program of {host_dir.name}'s supervisord (pid {program}) did not "
                        f"stop in {SHUTDOWN_TIMEOUT:g} s; killing it")
        _signal(program, signal.SIGKILL, group=True)
    for _, pid, programs in hosts:
        _signal(pid, signal.SIGKILL)
        for program in programs:  # a program's children that outlived it
            _signal(program, signal.SIGKILL, group=True)


def down(name: str, *, say: Say = _say) -> list[str]:
    """Remove lab ``name``: processes, namespaces, users it created, files.

    Idempotent and tolerant of a partial lab (after a crash); returns warnings for the
    pieces that could not be removed instead of raising.
    """
    require_root()
    check_name(name)
    root = LAB_ROOT / name
    warnings: list[str] = []
    _stop_supervisords(root, warnings)
    for namespace in netns.lab_namespaces(name):
        say(f"lab {name}: removing namespace {namespace}")
        warnings += netns.delete_namespace(namespace)
    if root.exists():
        say(f"lab {name}: removing {root}")

        def onerror(func: Callable[..., Any], path: str, exc_info: Any) -> None:
            warnings.append(f"could not remove {path}: {exc_info[1]}")

        shutil.rmtree(root, onerror=onerror)
    warnings += users.release(name)
    users.remove_root_if_unused()
    return warnings


# --- exec and info ---------------------------------------------------------------------------

# Runs first (as root, in the host's namespace), then execs the rest: a session of the
# command's own, so no controlling terminal. A user's program in root's session could open
# root's terminal (/dev/tty) and push keystrokes into it (TIOCSTI). setsid(1) would fork when
# its caller already leads a process group (Popen(start_new_session=True)), and the pid a
# caller holds would then be a parent that does not pass on its signals.
OWN_SESSION = (
    "import os, sys\n"
    "try:\n    os.setsid()\n"
    "except PermissionError:\n    pass  # already leads its process group\n"
    "if os.getsid(0) != os.getpid():\n"
    "    sys.exit('pvpn lab: cannot give the command a session of its own')\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def exec_argv(name: str, role: str, user: str, command: list[str]) -> tuple[list[str], Path]:
    """The argument list (and working directory) that runs ``command`` on a lab host.

    The command runs in the host's namespace as ``user`` with that user's groups and
    environment (HOME, USER, SHELL as at login), from the user's home directory. Its PATH is
    the login one behind the scripts directory of the Python environment pvpn runs from, so
    the users' ``pvpn`` is the same code as the lab's nodes (the one on /usr/local/bin may be
    another installation's). It runs in a session of its own, without a controlling terminal
    (:data:`OWN_SESSION`); its pid is the one the returned argv starts.
    """
    check_name(name)
    namespace = f"{name}-{role}"
    if namespace not in netns.list_namespaces():
        raise LabError(f"no lab host {role!r} in lab {name} (namespace {namespace} missing; "
                       "is the lab up?)")
    if not command:
        raise LabError("name a command to run after --")
    account = users.require_user(user)
    cwd = account.home if account.home.is_dir() else Path("/")
    login_path = ("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                  if account.uid == 0 else "/usr/local/bin:/usr/bin:/bin")
    argv = netns.ns_exec(namespace, sys.executable, "-I", "-S", "-c", OWN_SESSION,
                         "setpriv", "--reuid", str(account.uid),
                         "--regid", str(account.gid), "--init-groups", "--reset-env",
                         "--", "env", f"PATH={venv_bin()}:{login_path}", *command)
    return argv, cwd


def run_as(
    name: str,
    role: str,
    user: str,
    command: list[str],
    *,
    input: bytes | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` on a lab host as ``user`` and capture its output (for tests, demo).

    A non-zero exit is returned, not raised; a timeout raises :class:`LabError`.
    """
    argv, cwd = exec_argv(name, role, user, command)
    return run(argv, input=input, timeout=timeout, check=False, cwd=cwd)


def exec_in(name: str, role: str, user: str, command: list[str]) -> int:
    """Run ``command`` on a lab host with stdin/stdout passed through; its exit status."""
    require_root()
    argv, cwd = exec_argv(name, role, user, command)
    process = spawn(argv, capture=False, cwd=cwd)
    while True:
        try:
            status = process.wait()
            break
        except KeyboardInterrupt:
            # The command has a session of its own, out of the terminal's reach: pass the
            # Ctrl-C on, then wait for its own exit.
            process.send_signal(signal.SIGINT)
            continue
    return 128 - status if status < 0 else status


def info(name: str) -> dict[str, Any]:
    """Everything a user or a test needs to know about lab ``name``, as JSON data."""
    require_root()
    topology = load_topology(name)
    target_link, server_link = topology.target_link, topology.server_link
    ca = services.ca_certificate(topology)
    sock = services.client_socket(topology)
    www = topology.host_dir("target") / "www"
    sums_path = www / "SHA256SUMS"
    sums = services.parse_sha256sums(sums_path.read_text()) if sums_path.exists() else {}
    files = {
        file: {
            "size": size,
            "sha256": sums.get(file, ""),
            "url4": f"http://{target_link.right4}/{file}",
            "url6": f"http://[{target_link.right6}]/{file}",
        }
        for file, size in services.WWW_FILES.items()
    }
    connect = {user: quote(services.connect_argv(topology, user))
               for user in AUTHORIZED_USERS}
    chain = [
        {
            "role": role,
            "address": topology.endpoints(role)[0],
            "address6": topology.endpoints(role)[1],
            "dns_name": f"{topology.name}-{role}",
            "namespace": topology.host(role).namespace,
            "log": str(services.node_log(topology, role)),
        }
        for role in topology.chain_roles
    ]
    ssh = {
        user: quote([
            "ssh", "-i", str(services.ssh_key(topology, user)),
            "-o", f"UserKnownHostsFile={services.known_hosts(topology)}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", f"{user}@{target_link.right4}",
        ])
        for user in LAB_USERS
    }
    logs: dict[str, dict[str, str]] = {}
    for host in topology.hosts:
        host_dir = topology.host_dir(host.role)
        entries = {"supervisord": str(host_dir / "supervisord.log")}
        program = services.node_program(host.role)
        if program is not None:
            entries[program] = str(services.node_log(topology, host.role))
        if host.role == "target":
            for program in ("nginx", "iperf3", "echo4", "echo6", "sshd"):
                entries[program] = str(host_dir / f"{program}.log")
            entries["nginx-access"] = str(host_dir / "nginx-access.log")
        logs[host.role] = entries
    lab_users = {}
    for user in LAB_USERS:
        account = users.lookup(user)
        lab_users[user] = {
            "uid": account.uid if account else None,
            "authorized": user in AUTHORIZED_USERS,
            "pvpn_key": str(services.user_key(topology, user)),
            "ssh_key": str(services.ssh_key(topology, user)),
        }
    return {
        "name": topology.name,
        "dir": str(topology.root),
        "hosts": {
            host.role: {
                "namespace": host.namespace,
                "addresses": topology.addresses(host.role),
                "supervisord": str(topology.host_dir(host.role) / "supervisord.conf"),
            }
            for host in topology.hosts
        },
        "users": lab_users,
        "created_users": users.registered(name),
        "ports": {"pvpn": PVPN_PORT, "http": HTTP_PORT, "iperf3": IPERF_PORT,
                  "udp_echo": ECHO_PORT, "ssh": SSH_PORT},
        "server": {"ipv4": str(server_link.right4), "ipv6": str(server_link.right6),
                   "port": PVPN_PORT, "dns_name": f"{topology.name}-server"},
        "target": {"ipv4": str(target_link.right4), "ipv6": str(target_link.right6),
                   "subnets": services.target_subnets(topology)},
        "ca": str(ca),
        "client_socket": str(sock),
        "configs": {role: str(services.node_config(topology, role))
                    for role in ("client", *topology.chain_roles)},
        "files": files,
        "gateways": topology.gateways,
        "chain": chain,
        "connect": connect,
        "ssh": ssh,
        "logs": logs,
    }
