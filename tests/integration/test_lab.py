"""The lab itself: namespaces, addressing, target services, users, info, exec and down.

The pvpn nodes are not started here (``--no-nodes``): these tests check the test bed that
the VPN's own integration tests stand on.
"""

from __future__ import annotations

import configparser
import hashlib
import ipaddress
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager

import pytest

from pvpn.config import load_client_config, load_server_config
from pvpn.cli.lab import lab as lablib
from pvpn.cli.lab import netns, services, users
from pvpn.cli.lab.commands import find_program
from pvpn.cli.lab.errors import LabError
from pvpn.cli.lab.topology import LAB_ROOT, LAB_USERS
from pvpn.pki import describe_certificate

pytestmark = pytest.mark.integration

LabInfo = dict[str, Any]
Factory = Callable[..., ContextManager[LabInfo]]
QUIET: Callable[[str], None] = lambda _message: None  # noqa: E731


@pytest.fixture(scope="module")
def bare_lab(lab_factory: Factory) -> Iterator[LabInfo]:
    """A lab without pvpn nodes, shared by this module's tests."""
    with lab_factory(nodes=False) as info:
        yield info


def on(info: LabInfo, host: str, cmd: list[str], *, user: str = "root",
       input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return lablib.run_as(info["name"], host, user, cmd, input=input, timeout=timeout)


def cli(*args: str, input: bytes | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[bytes]:
    """``pvpn lab ARGS`` through the lab's own command line, in a child process."""
    return subprocess.run([sys.executable, "-m", "pvpn.cli.lab.cli", "lab", *args],
                          input=input, capture_output=True, timeout=timeout, check=False)


def sums(info: LabInfo) -> dict[str, str]:
    path = Path(info["dir"]) / "target" / "www" / "SHA256SUMS"
    return services.parse_sha256sums(path.read_text())


def included_section(host_dir: Path) -> Path:
    """The program section a lab host's supervisord.conf includes (the host's own copy), which
    names the host's directory and needs no PVPN_* variable."""
    conf = configparser.RawConfigParser()
    conf.read(host_dir / "supervisord.conf")
    include = Path(conf["include"]["files"])
    assert "ENV_" not in include.read_text() and str(host_dir) in include.read_text()
    return include


def lab_processes(name: str) -> list[str]:
    """Processes whose command line mentions the lab's directory."""
    marker = f"{LAB_ROOT}/{name}/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def assert_gone(name: str) -> None:
    assert netns.lab_namespaces(name) == []
    assert not (LAB_ROOT / name).exists()
    assert lab_processes(name) == []
    assert users.registered(name) == []
    for user in LAB_USERS:
        assert name not in _labs_using(user)


def _labs_using(user: str) -> list[str]:
    if not users.REGISTRY.exists():
        return []
    data = json.loads(users.REGISTRY.read_text() or "{}")
    labs: list[str] = data.get("users", {}).get(user, [])
    return labs


# --- reachability ----------------------------------------------------------------------------


def test_client_reaches_the_server_but_not_the_target(bare_lab: LabInfo) -> None:
    server, target = bare_lab["server"], bare_lab["target"]
    for address in (server["ipv4"], server["ipv6"]):
        result = on(bare_lab, "client", ["ping", "-c", "1", "-W", "2", address])
        assert result.returncode == 0, result.stderr
    for address in (target["ipv4"], target["ipv6"]):
        assert on(bare_lab, "client", ["ping", "-c", "1", "-W", "1", address]).returncode != 0
    for url in (f"http://{target['ipv4']}/1k", f"http://[{target['ipv6']}]/1k"):
        result = on(bare_lab, "client", ["curl", "-sS", "--max-time", "2", "-o", "/dev/null", url])
        assert result.returncode != 0, f"the client reached {url} without pvpn"


def test_no_forwarding_and_the_target_has_no_default_route(bare_lab: LabInfo) -> None:
    for host in bare_lab["hosts"]:
        result = on(bare_lab, host, ["sysctl", "-n", "net.ipv4.ip_forward",
                                     "net.ipv6.conf.all.forwarding"])
        assert result.stdout.split() == [b"0", b"0"], host
    for family in ("-4", "-6"):
        routes = on(bare_lab, "target", ["ip", family, "route", "show", "default"])
        assert routes.stdout.strip() == b""
        routes = on(bare_lab, "client", ["ip", family, "route", "show", "default"])
        assert b"via" in routes.stdout


# --- target services from the server -----------------------------------------------------


def test_server_fetches_every_file_intact(bare_lab: LabInfo) -> None:
    target = bare_lab["target"]
    served = on(bare_lab, "server", ["curl", "-sS", "--max-time", "5",
                                     f"http://{target['ipv4']}/SHA256SUMS"])
    assert served.returncode == 0, served.stderr
    expected = services.parse_sha256sums(served.stdout.decode())
    assert set(expected) == set(services.WWW_FILES)
    for name, size in services.WWW_FILES.items():
        result = on(bare_lab, "server", ["curl", "-sS", "--max-time", "60",
                                         f"http://{target['ipv4']}/{name}"], timeout=90)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout) == size, name
        assert hashlib.sha256(result.stdout).hexdigest() == expected[name], name
        assert bare_lab["files"][name]["sha256"] == expected[name]
    over_v6 = on(bare_lab, "server", ["curl", "-sS", "--max-time", "5",
                                      f"http://[{target['ipv6']}]/1k"])
    assert hashlib.sha256(over_v6.stdout).hexdigest() == expected["1k"]


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_server_runs_iperf3_against_the_target(bare_lab: LabInfo, family: str) -> None:
    address = bare_lab["target"]["ipv4" if family == "-4" else "ipv6"]
    result = on(bare_lab, "server", ["iperf3", family, "-c", address, "-p", "5201",
                                     "-t", "1", "-J"], timeout=30)
    assert result.returncode == 0, result.stdout[-2000:]
    report = json.loads(result.stdout)
    assert report["end"]["sum_received"]["bytes"] > 0


@pytest.mark.parametrize("family", ["UDP4", "UDP6"])
def test_server_gets_udp_echoes(bare_lab: LabInfo, family: str) -> None:
    target = bare_lab["target"]
    address = target["ipv4"] if family == "UDP4" else f"[{target['ipv6']}]"
    payload = f"echo over {family}\n".encode()
    result = on(bare_lab, "server", ["socat", "-T", "3", "STDIO", f"{family}:{address}:7"],
                input=payload)
    assert result.stdout == payload, result.stderr


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_ssh_to_the_target_as_the_user(bare_lab: LabInfo, user: str) -> None:
    command = shlex.split(bare_lab["ssh"][user]) + ["id", "-un"]
    result = on(bare_lab, "server", command, user=user)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == user


# --- users, keys, configs --------------------------------------------------------------------


def test_exec_runs_as_the_user_with_status_and_stdin(bare_lab: LabInfo) -> None:
    name = bare_lab["name"]
    result = cli("exec", "--name", name, "client", "--user", "alice", "--", "id", "-u")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == users.require_user("alice").uid
    env = cli("exec", "--name", name, "client", "--user", "bob", "--",
              "sh", "-c", 'echo "$USER $HOME"; pwd')
    home = str(users.require_user("bob").home)
    assert env.stdout.decode().split() == ["bob", home, home]
    assert cli("exec", "--name", name, "server", "--", "sh", "-c", "exit 7").returncode == 7
    echoed = cli("exec", "--name", name, "target", "--", "cat", input=b"through stdin\n")
    assert echoed.stdout == b"through stdin\n"
    missing = cli("exec", "--name", name, "nowhere", "--", "true")
    assert missing.returncode != 0 and b"no lab host" in missing.stderr


# What the user's command finds: its session id, its pid, and whether root's terminal opens.
SESSION_PROBE = """import os
try:
    open("/dev/tty", "rb").close()
    tty = "opened root's terminal"
except OSError as exc:
    tty = "no terminal: " + type(exc).__name__
print("sid", os.getsid(0), "pid", os.getpid(), tty)
"""


@pytest.mark.parametrize("how", ["exec_argv", "pvpn lab exec"])
def test_a_user_s_command_cannot_reach_root_s_terminal(bare_lab: LabInfo, how: str) -> None:
    """The lab ran users' commands in root's session (setpriv makes none): alice's program
    could open root's terminal and push keystrokes into it. Root's shell here is a real
    pseudo-terminal whose session runs the command the way a test or `pvpn lab exec` does."""
    probe = ["/usr/bin/python3", "-c", SESSION_PROBE]
    if how == "exec_argv":
        argv, cwd = lablib.exec_argv(bare_lab["name"], "client", "alice", probe)
    else:
        argv, cwd = [sys.executable, "-m", "pvpn.cli.lab.cli", "lab", "exec", "--name",
                     bare_lab["name"], "client", "--user", "alice", "--", *probe], Path("/")
    import pty

    pid, master = pty.fork()
    if pid == 0:  # root's shell, with the pty as its controlling terminal
        try:
            os._exit(subprocess.run(argv, cwd=cwd, timeout=30).returncode)
        finally:
            os._exit(99)
    output = b""
    deadline = time.monotonic() + 40
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the pty's last writer is gone
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    words = output.decode().split()
    assert words[:1] == ["sid"], output
    sid, command_pid = int(words[1]), int(words[3])
    assert sid != pid and sid == command_pid, output  # its own session, and it leads it
    assert "no terminal:" in output.decode(), output


def test_keys_and_node_configs(bare_lab: LabInfo) -> None:
    root = Path(bare_lab["dir"])
    for user in LAB_USERS:
        account = users.require_user(user)
        key = Path(bare_lab["users"][user]["pvpn_key"])
        for path, mode in ((key.parent, 0o700), (key, 0o600), (Path(bare_lab["ssh"][user]
                                                                    .split()[2]), 0o600)):
            st = path.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (account.uid, mode), path
        assert key.with_name("id_rsa.pub").read_text().startswith("ssh-rsa ")
    authorized = sorted(p.name for p in (root / "server" / "users").iterdir())
    assert authorized == ["alice.pub", "bob.pub"]  # carol is authorised nowhere

    server = load_server_config(Path(bare_lab["configs"]["server"]))
    assert sorted(server.listen) == sorted([(bare_lab["server"]["ipv4"], 4433),
                                            (bare_lab["server"]["ipv6"], 4433)])
    assert sorted(server.users) == ["alice", "bob"]
    allowed = sorted(str(n) for n in server.users["alice"].allow)
    assert allowed == sorted(bare_lab["target"]["subnets"])
    certificate = describe_certificate(server.certificate)
    assert f"IP:{bare_lab['server']['ipv4']}" in certificate["sans"]
    assert f"IP:{bare_lab['server']['ipv6']}" in certificate["sans"]
    assert f"DNS:{bare_lab['server']['dns_name']}" in certificate["sans"]
    client = load_client_config(Path(bare_lab["configs"]["client"]))
    assert str(client.socket) == bare_lab["client_socket"]
    for role in ("client", "server"):
        include = included_section(root / role)
        assert include == root / role / f"pvpn-{role}.conf" and include.is_file()


def test_info_says_what_a_user_needs(bare_lab: LabInfo) -> None:
    result = cli("info", "--name", bare_lab["name"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    name = bare_lab["name"]
    assert {h: v["namespace"] for h, v in info["hosts"].items()} == {
        "client": f"{name}-client", "server": f"{name}-server", "target": f"{name}-target"}
    client_addrs = list(info["hosts"]["client"]["addresses"].values())
    assert client_addrs[0]["ipv4"] == "10.77.0.1/24" and client_addrs[0]["ipv6"] == "fd77::1/64"
    assert info["ports"] == {"pvpn": 4433, "http": 80, "iperf3": 5201, "udp_echo": 7, "ssh": 22}
    assert set(info["users"]) == set(LAB_USERS)
    assert info["users"]["alice"]["uid"] == users.require_user("alice").uid
    assert {f: v["size"] for f, v in info["files"].items()} == services.WWW_FILES
    assert {f: v["sha256"] for f, v in info["files"].items()} == sums(bare_lab)
    for user in ("alice", "bob"):
        words = shlex.split(info["connect"][user])
        assert words[:3] == ["pvpn", "connect", "10.77.0.2:4433"]
        assert words[words.index("--ca") + 1] == info["ca"] and Path(info["ca"]).is_file()
        assert Path(words[words.index("--key") + 1]) == Path(info["users"][user]["pvpn_key"])
        assert words[words.index("--socket") + 1] == info["client_socket"]
        tos = [words[i + 1] for i, w in enumerate(words) if w == "--to"]
        assert tos == ["10.77.1.0/24", "fd77:0:0:1::/64"]
    assert "carol" not in info["connect"]
    assert "--via" not in info["connect"]["alice"]
    assert info["gateways"] == 0
    assert [(n["role"], n["address"]) for n in info["chain"]] == [("server", "10.77.0.2:4433")]
    assert info["chain"][0]["log"] == info["logs"]["server"]["pvpn-server"]
    assert set(info["ssh"]) == set(LAB_USERS)
    assert Path(info["logs"]["target"]["nginx"]).exists()
    assert set(info["logs"]) == {"client", "server", "target"}


def test_info_of_a_missing_lab_fails_clearly(lab_usable: None) -> None:
    result = cli("info", "--name", "nosuchlab")
    assert result.returncode == 1
    assert b"lab nosuchlab is not up" in result.stderr


# --- several labs, failures, down -------------------------------------------------------


def test_two_labs_do_not_interfere(bare_lab: LabInfo, lab_factory: Factory) -> None:
    def target_answers(info: LabInfo) -> bool:
        url = f"http://{info['target']['ipv4']}/1k"
        return on(info, "server", ["curl", "-sS", "--max-time", "3", "-o", "/dev/null",
                                   url]).returncode == 0

    with lab_factory(nodes=False) as second:
        assert second["name"] != bare_lab["name"]
        assert target_answers(second) and target_answers(bare_lab)
        assert sums(second) != sums(bare_lab)  # each lab has its own random files
        for user in LAB_USERS:
            assert users.lookup(user) is not None
    assert_gone(second["name"])
    assert target_answers(bare_lab)
    for user in LAB_USERS:  # still used by the first lab
        assert users.lookup(user) is not None


# --- gateways ---------------------------------------------------------------------------------


def pings(info: LabInfo, probes: list[tuple[str, str]], wait: int = 2) -> dict[tuple[str, str],
                                                                               bool]:
    """Ping every (host, address) at once, one echo each; which answered (bounded: `wait`
    seconds per ping, all in parallel)."""
    running = {}
    for host, address in probes:
        argv, cwd = lablib.exec_argv(info["name"], host, "root",
                                     ["ping", "-n", "-q", "-c", "1", "-W", str(wait), address])
        running[(host, address)] = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait + 20
    answered = {}
    for probe, process in running.items():
        try:
            answered[probe] = process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            answered[probe] = False
    return answered


def expected_reach(info: LabInfo) -> dict[tuple[str, str], bool]:
    """Which host reaches which address of another host without pvpn.

    A host reaches the addresses on its own links (its neighbours' ends), and by its default
    route the other addresses of its right-hand neighbour (which accepts packets for any of
    its addresses); nothing else, since no host forwards.
    """
    roles = list(info["hosts"])
    owned = {role: [entry[family].split("/")[0]
                    for entry in info["hosts"][role]["addresses"].values()
                    for family in ("ipv4", "ipv6")] for role in roles}
    links = {role: [ipaddress.ip_interface(entry[family]).network
                    for entry in info["hosts"][role]["addresses"].values()
                    for family in ("ipv4", "ipv6")] for role in roles}
    expected = {}
    for i, role in enumerate(roles):
        right = roles[i + 1] if i + 1 < len(roles) else None
        for other in roles:
            if other == role:
                continue
            for address in owned[other]:
                on_link = any(ipaddress.ip_address(address) in net for net in links[role])
                expected[(role, address)] = on_link or other == right
    return expected


def test_a_chain_of_two_gateways_reaches_only_neighbours(lab_factory: Factory) -> None:
    with lab_factory(nodes=False, gateways=2) as info:
        assert list(info["hosts"]) == ["client", "gw1", "gw2", "server", "target"]
        assert info["server"]["ipv4"] == "10.77.2.2"
        assert info["target"]["ipv4"] == "10.77.3.2"
        expected = expected_reach(info)
        # The cases the chain is about, spelled out.
        for host, address, reach in [
            ("gw1", "10.77.0.1", True), ("gw1", "fd77::1", True),              # the client
            ("gw1", "10.77.1.2", True), ("gw1", "fd77:0:0:1::2", True),        # gw2
            ("gw1", "10.77.2.2", False), ("gw1", "fd77:0:0:2::2", False),      # the server
            ("client", "10.77.0.2", True),                                     # gw1
            ("client", "10.77.1.2", False), ("client", "fd77:0:0:1::2", False),  # gw2
            ("client", "10.77.2.2", False), ("client", "fd77:0:0:2::2", False),  # the server
            ("client", "10.77.3.2", False), ("client", "fd77:0:0:3::2", False),  # the target
            ("gw2", "10.77.0.1", False), ("gw2", "10.77.3.2", False),
            ("server", "10.77.3.2", True), ("server", "10.77.0.1", False),
        ]:
            assert expected[(host, address)] is reach, (host, address)
        answered = pings(info, list(expected))
        # A first echo may be lost to neighbour discovery: ask the misses once more.
        retry = [p for p, ok in answered.items() if expected[p] and not ok]
        answered.update(pings(info, retry))
        wrong = {p: ok for p, ok in answered.items() if ok != expected[p]}
        assert wrong == {}, "(host, address): answered, against expectation"


def test_gateways_configs_certificates_and_info(lab_factory: Factory) -> None:
    load_gateway_config = getattr(pytest.importorskip("pvpn.config"), "load_gateway_config",
                                  None)
    with lab_factory(nodes=False, gateways=2) as info:
        name, root = info["name"], Path(info["dir"])
        assert info["gateways"] == 2
        chain = info["chain"]
        assert [(n["role"], n["address"], n["address6"]) for n in chain] == [
            ("gw1", "10.77.0.2:4433", "[fd77::2]:4433"),
            ("gw2", "10.77.1.2:4433", "[fd77:0:0:1::2]:4433"),
            ("server", "10.77.2.2:4433", "[fd77:0:0:2::2]:4433"),
        ]
        for node in chain:
            program = services.node_program(node["role"])
            assert node["log"] == info["logs"][node["role"]][program]
            assert node["dns_name"] == f"{name}-{node['role']}"
        assert info["logs"]["gw1"]["pvpn-gateway"] == str(root / "gw1" / "pvpn-gateway.log")
        for user in ("alice", "bob"):
            words = shlex.split(info["connect"][user])
            assert words[:7] == ["pvpn", "connect", "--via", "10.77.0.2:4433",
                                 "--via", "10.77.1.2:4433", "10.77.2.2:4433"]
            tos = [words[i + 1] for i, w in enumerate(words) if w == "--to"]
            assert tos == ["10.77.3.0/24", "fd77:0:0:3::/64"] == info["target"]["subnets"]
            assert words[words.index("--key") + 1] == info["users"][user]["pvpn_key"]
            assert words[words.index("--socket") + 1] == info["client_socket"]
            assert words[words.index("--ca") + 1] == info["ca"]
        # The CLI says the same.
        shown = cli("info", "--name", name)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["chain"] == chain

        server = load_server_config(Path(info["configs"]["server"]))
        assert sorted(server.listen) == [("10.77.2.2", 4433), ("fd77:0:0:2::2", 4433)]
        assert sorted(str(n) for n in server.users["bob"].allow) == sorted(
            info["target"]["subnets"])
        for role, link, next_hop in (("gw1", 0, "10.77.1.2"), ("gw2", 1, "10.77.2.2")):
            gw_dir = root / role
            assert info["configs"][role] == str(gw_dir / "gateway.toml")
            assert sorted(p.name for p in (gw_dir / "users").iterdir()) == [
                "alice.pub", "bob.pub"]  # carol may pass nowhere
            certificate = describe_certificate(gw_dir / f"{role}.crt")
            v6 = ipaddress.ip_address(f"fd77:0:0:{link}::2")
            assert {f"IP:10.77.{link}.2", f"IP:{v6}", f"DNS:{name}-{role}"} <= set(
                certificate["sans"])
            assert stat.S_IMODE((gw_dir / f"{role}.key").stat().st_mode) & 0o077 == 0
            include = included_section(gw_dir)
            assert include == gw_dir / "pvpn-gateway.conf" and include.is_file()
            if load_gateway_config is not None:
                gateway = load_gateway_config(gw_dir / "gateway.toml")
                assert gateway.name == role
                assert (f"10.77.{link}.2", 4433) in gateway.listen
                assert sorted(gateway.users) == ["alice", "bob"]
                assert gateway.users["alice"].permits(next_hop, 4433)
                assert not gateway.users["alice"].permits("10.77.3.2", 4433)
        # The chain's programs did not start (--no-nodes).
        assert not any("pvpn-gateway" in p for p in lab_processes(name))


def test_gateway_daemons_start_and_listen(lab_factory: Factory) -> None:
    """With pvpn-gateway installed, `up --gateways 2` runs it on every gateway host."""
    if find_program("pvpn-gateway") is None:
        pytest.skip("pvpn-gateway is not installed (bash scripts/run test installs it)")
    with lab_factory(nodes=True, gateways=2) as info:
        for role in ("gw1", "gw2"):
            listening = on(info, role, ["ss", "-H", "-l", "-n", "-t", "sport", "=", ":4433"])
            assert listening.stdout.strip(), f"nothing listens on 4433 on {role}"
            # Listening comes before supervisord's startsecs (2 s) make it RUNNING.
            deadline = time.monotonic() + 15
            while True:
                status = subprocess.run(
                    [str(find_program("supervisorctl")), "-c", info["hosts"][role]["supervisord"],
                     "status", "pvpn-gateway"],
                    capture_output=True, timeout=30, check=False)
                if b"RUNNING" in status.stdout or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert b"RUNNING" in status.stdout, status.stdout
            assert Path(info["logs"][role]["pvpn-gateway"]).exists()


@pytest.mark.parametrize("failure", [LabError("injected failure"), KeyboardInterrupt()])
def test_a_failed_up_removes_what_it_made(
    lab_usable: None, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    def fail(*_args: object) -> None:
        raise failure

    monkeypatch.setattr(lablib, "_make_ssh", fail)
    name = f"f{os.urandom(3).hex()}"
    with pytest.raises(type(failure)):
        lablib.up(name, nodes=False, say=QUIET)
    assert_gone(name)


def test_up_refuses_an_existing_lab_and_bad_names(bare_lab: LabInfo) -> None:
    with pytest.raises(LabError, match="exists already"):
        lablib.up(bare_lab["name"], nodes=False, say=QUIET)
    for bad in ("Upper", "1abc", "waytoolongname", "a-b", ""):
        result = cli("up", "--name", bad, "--no-nodes")
        assert result.returncode == 1 and b"invalid lab name" in result.stderr, bad


def test_down_twice_leaves_nothing(bare_lab: LabInfo) -> None:
    name = f"d{os.urandom(3).hex()}"
    lablib.up(name, nodes=False, say=QUIET)
    try:
        assert netns.lab_namespaces(name) and lab_processes(name)
        first, second = cli("down", "--name", name), cli("down", "--name", name)
        assert first.returncode == 0, first.stderr
        assert second.returncode == 0, second.stderr
        assert_gone(name)
        for user in LAB_USERS:  # the module's lab still uses them
            assert users.lookup(user) is not None
    finally:
        lablib.down(name, say=QUIET)


def test_down_after_a_crash(lab_usable: None) -> None:
    """A lab whose state file and some pieces are missing still goes away cleanly."""
    name = f"c{os.urandom(3).hex()}"
    lablib.up(name, nodes=False, say=QUIET)
    try:
        (LAB_ROOT / name / lablib.STATE_FILE).unlink()
        netns.delete_namespace(f"{name}-client")
        assert lablib.down(name, say=QUIET) == []
        assert_gone(name)
    finally:
        lablib.down(name, say=QUIET)


def test_last_down_deletes_only_lab_created_users(bare_lab: LabInfo) -> None:
    """Runs last: removes the module's lab, then checks the users' fate."""
    assert lablib.down(bare_lab["name"], say=QUIET) == []
    assert_gone(bare_lab["name"])
    for user in LAB_USERS:
        # Gone, unless it existed before the labs or another lab (outside this test) uses it.
        account = users.lookup(user)
        assert account is None or not users.is_lab_created(user) or _labs_using(user)

    # A user that existed before any lab survives the lab.
    if users.lookup("alice") is not None:
        pytest.skip("alice exists (before the labs, or used by another lab)")
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "alice"], check=True)
    name = f"p{os.urandom(3).hex()}"
    try:
        lablib.up(name, nodes=False, say=QUIET)
        lablib.down(name, say=QUIET)
        assert users.lookup("alice") is not None
        assert users.lookup("bob") is None or _labs_using("bob")
    finally:
        lablib.down(name, say=QUIET)
        subprocess.run(["userdel", "--remove", "alice"], check=False, capture_output=True)
