"""Shared test helpers: a lab of network namespaces for integration tests.

The module-scoped ``lab`` fixture gives each test module one lab with its pvpn nodes (the
``pvpn lab info`` JSON); ``lab_factory(nodes=..., gateways=..., name=...)`` is a context
manager for more labs (unique names, always removed, also on failure).  Run commands on a
lab host with ``pvpn.cli.lab.lab.run_as(info["name"], HOST, USER, [...])``.  Lab fixtures skip,
with the reason, when not root or when namespaces are unusable; ``lab_usable`` skips alone.
(With --import-mode=importlib this file is not importable: use its fixtures.)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager

import pytest

# The integration tests share helpers (tests/integration/vpnlib.py); with importlib mode the
# test folders are not on sys.path by themselves.
sys.path.insert(0, str(Path(__file__).parent / "integration"))

LabInfo = dict[str, Any]


def lab_unusable_reason() -> str | None:
    """Why integration tests cannot build a lab here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, users)"
    probe = f"pvpnprobe{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True,
                       timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` is unusable here: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    from pvpn.cli.lab.lab import REQUIRED_PROGRAMS
    from pvpn.cli.lab.commands import find_program

    missing = [p for p in REQUIRED_PROGRAMS if find_program(p) is None]
    if missing:
        return f"missing {', '.join(missing)} (run `bash scripts/run test`)"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip where labs can't be built; in CI (CI=true, root, set up by scripts/run) a lab that
    can't be built is a failure, never a silently skipped integration suite."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"integration tests cannot run in CI: {reason}")
    pytest.skip(reason)


def unique_lab_name(prefix: str = "t") -> str:
    return f"{prefix}{secrets.token_hex(3)}"


@contextlib.contextmanager
def running_lab(*, nodes: bool = True, gateways: int = 0, name: str | None = None
                ) -> Iterator[LabInfo]:
    """A lab that is up for the ``with`` block and removed afterwards, also on failure."""
    reason = lab_unusable_reason()
    if reason:
        skip_or_fail(reason)
    from pvpn.cli.lab import lab

    name = name or unique_lab_name()
    try:
        lab.up(name, gateways, nodes=nodes, say=lambda _m: None)
        yield lab.info(name)
    finally:
        lab.down(name, say=lambda _m: None)


@pytest.fixture(scope="module")
def lab() -> Iterator[LabInfo]:
    """One lab with its pvpn nodes per test module."""
    with running_lab(nodes=True) as info:
        yield info


@pytest.fixture(scope="session")
def lab_usable() -> None:
    """Skip the test unless labs can be built here."""
    reason = lab_unusable_reason()
    if reason:
        skip_or_fail(reason)


@pytest.fixture(scope="session")
def lab_factory() -> Callable[..., ContextManager[LabInfo]]:
    """``with lab_factory(nodes=False) as info:`` builds a lab and always removes it."""
    return running_lab
