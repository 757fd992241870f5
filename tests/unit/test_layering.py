"""The layers stay apart (issue 11): the core (``pvpn/*.py``, ``pvpn/nodes/``) opens no
socket, runs no program and reads no clock, and imports neither the adapters (``pvpn.io``),
the programs (``pvpn.client``, ``pvpn.server``, ``pvpn.gateway``) nor the tools
(``pvpn.cli``); the adapters import no program and no tool. Read from the source's import
statements (``ast``), so a lazy import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted([*ROOT.glob("pvpn/*.py"), *ROOT.glob("pvpn/nodes/*.py")])
ADAPTERS = sorted(ROOT.glob("pvpn/io/*.py"))

#: What only an adapter, a program or a tool may touch.
IO_MODULES = {"socket", "subprocess", "asyncio", "select", "selectors", "threading", "time",
              "signal", "multiprocessing", "fcntl", "ssl", "http", "urllib"}
OUTER = ("pvpn.io", "pvpn.client", "pvpn.server", "pvpn.gateway", "pvpn.cli")
PROGRAMS_AND_TOOLS = ("pvpn.client", "pvpn.server", "pvpn.gateway", "pvpn.cli")

def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(paths: list[Path], banned: tuple[str, ...], modules: set[str]) -> list[str]:
    found = []
    for path in paths:
        relative = str(path.relative_to(ROOT))
        for name in sorted(imports(path)):
            top = name.split(".")[0]
            bad = within(name, banned) or (top in modules and name == top)
            if bad:
                found.append(f"{relative} imports {name}")
    return found


def test_the_core_imports_no_io_no_adapter_no_program_and_no_tool() -> None:
    assert len(CORE) > 20  # the globs still find the core
    assert violations(CORE, OUTER, IO_MODULES) == []


def test_the_adapters_import_no_program_and_no_tool() -> None:
    assert len(ADAPTERS) > 5
    assert violations(ADAPTERS, PROGRAMS_AND_TOOLS, set()) == []


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    import socket\n    from pvpn.io import rawsock\n")
    assert imports(sneaky) >= {"socket", "pvpn.io", "pvpn.io.rawsock"}
