"""The pure parts of the bench's wireguard-go path: its keys, its `wg setconf` files, its
device names, the MTU read back from `ip link`, and its place in --peers and --only (nothing
here runs a command)."""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvpn.cli.bench import cli, paths
from pvpn.errors import ConfigError


def test_public_key_is_x25519_of_the_private_key() -> None:
    # RFC 7748 section 6.1, Alice's key pair, in wg's base64.
    private = base64.b64encode(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")).decode()
    public = base64.b64encode(bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")).decode()
    assert paths.wireguard_public_key(private) == public


def test_keypairs_are_fresh_clamped_and_consistent() -> None:
    (private, public), (other, _) = paths.wireguard_keypair(), paths.wireguard_keypair()
    assert private != other
    raw = base64.b64decode(private)
    assert len(raw) == 32 and raw[0] & 7 == 0 and raw[31] & 0xC0 == 0x40
    assert paths.wireguard_public_key(private) == public
    assert len(base64.b64decode(public)) == 32


def test_server_config_listens_and_allows_only_the_client() -> None:
    assert paths.wireguard_config("S", "C", ["10.79.0.2/32"], listen_port=51820) == (
        "[Interface]\n"
        "PrivateKey = S\n"
        "ListenPort = 51820\n"
        "\n"
        "[Peer]\n"
        "PublicKey = C\n"
        "AllowedIPs = 10.79.0.2/32\n")


def test_client_config_reaches_the_server_for_the_tunnel_and_the_target() -> None:
    text = paths.wireguard_config("C", "S", ["10.79.0.0/24", "10.77.1.0/24"],
                                  endpoint="10.77.0.2:51820")
    assert "ListenPort" not in text
    assert text.splitlines()[-2:] == ["AllowedIPs = 10.79.0.0/24, 10.77.1.0/24",
                                      "Endpoint = 10.77.0.2:51820"]


def test_device_names_are_the_labs_own_and_fit_ifnamsiz() -> None:
    longest = "b1234567wz"  # lab names have at most 10 characters
    client = paths.wireguard_interface(longest, "client")
    server = paths.wireguard_interface(longest, "server")
    assert client != server
    assert client.startswith(f"{longest}-") and server.startswith(f"{longest}-")
    assert max(len(client), len(server)) <= 15


def test_mtu_is_read_from_ip_link_show() -> None:
    shown = ("7: bab12w-wgc: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1420 qdisc "
             "fq_codel state UNKNOWN mode DEFAULT group default qlen 500\n"
             "    link/none \n")
    assert paths.link_mtu(shown) == 1420
    assert paths.link_mtu("garbage") is None


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def test_peers_include_wireguard_go_and_only_names_it_with_peers() -> None:
    assert "wireguard-go" in cli.options_from(_bench_args("--peers")).paths
    assert "wireguard-go" not in cli.options_from(_bench_args()).paths
    only = cli.options_from(_bench_args("--peers", "--only", "direct,wireguard-go"))
    assert only.paths == ["direct", "wireguard-go"]
    with pytest.raises(ConfigError, match="add --peers"):
        cli.options_from(_bench_args("--only", "wireguard-go"))


def test_pvpn_client_s_processes_are_not_the_user_s_connect_or_disconnect(tmp_path: Path
                                                                          ) -> None:
    # Before: the needles "pvpn-client" and ROOT/client/ matched `pvpn connect --socket
    # ROOT/client/pvpn-client.sock` too, so its CPU counted twice in the bench's totals.
    root = str(tmp_path)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    daemon = subprocess.Popen([*sleeper, "pvpn-client", "--config", f"{root}/client/client.toml"])
    connect = subprocess.Popen([*sleeper, "pvpn", "connect", "--socket",
                                f"{root}/client/pvpn-client.sock"])
    other = subprocess.Popen([*sleeper, "pvpn-client", "--config", f"{root}x/client/client.toml"])
    try:
        for _ in range(100):  # until the three have exec'd (their command lines are set)
            if all(Path(f"/proc/{p.pid}/cmdline").read_bytes().count(b"\0") > 4
                   for p in (daemon, connect, other)):
                break
            time.sleep(0.01)
        assert paths.daemon_processes("pvpn-client", root, "client") == [daemon.pid]
    finally:
        for proc in (daemon, connect, other):
            proc.kill()
            proc.wait()
