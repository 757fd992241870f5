"""A whole bench run: build the labs and paths, measure them side by side, tear down.

Each path gets a lab of its own, named ``b<token><letter>`` (one random token per run, so
several runs and other labs can coexist).  The measurements are interleaved: every repeat
of every cell goes over all the paths before the next repeat, so a burst of noise on the
shared machine spreads over the paths instead of hitting one.  Whatever happens (an error,
Ctrl-C, SIGTERM), the paths are undone, the temporary users removed and the labs taken down.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pvpn.cli.bench import measure, paths, report, wakeup
from pvpn.cli.bench.paths import BenchPath, PathUnavailable
from pvpn.cli.bench.profile import Profiles
from pvpn.cli.bench.scale import ScaleUsers
from pvpn.errors import PvpnError
from pvpn.cli.lab import lab
from pvpn.cli.lab.errors import LabError

Say = Callable[[str], None]

ALL_PATHS = ("direct", "pvpn", "pvpn-2gw", "openvpn-udp", "openvpn-tcp", "wireguard-go",
             "sshuttle")
BASE_PATHS = ("direct", "pvpn", "pvpn-2gw")
SECTIONS = ("wakeup", "latency", "bulk", "webstone", "scale")
#: Sections that measure this machine, not a path: they run even when no path could be set up.
MACHINE_SECTIONS = ("wakeup",)
LAB_LETTER = {"direct": "d", "pvpn": "p", "pvpn-2gw": "g", "openvpn-udp": "u",
              "openvpn-tcp": "t", "wireguard-go": "w", "sshuttle": "s"}
LAB_GATEWAYS = {"pvpn-2gw": 2}
SCALE_FILE = "100k"
PROFILE_LATENCY_SECONDS = 3.0  # the latency section's round trips take about that  # small enough that every user completes several in a run


@dataclass(frozen=True)
class Timing:
    """How long each measurement runs and how often (``--quick`` has shorter defaults)."""

    duration: float
    bulk_duration: float
    scale_duration: float
    repeats: int
    round_trips: int
    pings: int


@dataclass(frozen=True)
class Options(Timing):
    """What to measure, and how long."""

    paths: list[str]
    sections: list[str]
    files: list[str]
    clients: list[int]
    bulk_tests: list[str]
    scale_users: list[int]
    udp_rate: str
    quick: bool
    nat_ports: str | None = None
    # The scale test's pvpn path once per number of pvpn-server workers (empty: as set up).
    server_workers: list[int] = field(default_factory=list)
    command: str = ""
    profile: Path | None = None  # py-spy profiles of the pvpn processes go here

    def as_dict(self) -> dict[str, Any]:
        return {
            "paths": self.paths, "sections": self.sections, "files": self.files,
            "clients": self.clients, "bulk_tests": self.bulk_tests,
            "scale_users": self.scale_users, "duration": self.duration,
            "bulk_duration": self.bulk_duration, "scale_duration": self.scale_duration,
            "repeats": self.repeats, "round_trips": self.round_trips, "pings": self.pings,
            "udp_rate": self.udp_rate, "quick": self.quick, "nat_ports": self.nat_ports,
            "profile": None if self.profile is None else str(self.profile),
            "server_workers": self.server_workers,
        }


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """The teardown runs to its end: a second Ctrl-C must not leave labs or users behind
    (every step in it is bounded in time)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                    signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def checkout() -> str:
    """The commit of the pvpn checkout that runs (and how many files differ from it), or
    where pvpn was installed from when it does not run from a git checkout."""
    from pathlib import Path

    from pvpn import __version__

    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, timeout=10, check=False)
        if head.returncode != 0:
            return f"{__version__} installed in {root} (not a git checkout)"
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, timeout=10,
                                check=False).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return f"{__version__} ({root})"
    changed = len(status.splitlines())
    return (head.stdout.decode().strip()
            + (f" with {changed} changed file(s)" if changed else ""))


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count() or 0
    load = os.getloadavg()
    code = checkout()
    return {
        "cores": cores, "cpu": model, "kernel": platform.release(),
        "python": platform.python_version(), "loadavg_at_start": [round(v, 2) for v in load],
        "iperf3": paths.program_version(["iperf3", "--version"]),
        "nginx": paths.program_version(["nginx", "-v"]),
        "pvpn": code,
        "summary": f"{cores} cores ({model}), Linux {platform.release()}, "
                   f"load {load[0]:.2f} at start; pvpn {code}",
    }


