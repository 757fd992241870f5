"""Nodes under supervisord (issue 4): SIGHUP reloads keys and users without dropping
sessions, SIGTERM makes the server keep its sessions for their resume (issue 10) while
pvpn-client keeps its sessions held (issue 9), a broken config ends FATAL (not in a restart
loop), and `pvpn status` on a node shows its sessions and health."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import pytest
from vpnlib import connect, connect_argv, disconnect, fetch_ok, sh, status

from pvpn.config import load_server_config
from pvpn.state import decode_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slab(lab_factory: Callable[..., ContextManager[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    with lab_factory(nodes=True) as info:
        yield info


def ctl(info: dict[str, Any], host: str, *args: str) -> str:
    conf = info["hosts"][host]["supervisord"]
    return subprocess.run(["ip", "netns", "exec", info["hosts"][host]["namespace"],
                           str(Path(sys.executable).parent / "supervisorctl"), "-c", conf, *args],
                          capture_output=True, text=True, timeout=60).stdout


def wait_state(info: dict[str, Any], host: str, program: str, state: str,
               seconds: float = 40) -> None:
    deadline = time.monotonic() + seconds
    out = ""
    while time.monotonic() < deadline:
        out = ctl(info, host, "status", program)
        if state in out:
            return
        time.sleep(0.3)
    raise AssertionError(f"{program} on {host} not {state}: {out}")


def server_log(info: dict[str, Any]) -> str:
    return Path(info["logs"]["server"]["pvpn-server"]).read_text()


def test_sighup_reloads_users_and_keys_without_dropping_sessions(slab: dict[str, Any]) -> None:
    server_dir = Path(slab["configs"]["server"]).parent
    config = Path(slab["configs"]["server"])
    original = config.read_text()
    carol_pub = Path(slab["users"]["carol"]["pvpn_key"] + ".pub")
    carol_argv = connect_argv(slab, "alice", "--background")
    carol_argv[carol_argv.index("--key") + 1] = slab["users"]["carol"]["pvpn_key"]
    session = connect(slab, "alice")
    try:
        assert sh(slab, "client", "carol", *carol_argv).returncode != 0
        (server_dir / "users" / "carol.pub").write_bytes(carol_pub.read_bytes())
        allow = original.split("[users.alice]")[1].split("\n[")[0]
        config.write_text(original + f"\n[users.carol]{allow}\n")
        ctl(slab, "server", "signal", "HUP", "pvpn-server")
        deadline = time.monotonic() + 10
        while '"node:reloaded"' not in server_log(slab) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc = sh(slab, "client", "carol", *carol_argv)
        assert proc.returncode == 0, proc.stderr.decode()
        fetch_ok(slab, "carol", "1k")
        # alice's session went on through the reload.
        fetch_ok(slab, "alice", "10k")
        assert session in status(slab, "alice")
        assert '"event":"session:closed","session":"' + session not in server_log(slab)
    finally:
        disconnect(slab, "carol")
        disconnect(slab, "alice")
        config.write_text(original)
        (server_dir / "users" / "carol.pub").unlink(missing_ok=True)
        ctl(slab, "server", "signal", "HUP", "pvpn-server")


def test_pvpn_status_on_a_node_shows_sessions_and_daemon_health(slab: dict[str, Any]) -> None:
    session = connect(slab, "alice")
    try:
        fetch_ok(slab, "alice", "10k")
        for host, config in (("server", slab["configs"]["server"]),
                             ("client", slab["configs"]["client"])):
            proc = sh(slab, host, "root", "pvpn", "status", "--node", config, "--supervisord",
                      slab["hosts"][host]["supervisord"], "--json")
            assert proc.returncode == 0, proc.stderr.decode()
            report = json.loads(proc.stdout)
            (node,) = report["nodes"]
            (mine,) = [s for s in node["sessions"] if s["session"] == session]
            assert mine["user"] == "alice" and mine["state"] == "up"
            assert mine["bytes_in"] > 10_000 and mine["age"] >= 0
            assert any("RUNNING" in line for line in report["supervisord"])
        text = sh(slab, "server", "root", "pvpn", "status", "--node", slab["configs"]["server"],
                  "--supervisord", slab["hosts"]["server"]["supervisord"]).stdout.decode()
        assert session in text and "pvpn-server" in text and "RUNNING" in text
        # Not for other users: the node's control socket is root's.
        denied = sh(slab, "server", "alice", "pvpn", "status", "--node",
                    slab["configs"]["server"])
        assert denied.returncode != 0
    finally:
        disconnect(slab, "alice")


def rules(info: dict[str, Any], host: str) -> str:
    ns = info["hosts"][host]["namespace"]
    return "".join(subprocess.run(["ip", "netns", "exec", ns, tool], capture_output=True,
                                  text=True).stdout for tool in ("iptables-save", "ip6tables-save"))


def test_sigterm_server_keeps_sessions_for_their_resume_client_keeps_them_held(
        slab: dict[str, Any]) -> None:
    """An orderly stop is no end of the sessions (issue 10): the server detaches them, saves
    them with their mappings, keeps the NAT ports' rules (the kernel drops what nobody reads:
    no reset from the host's own stack ends a connection meanwhile) and takes its ICMP rules
    away; alice's tunnel process holds and resumes the same session from the next server."""
    session = connect(slab, "alice")
    since = len(server_log(slab))
    state = load_server_config(Path(slab["configs"]["server"])).state_file
    assert state is not None
    try:
        assert "PVPNS-IN" in rules(slab, "server")
        ctl(slab, "server", "stop", "pvpn-server")
        wait_state(slab, "server", "pvpn-server", "STOPPED")
        log = server_log(slab)[since:]
        assert f'"event":"session:detached","session":"{session}"' in log
        assert f'"event":"session:closed","session":"{session}"' not in log
        assert session in [s.id.hex() for s in decode_state(state.read_bytes()).sessions]
        assert (state.stat().st_mode & 0o777) == 0o600
        left = [line for line in rules(slab, "server").splitlines() if "PVPNS" in line]
        assert any("-p tcp" in line and "NFQUEUE" in line for line in left), left
        assert not any("icmp" in line for line in left), left
        # pvpn-client's SIGTERM is no end of the protection (issue 9): alice's session stays
        # in the kernel, held, for the next pvpn-client.
        ctl(slab, "client", "stop", "pvpn-client")
        wait_state(slab, "client", "pvpn-client", "STOPPED")
        assert "PVPNC-S0" in rules(slab, "client")
    finally:
        ctl(slab, "server", "start", "pvpn-server")
        ctl(slab, "client", "start", "pvpn-client")
        wait_state(slab, "server", "pvpn-server", "RUNNING")
        wait_state(slab, "client", "pvpn-client", "RUNNING")
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and f'"event":"session:resumed","session":' \
                f'"{session}"' not in server_log(slab)[since:]:
            time.sleep(0.5)
        assert f'"event":"session:resumed","session":"{session}"' in server_log(slab)[since:]
        fetch_ok(slab, "alice", "1k")
        assert session in status(slab, "alice")
    finally:
        disconnect(slab, "alice")


def test_a_broken_config_is_refused_and_ends_fatal(slab: dict[str, Any]) -> None:
    config = Path(slab["configs"]["server"])
    original = config.read_text()
    try:
        config.write_text(original.replace('nat_ports = "', 'nat_ports = "9-'))
        ctl(slab, "server", "restart", "pvpn-server")
        wait_state(slab, "server", "pvpn-server", "FATAL", 60)
        log = server_log(slab)
        assert "configuration error" in log and "nat_ports" in log
    finally:
        config.write_text(original)
        ctl(slab, "server", "start", "pvpn-server")
        wait_state(slab, "server", "pvpn-server", "RUNNING")
    connect(slab, "alice")
    try:
        fetch_ok(slab, "alice", "1k")
    finally:
        disconnect(slab, "alice")
