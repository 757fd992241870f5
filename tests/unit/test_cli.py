"""The `pvpn` command line: named connection profiles and argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvpn.cli.main import apply_profile, build_parser, cmd_connect
from pvpn.errors import ConfigError

PROFILES = """
[profile.work]
server = "10.77.2.2:4433"
via = ["10.77.0.2", "10.77.1.2"]
to = ["10.77.3.0/24"]
ca = "/etc/pvpn/ca.crt"
key = "~/keys/work"
keepalive = 2
"""


def parsed(*argv: str) -> object:
    args = build_parser().parse_args(["connect", *argv])
    args.key_given, args.socket_given, args.keepalive_given = args.key, args.socket, args.keepalive
    return args


def test_a_profile_fills_what_the_command_line_leaves_out(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(PROFILES)
    args = parsed("--profile", "work", "--to", "10.9.0.0/24")
    apply_profile(args, profiles)  # type: ignore[arg-type]
    assert args.server == "10.77.2.2:4433" and args.via == ["10.77.0.2", "10.77.1.2"]  # type: ignore[attr-defined]
    assert args.to == ["10.9.0.0/24"], "the command line wins"  # type: ignore[attr-defined]
    assert args.ca == "/etc/pvpn/ca.crt" and args.keepalive == 2.0  # type: ignore[attr-defined]
    assert args.key == Path("~/keys/work").expanduser()  # type: ignore[attr-defined]


@pytest.mark.parametrize("text, words", [
    ("[profile.home]\nserver = 'x'\n", "no [profile.work]"),
    ("[profile.work]\nservr = 'x'\n", "unknown setting"),
    ("[profile.work]\nto = '10.0.0.0/8'\n", "list of strings"),
    ("[profile.work\n", "not valid TOML"),
])
def test_bad_profiles_say_what_is_wrong(tmp_path: Path, text: str, words: str) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(text)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        apply_profile(parsed("--profile", "work"), profiles)  # type: ignore[arg-type]


@pytest.mark.parametrize("argv, words", [
    ([], "name the server"),
    (["10.0.0.1"], "--to PREFIX"),
    (["10.0.0.1", "--to", "10.9.0.0/24"], "--ca FILE"),
    (["10.0.0.1", "--to", "nonsense", "--ca", "c"], "not an IPv4/IPv6"),
    (["10.0.0.1", "--to", "10.9.0.0/24", "--via", "10.0.0.5", "--pin", "c"], "--pin names one"),
    (["10.0.0.1", "--to", "10.9.0.0/24", "--via", "10.0.0.1", "--ca", "c"], "twice"),
])
def test_connect_refuses_unclear_requests_before_doing_anything(
        argv: list[str], words: str) -> None:
    args = build_parser().parse_args(["connect", *argv])
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        cmd_connect(args)


def test_pvpn_connect_escapes_what_nodes_said(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9 point 9: a node's refusal or close reason (and the node names of ACCEPT) reach
    the user's terminal; a rogue gateway or server must not drive it with escape sequences."""
    from pvpn.client import connect

    connect._say("refused: \x1b]0;pwned\x07\x1b[2J (auth-failed)\nsecond line")
    connect._tell("session up via gw\x1b[31m1")
    captured = capsys.readouterr()
    assert captured.err == ("pvpn: refused: \\x1b]0;pwned\\x07\\x1b[2J (auth-failed)\n"
                            "second line\n")
    assert captured.out == "pvpn: session up via gw\\x1b[31m1\n"


def test_keygen_force_replaces_its_own_public_key_and_nothing_else(tmp_path: Path) -> None:
    from pvpn.cli.main import cmd_keygen

    key, other = tmp_path / "X.pem", tmp_path / "X.pub"
    other.write_text("someone else's file\n")
    args = build_parser().parse_args(["keygen", "--key", str(key), "--bits", "2048"])
    assert cmd_keygen(args) == 0
    first = (tmp_path / "X.pem.pub").read_text()
    args.force = True
    assert cmd_keygen(args) == 0
    assert (tmp_path / "X.pem.pub").read_text() != first  # a new key, its own .pub
    assert other.read_text() == "someone else's file\n"  # X.pub is not X.pem's to delete


def test_status_names_every_hop_of_a_chain_in_order_and_escapes_them() -> None:
    from pvpn.cli.main import chain_text

    chained = {"server": "10.77.3.1:4433", "via": ["10.77.1.1:4433", "10.77.2.1:4433"],
               "nodes": ["gw1", "gw2", "server"]}
    assert chain_text(chained) == ("gw1 (10.77.1.1:4433) > gw2 (10.77.2.1:4433) > "
                                   "server (10.77.3.1:4433)")
    # Before the chain is up (or from an older `pvpn connect`): the endpoints alone.
    assert chain_text({**chained, "nodes": []}) == "10.77.1.1:4433 > 10.77.2.1:4433 > 10.77.3.1:4433"
    assert chain_text({"server": "10.77.3.1:4433"}) == "10.77.3.1:4433"
    # What a node named itself reaches root's terminal only escaped.
    hostile = chain_text({"server": "s:1", "nodes": ["\x1b]0;owned\x07"]})
    assert "\x1b" not in hostile and "\x07" not in hostile and hostile.endswith("(s:1)")
