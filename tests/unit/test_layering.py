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

def imports(path: Path, typing_too: bool = True) -> set[str]:
    """The modules ``path`` imports, lazily too; with ``typing_too=False`` not those imported
    only for the type checker (``if TYPE_CHECKING:``), which never run."""
    tree = ast.parse(path.read_text(), str(path))
    if not typing_too:
        for node in ast.walk(tree):
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                    and node.test.id == "TYPE_CHECKING"):
                node.body = []
    names: set[str] = set()
    for node in ast.walk(tree):
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


PROGRAMS = sorted([*ROOT.glob("client/*.py"), *ROOT.glob("gateway/*.py"),
                   *ROOT.glob("server/*.py")])


def test_the_node_programs_import_no_tool() -> None:
    # The lab and the bench ship in pvpn.cli beside the nodes (an extra would select
    # dependencies, not modules); no node ever loads them, or the trace tools.
    assert len(PROGRAMS) > 5
    assert violations(PROGRAMS, ("pvpn.cli",), set()) == []


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    import socket\n    from pvpn.io import rawsock\n")
    assert imports(sneaky) >= {"socket", "pvpn.io", "pvpn.io.rawsock"}



def module_name(path: Path, root: Path = ROOT) -> str:
    """``path``'s import name: client/, gateway/ and server/ install as pvpn.client, ..."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] != "pvpn":
        parts = ("pvpn", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted([
    *ROOT.glob("pvpn/**/*.py"), *ROOT.glob("client/*.py"), *ROOT.glob("gateway/*.py"),
    *ROOT.glob("server/*.py")])}


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round about (Tarjan's
    strongly connected components of the import graph, lazy imports included)."""
    graph = {name: sorted(m for m in imports(path, typing_too=False)
                          if m in modules and m != name)
             for name, path in modules.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        order[name] = low[name] = len(order)
        stack.append(name)
        for other in graph[name]:
            if other not in order:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], order[other])
        if low[name] == order[name]:
            group = []
            while stack[-1] != name:
                group.append(stack.pop())
            group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in graph:
        if name not in order:
            visit(name)
    return cycles


def test_no_modules_import_each_other() -> None:
    # Such a pair (pvpn trace and the lab's demo were one) is held apart only by the order in
    # which its imports happen to run; one import moved to the top breaks both.
    assert len(MODULES) > 60 and "pvpn.client.daemon" in MODULES
    assert import_cycles(MODULES) == []


def test_the_cycle_check_sees_a_lazy_cycle_and_not_a_type_checking_one(tmp_path: Path) -> None:
    (tmp_path / "pvpn").mkdir()
    files = {"a": "from pvpn import b\n", "b": "def f():\n    import pvpn.c\n",
             "c": "from pvpn.a import x\n",
             "d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pvpn import e\n",
             "e": "from pvpn import d\n"}
    for name, text in files.items():
        (tmp_path / "pvpn" / f"{name}.py").write_text(text)
    modules = {module_name(p, tmp_path): p for p in (tmp_path / "pvpn").glob("*.py")}
    assert import_cycles(modules) == [["pvpn.a", "pvpn.b", "pvpn.c"]]