class Bench:
    """One run: its labs, paths, temporary users and results."""

    def __init__(self, options: Options, say: Say = _say) -> None:
        self.options = options
        self.started = time.monotonic()
        self.say: Say = lambda message: say(
            f"{time.monotonic() - self.started:6.1f}s {message}")
        self.token = secrets.token_hex(2)
        self.labs: list[str] = []
        self.paths: list[BenchPath] = []
        self.scale: ScaleUsers | None = None
        self.results: dict[str, Any] = {
            "bench": 1,
            "command": options.command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "settings": options.as_dict(),
            "paths": {},
            "webstone": [], "bulk": [], "latency": [], "scale": [], "wakeup": [],
            "memory": {},
            "warnings": [],
            "interrupted": False,
        }
        self.step = 0
        self.steps = 0
        self.profiles = None if options.profile is None else Profiles(options.profile, self.say)

    # --- labs and paths ------------------------------------------------------------------

    def _lab(self, path_name: str, nodes: bool) -> str:
        name = f"b{self.token}{LAB_LETTER[path_name]}"
        self.labs.append(name)  # before up: an interrupted up is still taken down
        self.say(f"bench: building lab {name} for {path_name}")
        lab.up(name, LAB_GATEWAYS.get(path_name, 0), nodes=nodes, say=lambda _m: None)
        return name

    def _down_quietly(self, name: str) -> str:
        try:
            self._release_lab(name)
        except LabError as exc:
            return str(exc)
        return ""

    def _release_lab(self, name: str) -> None:
        for warning in lab.down(name, say=lambda _m: None):
            self.results["warnings"].append(f"lab {name}: {warning}")
        if name in self.labs:
            self.labs.remove(name)

    def setup_paths(self) -> None:
        for name in self.options.paths:
            meta: dict[str, Any] = {"status": "failed", "note": "", "hops": None}
            self.results["paths"][name] = meta
            lab_name: str | None = None
            try:
                lab_name = self._lab(name, nodes=name.startswith("pvpn"))
                meta["lab"] = lab_name
                topology = lab.load_topology(lab_name)
                if name == "direct":
                    path = paths.setup_direct(topology)
                elif name.startswith("pvpn"):
                    path = paths.setup_pvpn(topology, name, self.options.nat_ports)
                elif name.startswith("openvpn"):
                    path = paths.setup_openvpn(topology, name.split("-")[1], self.say)
                elif name == "wireguard-go":
                    path = paths.setup_wireguard(topology, self.say)
                else:
                    path = paths.setup_sshuttle(topology, self.say)
            except (PathUnavailable, PvpnError) as exc:
                peer = report.is_peer(name)
                meta["status"] = "skipped" if peer else "failed"
                meta["note"] = str(exc).replace("\n", " ")[:600]
                self.say(f"bench: {name} {'skipped' if peer else 'FAILED'}: {meta['note']}")
                if lab_name is not None:
                    self._release_lab(lab_name)
                continue
            self.paths.append(path)
            meta.update({"status": "ok", "note": "; ".join(path.notes), "hops": path.hops,
                         "udp": path.udp, "icmp": path.icmp, "settings": path.settings})
            self.say(f"bench: {name} ready ({path.target4} via lab {path.lab})")

    # --- measuring -----------------------------------------------------------------------

    def _progress(self, what: str, outcome: str) -> None:
        self.step += 1
        self.say(f"[{self.step}/{self.steps}] {what}: {outcome}")

    def check_path(self, path: BenchPath, when: str) -> None:
        """Before each measurement: does the path still reach the target?  A path that broke
        (on a shared machine, another program may kill a tunnel process) is reported with
        its logs' last lines and set up again once (pvpn: a new `pvpn connect`)."""
        problem = paths.reaches(path)
        if not problem:
            return
        incident: dict[str, Any] = {"when": when, "problem": problem,
                                    "logs": paths.log_tails(path)[-3000:]}
        self.say(f"bench: {path.name} stopped working ({when}): {problem}")
        if path.revive is not None:
            try:
                path.revive()
                incident["revived"] = True
                self.say(f"bench: {path.name} set up again")
            except (PvpnError, OSError) as exc:
                incident["revived"] = False
                incident["revive_error"] = str(exc)[:500]
        self.results["paths"][path.name].setdefault("incidents", []).append(incident)
        self.results["warnings"].append(
            f"{path.name} stopped working ({when}): {problem}"
            + ("; set up again" if incident.get("revived") else ""))

    def _plan(self) -> int:
        o, n = self.options, len(self.paths)
        steps = 0
        if "wakeup" in o.sections:
            steps += o.repeats * len(wakeup.LOOPS)
        if "latency" in o.sections:
            steps += o.repeats * n
        if "bulk" in o.sections:
            steps += o.repeats * n * len(o.bulk_tests)
        if "webstone" in o.sections:
            steps += o.repeats * n * len(o.files) * len(o.clients)
        if "scale" in o.sections:
            steps += o.repeats * len(self._scale_paths()) * len(o.scale_users)
            if any(p.name == "pvpn" for p in self._scale_paths()):
                # each further --server-workers setting measures the pvpn path again
                steps += o.repeats * max(0, len(o.server_workers) - 1) * len(o.scale_users)
        return steps

    @contextlib.contextmanager
    def _profiled(self, path: BenchPath, what: str, seconds: float, repeat: int
                  ) -> Iterator[None]:
        """Profile the pvpn processes of ``path`` during the first repeat of a measurement
        (``--profile``); the recorders are stopped whatever happens."""
        profiles = self.profiles
        if profiles is None or repeat or not path.name.startswith("pvpn"):
            yield
            return
        try:
            recordings = profiles.start(path, what, seconds)
        except PathUnavailable as exc:
            self.results["warnings"].append(f"profile of {path.name} {what}: {exc}")
            self.profiles = None
            yield
            return
        try:
            yield
        except BaseException:  # Ctrl-C, SIGTERM: the recorders go at once, unread
            profiles.stop_all(recordings)
            raise
        profiles.finish(path, what, recordings)

    def measure_wakeup(self) -> None:
        """The event loops' cost per wake-up (pvpn.cli.bench.wakeup), 10x the latency
        section's round trips, at most 20,000."""
        count = min(20_000, 10 * self.options.round_trips)
        for repeat in range(self.options.repeats):
            for record in wakeup.measure(count):
                record["repeat"] = repeat
                self.results["wakeup"].append(record)
                self._progress(f"wake-up {record['loop']}",
                               report.seconds(record.get("round_trip"))
                               + (f" ({record['error']})" if "error" in record else ""))

    def measure_latency(self) -> None:
        echoes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for path in self.paths:
                try:
                    echoes[path.name] = measure.start_echo(path)
                except PvpnError as exc:
                    self.results["warnings"].append(f"{path.name}: {exc}")
            for repeat in range(self.options.repeats):
                for path in self.paths:
                    self.check_path(path, f"latency, repeat {repeat + 1}")
                    record: dict[str, Any] = {"path": path.name, "repeat": repeat}
                    if path.name in echoes:
                        with self._profiled(path, "latency", PROFILE_LATENCY_SECONDS, repeat):
                            record["rr"] = measure.round_trips(path, self.options.round_trips)
                    if path.icmp:
                        record["ping"] = measure.ping(path, self.options.pings)
                    self.results["latency"].append(record)
                    rr, png = record.get("rr", {}), record.get("ping", {})
                    self._progress(
                        f"latency {path.name}",
                        f"rr median {report.seconds(rr.get('median'))} "
                        f"p99 {report.seconds(rr.get('p99'))}, ping "
                        f"{report.seconds(png.get('median'))}"
                        + (f" ({rr['error']})" if "error" in rr else ""))
        finally:
            for proc in echoes.values():
                measure.stop_echo(proc)

    def measure_bulk(self) -> None:
        for repeat in range(self.options.repeats):
            for test in self.options.bulk_tests:
                for path in self.paths:
                    self.check_path(path, f"bulk {test}, repeat {repeat + 1}")
                    if test.startswith("udp"):
                        if not path.udp:
                            self._progress(f"bulk {test} {path.name}", "n/a (no UDP)")
                            continue
                        result = measure.iperf3(path, self.options.bulk_duration,
                                                udp_rate=self.options.udp_rate)
                    else:
                        streams = int(test[3:].split("-")[0])
                        with self._profiled(path, test, self.options.bulk_duration - 0.5,
                                            repeat):
                            result = measure.bulk(path, self.options.bulk_duration,
                                                  streams=streams,
                                                  reverse=test.endswith("down"))
                    result.update({"path": path.name, "test": test, "repeat": repeat})
                    self.results["bulk"].append(result)
                    outcome = result.get("error") or (
                        f"{report.si(result.get('bits_per_second'), 'b')}/s"
                        + (f", loss {result['lost_percent']:.2f}%"
                           if "lost_percent" in result else "")
                        + (f", retrans {result['retransmits']}"
                           if result.get("retransmits") is not None else ""))
                    self._progress(f"bulk {test} {path.name}", str(outcome))

    def measure_webstone(self) -> None:
        for repeat in range(self.options.repeats):
            for file in self.options.files:
                for clients in self.options.clients:
                    for path in self.paths:
                        self.check_path(path, f"http {file} x{clients}, repeat {repeat + 1}")
                        result = measure.http_cell(path, file, clients, self.options.duration)
                        result.update({"path": path.name, "file": file, "clients": clients,
                                       "repeat": repeat})
                        self.results["webstone"].append(result)
                        outcome = result.get("error") or (
                            f"{report.si(result.get('throughput'))}B/s, avg "
                            f"{report.seconds(result.get('avg_response'))}, "
                            f"{result.get('requests')} requests"
                            + (f", {result['errors']} errors ({result.get('first_error')})"
                               if result.get("errors") else "")
                            + (f", {result['retransmits']} retrans"
                               if result.get("retransmits") else ""))
                        self._progress(f"http {file} x{clients} {path.name}", str(outcome))

    def _scale_paths(self) -> list[BenchPath]:
        # pvpn-2gw is left out: each user would need authorising at every gateway too, and
        # the extra hop's cost is measured by the other sections.
        return [p for p in self.paths if p.name != "pvpn-2gw"]

    def _pvpn_memory(self, path: BenchPath, count: int) -> None:
        """Open ``count`` idle sessions of temporary users; the server's RSS before/after."""
        server = path.processes["pvpn-server"]
        client = path.processes["pvpn-client"]
        memory: dict[str, Any] = {"rss_before": measure.total_rss(server()),
                                  "client_rss_before": measure.total_rss(client())}
        self.scale = ScaleUsers(path.topology, self.token)
        memory["users"] = self.scale.names  # filled in as they are made
        self.results["memory"][path.name] = memory
        self.scale.create(count, self.say)
        failed = self.scale.connect(self.scale.names, self.say)
        if failed:
            self.results["warnings"].append(
                f"scale: {len(failed)} of {count} temporary users could not connect: "
                + ", ".join(failed[:5]))
        time.sleep(1.0)  # let the sessions settle (handshake buffers freed)
        opened = len(self.scale.connected)
        memory["users"] = list(self.scale.names)  # a copy: remove() empties names later
        memory["sessions"] = opened
        memory["rss_idle"] = measure.total_rss(server())
        memory["client_rss_idle"] = measure.total_rss(client())
        if opened:
            memory["per_session"] = (memory["rss_idle"] - memory["rss_before"]) / opened
            memory["client_per_session"] = (memory["client_rss_idle"]
                                            - memory["client_rss_before"]) / opened
        self.say(f"bench: pvpn-server RSS {report.si(memory['rss_before'])}B -> "
                 f"{report.si(memory['rss_idle'])}B with {opened} more sessions")

    def measure_scale(self) -> None:
        counts = self.options.scale_users
        pvpn = next((p for p in self.paths if p.name == "pvpn"), None)
        if pvpn is not None:
            try:
                self._pvpn_memory(pvpn, max(counts))
            except (PvpnError, OSError) as exc:
                self.results["warnings"].append(f"scale users: {exc}")
                self.say(f"bench: scale users could not be set up: {exc}")
        settings: list[int | None] = list(self.options.server_workers) or [None]
        for repeat in range(self.options.repeats):
            for number, workers in enumerate(settings):
                if workers is not None and pvpn is not None:
                    try:
                        self._server_workers(pvpn, workers)
                    except (PvpnError, OSError) as exc:
                        self.results["warnings"].append(f"server workers {workers}: {exc}")
                        self._progress(f"scale with {workers} server workers", f"n/a ({exc})")
                        continue
                for count in counts:
                    for path in self._scale_paths():
                        if number and path.name != "pvpn":
                            continue  # the others are measured once a repeat
                        self._scale_run(path, count, repeat, workers)
                # After the load, with the pvpn-server the idle figure was taken of: after the
                # last repeat, or with --server-workers after the first setting's first (the
                # next setting restarts pvpn-server: a new process, or several).
                last = self.options.repeats - 1 if settings == [None] else 0
                if repeat == last and number == 0:
                    self._memory_after_load(pvpn)

    def _memory_after_load(self, pvpn: BenchPath | None) -> None:
        if pvpn is not None and pvpn.name in self.results["memory"]:
            memory = self.results["memory"][pvpn.name]
            memory["rss_after_load"] = measure.total_rss(pvpn.processes["pvpn-server"]())
            memory["client_rss_after_load"] = measure.total_rss(
                pvpn.processes["pvpn-client"]())

    def _scale_run(self, path: BenchPath, count: int, repeat: int, workers: int | None) -> None:
        label = f"scale {count} user(s) {path.name}" + (
            f" ({workers} server workers)" if workers is not None and path.name == "pvpn"
            else "")
        self.check_path(path, f"scale {count}, repeat {repeat + 1}")
        if path.name == "pvpn":
            connected = self.scale.connected if self.scale else []
            if len(connected) < count:
                self._progress(label, "n/a (not enough users connected)")
                return
            users = connected[:count]
        else:
            users = [paths.BENCH_USER] * count
        per_user = measure.http_users(path, users, SCALE_FILE, self.options.scale_duration)
        record = _scale_record(path.name, count, repeat, per_user)
        if workers is not None and path.name == "pvpn":
            record["workers"] = workers
        self.results["scale"].append(record)
        self._progress(label, f"{report.si(record.get('aggregate'))}B/s, Jain "
                       f"{record.get('jain') or 0:.3f}"
                       + (f", {record['errors']} errors" if record.get("errors") else ""))

    def _server_workers(self, path: BenchPath, workers: int) -> None:
        """pvpn-server restarted with ``workers`` workers; back when every session of the
        path (alice's and the scale users') is up again."""
        expected = 1 + (len(self.scale.connected) if self.scale else 0)
        self.say(f"bench: pvpn-server with {workers} worker(s)")
        paths.set_server_workers(path.topology, workers, expected)

    # --- the whole run -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        lab.require_root()
        try:
            with lab.sigterm_interrupts():
                self.setup_paths()
                self.steps = self._plan()
                for section in SECTIONS:
                    if section in self.options.sections and (
                            self.paths or section in MACHINE_SECTIONS):
                        self.say(f"bench: {section}")
                        getattr(self, f"measure_{section}")()
        except KeyboardInterrupt:
            self.results["interrupted"] = True
            self.say("bench: interrupted; tearing down")
        finally:
            with _uninterruptible():
                self.teardown()
        self.results["summary"] = report.summarize(self.results)
        if self.profiles is not None and self.profiles.summary:
            written = self.profiles.write([
                "py-spy profiles of pvpn's processes (self time per line of Python: the "
                "innermost frame of each sample)",
                f"date: {self.results['date']}; {self.results['machine'].get('summary', '')}",
                f"command: {self.options.command}"])
            self.say(f"bench: profiles in {written}")
            self.results["profiles"] = str(written)
        return self.results

    def teardown(self) -> None:
        for path in reversed(self.paths):
            self.results["warnings"] += path.teardown()
        self.paths = []
        # The labs are independent: take them down side by side (each `down` is bounded).
        names = list(self.labs)
        if names:
            self.say(f"bench: removing labs {', '.join(names)}")
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            for name, error in zip(names, pool.map(self._down_quietly, names)):
                if error:
                    self.results["warnings"].append(f"lab {name}: {error}")
        if self.scale is not None:
            self.results["warnings"] += self.scale.remove()
            self.scale = None


def _scale_record(path: str, count: int, repeat: int, per_user: list[dict[str, Any]]
                  ) -> dict[str, Any]:
    rates = [float(r.get("throughput", 0.0) or 0.0) for r in per_user]
    windows = [float(r["seconds"]) for r in per_user if r.get("seconds")]
    total = sum(int(r.get("bytes", 0) or 0) for r in per_user)
    window = max(windows) if windows else 0.0
    errors = sum(int(r.get("errors", 0) or 0) for r in per_user) + sum(
        1 for r in per_user if "error" in r)
    return {
        "path": path, "users": count, "repeat": repeat,
        "aggregate": total / window if window else 0.0,
        "per_user": rates,
        "jain": report.jain(rates),
        "requests": sum(int(r.get("requests", 0) or 0) for r in per_user),
        "errors": errors,
    }


def run(options: Options, say: Say = _say) -> dict[str, Any]:
    """Run the bench; the results (with ``summary``) whatever happened."""
    return Bench(options, say).run()
