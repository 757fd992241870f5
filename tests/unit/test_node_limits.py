"""The nodes' limits are [server] / [gateway] settings with safe defaults (issue 9 points 7, 8;
docs/design.md "Limits and defences: the nodes")."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvpn.config import NodeLimits, load_gateway_config, load_server_config
from pvpn.errors import ConfigError


def base(tmp_path: Path, role: str) -> str:
    for name in ("node.crt", "node.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "users").mkdir(exist_ok=True)
    return (f'[{role}]\nname = "{role}"\nlisten = ["127.0.0.1:4433"]\n'
            f'certificate = "{tmp_path}/node.crt"\nprivate_key = "{tmp_path}/node.key"\n'
            f'authorized_keys = "{tmp_path}/users"\n')


@pytest.mark.parametrize("role, load", [("server", load_server_config),
                                        ("gateway", load_gateway_config)])
def test_limits_defaults_settings_and_mistakes(tmp_path: Path, role: str, load: object) -> None:
    path = tmp_path / f"{role}.toml"
    path.write_text(base(tmp_path, role))
    assert load(path).limits == NodeLimits(  # type: ignore[operator]
        hello_timeout=10, auth_timeout=15, reauth_interval=3600, preauth_per_source=32,
        preauth_max=256)
    path.write_text(base(tmp_path, role) + "hello_timeout = 5\nauth_timeout = 20\n"
                    "reauth_interval = 600\npreauth_per_source = 8\npreauth_max = 64\n")
    assert load(path).limits == NodeLimits(5, 20, 600, 8, 64)  # type: ignore[operator]
    for bad, setting in (("hello_timeout = 0", "hello_timeout"),
                         ("hello_timeout = 20\nauth_timeout = 15", "auth_timeout"),
                         ("reauth_interval = 1", "reauth_interval"),
                         ("preauth_max = 0", "preauth_max"),
                         ("preauth_per_source = 300", "preauth_per_source"),
                         ('preauth_max = "many"', "preauth_max")):
        path.write_text(base(tmp_path, role) + bad + "\n")
        with pytest.raises(ConfigError, match=rf"\[{role}\] {setting}"):
            load(path)  # type: ignore[operator]


def test_a_gateways_sessions_per_user(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(base(tmp_path, "gateway"))
    assert load_gateway_config(path).sessions_per_user == 10
    path.write_text(base(tmp_path, "gateway") + "sessions_per_user = 3\n")
    assert load_gateway_config(path).sessions_per_user == 3
    path.write_text(base(tmp_path, "gateway") + "sessions_per_user = 0\n")
    with pytest.raises(ConfigError, match=r"\[gateway\] sessions_per_user"):
        load_gateway_config(path)


@pytest.mark.parametrize("role, load, section", [
    ("server", load_server_config, 'allow = ["10.0.0.0/8"]'),
    ("gateway", load_gateway_config, 'next = ["10.0.0.2:4433"]'),
])
def test_a_user_name_with_a_trailing_newline_is_refused(
        tmp_path: Path, role: str, load: object, section: str) -> None:
    # `^...$` with .match() took "alice\n" ($ matches before a final newline); fullmatch does not.
    path = tmp_path / f"{role}.toml"
    path.write_text(base(tmp_path, role) + f'[users.alice]\n{section}\n')
    assert list(load(path).users) == ["alice"]  # type: ignore[operator]
    path.write_text(base(tmp_path, role) + f'[users."alice\\n"]\n{section}\n')
    with pytest.raises(ConfigError, match=r"\[users\.alice"):
        load(path)  # type: ignore[operator]



@pytest.mark.parametrize("role, load, setting, value", [
    ("server", load_server_config, "name", "node"),
    ("gateway", load_gateway_config, "name", "node"),
    ("server", load_server_config, "instance", "a"),  # a gateway has no rules, no instance
])
def test_a_node_name_or_instance_with_a_trailing_newline_is_refused(
        tmp_path: Path, role: str, load: object, setting: str, value: str) -> None:
    # The same `^...$`-with-.match() hole as the user names': "node\n" would name a node in
    # every record, and an instance every rule and chain of the node.
    path = tmp_path / f"{role}.toml"
    text = base(tmp_path, role).replace(f'name = "{role}"\n', 'name = "node"\n')
    path.write_text(text.replace(f'{setting} = "node"\n', "") + f'{setting} = "{value}"\n')
    assert getattr(load(path), setting) == value  # type: ignore[operator]
    path.write_text(text.replace(f'{setting} = "node"\n', "") + f'{setting} = "{value}\\n"\n')
    with pytest.raises(ConfigError, match=rf"\[{role}\] {setting}"):
        load(path)  # type: ignore[operator]
