"""``pvpn lab demo``: the story of alice and bob, told with real commands in a real lab.

The lab has two gateways: client - gw1 - gw2 - server - target, and each user's VPN runs
through the whole chain.  Every step prints the command it runs (as the ``pvpn lab exec``
line one would type) and checks its outcome; at the end the nodes' logs show alice's session
hop by hop, as ``pvpn trace`` shows it.  The lab is removed at the end whatever happens.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pvpn import trace
from pvpn.cli.lab import lab, services
from pvpn.cli.lab.commands import find_program, quote, spawn
from pvpn.cli.lab.errors import LabError
from pvpn.cli.lab.topology import Topology
from pvpn.cli.trace import read_records, with_rotated
from pvpn.names import SESSION_CLOSED

DEMO_NAME = "pvpndemo"
DEMO_GATEWAYS = 2
FETCH_TIMEOUT = 20  # seconds curl may take through the tunnel
BLOCKED_TIMEOUT = 4  # seconds before bob's direct attempt is declared failed
CONNECT_TIMEOUT = 45  # seconds `pvpn connect` may take to build a chain
LOGS_TIMEOUT = 5.0  # seconds the nodes get to log the end of alice's session
SESSION_UP = re.compile(r"\bsession ([0-9a-f]{32}) is up\b")


class DemoFailed(LabError):
    """A step of the story did not turn out as told."""


def _out(text: str = "") -> None:
    print(text, flush=True)


class Story:
    """Runs the demo's commands on lab hosts and narrates them."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        # Users get /usr/local/bin/pvpn from scripts/run; from a source tree, use the venv's.
        self.pvpn = "pvpn" if Path("/usr/local/bin/pvpn").exists() else (
            find_program("pvpn") or "pvpn")
        self.sums = services.parse_sha256sums(
            (topology.host_dir("target") / "www" / "SHA256SUMS").read_text())

    def shown(self, user: str, command: Sequence[str]) -> str:
        return quote(["pvpn", "lab", "exec", "--name", self.topology.name, "client",
                      "--user", user, "--", *command])

    def start(self, user: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        _out(f"  $ {self.shown(user, command)}")
        argv, cwd = lab.exec_argv(self.topology.name, "client", user, list(command))
        return spawn(argv, capture=True, cwd=cwd)

    @staticmethod
    def finish(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, bytes, bytes]:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate(timeout=10)
            return -1, stdout, stderr + b"\n(killed: took too long)"
        return process.returncode, stdout, stderr

    def run(self, user: str, command: Sequence[str], timeout: float) -> tuple[int, bytes, bytes]:
        return self.finish(self.start(user, command), timeout)

    def connect_command(self, user: str) -> list[str]:
        return [*services.connect_argv(self.topology, user, self.pvpn), "--background"]

    def connect(self, user: str) -> str:
        """Open ``user``'s VPN through the chain; the session id it printed."""
        result = self.run(user, self.connect_command(user), timeout=CONNECT_TIMEOUT)
        self.expect_ok(f"{user}'s pvpn connect", result)
        match = SESSION_UP.search((result[1] + result[2]).decode(errors="replace"))
        if match is None:
            raise DemoFailed(f"{user}'s pvpn connect did not print `session <id> is up`")
        return match.group(1)

    def url(self, file: str) -> str:
        return f"http://{self.topology.target_link.right4}/{file}"

    def check_fetch(self, user: str, file: str, result: tuple[int, bytes, bytes]) -> None:
        status, body, stderr = result
        if status != 0:
            raise DemoFailed(f"{user}'s curl of {file} failed (exit {status}): "
                             f"{stderr.decode(errors='replace').strip()}")
        digest = hashlib.sha256(body).hexdigest()
        if digest != self.sums.get(file):
            raise DemoFailed(f"{user} got {len(body)} bytes of {file} with sha256 {digest}, "
                             f"expected {self.sums.get(file)}")
        _out(f"    {user} got {len(body)} bytes, sha256 {digest[:16]}... matches SHA256SUMS")

    def expect_blocked(self, user: str) -> None:
        """``user``'s packets to the target must not get there (no VPN of theirs is up)."""
        status, _, stderr = self.run(user, ["curl", "-sS", "--max-time", str(BLOCKED_TIMEOUT),
                                            "-o", "/dev/null", self.url("1k")],
                                     timeout=BLOCKED_TIMEOUT + 10)
        if status == 0:
            raise DemoFailed(f"{user} reached the target without a VPN of their own")
        _out(f"    fails as expected: {stderr.decode(errors='replace').strip()}")

    def node_logs(self) -> list[tuple[str, Path]]:
        """The client's and every chain node's log, in chain order."""
        t = self.topology
        return [(role, services.node_log(t, role)) for role in ("client", *t.chain_roles)]

    def session_view(self, session: str) -> list[dict[str, Any]]:
        """alice's records from every node's log, once every node logged the end of her
        session (bounded: whatever is there after LOGS_TIMEOUT)."""
        logs = self.node_logs()
        deadline = time.monotonic() + LOGS_TIMEOUT
        while True:
            files = [f for _role, path in logs for f in with_rotated(path)]
            records = trace.select_session(read_records(files), session)
            # Every hop has logged the end of her session (its counters come with it).
            closed = {r.get("node") for r in records if r.get("event") == SESSION_CLOSED}
            if closed >= {role for role, _path in logs} or time.monotonic() >= deadline:
                return records
            time.sleep(0.2)

    def expect_ok(self, what: str, result: tuple[int, bytes, bytes]) -> None:
        status, stdout, stderr = result
        for line in (stdout + stderr).decode(errors="replace").strip().splitlines():
            _out(f"    {line}")
        if status != 0:
            raise DemoFailed(f"{what} failed (exit {status})")

    def tell(self) -> None:
        t = self.topology
        hops = ", ".join(f"{t.host(role).namespace} ({t.listen_link(role).right4})"
                         for role in t.gateway_roles)
        _out(f"""
The lab {t.name} is a chain of hosts:
  a client host ({t.host('client').namespace}) where alice and bob log in,
  {len(t.gateway_roles)} gateways: {hops},
  a pvpn server ({t.host('server').namespace}, {t.server_link.right4}),
  and behind it a target host ({t.host('target').namespace}, {t.target_link.right4} / \
{t.target_link.right6}).
No host forwards packets: each reaches only its neighbours, so the client host reaches gw1
and nothing beyond.  A VPN runs through every gateway to the server; each hop checks the
user's key and its own policy, and only the server sees inside.
""")
        _out("1. Without a VPN, alice cannot reach the target:")
        self.expect_blocked("alice")

        vias = " and ".join(t.gateway_roles)
        _out(f"\n2. alice opens her personal VPN to the target's subnets, through {vias}:")
        alice_session = self.connect("alice")

        _out("\n3. alice fetches a file from the target through her VPN:")
        self.check_fetch("alice", "1k", self.run(
            "alice", ["curl", "-sS", "--max-time", str(FETCH_TIMEOUT), self.url("1k")],
            timeout=FETCH_TIMEOUT + 10))

        _out("\n4. bob, on the same host at the same time, does not get through alice's VPN:")
        self.expect_blocked("bob")

        _out("\n5. bob opens his own VPN through the same chain to the same server:")
        self.connect("bob")

        _out("\n6. alice and bob fetch the same file from the same server at once:")
        fetch = ["curl", "-sS", "--max-time", str(FETCH_TIMEOUT), self.url("1m")]
        running = {user: self.start(user, fetch) for user in ("alice", "bob")}
        for user, process in running.items():
            self.check_fetch(user, "1m", self.finish(process, FETCH_TIMEOUT + 10))

        _out("\n7. both close their VPNs:")
        for user in ("alice", "bob"):
            self.expect_ok(f"{user}'s pvpn disconnect",
                           self.run(user, [self.pvpn, "disconnect", "--socket",
                                           str(services.client_socket(self.topology))],
                                    timeout=30))
        _out("\n8. Without her VPN, alice's packets take the normal route again, and fail:")
        self.expect_blocked("alice")

        _out("\n9. alice's session, hop by hop, from the nodes' logs:")
        _out(f"  $ pvpn trace {alice_session} --lab {t.name}")
        records = self.session_view(alice_session)
        _out("")
        for line in trace.format_trace(trace.trace_session(records, alice_session)
                                       ).splitlines():
            _out(f"    {line}")
        missing = [role for role, _path in self.node_logs()
                   if role not in {r.get("node") for r in records}]
        if missing:
            _out(f"    (nothing logged for her session by: {', '.join(missing)})")
        _out("\nThe story is told: only the owner of a VPN gets through it, hop by hop.")


def demo(name: str = DEMO_NAME) -> int:
    """Build a lab, tell the story, remove the lab; 0 if every step turned out as told."""
    lab.require_root()
    # The demo lab belongs to the demo alone: clear leftovers of an interrupted earlier run.
    for warning in lab.down(name, say=lambda _m: None):
        print(f"pvpn lab demo: warning: {warning}", file=sys.stderr)
    missing = [p for p in ("pvpn", "pvpn-client", "pvpn-gateway", "pvpn-server")
               if find_program(p) is None]
    if missing:
        raise LabError(f"the demo needs {', '.join(missing)}; install pvpn with "
                       "`bash scripts/run demo` from the checkout")
    _out(f"$ pvpn lab up --name {name} --gateways {DEMO_GATEWAYS}")
    topology = lab.up(name, DEMO_GATEWAYS, say=_out)
    try:
        Story(topology).tell()
    finally:
        _out(f"\n$ pvpn lab down --name {name}")
        for warning in lab.down(name, say=_out):
            print(f"pvpn lab demo: warning: {warning}", file=sys.stderr)
    return 0
