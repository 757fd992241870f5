"""From the bench's raw results to medians, ratios, targets and readable tables (pure).

Nothing here runs a command, reads a clock or opens a file: :func:`summarize` turns the raw
results (lists of per-repeat records, as the JSON keeps them) into medians with their spread,
:func:`targets` checks the figures against issue 5's targets, :func:`render` writes the text
tables and :func:`markdown_webstone` the thesis-style tables for the README.

Every figure is shown as a ratio to ``direct`` (``×d``) and to the best peer in the same
cell (``×p``: the best of OpenVPN over UDP, over TCP, wireguard-go and sshuttle that was
measured); pvpn's bulk figures also against OpenVPN over UDP and wireguard-go one by one.  A
ratio is always *this path ÷ the reference*: above 1 is better for rates, worse for times.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DIRECT = "direct"
PEERS = ("openvpn-udp", "openvpn-tcp", "wireguard-go", "sshuttle")
FILES = ("0", "1k", "10k", "100k", "1m")
FILE_LABELS = {"0": "0 B", "1k": "1 KB", "10k": "10 KB", "100k": "100 KB", "1m": "1 MB"}
BULK_TESTS = ("tcp1-up", "tcp1-down", "tcp8-up", "tcp8-down", "udp-up")
TCP_TESTS = ("tcp1-up", "tcp1-down", "tcp8-up", "tcp8-down")
# The peers pvpn's bulk TCP is held against one by one (issue 12's bulk target).
BULK_REFERENCES = ("openvpn-udp", "wireguard-go")
BULK_LABELS = {"tcp1-up": "TCP 1 up", "tcp1-down": "TCP 1 down", "tcp8-up": "TCP 8 up",
               "tcp8-down": "TCP 8 down", "udp-up": "UDP up"}
MB = 1_000_000

Results = Mapping[str, Any]


@dataclass(frozen=True)
class Spread:
    """The median of a figure's repeats and their range."""

    median: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def spread(values: Iterable[float | int | None]) -> Spread | None:
    """Median, min and max of the values that are numbers; None if there are none."""
    numbers = [float(v) for v in values
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not numbers:
        return None
    return Spread(statistics.median(numbers), min(numbers), max(numbers), len(numbers))


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def jain(values: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all are equal, 1/n when one
    gets everything."""
    if not values:
        return None
    square_sum = sum(v * v for v in values)
    if square_sum == 0:
        return None
    return sum(values) ** 2 / (len(values) * square_sum)


def is_peer(name: str) -> bool:
    return name in PEERS


def _ok_paths(results: Results) -> list[str]:
    paths: Mapping[str, Any] = results.get("paths", {})
    return [name for name, meta in paths.items() if meta.get("status") == "ok"]


# --- summary -----------------------------------------------------------------------------


def _group(records: Iterable[Mapping[str, Any]], *keys: str
           ) -> dict[tuple[Any, ...], list[Mapping[str, Any]]]:
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(record.get(k) for k in keys), []).append(record)
    return groups


def _num(record: Mapping[str, Any], *keys: str) -> float | None:
    value: Any = record
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _ok(record: Mapping[str, Any]) -> bool:
    return "error" not in record


def cpu_per_gb(record: Mapping[str, Any]) -> dict[str, float]:
    """CPU seconds per GB moved, per process role, of one bulk record."""
    moved = _num(record, "bytes")
    cpu = record.get("cpu")
    if not moved or not isinstance(cpu, Mapping):
        return {}
    return {str(role): float(sec) / (moved / 1e9) for role, sec in cpu.items()
            if isinstance(sec, (int, float))}


def utilization(record: Mapping[str, Any]) -> dict[str, float]:
    """Share of one core each process role kept busy during a bulk record (1.0 = 100%)."""
    wall = _num(record, "wall")
    cpu = record.get("cpu")
    if not wall or not isinstance(cpu, Mapping):
        return {}
    return {str(role): float(sec) / wall for role, sec in cpu.items()
            if isinstance(sec, (int, float))}


def scale_by_workers(records: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pvpn path's scale figures by pvpn-server workers (``bench --server-workers``):
    {workers: {users: {"aggregate": spread, "ratio": its median over the first workers
    value's}}}, the workers in the order they were measured."""
    out: dict[str, dict[str, Any]] = {}
    for (workers, users), group in _group(records, "workers", "users").items():
        agg = spread(_num(r, "aggregate") for r in group if _ok(r))
        entry: dict[str, Any] = {"errors": sum(int(_num(r, "errors") or 0) for r in group)}
        if agg is not None:
            entry["aggregate"] = agg.as_dict()
        out.setdefault(str(workers), {})[str(users)] = entry
    base = next(iter(out.values()), {})
    for by_users in out.values():
        for users, entry in by_users.items():
            mine = entry.get("aggregate", {}).get("median")
            theirs = base.get(users, {}).get("aggregate", {}).get("median")
            if mine and theirs:
                entry["ratio"] = mine / theirs
    return out


def scale_workers_lines(by_workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The table of :func:`scale_by_workers`."""
    if not by_workers:
        return []
    counts = sorted({int(n) for v in by_workers.values() for n in v})
    first = next(iter(by_workers))
    rows = []
    for workers, by_users in by_workers.items():
        cells = []
        for n in counts:
            entry = by_users.get(str(n), {})
            median = entry.get("aggregate", {}).get("median")
            ratio = entry.get("ratio")
            cells.append("n/a" if median is None else f"{si(median)}B/s"
                         + (f" (x{ratio:.2f})" if ratio is not None else ""))
        rows.append([workers, *cells])
    return [f"Scale by pvpn-server workers (the pvpn path; aggregate bytes/s, median; ratio "
            f"to {first} worker(s))", *_table(["workers", *(f"{n} user(s)" for n in counts)],
                                              rows), ""]


def summarize(results: Results) -> dict[str, Any]:
    """Medians and spreads of every figure, by path and cell, as JSON-ready data."""
    out: dict[str, Any] = {}

    web: dict[str, dict[str, dict[str, Any]]] = {"throughput": {}, "avg_response": {},
                                                 "p99_response": {}, "errors": {},
                                                 "retransmits_per_request": {}}
    for (path, file, clients), records in _group(results.get("webstone", []), "path", "file",
                                                 "clients").items():
        good = [r for r in records if _ok(r) and _num(r, "requests")]
        cell = f"{file}/{clients}"
        for field in ("throughput", "avg_response", "p99_response"):
            s = spread(_num(r, field) for r in good)
            if s is not None:
                web[field].setdefault(path, {})[cell] = s.as_dict()
        web["errors"].setdefault(path, {})[cell] = sum(int(_num(r, "errors") or 0)
                                                      for r in records) + (len(records)
                                                                           - len(good))
        per_request = spread((_num(r, "retransmits") or 0.0) / (_num(r, "requests") or 1.0)
                             for r in good if _num(r, "retransmits") is not None)
        if per_request is not None:
            web["retransmits_per_request"].setdefault(path, {})[cell] = per_request.as_dict()
    out["webstone"] = web

    bulk: dict[str, dict[str, Any]] = {}
    udp_loss: dict[str, Any] = {}
    cpu: dict[str, dict[str, dict[str, Any]]] = {}
    busy: dict[str, dict[str, dict[str, Any]]] = {}
    cpu_total: dict[str, dict[str, Any]] = {}
    retrans: dict[str, dict[str, Any]] = {}
    for (path, test), records in _group(results.get("bulk", []), "path", "test").items():
        good = [r for r in records if _ok(r)]
        s = spread(_num(r, "bits_per_second") for r in good)
        if s is not None:
            bulk.setdefault(path, {})[test] = s.as_dict()
        if test == "udp-up":
            loss = spread(_num(r, "lost_percent") for r in good)
            if loss is not None:
                udp_loss[path] = loss.as_dict()
            continue
        rt = spread(_num(r, "retransmits") for r in good)
        if rt is not None:
            retrans.setdefault(path, {})[test] = rt.as_dict()
        totals = spread(sum(cpu_per_gb(r).values()) for r in good if cpu_per_gb(r))
        if totals is not None:
            cpu_total.setdefault(path, {})[test] = totals.as_dict()
        roles = sorted({role for r in good for role in cpu_per_gb(r)})
        for role in roles:
            per_gb = spread(cpu_per_gb(r).get(role) for r in good)
            share = spread(utilization(r).get(role) for r in good)
            if per_gb is not None:
                cpu.setdefault(path, {}).setdefault(role, {})[test] = per_gb.as_dict()
            if share is not None:
                busy.setdefault(path, {}).setdefault(role, {})[test] = share.as_dict()
    out["bulk"] = bulk
    out["udp_loss_percent"] = udp_loss
    out["bulk_retransmits"] = retrans
    out["cpu_seconds_per_gb"] = cpu
    out["cpu_utilization"] = busy
    out["cpu_seconds_per_gb_total"] = cpu_total

    latency: dict[str, dict[str, Any]] = {"rr_median": {}, "rr_p99": {}, "ping_median": {}}
    for (path,), records in _group(results.get("latency", []), "path").items():
        for field, keys in (("rr_median", ("rr", "median")), ("rr_p99", ("rr", "p99")),
                            ("ping_median", ("ping", "median"))):
            s = spread(_num(r, *keys) for r in records)
            if s is not None:
                latency[field][path] = s.as_dict()
    out["latency"] = latency

    scale: dict[str, dict[str, Any]] = {}
    scale_records = list(results.get("scale", []))
    tagged = [r for r in scale_records if "workers" in r]
    first = tagged[0]["workers"] if tagged else None  # the main table's pvpn figures
    out["scale_workers"] = scale_by_workers(tagged)
    for (path, users), records in _group([r for r in scale_records
                                          if r.get("workers", first) == first],
                                         "path", "users").items():
        good = [r for r in records if _ok(r)]
        agg = spread(_num(r, "aggregate") for r in good)
        fair = spread(_num(r, "jain") for r in good)
        entry: dict[str, Any] = {}
        if agg is not None:
            entry["aggregate"] = agg.as_dict()
        if fair is not None:
            entry["jain"] = fair.as_dict()
        entry["errors"] = sum(int(_num(r, "errors") or 0) for r in records)
        scale.setdefault(path, {})[str(users)] = entry
    out["scale"] = scale

    wakeups: dict[str, Any] = {}
    for (loop,), records in _group(results.get("wakeup", []), "loop").items():
        s = spread(_num(r, "round_trip") for r in records)
        if s is not None:
            wakeups[loop] = s.as_dict()
    out["wakeup"] = wakeups

    out["bulk_against_peers"] = bulk_against_peers(out)
    out["hop_cost"] = hop_cost(out)
    out["targets"] = [t.as_dict() for t in targets(results, out)]
    return out


def _median(summary: Mapping[str, Any], *keys: str) -> float | None:
    value: Any = summary
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if isinstance(value, Mapping):
        median = value.get("median")
        return float(median) if isinstance(median, (int, float)) else None
    return None


def bulk_against_peers(summary: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """pvpn's bulk TCP medians over each of :data:`BULK_REFERENCES`', by pvpn path, then
    reference, then test (only the pairs both measured)."""
    bulk: Mapping[str, Any] = summary.get("bulk", {})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in (p for p in bulk if p.startswith("pvpn")):
        for reference in BULK_REFERENCES:
            for test in TCP_TESTS:
                r = ratio(_median(summary, "bulk", path, test),
                          _median(summary, "bulk", reference, test))
                if r is not None:
                    out.setdefault(path, {}).setdefault(reference, {})[test] = r
    return out


def hop_cost(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What each extra hop costs: pvpn through 2 gateways against pvpn over one hop."""
    one, two = "pvpn", "pvpn-2gw"
    out: dict[str, Any] = {}
    rr1 = _median(summary, "latency", "rr_median", one)
    rr2 = _median(summary, "latency", "rr_median", two)
    if rr1 is not None and rr2 is not None:
        out["added_round_trip_per_gateway"] = (rr2 - rr1) / 2
    for test in BULK_TESTS:
        r = ratio(_median(summary, "bulk", two, test), _median(summary, "bulk", one, test))
        if r is not None:
            out[f"bulk_{test}_ratio"] = r
    return out


# --- targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One of the targets (issue 5's, or issue 12's): met (True/False) or not measured
    (None), and the figures."""

    name: str
    met: bool | None
    detail: str
    issue: int = 5

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.name, "met": self.met, "detail": self.detail,
                "issue": self.issue}


def _cells(summary: Mapping[str, Any], field: str, path: str) -> dict[str, float]:
    cells = summary.get("webstone", {}).get(field, {}).get(path, {})
    return {cell: float(v["median"]) for cell, v in cells.items()}


def _verdict(checks: list[bool]) -> bool | None:
    return all(checks) if checks else None


def _ratio_checks(pairs: Iterable[tuple[str, float | None, float | None]], minimum: float
                  ) -> tuple[list[bool], list[str]]:
    """For each (label, measured, reference): whether measured/reference reaches ``minimum``,
    and "label 0.93x" (pairs without a ratio are left out)."""
    checks: list[bool] = []
    parts: list[str] = []
    for label, measured, reference in pairs:
        r = ratio(measured, reference)
        if r is not None:
            checks.append(r >= minimum)
            parts.append(f"{label} {r:.2f}x")
    return checks, parts


def _round_trip_targets(summary: Mapping[str, Any]) -> list[Target]:
    """Issue 12's: pvpn's 1-byte round trip within 2x OpenVPN/UDP's, and each gateway adding
    at most half of what the one hop adds over direct."""
    def rr(path: str) -> float | None:
        return _median(summary, "latency", "rr_median", path)

    pvpn, openvpn, direct, two = rr("pvpn"), rr("openvpn-udp"), rr(DIRECT), rr("pvpn-2gw")
    out = [Target("1-byte round trip <= 2x OpenVPN/UDP's (median)",
                  None if pvpn is None or openvpn is None else pvpn <= 2 * openvpn,
                  "not measured" if pvpn is None or openvpn is None else
                  f"pvpn {seconds(pvpn)}, OpenVPN/UDP {seconds(openvpn)}: "
                  f"{pvpn / openvpn:.2f}x", 12)]
    if pvpn is None or direct is None or two is None:
        out.append(Target("each gateway adds <= half the round trip the one hop adds", None,
                          "not measured", 12))
    else:
        hop, gateway = pvpn - direct, (two - pvpn) / 2
        out.append(Target("each gateway adds <= half the round trip the one hop adds",
                          gateway <= hop / 2,
                          f"one hop adds {seconds(hop)} over direct, each gateway "
                          f"{seconds(gateway)} ({gateway / hop:.2f}x)" if hop > 0 else
                          f"each gateway {seconds(gateway)}", 12))
    return out


def _cpu_target(summary: Mapping[str, Any]) -> Target:
    """Issue 12's: CPU seconds per GB of all of pvpn's processes at most OpenVPN/UDP's, for
    each bulk TCP test both measured."""
    checks, parts = [], []
    for test in TCP_TESTS:
        mine = _median(summary, "cpu_seconds_per_gb_total", "pvpn", test)
        theirs = _median(summary, "cpu_seconds_per_gb_total", "openvpn-udp", test)
        if mine is not None and theirs:
            checks.append(mine <= theirs)
            parts.append(f"{test} {mine / theirs:.2f}x")
    return Target("CPU seconds per GB, all of pvpn's processes <= OpenVPN/UDP's",
                  _verdict(checks), ", ".join(parts) or "not measured", 12)


def targets(results: Results, summary: Mapping[str, Any]) -> list[Target]:
    """Check the measured medians against the targets of issues 5 and 12."""
    out: list[Target] = []
    paths: Mapping[str, Any] = results.get("paths", {})
    pvpn_paths = [p for p in _ok_paths(results) if p.startswith("pvpn")]

    # Added round trip over direct, per hop, at the median.
    direct_rr = _median(summary, "latency", "rr_median", DIRECT)
    checks, parts = [], []
    for path in pvpn_paths:
        rr = _median(summary, "latency", "rr_median", path)
        hops = int(paths.get(path, {}).get("hops", 1) or 1)
        if rr is None or direct_rr is None:
            continue
        per_hop = (rr - direct_rr) / hops
        checks.append(per_hop <= 0.0002)
        parts.append(f"{path}: +{per_hop * 1e3:.3f} ms per hop ({hops} hop(s))")
    out.append(Target("added round trip over direct <= 0.2 ms per hop (median)",
                      _verdict(checks), "; ".join(parts) or "not measured"))

    # No retransmission storms: no small request waits for a retransmission timeout.
    checks, parts = [], []
    for path in pvpn_paths:
        p99 = _cells(summary, "p99_response", path)
        small = {c: v for c, v in p99.items() if c.split("/")[0] in ("0", "1k", "10k")}
        if small:
            worst = max(small.values())
            checks.append(worst < 0.2)
            parts.append(f"{path}: worst p99 response {worst * 1e3:.1f} ms in the 0 B-10 KB "
                         "cells")
    out.append(Target("no retransmission storms (p99 response of 0 B-10 KB requests "
                      "under one 200 ms retransmission timeout)", _verdict(checks),
                      "; ".join(parts) or "not measured"))

    # pvpn over one hop beats sshuttle on every cell of the table.
    pv_t, ss_t = _cells(summary, "throughput", "pvpn"), _cells(summary, "throughput", "sshuttle")
    pv_r = _cells(summary, "avg_response", "pvpn")
    ss_r = _cells(summary, "avg_response", "sshuttle")
    common = sorted(set(pv_t) & set(ss_t))
    losing = [c for c in common if pv_t[c] <= ss_t[c] or pv_r.get(c, math.inf) >= ss_r.get(
        c, math.inf)]
    out.append(Target("pvpn (one hop) beats sshuttle on every cell of the table",
                      None if not common else not losing,
                      (f"{len(common) - len(losing)} of {len(common)} cells"
                       + (f"; behind on {', '.join(losing)}" if losing else ""))
                      if common else "sshuttle not measured"))

    # pvpn reaches OpenVPN over UDP on bulk TCP and on the 0 B-10 KB cells.
    checks, parts = _ratio_checks(
        ((test, _median(summary, "bulk", "pvpn", test),
          _median(summary, "bulk", "openvpn-udp", test)) for test in TCP_TESTS), 1.0)
    out.append(Target("pvpn >= 1.0x OpenVPN/UDP on bulk TCP", _verdict(checks),
                      ", ".join(parts) or "OpenVPN/UDP not measured"))
    ov_t = _cells(summary, "throughput", "openvpn-udp")
    small_cells: list[tuple[str, float | None, float | None]] = [
        (cell, pv_t[cell], ov_t[cell]) for cell in sorted(set(pv_t) & set(ov_t))
        if cell.split("/")[0] in ("0", "1k", "10k")]
    checks, parts = _ratio_checks(small_cells, 1.0)
    out.append(Target("pvpn >= 1.0x OpenVPN/UDP on the 0 B-10 KB cells (file/clients)",
                      _verdict(checks), ", ".join(parts) or "OpenVPN/UDP not measured"))
    checks, parts = _ratio_checks(small_cells, 0.7)
    out.append(Target("pvpn >= 0.7x OpenVPN/UDP on the 0 B-10 KB cells (file/clients)",
                      _verdict(checks), ", ".join(parts) or "OpenVPN/UDP not measured", 12))

    out += _round_trip_targets(summary)
    out.append(_cpu_target(summary))

    # ... and is ahead of userspace WireGuard on bulk TCP (issue 12).
    checks, parts = _ratio_checks(
        ((test, _median(summary, "bulk", "pvpn", test),
          _median(summary, "bulk", "wireguard-go", test)) for test in TCP_TESTS), 1.0)
    out.append(Target("pvpn >= 1.0x wireguard-go on bulk TCP", _verdict(checks),
                      ", ".join(parts) or "pvpn or wireguard-go not measured", 12))

    # Through two gateways, at least 0.8x of pvpn over one hop.
    g2 = _cells(summary, "throughput", "pvpn-2gw")
    checks, parts = _ratio_checks(
        [*((test, _median(summary, "bulk", "pvpn-2gw", test),
            _median(summary, "bulk", "pvpn", test)) for test in TCP_TESTS),
         *((cell, g2[cell], pv_t[cell]) for cell in sorted(set(g2) & set(pv_t)))], 0.8)
    out.append(Target("pvpn through 2 gateways >= 0.8x pvpn over one hop",
                      _verdict(checks), ", ".join(parts) or "not measured"))

    # Memory per idle session under 1 MB at the server, and flat under load.
    memory: Mapping[str, Any] = results.get("memory", {}).get("pvpn", {})
    per_session = memory.get("per_session")
    if isinstance(per_session, (int, float)):
        out.append(Target("server memory per idle session < 1 MB", per_session < MB,
                          f"{per_session / 1e3:.0f} kB per session over "
                          f"{memory.get('sessions')} sessions"))
    else:
        out.append(Target("server memory per idle session < 1 MB", None, "not measured"))
    idle, loaded = memory.get("rss_idle"), memory.get("rss_after_load")
    if isinstance(idle, (int, float)) and isinstance(loaded, (int, float)) and idle:
        growth = loaded / idle - 1
        out.append(Target("server memory flat under load (within +10%)", growth <= 0.10,
                          f"{idle / 1e6:.1f} MB idle, {loaded / 1e6:.1f} MB after the scale "
                          f"load ({growth * 100:+.1f}%)"))
    else:
        out.append(Target("server memory flat under load (within +10%)", None,
                          "not measured"))
    return out


# --- text --------------------------------------------------------------------------------


def si(value: float | None, unit: str = "") -> str:
    """3 significant digits with a k/M/G prefix: 812k, 3.10M."""
    if value is None or not math.isfinite(value):
        return "-"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def seconds(value: float | None) -> str:
    """A duration in the unit that suits it: 84.2us, 1.91ms, 0.758s."""
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) < 1e-3:
        return f"{value * 1e6:.3g}us"
    if abs(value) < 1:
        return f"{value * 1e3:.3g}ms"
    return f"{value:.3g}s"


def _cell_text(s: Mapping[str, Any] | None, fmt: Callable[[float | None], str]) -> str:
    if not s:
        return "-"
    if s.get("n", 1) > 1 and s["min"] != s["max"]:
        return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"
    return fmt(s["median"])


def _ratio_text(value: float | None, direct: float | None, peer: float | None) -> str:
    d, p = ratio(value, direct), ratio(value, peer)
    return f"{'-' if d is None else f'{d:.2f}'} / {'-' if p is None else f'{p:.2f}'}"


def _best_peer(values: Mapping[str, float | None], higher_better: bool) -> float | None:
    numbers = [v for name, v in values.items() if is_peer(name) and v is not None]
    if not numbers:
        return None
    return max(numbers) if higher_better else min(numbers)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def _metric_tables(title: str, paths: list[str], columns: list[tuple[str, str]],
                   cells: Mapping[str, Mapping[str, Any]], fmt: Callable[[float | None], str],
                   higher_better: bool,
                   row_label: str = "path") -> list[str]:
    """A values table (median (min-max)) and a ratio table (×d / ×p) of one metric."""
    lines = [title]
    rows = [[path, *(_cell_text(cells.get(path, {}).get(key), fmt) for key, _ in columns)]
            for path in paths]
    lines += _table([row_label, *(label for _, label in columns)], rows)
    ratio_rows = []
    for path in paths:
        if path == DIRECT:
            continue
        row = [path]
        for key, _ in columns:
            values = {p: _median(cells, p, key) for p in paths}
            row.append(_ratio_text(values.get(path), values.get(DIRECT),
                                   _best_peer(values, higher_better)))
        ratio_rows.append(row)
    if ratio_rows:
        lines.append("")
        lines.append("  ratio to direct / to the best peer "
                     + ("(above 1 is better)" if higher_better else "(below 1 is better)"))
        lines += ["  " + line for line in _table(["path", *(lb for _, lb in columns)],
                                                 ratio_rows)]
    return lines + [""]


def _against_peers_table(against: Mapping[str, Mapping[str, Mapping[str, float]]]
                         ) -> list[str]:
    """pvpn's bulk TCP as a ratio to each of :data:`BULK_REFERENCES`, a row per pair."""
    pairs = [(path, reference, ratios) for path, by_reference in against.items()
             for reference, ratios in by_reference.items()]
    tests = [t for t in TCP_TESTS if any(t in ratios for _, _, ratios in pairs)]
    if not tests:
        return []
    rows = [[path, reference, *(f"{ratios[t]:.2f}" if t in ratios else "-" for t in tests)]
            for path, reference, ratios in pairs]
    return ["pvpn's bulk TCP against OpenVPN/UDP and wireguard-go (above 1: pvpn is faster)",
            *_table(["path", "against", *(BULK_LABELS[t] for t in tests)], rows), ""]


def _wakeup_table(wakeups: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Per event loop: a 1-byte round trip between two processes (two wake-ups), and its
    cost over blocking system calls (the floor)."""
    if not wakeups:
        return []
    floor = wakeups.get("blocking", {}).get("median")
    rows = []
    for loop, s in wakeups.items():
        rt = s.get("median")
        over = "-" if floor is None or rt is None else seconds((rt - floor) / 2)
        rows.append([loop, seconds(rt), seconds(None if rt is None else rt / 2), over])
    lines = ["Wake-ups: a 1-byte ping-pong between two processes over a unix socket (each "
             "round trip wakes each once)"]
    lines += _table(["loop", "round trip", "per wake-up", "per wake-up over blocking"], rows)
    lines.append("")
    return lines


def render(results: Results, summary: Mapping[str, Any] | None = None) -> str:
    """The readable report of one bench run."""
    summary = summary if summary is not None else summarize(results)
    settings: Mapping[str, Any] = results.get("settings", {})
    paths_meta: Mapping[str, Any] = results.get("paths", {})
    paths = _ok_paths(results)
    lines = [f"pvpn bench, {results.get('date', '?')}",
             f"command: {results.get('command', '?')}",
             f"machine: {results.get('machine', {}).get('summary', '?')}",
             f"repeats: {settings.get('repeats')}; HTTP cells {settings.get('duration')} s, "
             f"bulk {settings.get('bulk_duration')} s, {settings.get('round_trips')} round "
             f"trips; figures are the median of the repeats (min-max)"]
    if settings.get("nat_ports"):
        lines.append(f"pvpn servers' nat_ports: {settings['nat_ports']}")
    lines += ["", "paths:"]
    for name, meta in paths_meta.items():
        note = meta.get("note") or ""
        lines.append(f"  {name:<12} {meta.get('status', '?'):<8} {note}".rstrip())
        # Each path's exact settings (versions, ciphers, MTU), so the figures can be redone.
        for key, value in (meta.get("settings") or {}).items():
            lines.append(f"      {key}: {value}")
    lines.append("")

    web = summary.get("webstone", {})
    clients = sorted({int(c.split("/")[1]) for p in web.get("throughput", {}).values()
                      for c in p})
    files = [f for f in FILES if any(f"{f}/{c}" in p for p in web.get("throughput", {}).values()
                                     for c in clients)]
    for count in clients:
        columns = [(f"{f}/{count}", FILE_LABELS[f]) for f in files]
        lines += _metric_tables(
            f"HTTP throughput, bytes/s, {count} client(s), a new TCP connection per request",
            paths, columns, web.get("throughput", {}), si, True)
        lines += _metric_tables(
            f"HTTP average response time, {count} client(s)",
            paths, columns, web.get("avg_response", {}), seconds, False)
    errors = {p: sum(v.values()) for p, v in web.get("errors", {}).items() if sum(v.values())}
    if errors:
        lines.append("HTTP requests that failed: " + ", ".join(
            f"{p} {n}" for p, n in sorted(errors.items())))
        lines.append("")

    bulk = summary.get("bulk", {})
    tests = [t for t in BULK_TESTS if any(t in v for v in bulk.values())]
    if tests:
        lines += _metric_tables("Bulk (iperf3), bits/s: TCP with 1 and 8 streams, up (client "
                                "to target) and down; UDP at a fixed offered rate",
                                paths, [(t, BULK_LABELS[t]) for t in tests], bulk,
                                lambda v: si(v, "b"), True)
        lines += _against_peers_table(summary.get("bulk_against_peers", {}))
        loss = summary.get("udp_loss_percent", {})
        if loss:
            lines.append("UDP loss at the offered rate: " + ", ".join(
                f"{p} {v['median']:.2f}%" for p, v in loss.items()))
            lines.append("")

    latency = summary.get("latency", {})
    if any(latency.values()):
        cells = {p: {"rr_median": latency.get("rr_median", {}).get(p),
                     "rr_p99": latency.get("rr_p99", {}).get(p),
                     "ping_median": latency.get("ping_median", {}).get(p)} for p in paths}
        lines += _metric_tables("Latency: 1-byte request/response over one TCP connection, and "
                                "ICMP ping",
                                paths, [("rr_median", "TCP RR median"), ("rr_p99", "TCP RR p99"),
                                        ("ping_median", "ping median")],
                                cells, seconds, False)
    cost = summary.get("hop_cost", {})
    if cost:
        parts = []
        if "added_round_trip_per_gateway" in cost:
            parts.append(f"+{seconds(cost['added_round_trip_per_gateway'])} round trip per "
                         "gateway")
        parts += [f"{BULK_LABELS[t]} x{cost[f'bulk_{t}_ratio']:.2f}" for t in BULK_TESTS
                  if f"bulk_{t}_ratio" in cost]
        lines.append("Cost of each extra hop (pvpn-2gw against pvpn): " + ", ".join(parts))
        lines.append("")

    scale = summary.get("scale", {})
    if scale:
        counts = sorted({int(n) for v in scale.values() for n in v})
        agg = {p: {n: e.get("aggregate") for n, e in v.items()} for p, v in scale.items()}
        lines += _metric_tables("Scale: N users at once, each with its own VPN and its own "
                                "downloads (100 KB, a new connection each); aggregate bytes/s",
                                [p for p in paths if p in scale],
                                [(str(n), f"{n} user(s)") for n in counts], agg, si, True)
        rows = [[p, *(f"{scale[p].get(str(n), {}).get('jain', {}).get('median', math.nan):.3f}"
                      for n in counts)] for p in paths if p in scale]
        lines.append("Per-user fairness (Jain's index, 1 = equal shares)")
        lines += _table(["path", *(f"{n} user(s)" for n in counts)], rows)
        lines.append("")
    lines += scale_workers_lines(summary.get("scale_workers", {}))

    memory: Mapping[str, Any] = results.get("memory", {})
    for path, mem in memory.items():
        if not isinstance(mem, Mapping) or "per_session" not in mem:
            continue
        lines.append(f"Memory at the server ({path}): pvpn-server RSS {si(mem.get('rss_before'))}B"
                     f" with 1 session, {si(mem.get('rss_idle'))}B with "
                     f"{mem.get('sessions')} more idle sessions = "
                     f"{si(mem.get('per_session'))}B per session; "
                     f"{si(mem.get('rss_after_load'))}B after the scale load")
        lines.append("")

    cpu = summary.get("cpu_seconds_per_gb", {})
    busy = summary.get("cpu_utilization", {})
    if cpu:
        tests = [t for t in BULK_TESTS if t != "udp-up"]
        rows = []
        for path in paths:
            for role, per_test in cpu.get(path, {}).items():
                row = [path, role]
                for t in tests:
                    v = per_test.get(t)
                    u = busy.get(path, {}).get(role, {}).get(t)
                    row.append("-" if not v else
                               f"{v['median']:.2f} ({u['median'] * 100:.0f}%)" if u else
                               f"{v['median']:.2f}")
                rows.append(row)
        lines.append("CPU seconds per GB moved during the bulk TCP transfers, per process "
                     "(share of one core in brackets)")
        lines += _table(["path", "process", *(BULK_LABELS[t] for t in tests)], rows)
        lines.append("")
        totals = summary.get("cpu_seconds_per_gb_total", {})
        lines += _metric_tables("CPU seconds per GB, all the VPN's processes together",
                                [p for p in paths if p in totals],
                                [(t, BULK_LABELS[t]) for t in tests], totals,
                                lambda v: "-" if v is None else f"{v:.2f}", False)

    lines += _wakeup_table(summary.get("wakeup", {}))

    for issue in (5, 12):  # issue 12's are in addition to issue 5's
        lines.append(f"Targets (issue {issue})")
        for target in summary.get("targets", []):
            if target.get("issue", 5) == issue:
                mark = {True: "met", False: "NOT MET", None: "n/a"}[target["met"]]
                lines.append(f"  [{mark}] {target['target']}: {target['detail']}")
    for warning in results.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines).rstrip() + "\n"


def markdown_webstone(results: Results, summary: Mapping[str, Any] | None = None,
                      clients: int = 1) -> str:
    """The thesis-style tables (throughput, average response time) as Markdown."""
    summary = summary if summary is not None else summarize(results)
    web = summary.get("webstone", {})
    paths = _ok_paths(results)
    head = "| path | " + " | ".join(FILE_LABELS[f] for f in FILES) + " |"
    rule = "|---|" + "---|" * len(FILES)
    out = [f"Throughput, bytes/s, {clients} client(s):", "", head, rule]
    for path in paths:
        cells = web.get("throughput", {}).get(path, {})
        out.append(f"| {path} | " + " | ".join(
            f"{cells[f'{f}/{clients}']['median']:,.0f}" if f"{f}/{clients}" in cells else "-"
            for f in FILES) + " |")
    out += ["", f"Average response time, seconds, {clients} client(s):", "", head, rule]
    for path in paths:
        cells = web.get("avg_response", {}).get(path, {})
        out.append(f"| {path} | " + " | ".join(
            f"{cells[f'{f}/{clients}']['median']:.6f}" if f"{f}/{clients}" in cells else "-"
            for f in FILES) + " |")
    return "\n".join(out) + "\n"
