"""The lab's addressing and generated configurations, without root or namespaces."""

from __future__ import annotations

import configparser
import ipaddress
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

from pvpn.config import load_client_config
from pvpn.cli.lab import services
from pvpn.cli.lab import topology as topology_module
from pvpn.cli.lab.errors import LabError
from pvpn.cli.lab.topology import build_topology, check_name, is_lab_namespace

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_addressing_follows_the_design_without_gateways() -> None:
    topology = build_topology("pvpnlab")
    assert [h.namespace for h in topology.hosts] == [
        "pvpnlab-client", "pvpnlab-server", "pvpnlab-target"]
    assert topology.server_link.right4 == ipaddress.ip_address("10.77.0.2")
    assert topology.server_link.right6 == ipaddress.ip_address("fd77::2")
    assert str(topology.target_link.subnet4) == "10.77.1.0/24"
    assert str(topology.target_link.subnet6) == "fd77:0:0:1::/64"
    assert topology.addresses("server") == {
        "pvpnlab-0b": {"link": "0", "ipv4": "10.77.0.2/24", "ipv6": "fd77::2/64",
                       "peer": "client"},
        "pvpnlab-1a": {"link": "1", "ipv4": "10.77.1.1/24", "ipv6": "fd77:0:0:1::1/64",
                       "peer": "target"},
    }
    assert topology.right_link("target") is None and topology.left_link("client") is None


def test_addressing_with_gateways() -> None:
    topology = build_topology("abcdefghij", 8)
    assert [h.role for h in topology.hosts][1:3] == ["gw1", "gw2"]
    assert len(topology.links) == 10
    assert str(topology.target_link.subnet6) == "fd77:0:0:9::/64"
    # IFNAMSIZ: interface names have at most 15 characters.
    assert max(len(link.right_ifname) for link in topology.links) <= 15
    with pytest.raises(LabError):
        build_topology("x", 9)


