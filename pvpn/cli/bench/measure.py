"""One measurement each: an HTTP cell, an iperf3 run, round trips, ping, CPU and memory.

Every function runs its traffic on a path's client host as the bench's user (through
:meth:`BenchPath.argv`) and returns plain data for the JSON; a measurement that fails
returns ``{"error": ...}`` rather than raising, so one bad cell never ends the run.
"""

from __future__ import annotations

import json
import os
import re
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pvpn.cli.bench.load import MAX_RESPONSE_SECONDS
from pvpn.cli.bench.paths import BENCH_USER, BenchPath
from pvpn.errors import PvpnError
from pvpn.cli.lab import netns
from pvpn.cli.lab.commands import run
from pvpn.cli.lab.topology import HTTP_PORT, IPERF_PORT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
LOAD_MODULE = "pvpn.cli.bench.load"
ECHO_PORT = 7007
# A request not answered in this time counts as an error (a SYN retransmitted twice: 1+2 s).
REQUEST_TIMEOUT = 5.0


def python() -> str:
    """The interpreter pvpn runs from (the lab's users can run it too)."""
    return sys.executable


def _run_json(path: BenchPath, command: list[str], timeout: float, user: str = BENCH_USER
              ) -> dict[str, Any]:
    try:
        result = path.run(command, timeout=timeout, user=user)
    except PvpnError as exc:
        return {"error": str(exc)}
    out = result.stdout.decode(errors="replace").strip()
    try:
        data = json.loads(out.splitlines()[-1]) if out else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        err = result.stderr.decode(errors="replace").strip()
        return {"error": f"exit {result.returncode}: {(err or out)[-400:]}"}
    return data


# --- CPU and memory ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (its threads included, and its reaped children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[11..14] are utime, stime, cutime, cstime (proc(5) fields 14-17)
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS


def rss_bytes(pid: int) -> int | None:
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return int(statm[1]) * PAGE


def cpu_snapshot(groups: Mapping[str, Callable[[], list[int]]]) -> dict[str, dict[int, float]]:
    """CPU seconds of every process of every role, by pid."""
    snap: dict[str, dict[int, float]] = {}
    for role, pids in groups.items():
        per: dict[int, float] = {}
        for pid in pids():
            value = cpu_seconds(pid)
            if value is not None:
                per[pid] = value
        snap[role] = per
    return snap


def cpu_delta(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
              ) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (processes born in between count
    from zero; those that died in between are lost, and rare in a bulk transfer)."""
    out: dict[str, float] = {}
    for role, now in after.items():
        then = before.get(role, {})
        out[role] = round(sum(v - then.get(pid, 0.0) for pid, v in now.items()), 3)
    return out


def total_rss(pids: list[int]) -> int:
    return sum(r for r in (rss_bytes(pid) for pid in pids) if r is not None)


# --- TCP retransmissions -----------------------------------------------------------------


def retransmits(namespace: str) -> int | None:
    """RetransSegs of the namespace's TCP (all sockets in it)."""
    try:
        out = run(netns.ns_exec(namespace, "cat", "/proc/net/snmp"), timeout=10,
                  check=False).stdout.decode()
    except PvpnError:
        return None
    lines = [line.split() for line in out.splitlines() if line.startswith("Tcp:")]
    if len(lines) < 2 or "RetransSegs" not in lines[0]:
        return None
    return int(lines[1][lines[0].index("RetransSegs")])


def _retrans_namespaces(path: BenchPath) -> list[str]:
    return [path.namespace("client"), path.namespace("target")]


def _retrans_now(path: BenchPath) -> int | None:
    values = [retransmits(ns) for ns in _retrans_namespaces(path)]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


# --- the measurements --------------------------------------------------------------------


def http_cell(path: BenchPath, file: str, clients: int, duration: float) -> dict[str, Any]:
    """One WebStone cell: ``clients`` processes fetching ``/file`` for ``duration`` s."""
    before = _retrans_now(path)
    data = _run_json(path, [python(), "-m", LOAD_MODULE, "http", "--host", path.target4,
                            "--port", str(HTTP_PORT), "--path", f"/{file}",
                            "--clients", str(clients), "--duration", f"{duration:g}",
                            "--timeout", f"{REQUEST_TIMEOUT:g}"],
                     timeout=duration + REQUEST_TIMEOUT + MAX_RESPONSE_SECONDS + 30)
    after = _retrans_now(path)
    if before is not None and after is not None:
        data["retransmits"] = after - before
    return data


