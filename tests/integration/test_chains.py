"""Personal VPNs chained through gateways, in real labs with 1 and 2 gateways: every hop a
namespace, every node under supervisord, real users and clients (issue 3)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import pytest
from vpnlib import (
    capture, clear_packets, connect, connect_argv, curl, disconnect, fetch_ok, sh, status,
    udp_echo, vpn,
)

from pvpn.cli.lab.lab import exec_argv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab2(lab_factory: Callable[..., ContextManager[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    with lab_factory(nodes=True, gateways=2) as info:
        yield info


@pytest.fixture(scope="module")
def lab1(lab_factory: Callable[..., ContextManager[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    with lab_factory(nodes=True, gateways=1) as info:
        yield info


def gateways(info: dict[str, Any]) -> list[str]:
    return [role for role in info["hosts"] if role.startswith("gw")]


def log_text(info: dict[str, Any], role: str) -> str:
    program = "pvpn-gateway" if role.startswith("gw") else f"pvpn-{role}"
    return Path(info["logs"][role][program]).read_text()


def records(info: dict[str, Any], role: str) -> list[dict[str, Any]]:
    out = []
    for line in log_text(info, role).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # supervisord may interleave a line of its own
    return out


def refused(info: dict[str, Any], user: str, argv: list[str]) -> str:
    proc = sh(info, "client", user, *argv, timeout=90)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0, out
    return out


def all_links(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(host, interface) for every link between the client and the server."""
    chain = ["client", *gateways(info)]
    return [(host, iface) for host in chain
            for iface, meta in info["hosts"][host]["addresses"].items()
            if meta["peer"] != "client" or host == "client"]


# ---------------------------------------------------------------- what a user sees


@pytest.mark.parametrize("which", ["lab1", "lab2"])
def test_alice_reaches_the_target_through_the_chain_and_bob_does_not(
        which: str, request: pytest.FixtureRequest) -> None:
    info = request.getfixturevalue(which)
    with vpn(info, "alice") as session:
        fetch_ok(info, "alice", "1m")
        fetch_ok(info, "alice", "10k", "url6")
        for address in (info["target"]["ipv4"], info["target"]["ipv6"]):
            ping = sh(info, "client", "alice", "ping", "-c", "2", "-i", "0.2", "-W", "3", address)
            assert ping.returncode == 0, ping.stdout.decode()
            assert udp_echo(info, "alice", address, "chained").stdout == b"chained"
        ssh = sh(info, "client", "alice", *shlex.split(info["ssh"]["alice"]), "id", "-un")
        assert ssh.stdout.decode().strip() == "alice", ssh.stderr.decode()
        assert curl(info, "bob", info["files"]["1k"]["url4"], 3).returncode != 0
        # Every node of the chain opened the same session for alice.
        for role in [*gateways(info), "server"]:
            opened = [r for r in records(info, role)
                      if r.get("event") == "session:opened" and r.get("session") == session]
            assert opened and opened[0]["user"] == "alice", role