@pytest.mark.parametrize("name", ["", "A", "1lab", "lab-1", "abcdefghijk", "lab/x", "lab\n"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(LabError, match="invalid lab name"):
        check_name(name)


def test_namespaces_are_recognised_by_exact_prefix() -> None:
    assert is_lab_namespace("pvpn", "pvpn-client")
    assert is_lab_namespace("pvpn", "pvpn-gw3")
    assert not is_lab_namespace("pvpn", "pvpnlab-client")
    assert not is_lab_namespace("pvpn", "pvpn-clientx")


def test_node_configs_parse(tmp_path: Path) -> None:
    topology = build_topology("t1")
    client_file = tmp_path / "client.toml"
    client_file.write_text(services.client_toml(topology))
    client = load_client_config(client_file)
    assert client.socket == Path("/run/pvpn-lab/t1/client/pvpn-client.sock")
    server = tomllib.loads(services.server_toml(topology))
    assert server["server"]["listen"] == ["10.77.0.2:4433", "[fd77::2]:4433"]
    assert sorted(server["users"]) == ["alice", "bob"]
    assert server["users"]["bob"]["allow"] == ["10.77.1.0/24", "fd77:0:0:1::/64"]


def test_the_chain_with_two_gateways() -> None:
    topology = build_topology("t2", 2)
    assert topology.chain_roles == ("gw1", "gw2", "server")
    assert topology.endpoints("gw1") == ["10.77.0.2:4433", "[fd77::2]:4433"]
    assert topology.endpoints("gw2") == ["10.77.1.2:4433", "[fd77:0:0:1::2]:4433"]
    assert topology.endpoints("server") == ["10.77.2.2:4433", "[fd77:0:0:2::2]:4433"]
    assert [topology.next_hop(r) for r in ("client", "gw1", "gw2")] == ["gw1", "gw2", "server"]
    assert topology.server_link.index == 2 and str(topology.target_link.subnet4) == "10.77.3.0/24"
    with pytest.raises(LabError):
        topology.endpoints("client")
    assert [services.node_program(r) for r in ("client", "gw1", "gw2", "server", "target")] == [
        "pvpn-client", "pvpn-gateway", "pvpn-gateway", "pvpn-server", None]
    assert services.node_log(topology, "gw2") == Path("/run/pvpn-lab/t2/gw2/pvpn-gateway.log")
    assert services.node_config(topology, "gw1") == Path("/run/pvpn-lab/t2/gw1/gateway.toml")


@pytest.mark.parametrize("gateways", [0, 1, 2, 8])
def test_connect_command_goes_via_every_gateway(gateways: int) -> None:
    topology = build_topology("t3", gateways)
    argv = services.connect_argv(topology, "alice")
    vias = [argv[i + 1] for i, word in enumerate(argv) if word == "--via"]
    assert vias == [f"10.77.{k}.2:4433" for k in range(gateways)]
    assert argv[:2] == ["pvpn", "connect"]
    server = argv[2 + 2 * gateways]
    assert server == f"10.77.{gateways}.2:4433"
    assert argv[argv.index("--key") + 1] == "/run/pvpn-lab/t3/users/alice/id_rsa"
    tos = [argv[i + 1] for i, word in enumerate(argv) if word == "--to"]
    assert tos == [f"10.77.{gateways + 1}.0/24", f"fd77:0:0:{gateways + 1}::/64"]


def test_server_config_stays_on_its_left_link_with_gateways() -> None:
    server = tomllib.loads(services.server_toml(build_topology("t2", 2)))
    assert server["server"]["listen"] == ["10.77.2.2:4433", "[fd77:0:0:2::2]:4433"]
    for user in ("alice", "bob"):
        assert server["users"][user]["allow"] == ["10.77.3.0/24", "fd77:0:0:3::/64"]


@pytest.mark.parametrize("role, listen, nexthop", [
    ("gw1", ["10.77.0.2:4433", "[fd77::2]:4433"],
     ["10.77.1.2:4433", "[fd77:0:0:1::2]:4433"]),
    ("gw2", ["10.77.1.2:4433", "[fd77:0:0:1::2]:4433"],
     ["10.77.2.2:4433", "[fd77:0:0:2::2]:4433"]),
])
def test_gateway_configs(role: str, listen: list[str], nexthop: list[str]) -> None:
    text = services.gateway_toml(build_topology("t2", 2), role)
    data = tomllib.loads(text)
    gateway = data["gateway"]
    assert gateway["name"] == role and gateway["listen"] == listen
    assert gateway["certificate"] == f"/run/pvpn-lab/t2/{role}/{role}.crt"
    assert gateway["private_key"] == f"/run/pvpn-lab/t2/{role}/{role}.key"
    assert gateway["authorized_keys"] == f"/run/pvpn-lab/t2/{role}/users"
    assert gateway["connect_timeout"] > 0
    assert sorted(data["users"]) == ["alice", "bob"]  # carol may pass nowhere
    for user in ("alice", "bob"):
        assert data["users"][user] == {"next": nexthop}


def test_gateway_configs_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's own loader accepts what the lab writes (files made where it names)."""
    config = pytest.importorskip("pvpn.config")
    if not hasattr(config, "load_gateway_config"):
        pytest.skip("pvpn.config.load_gateway_config does not exist yet")
    monkeypatch.setattr(topology_module, "LAB_ROOT", tmp_path)
    topology = build_topology("t2", 2)
    for role, next_hop in (("gw1", ("10.77.1.2", 4433)), ("gw2", ("fd77:0:0:2::2", 4433))):
        gw_dir = topology.host_dir(role)
        (gw_dir / "users").mkdir(parents=True)
        for suffix in ("crt", "key"):
            (gw_dir / f"{role}.{suffix}").write_text("placeholder\n")
        path = services.node_config(topology, role)
        path.write_text(services.gateway_toml(topology, role))
        loaded = config.load_gateway_config(path)
        assert loaded.name == role
        assert sorted(loaded.listen) == sorted(
            (host.strip("[]"), 4433) for host, _, _port in
            (e.rpartition(":") for e in topology.endpoints(role)))
        assert sorted(loaded.users) == ["alice", "bob"]
        assert loaded.users["alice"].permits(*next_hop)
        assert not loaded.users["alice"].permits(next_hop[0], 4434)
        assert not loaded.users["bob"].permits("10.77.3.2", 4433)  # not past the next hop


def test_supervisord_sections_are_valid_ini() -> None:
    topology = build_topology("t1")
    target = configparser.RawConfigParser()
    target.read_string(services.target_supervisord_conf(
        topology, {"nginx": "/n", "iperf3": "/i", "socat": "/s", "sshd": "/d"}))
    programs = sorted(s for s in target.sections() if s.startswith("program:"))
    assert programs == ["program:echo4", "program:echo6", "program:iperf3",
                        "program:nginx", "program:sshd"]
    for role in ("client", "server", "gateway"):
        section = configparser.RawConfigParser()
        section.read(SHIPPED / f"pvpn-{role}.conf")
        program = section[f"program:pvpn-{role}"]
        # A real node's fixed directories: nothing for supervisord's environment to define.
        assert program["command"] == f"pvpn-{role} --config /etc/pvpn/{role}.toml"
        assert program["stdout_logfile"] == f"/var/log/pvpn/pvpn-{role}.log"
        assert program["startretries"] == "3" and program["stopwaitsecs"] == "15"
    setup_py = (SHIPPED.parent / "setup.py").read_text()
    assert '"supervisord.d/pvpn-gateway.conf"' in setup_py


SHIPPED = Path(__file__).resolve().parents[2] / "supervisord.d"
SHIPPED_FILES = ("supervisord.conf", "pvpn-client.conf", "pvpn-server.conf", "pvpn-gateway.conf")


def settings(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True)
                   if not line.lstrip().startswith(";"))


def test_the_shipped_files_need_no_environment() -> None:
    """`supervisorctl -c /etc/pvpn/supervisord.conf status` failed in a root shell ("Format
    string ... contains names ('ENV_PVPN_RUNDIR') which cannot be expanded") unless
    PVPN_ETC, PVPN_LOGDIR and PVPN_RUNDIR were exported; the files name the paths now."""
    for name in SHIPPED_FILES:
        text = (SHIPPED / name).read_text()
        assert "ENV_" not in text and "PVPN_" not in text, name
        # %(here)s (the file's own directory) is the only expansion left.
        assert settings(text).replace("%(here)s", "").count("%(") == 0, name
    main = configparser.RawConfigParser()
    main.read(SHIPPED / "supervisord.conf")
    assert main["unix_http_server"]["file"] == "/run/pvpn/supervisor.sock"
    assert main["supervisorctl"]["serverurl"] == "unix:///run/pvpn/supervisor.sock"
    assert main["supervisord"]["pidfile"] == "/run/pvpn/supervisord.pid"
    assert main["include"]["files"] == "%(here)s/pvpn-*.conf"
    # supervisorctl's own reading of it, in an environment without PVPN_*.
    from supervisor.options import ClientOptions

    options = ClientOptions()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVPN_")}
    with mock.patch.dict(os.environ, env, clear=True):
        options.realize(["-c", str(SHIPPED / "supervisord.conf")])
    assert options.serverurl == "unix:///run/pvpn/supervisor.sock"


def test_the_lab_writes_copies_for_its_hosts_directories(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped files, with the host's directory for /etc/pvpn, /var/log/pvpn and /run/pvpn:
    the lab needs no PVPN_* either, and runs what a real node runs."""
    monkeypatch.setattr(topology_module, "LAB_ROOT", tmp_path)
    topology = build_topology("t2", 2)
    for role, program, kind in (("gw1", "pvpn-gateway", "gateway"),
                                ("client", "pvpn-client", "client"),
                                ("server", "pvpn-server", "server")):
        host_dir = topology.host_dir(role)
        section_text = services.node_program_conf(topology, role, program)
        conf_text = services.node_supervisord_conf(topology, role, program)
        for text in (section_text, conf_text):
            assert "ENV_" not in text
            for real in ("/etc/pvpn", "/var/log/pvpn", "/run/pvpn"):
                assert real not in settings(text), (role, real)
        section = configparser.RawConfigParser()
        section.read_string(section_text)
        shipped = configparser.RawConfigParser()
        shipped.read(SHIPPED / f"{program}.conf")
        copy, original = section[f"program:{program}"], shipped[f"program:{program}"]
        assert copy["command"] == f"{program} --config {host_dir}/{kind}.toml"
        assert copy["stdout_logfile"] == f"{host_dir}/{program}.log"
        changed = {k for k in original if copy[k] != original[k]}
        assert set(copy) == set(original) and changed == {"command", "stdout_logfile"}

        conf = configparser.RawConfigParser()
        conf.read_string(conf_text)
        main = configparser.RawConfigParser()
        main.read(SHIPPED / "supervisord.conf")
        assert conf["include"]["files"] == str(host_dir / f"{program}.conf")
        assert conf["supervisord"]["identifier"] == f"t2-{role}"
        assert conf["supervisord"]["umask"] == main["supervisord"]["umask"] == "077"
        assert conf["supervisord"]["logfile"] == f"{host_dir}/supervisord.log"
        assert conf["supervisord"]["childlogdir"] == str(host_dir)
        assert conf["unix_http_server"]["file"] == f"{host_dir}/supervisor.sock"
        assert conf["unix_http_server"]["chmod"] == "0700"
        assert conf["supervisorctl"]["serverurl"] == f"unix://{host_dir}/supervisor.sock"
        # Written where it includes them, supervisorctl reads it with no PVPN_* set.
        host_dir.mkdir(parents=True)
        (host_dir / f"{program}.conf").write_text(section_text)
        (host_dir / "supervisord.conf").write_text(conf_text)
        from supervisor.options import ClientOptions

        options = ClientOptions()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVPN_")}
        with mock.patch.dict(os.environ, env, clear=True):
            options.realize(["-c", str(host_dir / "supervisord.conf")])
        assert options.serverurl == f"unix://{host_dir}/supervisor.sock"


def test_for_host_replaces_whole_directories_in_settings_only() -> None:
    text = ("; /etc/pvpn stays in a comment\n"
            "command=x --config /etc/pvpn/a.toml --old /etc/pvpn-old/b /run/pvpnx /opt/etc/pvpn\n"
            "logfile=/var/log/pvpn\n"
            "serverurl=unix:///run/pvpn/supervisor.sock\n")
    assert services.for_host(text, Path("/h")) == (
        "; /etc/pvpn stays in a comment\n"
        "command=x --config /h/a.toml --old /etc/pvpn-old/b /run/pvpnx /opt/etc/pvpn\n"
        "logfile=/h\n"
        "serverurl=unix:///h/supervisor.sock\n")


def test_sha256sums_round_trip() -> None:
    digests = {"0": "e3b0" * 16, "1k": "ab" * 32}
    assert services.parse_sha256sums(services.sha256sums(digests)) == digests
