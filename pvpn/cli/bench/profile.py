"""``pvpn bench --profile DIR``: py-spy profiles of every pvpn process while a measurement
runs, so a missed target comes with what bounds it.

For each measurement profiled (the first repeat of each bulk TCP test and of the latency
section, on the pvpn paths), :class:`Profiles` starts one ``py-spy record`` per process of the
path (pvpn-client, the user's `pvpn connect`, each pvpn-gateway, pvpn-server, found by
:attr:`BenchPath.processes`), sampling without stopping the process (``--nonblocking``), and
keeps the collapsed stacks (``DIR/<path>-<measurement>-<role>-<pid>.txt``); where ``perf`` is
installed (Debian's linux-perf; not installed by the bench), ``perf record -e cpu-clock`` of
the same process too, summed up by library (``perf report --sort dso``): the interpreter,
libcrypto (TLS), uvloop, the kernel (system calls: TCP, netfilter, the TUN device).
:func:`self_time` reads the stacks as py-spy's ``top`` does: the share of samples whose innermost
frame is each line (time in a system call counts on the line that makes it);
``DIR/profiles.txt`` lists the top lines of every process of every measurement.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pvpn.cli.bench.paths import BenchPath, ensure_program

Say = Callable[[str], None]

RATE = 250  # samples a second: py-spy's default is 100
PERF_RATE = 499  # perf's samples a second (an odd rate, not in step with timers)
TOP_LIBRARIES = 6
TOP = 12  # lines shown per process
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
STOP_TIMEOUT = 20.0


def self_time(collapsed: str) -> tuple[int, Counter[str]]:
    """(samples, samples per innermost frame) of py-spy's raw (collapsed stack) output:
    lines ``frame;frame;...;frame COUNT``."""
    total = 0
    frames: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames[stack.rsplit(";", 1)[-1].strip()] += int(count)
    return total, frames


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    """Wait for a recorder (bounded); what it said on stderr."""
    try:
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or b""


def top_lines(collapsed: str, top: int = TOP) -> list[str]:
    total, frames = self_time(collapsed)
    return [f"{count / total * 100:5.1f}%  {frame}" for frame, count in frames.most_common(top)
            ] if total else []


def libraries(report: str, top: int = TOP_LIBRARIES) -> list[str]:
    """The top lines of ``perf report --sort dso --stdio -q``: ``  45.12%  libcrypto.so.3``."""
    rows = []
    for line in report.splitlines():
        share, _, dso = line.strip().partition(" ")
        if share.endswith("%") and dso.strip():
            rows.append(f"{share}  {dso.strip()}")
    return rows[:top]


@dataclass
class _Recording:
    role: str
    pid: int
    out: Path
    proc: subprocess.Popen[bytes]
    perf: subprocess.Popen[bytes] | None = None


@dataclass
class Profiles:
    """The profiles of one bench run, written under ``directory``."""

    directory: Path
    say: Say
    summary: list[str] = field(default_factory=list)
    _py_spy: str | None = None
    _perf: str | None = field(default_factory=lambda: shutil.which("perf"))

    def start(self, path: BenchPath, what: str, seconds: float) -> list[_Recording]:
        """Start recording every pvpn process of ``path`` for ``seconds``."""
        if self._py_spy is None:
            self._py_spy = ensure_program("py-spy", apt=None, pip="py-spy", say=self.say)
            self.directory.mkdir(parents=True, exist_ok=True)
        recordings = []
        for role, pids in path.processes.items():
            for pid in pids():
                out = self.directory / _SAFE.sub("_", f"{path.name}-{what}-{role}-{pid}.txt")
                proc = subprocess.Popen(
                    [self._py_spy, "record", "--pid", str(pid), "--rate", str(RATE),
                     "--duration", str(max(1, int(seconds))), "--format", "raw",
                     "--nonblocking", "--output", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                perf = None
                if self._perf:
                    perf = subprocess.Popen(
                        [self._perf, "record", "-q", "-e", "cpu-clock", "-F", str(PERF_RATE),
                         "-p", str(pid), "-o", str(out.with_suffix(".perf")), "--", "sleep",
                         str(max(1, int(seconds)))],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                recordings.append(_Recording(role, pid, out, proc, perf))
        return recordings

    def _libraries(self, rec: _Recording) -> list[str]:
        if rec.perf is None:
            return []
        _stop(rec.perf)
        data = rec.out.with_suffix(".perf")
        try:
            shown = subprocess.run([str(self._perf), "report", "-i", str(data), "--sort", "dso",
                                    "--stdio", "-q"], capture_output=True, text=True,
                                   timeout=STOP_TIMEOUT).stdout
        except (OSError, subprocess.TimeoutExpired):
            shown = ""
        found = libraries(shown)
        return ["   perf, by library: " + ", ".join(
            row.replace("  ", " ") for row in found)] if found else []

    def finish(self, path: BenchPath, what: str, recordings: list[_Recording]) -> None:
        """Wait for the recordings (bounded) and add their top lines to the summary."""
        self.summary.append(f"== {path.name} {what}")
        for rec in recordings:
            err = _stop(rec.proc)
            text = rec.out.read_text() if rec.out.exists() else ""
            total, _ = self_time(text)
            self.summary.append(f"-- {rec.role} (pid {rec.pid}): {total} samples"
                                + ("" if total else f"; py-spy: "
                                   f"{err.decode(errors='replace').strip()[-200:]}"))
            self.summary += top_lines(text)
            self.summary += self._libraries(rec)
        self.summary.append("")

    def stop_all(self, recordings: list[_Recording]) -> None:
        for rec in recordings:
            for proc in (rec.proc, rec.perf):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def write(self, header: list[str]) -> Path:
        out = self.directory / "profiles.txt"
        out.write_text("\n".join([*header, "", *self.summary]).rstrip() + "\n")
        return out
