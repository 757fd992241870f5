"""Temporary users for the scale test, each with a pvpn key authorised at the server.

The lab has only alice, bob and carol; the scale test needs up to 50 users, each with a VPN
of their own.  :class:`ScaleUsers` creates local users named ``pvb<token><nn>`` (GECOS
``pvpn bench user``, home in the lab's directory), gives each an RSA key, installs the public
key in the server's ``authorized_keys`` directory, adds a ``[users.NAME]`` section allowing
the target's subnets to server.toml and makes pvpn-server re-read its users (SIGHUP through
the host's supervisorctl).  :meth:`ScaleUsers.remove` deletes the users again; the keys and
the configuration go with the lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pvpn.cli.bench.paths import PathUnavailable, connect_argv, SESSION_RE
from pvpn.errors import PvpnError
from pvpn.names import NODE_RELOAD_FAILED, NODE_RELOADED
from pvpn.cli.lab import lab, services
from pvpn.cli.lab import users as lab_users
from pvpn.cli.lab.commands import find_program, run
from pvpn.cli.lab.topology import Topology

Say = Callable[[str], None]

GECOS = "pvpn bench user"
KEY_BITS = 2048  # the smallest pvpn accepts: 50 keys are made at bench time
CONNECT_BATCH = 8  # `pvpn connect`s started at once
CONNECT_TIMEOUT = 90.0
RELOAD_TIMEOUT = 15.0
MAX_USERS = 60  # below the lab client's max_sessions (64), alice's session included


class ScaleUsers:
    """Temporary users of one lab and their VPN sessions."""

    def __init__(self, topology: Topology, token: str) -> None:
        self.topology = topology
        self.token = token
        self.names: list[str] = []
        self.connected: list[str] = []

    def home(self, name: str) -> Path:
        return self.topology.root / "bench-users" / name

    def key(self, name: str) -> Path:
        return self.home(name) / "id_rsa"

    def create(self, count: int, say: Say) -> None:
        """Create ``count`` users, authorise their keys and reload pvpn-server."""
        from pvpn import auth

        if not 1 <= count <= MAX_USERS:
            raise PathUnavailable(f"scale users must number 1..{MAX_USERS}, not {count}")
        server_dir = self.topology.host_dir("server")
        allow = services.target_subnets(self.topology)
        sections: list[str] = []
        say(f"bench: creating {count} temporary users with pvpn keys")
        for i in range(count):
            name = f"pvb{self.token}{i:02d}"
            home = self.home(name)
            home.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if lab_users.lookup(name) is not None:
                raise PathUnavailable(f"user {name} exists already; remove it with "
                                      f"`userdel {name}` if a bench left it behind")
            run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell",
                 "/usr/sbin/nologin", "--comment", GECOS, name])
            self.names.append(name)
            account = lab_users.require_user(name)
            home.mkdir(mode=0o700, exist_ok=True)
            os.chown(home, account.uid, account.gid)
            key = auth.generate_user_key(KEY_BITS)
            auth.save_private_key(key, self.key(name))
            os.chown(self.key(name), account.uid, account.gid)
            auth.save_public_key(key, server_dir / "users" / f"{name}.pub",
                                 f"{name}@bench")
            sections += ["", f"[users.{name}]",
                         "allow = " + json.dumps(allow)]
        config = services.node_config(self.topology, "server")
        with open(config, "a") as out:
            out.write("\n".join(sections) + "\n")
        self._reload_server()

    def _reload_server(self) -> None:
        """SIGHUP pvpn-server through supervisorctl; wait for its node:reloaded record."""
        supervisorctl = find_program("supervisorctl")
        if supervisorctl is None:
            raise PathUnavailable("supervisorctl not found")
        log = services.node_log(self.topology, "server")
        before = log.stat().st_size if log.exists() else 0
        conf = self.topology.host_dir("server") / "supervisord.conf"
        run([supervisorctl, "-c", str(conf), "signal", "HUP", "pvpn-server"], timeout=30)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        for _ in range(int(RELOAD_TIMEOUT / 0.1) + 1):
            with open(log, "rb") as handle:
                handle.seek(before)
                tail = handle.read().decode(errors="replace")
            if NODE_RELOADED in tail and self.names[-1] in tail:
                return
            if NODE_RELOAD_FAILED in tail:
                raise PathUnavailable(f"pvpn-server could not reload its users: {tail[-300:]}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise PathUnavailable(f"pvpn-server did not reload its users in {RELOAD_TIMEOUT:g} s")

    def connect(self, names: list[str], say: Say) -> list[str]:
        """Open the VPN of each user (a few at a time); returns the users that failed."""
        failed: list[str] = []
        pending = [n for n in names if n not in self.connected]
        say(f"bench: opening {len(pending)} VPN sessions of temporary users")
        for start in range(0, len(pending), CONNECT_BATCH):
            batch = pending[start:start + CONNECT_BATCH]
            procs: list[tuple[str, subprocess.Popen[bytes]]] = []
            for name in batch:
                argv, cwd = lab.exec_argv(self.topology.name, "client", name, connect_argv(
                    self.topology, name, self.key(name), self.home(name) / "connect.log"))
                procs.append((name, subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                                     stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT)))
            for name, proc in procs:
                try:
                    out, _ = proc.communicate(timeout=CONNECT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate(timeout=10)
                if proc.returncode == 0 and SESSION_RE.search(out.decode(errors="replace")):
                    self.connected.append(name)
                else:
                    failed.append(name)
        return failed

    def remove(self) -> list[str]:
        """Delete the users (their processes must be gone: the lab's namespaces are);
        returns warnings, never raises."""
        warnings: list[str] = []
        for name in self.names:
            account = lab_users.lookup(name)
            if account is None:
                continue
            _kill_user_processes(account.uid)
            try:
                result = run(["userdel", name], check=False, timeout=30)
            except PvpnError as exc:
                warnings.append(f"userdel {name}: {exc}")
                continue
            if lab_users.lookup(name) is not None:
                warnings.append(f"could not delete user {name}: "
                                f"{result.stderr.decode(errors='replace').strip()}")
        self.names = []
        self.connected = []
        return warnings


def _kill_user_processes(uid: int) -> None:
    """SIGKILL what still runs as one of the bench's temporary users (bounded)."""
    for _ in range(3):
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat().st_uid == uid:
                        pids.append(int(entry.name))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        time.sleep(0.3)