def test_alice_and_bob_chains_at_once_replies_never_cross(lab2: dict[str, Any]) -> None:
    with vpn(lab2, "alice") as s_alice, vpn(lab2, "bob") as s_bob:
        assert s_alice != s_bob
        procs = []
        for user in ("alice", "bob"):
            for name in ("big", "1m", "100k", "10k"):
                argv, cwd = exec_argv(lab2["name"], "client", user,
                                      ["curl", "-sS", "--max-time", "150",
                                       lab2["files"][name]["url4"]])
                procs.append((user, name, subprocess.Popen(
                    argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        for user in ("alice", "bob"):
            for i in range(5):
                echo = udp_echo(lab2, user, lab2["target"]["ipv6"], f"{user}-{i}")
                assert echo.stdout.decode() == f"{user}-{i}", echo.stderr.decode()
        for user, name, proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, (user, name, err.decode())
            assert hashlib.sha256(out).hexdigest() == lab2["files"][name]["sha256"], (user, name)


def test_marker_never_in_clear_on_any_link_and_gateways_never_see_it(
        lab2: dict[str, Any]) -> None:
    marker = f"PVPN-CHAIN-MARKER-{time.time_ns()}"
    links = all_links(lab2)
    with vpn(lab2, "alice"), contextlib.ExitStack() as stack:
        pcaps = [(host, iface, stack.enter_context(capture(lab2, host, iface)))
                 for host, iface in links]
        proc = curl(lab2, "alice", f"http://{lab2['target']['ipv4']}/{marker}", 10,
                    "client", "-d", marker * 20)
        assert proc.returncode == 0, proc.stderr.decode()
        fetch_ok(lab2, "alice", "100k")
    for host, iface, pcap in pcaps:
        data = pcap.read_bytes()
        assert len(data) > 1000, f"nothing captured on {host}/{iface}"
        assert marker.encode() not in data, f"marker in clear on {host}/{iface}"
        assert clear_packets(pcap, lab2) == [], f"clear target traffic on {host}/{iface}"
    for role in gateways(lab2):
        assert marker not in log_text(lab2, role)
    assert marker in Path(lab2["logs"]["target"]["nginx-access"]).read_text()


def test_status_shows_every_hop_of_the_chain(lab2: dict[str, Any]) -> None:
    argv = connect_argv(lab2, "alice")
    vias = [argv[i + 1] for i, word in enumerate(argv) if word == "--via"]
    server = argv[len(argv) - argv[::-1].index(vias[-1])]  # the word after the last --via
    with vpn(lab2, "alice"):
        shown = status(lab2, "alice")
    assert f"via gw1 ({vias[0]}) > gw2 ({vias[1]}) > server ({server});" in shown, shown


# ---------------------------------------------------------------- refusals


def test_a_failed_connect_says_why_and_names_the_hop(lab1: dict[str, Any]) -> None:
    """The reason was empty ("cannot reach 10.77.1.99:4433: "). A port nobody listens on
    is refused at once; a gateway whose next hop drops its SYNs says so after its
    connect_timeout; both name the hop."""
    argv = connect_argv(lab1, "alice")
    first = argv.index("--via")
    gateway, server = argv[first + 1], argv[first + 2]
    direct = argv[:first] + [gateway.replace(":4433", ":4499")] + argv[first + 3:]
    gw_ns = lab1["hosts"]["gw1"]["namespace"]
    server_address = server.rsplit(":", 1)[0]
    drop = ["OUTPUT", "-p", "tcp", "--syn", "-d", server_address, "--dport", "4433",
            "-j", "DROP"]
    # One after the other: alice's two attempts protect the same prefixes.
    out = refused(lab1, "alice", direct)
    assert f"cannot reach {gateway.replace(':4433', ':4499')}: connection refused (the " \
           "host is up but nothing listens on that port" in out, out
    subprocess.run(["ip", "netns", "exec", gw_ns, "iptables", "-I", *drop], check=True)
    silent = None
    try:
        command, cwd = exec_argv(lab1["name"], "client", "alice", argv)
        silent = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        said = silent.communicate(timeout=90)[0].decode()
    finally:
        subprocess.run(["ip", "netns", "exec", gw_ns, "iptables", "-D", *drop], check=True)
        if silent is not None and silent.poll() is None:
            silent.kill()
            silent.wait(timeout=10)
            disconnect(lab1, "alice")
    assert silent.returncode != 0, said
    assert f"gw1 cannot reach the next hop {server}: no answer within" in said, said
    assert "(timed out: the host is down, or a firewall drops the packets)" in said, said


def test_a_user_the_gateway_does_not_allow_is_refused(lab2: dict[str, Any]) -> None:
    argv = connect_argv(lab2, "alice")
    argv[argv.index("--key") + 1] = lab2["users"]["carol"]["pvpn_key"]
    out = refused(lab2, "carol", argv)
    assert "not authorised" in out and "gw1" in out


def test_a_next_hop_the_gateway_does_not_allow_is_refused(lab2: dict[str, Any]) -> None:
    argv = connect_argv(lab2, "alice")
    # Drop the second --via: gw1 would have to forward straight to the server.
    second = [i for i, a in enumerate(argv) if a == "--via"][1]
    del argv[second:second + 2]
    out = refused(lab2, "alice", argv)
    assert "may not forward" in out


def test_a_looped_chain_is_refused(lab2: dict[str, Any]) -> None:
    argv = connect_argv(lab2, "alice")
    first = argv.index("--via")
    looped = argv[:first + 2] + argv[first:]  # --via gw1 --via gw1 --via gw2 ...
    assert "twice" in refused(lab2, "alice", looped)


@contextlib.contextmanager
def extra_gateway(info: dict[str, Any], name: str, port: int,
                  certificate: str | None = None) -> Iterator[str]:
    """A second pvpn-gateway on gw1's host (side by side with gw1), same policy, own port."""
    config = Path(info["hosts"]["gw1"]["supervisord"]).parent / "gateway.toml"
    text = config.read_text().replace('name = "gw1"', f'name = "{name}"')
    lines = []
    for line in text.splitlines():
        if line.startswith("listen"):
            line = line.replace(":4433", f":{port}")
        if certificate and line.startswith("certificate"):
            line = f'certificate = "{certificate}"'
        if certificate and line.startswith("private_key"):
            line = f'private_key = "{certificate[:-4]}.key"'
        if line.startswith("control"):
            line = f'control = "{config.with_name(f"{name}.ctl")}"'
        lines.append(line)
    path = config.with_name(f"{name}.toml")
    path.write_text("\n".join(lines) + "\n")
    log = config.with_name(f"{name}.log")
    ns = info["hosts"]["gw1"]["namespace"]
    program = str(Path(sys.executable).parent / "pvpn-gateway")
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, program, "--config", str(path)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(50):
            if "node:started" in log.read_text():
                break
            time.sleep(0.1)
        yield str(log)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        path.unlink()


def test_a_gateway_with_a_wrong_certificate_is_refused(lab2: dict[str, Any]) -> None:
    server_cert = str(Path(lab2["hosts"]["server"]["supervisord"]).parent / "server.crt")
    if not Path(server_cert).exists():
        pytest.fail(f"lab layout changed: no {server_cert}")
    with extra_gateway(lab2, "gw1x", 4435, certificate=server_cert):
        argv = connect_argv(lab2, "alice")
        first = argv.index("--via")
        argv[first + 1] = argv[first + 1].replace(":4433", ":4435")
        out = refused(lab2, "alice", argv)
    assert "certificate" in out and "not" in out


def test_two_gateways_side_by_side_replies_take_their_own(lab2: dict[str, Any]) -> None:
    with extra_gateway(lab2, "gw1b", 4434) as side_log:
        bob_argv = connect_argv(lab2, "bob", "--background")
        first = bob_argv.index("--via")
        bob_argv[first + 1] = bob_argv[first + 1].replace(":4433", ":4434")
        with vpn(lab2, "alice") as s_alice:
            proc = sh(lab2, "client", "bob", *bob_argv)
            assert proc.returncode == 0, proc.stderr.decode()
            try:
                s_bob = proc.stdout.decode().split("session ")[1].split()[0]
                for user in ("alice", "bob"):
                    fetch_ok(lab2, user, "1m")
                    assert udp_echo(lab2, user, lab2["target"]["ipv4"], user).stdout == user.encode()
            finally:
                disconnect(lab2, "bob")
        time.sleep(1)
        side = Path(side_log).read_text()
        main = log_text(lab2, "gw1")
        assert s_bob in side and s_alice not in side
        assert s_alice in main and s_bob not in main


# ---------------------------------------------------------------- gateway logs


def test_gateway_logs_say_who_where_when_and_how_much(lab2: dict[str, Any]) -> None:
    session = connect(lab2, "alice")
    try:
        fetch_ok(lab2, "alice", "100k")
    finally:
        disconnect(lab2, "alice")
    time.sleep(1.5)
    uid = lab2["users"]["alice"]["uid"]
    for role in gateways(lab2):
        mine = [r for r in records(lab2, role) if r.get("session") == session]
        events = {r["event"] for r in mine}
        assert {"session:opened", "session:closed"} <= events, (role, events)
        opened = next(r for r in mine if r["event"] == "session:opened")
        closed = next(r for r in mine if r["event"] == "session:closed")
        assert opened["user"] == "alice" and opened["uid"] == uid
        assert opened["prev_hop"] and opened["next_hop"] and opened["client"]
        assert closed["bytes_from_next"] > 100_000 and closed["bytes_to_next"] > 0
        assert closed["envelopes_from_user"] > 0 and closed["envelopes_to_user"] > 0
        assert closed["reason"]


def gw_ctl(info: dict[str, Any], role: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", info["hosts"][role]["namespace"],
                           str(Path(sys.executable).parent / "supervisorctl"), "-c",
                           info["hosts"][role]["supervisord"], *args],
                          capture_output=True, text=True, timeout=60).stdout


def test_gateway_status_and_reload_keep_the_session(lab2: dict[str, Any]) -> None:
    """`pvpn status` on a gateway shows alice's spliced session and the daemon's health; a
    SIGHUP re-reads the gateway's users without dropping it."""
    session = connect(lab2, "alice")
    try:
        fetch_ok(lab2, "alice", "100k")
        config = lab2["configs"]["gw1"]
        proc = sh(lab2, "gw1", "root", "pvpn", "status", "--node", config, "--supervisord",
                  lab2["hosts"]["gw1"]["supervisord"], "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        report = json.loads(proc.stdout)
        (mine,) = [s for s in report["nodes"][0]["sessions"] if s["session"] == session]
        assert mine["user"] == "alice" and mine["state"] == "up"
        assert mine["bytes_from_next"] > 100_000 and mine["next_hop"].endswith(":4433")
        assert any("pvpn-gateway" in line and "RUNNING" in line
                   for line in report["supervisord"])
        gw_ctl(lab2, "gw1", "signal", "HUP", "pvpn-gateway")
        deadline = time.monotonic() + 10
        while '"node:reloaded"' not in log_text(lab2, "gw1") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert '"node:reloaded"' in log_text(lab2, "gw1")
        fetch_ok(lab2, "alice", "10k")
        assert not [r for r in records(lab2, "gw1")
                    if r.get("event") == "session:closed" and r.get("session") == session]
    finally:
        disconnect(lab2, "alice")
