"""The one place where pvpn runs iptables: install rule sets atomically, remove them, and
find every rule of an instance again after a crash."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Iterable

from pvpn.errors import ConfigError, PvpnError
from pvpn.firewall import TABLE, RuleSet, chain_prefix, rule_text

_TOOLS = {4: ("iptables", "iptables-restore", "iptables-save"),
          6: ("ip6tables", "ip6tables-restore", "ip6tables-save")}


def _tool(version: int, index: int) -> str:
    name = _TOOLS[version][index]
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"{name} not found; install the iptables package (apt-get install iptables)")
    return path


def apply(rules: RuleSet) -> None:
    """Install both families' rules, each in one atomic iptables-restore transaction."""
    for version, text in ((4, rules.v4), (6, rules.v6)):
        if not text:
            continue
        proc = subprocess.run([_tool(version, 1), "-w", "5", "--noflush"], input=text,
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise PvpnError(f"{_TOOLS[version][1]} refused the rules: {proc.stderr.strip()}")


def remove(commands: list[list[str]]) -> list[str]:
    """Undo rules: one atomic iptables-restore per family when everything is still there
    (the usual case, and fast), else command by command, tolerating what is already gone."""
    errors: list[str] = []
    for version in (4, 6):
        text = "\n".join([f"*{TABLE}", *(rule_text(args) for args in commands), "COMMIT", ""])
        proc = subprocess.run([_tool(version, 1), "-w", "5", "--noflush"], input=text,
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            errors += run_each(commands, (version,))
    return errors


def run_each(commands: Iterable[list[str]], versions: Iterable[int] = (4, 6)) -> list[str]:
    """Run iptables commands one by one; a rule or chain that is already gone is fine.
    Returns the errors that were not of that kind."""
    errors = []
    for version in versions:
        for args in commands:
            proc = subprocess.run([_tool(version, 0), "-w", "5", "-t", TABLE, *args],
                                  capture_output=True, text=True, timeout=30)
            err = proc.stderr.strip()
            if proc.returncode != 0 and not _is_missing(err):
                errors.append(f"{_TOOLS[version][0]} {' '.join(args)}: {err}")
    return errors


def _is_missing(err: str) -> bool:
    lowered = err.lower()
    return any(s in lowered for s in ("does not exist", "no chain", "bad rule", "not found",
                                      "no such file"))


def saved(version: int) -> str:
    """The ruleset of our table as iptables-save prints it."""
    proc = subprocess.run([_tool(version, 2), "-t", TABLE], capture_output=True, text=True,
                          timeout=30)
    return proc.stdout


def ensure_jump(builtin: str, chain: str) -> None:
    """``-I builtin 1 -j chain`` in both families, unless it is there already (no duplicates)."""
    for version in (4, 6):
        check = subprocess.run([_tool(version, 0), "-w", "5", "-t", TABLE, "-C", builtin, "-j",
                                chain], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            run_each([["-I", builtin, "1", "-j", chain]], (version,))


def ensure_rule(rule: str) -> None:
    """Insert ``rule`` (a chain and its arguments, as iptables-save prints them without
    ``-A``) first in its chain in both families, unless it is there already."""
    chain, *args = shlex.split(rule)
    for version in (4, 6):
        check = subprocess.run([_tool(version, 0), "-w", "5", "-t", TABLE, "-C", chain, *args],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            run_each([["-I", chain, "1", *args]], (version,))


def remove_chains(chains: list[str], referring: str) -> list[str]:
    """Remove these chains and the jumps to them from chain ``referring``."""
    errors: list[str] = []
    for version in (4, 6):
        jumps = []
        for line in saved(version).splitlines():
            if line.startswith(f"-A {referring} "):
                args = shlex.split(line)
                if "-j" in args and args[args.index("-j") + 1] in chains:
                    jumps.append(["-D", *args[1:]])
        errors += run_each(jumps, (version,))
        errors += run_each([["-F", c] for c in chains], (version,))
        errors += run_each([["-X", c] for c in chains], (version,))
    return errors


def instance_chains(instance: str, version: int) -> tuple[list[str], list[list[str]]]:
    """The chains named after the instance, and the rules of built-in chains that jump to them."""
    prefix = chain_prefix(instance) + "-"
    proc = subprocess.run([_tool(version, 2), "-t", TABLE], capture_output=True, text=True,
                          timeout=30)
    chains, jumps = [], []
    for line in proc.stdout.splitlines():
        if line.startswith(":" + prefix):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and not line.split()[1].startswith(prefix):
            args = shlex.split(line)
            if "-j" in args and args[args.index("-j") + 1].startswith(prefix):
                jumps.append(["-D", *args[1:]])
    return chains, jumps


def ensure_only_jumps(instance: str, wanted: list[list[str]]) -> list[str]:
    """Make ``wanted`` (built-in chains' rules, as iptables-save shows them without ``-A``)
    the only rules of built-in chains that lead into the instance's chains: each kept if
    there, put first in its chain if missing, every other (a duplicate, an older run's)
    removed. Returns the rules removed."""
    removed: list[str] = []
    for version in (4, 6):
        _, jumps = instance_chains(instance, version)
        found: list[list[str]] = []
        extra = []
        for rule in jumps:  # each ["-D", CHAIN, ...]
            if rule[1:] in wanted and rule[1:] not in found:
                found.append(rule[1:])
            else:
                extra.append(rule)
        run_each(extra, (version,))
        removed += [" ".join(rule[1:]) for rule in extra]
        for jump in wanted:
            if jump not in found:
                errors = run_each([["-I", jump[0], "1", *jump[1:]]], (version,))
                if errors:
                    raise PvpnError("; ".join(errors))
    return removed


def packets_counted(rule: str) -> dict[int, int | None]:
    """The packet count of ``rule`` (as iptables-save prints it, without ``-A``) in each
    family, None where it is not found (nor its chain); PvpnError where iptables failed (its
    lock held too long, say), which says nothing about the rule."""
    chain = rule.split()[0]
    out: dict[int, int | None] = {}
    for version in (4, 6):
        out[version] = None
        proc = subprocess.run([_tool(version, 0), "-w", "5", "-t", TABLE, "-S", chain, "-v"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 and not _is_missing(proc.stderr):
            raise PvpnError(f"{_TOOLS[version][0]} -S {chain}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            args = shlex.split(line)
            if "-c" in args and args[0] == "-A":  # -A CHAIN ... -c PACKETS BYTES ...
                at = args.index("-c")
                if args[1:at] + args[at + 3:] == shlex.split(rule):
                    out[version] = int(args[at + 1])
    return out


def remove_instance(instance: str) -> list[str]:
    """Remove every rule and chain of an instance (after a clean stop or a crash)."""
    errors: list[str] = []
    for version in (4, 6):
        chains, jumps = instance_chains(instance, version)
        errors += run_each(jumps, (version,))
        errors += run_each([["-F", c] for c in chains], (version,))
        errors += run_each([["-X", c] for c in chains], (version,))
    return errors