def http_users(path: BenchPath, users: list[str], file: str, duration: float
               ) -> list[dict[str, Any]]:
    """One load process per user, all starting at the same moment; their summaries."""
    start_at = time.time() + 1.0 + 0.1 * len(users)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for user in users:
            argv, cwd = path.argv([python(), "-m", LOAD_MODULE, "http", "--host", path.target4,
                                   "--port", str(HTTP_PORT), "--path", f"/{file}",
                                   "--clients", "1", "--duration", f"{duration:g}",
                                   "--timeout", f"{REQUEST_TIMEOUT:g}",
                                   "--start-at", f"{start_at:.3f}"], user)
            procs.append(subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        results: list[dict[str, Any]] = []
        limit = (time.monotonic() + (start_at - time.time()) + duration + REQUEST_TIMEOUT
                 + MAX_RESPONSE_SECONDS + 30)
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=10)
            try:
                data = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                data = {"error": err.decode(errors="replace")[-300:]}
            results.append(data)
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def iperf3(path: BenchPath, duration: float, *, streams: int = 1, reverse: bool = False,
           udp_rate: str | None = None, udp_length: int = 1200) -> dict[str, Any]:
    """One iperf3 run against the target, parsed from its JSON.

    TCP: goodput at the receiver and the sender's retransmissions.  UDP (``udp_rate``):
    the offered rate with datagrams of ``udp_length`` bytes (below any tunnel's MTU, so no
    path fragments them), the received rate and the loss.
    """
    cmd = ["iperf3", "-c", path.target4, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J"]
    if streams > 1:
        cmd += ["-P", str(streams)]
    if reverse:
        cmd.append("-R")
    if udp_rate is not None:
        cmd += ["-u", "-b", udp_rate, "-l", str(udp_length)]
    data: dict[str, Any] = {}
    for attempt in range(3):  # the target's iperf3 serves one test at a time: retry "busy"
        try:
            result = path.run(cmd, timeout=duration + 30)
        except PvpnError as exc:
            return {"error": str(exc)}
        try:
            data = json.loads(result.stdout.decode(errors="replace"))
        except ValueError:
            data = {"error": f"exit {result.returncode}: "
                             f"{result.stderr.decode(errors='replace')[-300:]}"}
        if "busy" in str(data.get("error", "")) and attempt < 2:
            time.sleep(1.0)
            continue
        break
    if "error" in data:
        return {"error": str(data["error"])}
    end = data.get("end", {})
    if udp_rate is not None:
        summary = end.get("sum_received") or end.get("sum") or {}
        sent = end.get("sum_sent") or end.get("sum") or {}
        return {
            "bits_per_second": float(summary.get("bits_per_second", 0.0)),
            "offered": udp_rate,
            "length": udp_length,
            "lost_percent": float(summary.get("lost_percent", 0.0)),
            "lost_packets": int(summary.get("lost_packets", 0)),
            "packets": int(summary.get("packets", 0) or sent.get("packets", 0)),
            "jitter_ms": float(summary.get("jitter_ms", 0.0)),
            "bytes": int(summary.get("bytes", 0)),
        }
    received = end.get("sum_received", {})
    sent = end.get("sum_sent", {})
    return {
        "bits_per_second": float(received.get("bits_per_second", 0.0)),
        "bytes": int(received.get("bytes", 0)),
        "seconds": float(received.get("seconds", 0.0)),
        "retransmits": sent.get("retransmits"),
    }


def bulk(path: BenchPath, duration: float, *, streams: int, reverse: bool
         ) -> dict[str, Any]:
    """A TCP bulk transfer with the CPU every process of the path used meanwhile."""
    before = cpu_snapshot(path.processes)
    t0 = time.monotonic()
    result = iperf3(path, duration, streams=streams, reverse=reverse)
    wall = time.monotonic() - t0
    if "error" not in result:
        result["cpu"] = cpu_delta(before, cpu_snapshot(path.processes))
        result["wall"] = round(wall, 3)
    return result


def start_echo(path: BenchPath) -> subprocess.Popen[bytes]:
    """The TCP echo server for round trips, on the target, until :func:`stop_echo`."""
    argv = netns.ns_exec(path.namespace("target"), python(), "-m", LOAD_MODULE, "echo",
                         "--bind", path.target4, "--port", str(ECHO_PORT))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    if proc.stdout is None:
        raise PvpnError("no pipe from the echo server")
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready or b"listening" not in proc.stdout.readline():
        stop_echo(proc)
        raise PvpnError(f"the echo server did not start on {path.namespace('target')}")
    return proc


def stop_echo(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def round_trips(path: BenchPath, count: int) -> dict[str, Any]:
    """``count`` one-byte request/response round trips over one TCP connection."""
    return _run_json(path, [python(), "-m", LOAD_MODULE, "rr", "--host", path.target4,
                            "--port", str(ECHO_PORT), "--count", str(count)],
                     timeout=60 + count * 0.05)


PING_TIME = re.compile(r"time=([0-9.]+) ms")


def ping(path: BenchPath, count: int) -> dict[str, Any]:
    """ICMP echo round trips (0.2 s apart: the fastest an unprivileged user may ping)."""
    try:
        result = path.run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2",
                           path.target4], timeout=count * 0.2 + 30)
    except PvpnError as exc:
        return {"error": str(exc)}
    times = [float(m) / 1000 for m in PING_TIME.findall(result.stdout.decode())]
    if not times:
        return {"error": f"no replies: {result.stdout.decode(errors='replace')[-200:]}"}
    return {"count": len(times), "sent": count, "median": statistics.median(times),
            "min": min(times), "max": max(times)}
