"""The lab's addressing and generated configurations, without root or namespaces."""

from __future__ import annotations

import configparser
import ipaddress
import sys
from pathlib import Path

import pytest

from pvpn.config import load_client_config
from pvpn.lab import services
from pvpn.lab.errors import LabError
from pvpn.lab.topology import build_topology, check_name, is_lab_namespace

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


@pytest.mark.parametrize("name", ["", "A", "1lab", "lab-1", "abcdefghijk", "lab/x"])
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


def test_supervisord_sections_are_valid_ini() -> None:
    topology = build_topology("t1")
    target = configparser.RawConfigParser()
    target.read_string(services.target_supervisord_conf(
        topology, {"nginx": "/n", "iperf3": "/i", "socat": "/s", "sshd": "/d"}))
    programs = sorted(s for s in target.sections() if s.startswith("program:"))
    assert programs == ["program:echo4", "program:echo6", "program:iperf3",
                        "program:nginx", "program:sshd"]
    shipped = Path(__file__).resolve().parents[2] / "supervisord.d"
    for role in ("client", "server"):
        section = configparser.RawConfigParser()
        section.read(shipped / f"pvpn-{role}.conf")
        program = section[f"program:pvpn-{role}"]
        assert program["command"] == f"pvpn-{role} --config %(ENV_PVPN_ETC)s/{role}.toml"
        assert program["startretries"] == "3" and program["stopwaitsecs"] == "15"


def test_sha256sums_round_trip() -> None:
    digests = {"0": "e3b0" * 16, "1k": "ab" * 32}
    assert services.parse_sha256sums(services.sha256sums(digests)) == digests
