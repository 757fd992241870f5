"""``pvpn trace ... --html FILE``: one session as a self-contained page to look at.

The page holds everything it shows (inline CSS, SVG and a little script; no font, image,
style sheet or script from anywhere, and a Content-Security-Policy that lets the page load
nothing, not even by mistake): open it from a disk, mail it, keep it with a bug report.

- the hops as lanes on one time axis (seconds from the session's first record, as the
  terminal view counts them): each hop's span and every record it logged, as a marker with
  the event's name; a capture read with ``--packets`` adds a lane whose rows are its flows,
  with their resets, retransmissions, zero windows and ICMP errors marked;
- bytes per second per hop and direction, on the same axis: a hop's average from its
  ``session:closed`` counters (dashed: the records count only totals), and each capture's
  real rate each way, from its packets;
- the hop blocks, the flows and the timeline as tables.

Without the script the page shows all of it; the script adds a time cursor across both
plots and lets a legend entry hide its series.  Every string on the page came from someone
else (a user name from an unauthenticated HELLO, a peer's reason, a captured address) and is
escaped for HTML; this module is pure: a trace and summaries in, text out.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pvpn.names import (
    LINK_DEAD, LINK_ERROR, LINK_REFUSED, PACKET_DROPPED, SESSION_ATTACHED, SESSION_CLOSED,
    SESSION_DETACHED, SESSION_HELD, SESSION_OPENED, SESSION_REATTACHED, SESSION_RECOVERED,
    SESSION_REGISTERED, SESSION_RESUMED,
)
from pvpn.text import printable
from pvpn.trace import (
    DETAIL_FIELDS, HopSummary, LogRecord, SessionTrace, Traffic, format_time, record_time,
)
from pvpn.cli.trace_packets import (
    CaptureSummary, Direction, FlowSummary, capture_label, nice_step, rate_series, where_text,
)

WIDTH = 1100  # the SVGs' coordinate width; they scale to the window
LEFT = 170  # room for the lane names
RIGHT = 24
LANE_ROW = 13  # height of one row of event names
MAX_LABEL_ROWS = 3
MAX_FLOW_ROWS = 24  # flows drawn per capture lane (the table lists them all)
PLOT_HEIGHT = 240
CHAR = 6.1  # rough width of a character of the 10 px labels

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")

# Event -> the marker's class (its colour in the style sheet).
EVENT_CLASSES: Mapping[str, str] = {
    SESSION_OPENED: "open", SESSION_REGISTERED: "open", SESSION_ATTACHED: "open",
    SESSION_RESUMED: "resume", SESSION_REATTACHED: "resume", SESSION_RECOVERED: "resume",
    SESSION_HELD: "held", SESSION_DETACHED: "held",
    SESSION_CLOSED: "close", LINK_DEAD: "dead", LINK_ERROR: "dead",
    LINK_REFUSED: "dead", PACKET_DROPPED: "drop",
}

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #555; margin: .1em 0; } .warning { color: #a40; }
code, .mono, td.num, td.mono { font-family: ui-monospace, monospace; font-size: 12.5px; }
svg { width: 100%; height: auto; display: block; }
svg text { font: 10px ui-monospace, monospace; fill: #333; }
svg .lane-name { font: bold 12px system-ui, sans-serif; fill: #222; }
svg .lane-role { font: 10px system-ui, sans-serif; fill: #777; }
svg .tick { stroke: #ddd; } svg .axis-label { fill: #666; }
svg .band { fill: #f6f7f9; } svg .span { fill: #b9c7d9; }
svg .flow-bar { fill: #cfd8c8; } svg .flow-name { fill: #555; }
svg .event circle { stroke: #fff; stroke-width: 1; fill: #888; }
svg .ev-open circle { fill: #1f77b4; } svg .ev-close circle { fill: #333; }
svg .ev-resume circle { fill: #2ca02c; } svg .ev-held circle { fill: #ff9f1c; }
svg .ev-dead circle { fill: #d62728; } svg .ev-drop circle { fill: #e4572e; }
svg .mark-reset { fill: #d62728; } svg .mark-retransmission { fill: #ff7f0e; }
svg .mark-zero { fill: #9467bd; } svg .mark-icmp { fill: #8c564b; }
svg .rate { fill: none; stroke-width: 1.6; } svg .average { stroke-dasharray: 6 4; }
svg .cursor { stroke: #000; stroke-width: .8; stroke-dasharray: 2 2; }
.hidden { display: none; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .3em 1.2em; }
.legend li { white-space: nowrap; } .legend li.off { opacity: .35; }
.swatch { display: inline-block; width: 1.6em; height: .25em; vertical-align: middle;
          margin-right: .4em; }
.hint { display: none; color: #777; font-size: .9em; }
.interactive .hint { display: block; } .interactive .legend li { cursor: pointer; }
table { border-collapse: collapse; margin: .3em 0 1em; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .2em .6em; text-align: left;
         vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; } td.num { text-align: right; }
#cursor-time { font-family: ui-monospace, monospace; }
""" + "".join(f".swatch.c{i} {{ background: {c}; }} svg .c{i} {{ stroke: {c}; }}\n"
              for i, c in enumerate(PALETTE))

SCRIPT = """
(function () {
  "use strict";
  document.documentElement.classList.add("interactive");
  var series = document.querySelectorAll("g.series");
  document.querySelectorAll(".legend li[data-series]").forEach(function (item) {
    item.addEventListener("click", function () {
      var id = item.getAttribute("data-series");
      var off = item.classList.toggle("off");
      series.forEach(function (g) {
        if (g.getAttribute("data-series") === id) { g.classList.toggle("hidden", off); }
      });
    });
  });
  var svgs = document.querySelectorAll("svg.timed");
  var readout = document.getElementById("cursor-time");
  function hide() {
    svgs.forEach(function (s) { s.querySelector(".cursor").classList.add("hidden"); });
    readout.textContent = "";
  }
  svgs.forEach(function (svg) {
    var x0 = Number(svg.getAttribute("data-x0")), x1 = Number(svg.getAttribute("data-x1"));
    var t0 = Number(svg.getAttribute("data-t0")), t1 = Number(svg.getAttribute("data-t1"));
    svg.addEventListener("mousemove", function (event) {
      var point = svg.createSVGPoint();
      point.x = event.clientX; point.y = event.clientY;
      var p = point.matrixTransform(svg.getScreenCTM().inverse());
      if (p.x < x0 || p.x > x1) { hide(); return; }
      svgs.forEach(function (s) {
        var line = s.querySelector(".cursor");
        line.setAttribute("x1", p.x); line.setAttribute("x2", p.x);
        line.classList.remove("hidden");
      });
      var t = t0 + (p.x - x0) / (x1 - x0) * (t1 - t0);
      readout.textContent = "cursor at " + (t < 0 ? "" : "+") + t.toFixed(3) + " s";
    });
    svg.addEventListener("mouseleave", hide);
  });
})();
"""


def esc(value: object) -> str:
    """Someone else's string as HTML text or attribute value: printable, then escaped."""
    return html.escape(printable(str(value)), quote=True)


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def content_security_policy() -> str:
    """Nothing to load from anywhere; only this page's own style sheet and script run."""
    return (f"default-src 'none'; style-src {_csp_hash(STYLE)}; "
            f"script-src {_csp_hash(SCRIPT)}; img-src 'none'; base-uri 'none'; "
            "form-action 'none'")


def _n(value: float) -> str:
    """A coordinate, short."""
    return f"{value:.2f}".rstrip("0").rstrip(".") if math.isfinite(value) else "0"


@dataclass(frozen=True, slots=True)
class Axis:
    """Offsets (seconds from the session's start) to x in the SVGs."""

    t0: float
    t1: float

    def x(self, offset: float) -> float:
        span = self.t1 - self.t0
        return LEFT + (offset - self.t0) / span * (WIDTH - LEFT - RIGHT)

    def ticks(self) -> list[float]:
        step = nice_step(self.t1 - self.t0, 10)
        first = math.ceil(self.t0 / step - 1e-9)
        return [round(i * step, 9) for i in range(first, first + 200)
                if i * step <= self.t1 + 1e-9]

    def attributes(self) -> str:
        return (f'data-x0="{_n(LEFT)}" data-x1="{_n(WIDTH - RIGHT)}" '
                f'data-t0="{self.t0!r}" data-t1="{self.t1!r}"')


def _seconds(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return f"+{text} s" if value > 0 else f"{text} s"


def _axis_for(trace: SessionTrace, captures: Sequence[CaptureSummary]) -> Axis:
    offsets = [0.0, trace.end - trace.start]
    for capture in captures:
        for when in (capture.first, capture.last):
            if when is not None:
                offsets.append(when - trace.start)
    t0, t1 = min(offsets), max(offsets)
    if t1 - t0 < 1e-3:
        t1 = t0 + 1e-3
    return Axis(t0, t1)


def _details(record: Mapping[str, Any]) -> str:
    names = [f for f in DETAIL_FIELDS if f in record]
    names += sorted(k for k in record if k.startswith("bytes") and k not in names)
    return " ".join(f"{name}={printable(str(record[name]))}" for name in names
                    if record[name] is not None and record[name] != "")


def _grid(axis: Axis, top: float, bottom: float) -> list[str]:
    parts = []
    for tick in axis.ticks():
        x = _n(axis.x(tick))
        parts.append(f'<line class="tick" x1="{x}" x2="{x}" y1="{_n(top)}" '
                     f'y2="{_n(bottom)}"/>')
        parts.append(f'<text class="axis-label" x="{x}" y="{_n(top - 4)}" '
                     f'text-anchor="middle">{esc(_seconds(tick))}</text>')
    return parts


def _place(rows: list[float], x: float, width: float) -> int | None:
    """The first label row with room at ``x`` (each row keeps the end of its last label)."""
    for index, end in enumerate(rows):
        if x >= end + 4:
            rows[index] = x + width
            return index
    return None


def _hop_lane(hop: HopSummary, records: Sequence[LogRecord], start: float, axis: Axis,
              y: float, index: int) -> tuple[list[str], float]:
    """One hop's lane at ``y``: its name, its span and a marker per record; its height."""
    rows = [-1e9] * MAX_LABEL_ROWS
    placed: list[tuple[float, float, str, str, str, int | None]] = []
    for record in records:
        offset = (record_time(record) or start) - start
        event = str(record.get("event", "?"))
        x = axis.x(offset)
        width = CHAR * len(printable(event))
        # A name starts at its marker, or ends there near the right edge.
        left = x - 3 if x - 3 + width <= WIDTH - 2 else x + 3 - width
        row = _place(rows, left, width)
        tip = f"{_seconds(offset)}  {hop.name}  {event}  {_details(record)}".rstrip()
        placed.append((x, left, event, EVENT_CLASSES.get(event, "other"), tip, row))
    used = max((row + 1 for *_, row in placed if row is not None), default=0)
    height = 36 + LANE_ROW * used
    bar = y + LANE_ROW * used + 16
    parts = [f'<g class="lane hop" data-hop="{esc(hop.name)}" data-role="{esc(hop.role)}">']
    if index % 2 == 0:
        parts.append(f'<rect class="band" x="0" y="{_n(y)}" width="{WIDTH}" '
                     f'height="{_n(height)}"/>')
    parts.append(f'<text class="lane-name" x="8" y="{_n(bar + 1)}">{esc(hop.name)}</text>')
    if hop.role and hop.role != hop.name:
        parts.append(f'<text class="lane-role" x="8" y="{_n(bar + 13)}">{esc(hop.role)}'
                     '</text>')
    x0, x1 = axis.x(hop.first - start), axis.x(hop.last - start)
    parts.append(f'<rect class="span" x="{_n(x0)}" y="{_n(bar - 3)}" '
                 f'width="{_n(max(1.0, x1 - x0))}" height="6"><title>'
                 f'{esc(hop.name)}: {esc(_seconds(hop.first - start))} .. '
                 f'{esc(_seconds(hop.last - start))}</title></rect>')
    for x, left, event, kind, tip, row in placed:
        parts.append(f'<g class="event ev-{kind}" data-event="{esc(event)}">'
                     f'<title>{esc(tip)}</title>'
                     f'<circle cx="{_n(x)}" cy="{_n(bar)}" r="4"/>')
        if row is not None:
            label_y = bar - 9 - LANE_ROW * (used - 1 - row)
            parts.append(f'<text class="event-label" x="{_n(left)}" y="{_n(label_y)}">'
                         f'{esc(event)}</text>')
        parts.append("</g>")
    parts.append("</g>")
    return parts, height


MARK_CLASSES = {"reset": "mark-reset", "retransmission": "mark-retransmission",
                "zero window": "mark-zero", "icmp": "mark-icmp"}


def _flow_row(flow: FlowSummary, start: float, axis: Axis, y: float) -> list[str]:
    x0, x1 = axis.x(flow.start - start), axis.x(flow.end - start)
    tip = (f"{flow.name}  {_seconds(flow.start - start)} .. {_seconds(flow.end - start)}  "
           f"up {flow.up.packets} packets {flow.up.bytes} B, down {flow.down.packets} "
           f"packets {flow.down.bytes} B" + (f"  {flow.state}" if flow.state else ""))
    parts = [f'<g class="flow" data-flow="{esc(flow.name)}"><title>{esc(tip)}</title>',
             f'<text class="flow-name" x="{_n(x0)}" y="{_n(y + 9)}">{esc(flow.name)}'
             + (f" ({esc(flow.state)})" if flow.state else "") + "</text>",
             f'<rect class="flow-bar" x="{_n(x0)}" y="{_n(y + 12)}" '
             f'width="{_n(max(1.0, x1 - x0))}" height="5"/>']
    for event in flow.events:
        x = axis.x(event.time - start)
        text = f"{_seconds(event.time - start)} {event.kind} {event.direction}" + (
            f": {event.detail}" if event.detail else "")
        parts.append(f'<rect class="mark {MARK_CLASSES.get(event.kind, "mark-icmp")}" '
                     f'data-kind="{esc(event.kind)}" x="{_n(x - 1.5)}" y="{_n(y + 10)}" '
                     f'width="3" height="9"><title>{esc(text)}</title></rect>')
    parts.append("</g>")
    return parts


def _capture_lane(capture: CaptureSummary, start: float, axis: Axis, y: float, index: int
                  ) -> tuple[list[str], float]:
    flows = capture.flows[:MAX_FLOW_ROWS]
    height = 26 + 22 * max(1, len(flows)) + (14 if len(capture.flows) > len(flows) else 0)
    parts = [f'<g class="lane capture" data-capture="{esc(capture.path)}">']
    if index % 2 == 0:
        parts.append(f'<rect class="band" x="0" y="{_n(y)}" width="{WIDTH}" '
                     f'height="{_n(height)}"/>')
    parts.append(f'<text class="lane-name" x="8" y="{_n(y + 18)}">packets</text>')
    where = where_text(capture)
    short = where if len(where) <= 26 else where[:25] + "\u2026"
    parts.append(f'<text class="lane-role" x="8" y="{_n(y + 31)}"><title>{esc(where)}</title>'
                 f'{esc(short)}</text>')
    if not flows:
        parts.append(f'<text x="{LEFT}" y="{_n(y + 24)}">'
                     f'{esc(capture.error or "no packets")}</text>')
    for row, flow in enumerate(flows):
        parts += _flow_row(flow, start, axis, y + 8 + 22 * row)
    if len(capture.flows) > len(flows):
        parts.append(f'<text x="{LEFT}" y="{_n(y + height - 6)}">... and '
                     f'{len(capture.flows) - len(flows)} more flows (see the table)</text>')
    parts.append("</g>")
    return parts, height


def lanes_svg(trace: SessionTrace, captures: Sequence[CaptureSummary], axis: Axis) -> str:
    """The hops (and captures) as lanes on one time axis."""
    by_hop: dict[tuple[str, str], list[LogRecord]] = {}
    for record in trace.timeline:
        key = (str(record.get("role") or ""), str(record.get("node") or ""))
        by_hop.setdefault(key, []).append(record)
    top = 22.0
    y = top
    body: list[str] = []
    index = 0
    for hop in trace.hops:
        parts, height = _hop_lane(hop, by_hop.get((hop.role, hop.node), []), trace.start,
                                  axis, y, index)
        body += parts
        y += height
        index += 1
    for capture in captures:
        parts, height = _capture_lane(capture, trace.start, axis, y, index)
        body += parts
        y += height
        index += 1
    bottom = y + 4
    return "\n".join([
        f'<svg class="timed lanes" viewBox="0 0 {WIDTH} {_n(bottom)}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="the hops on one time '
        f'axis" {axis.attributes()}>',
        *_grid(axis, top, bottom), *body,
        f'<line class="cursor hidden" x1="0" x2="0" y1="{_n(top)}" y2="{_n(bottom)}"/>',
        "</svg>"])


@dataclass(frozen=True, slots=True)
class Series:
    """One line of the rate plot."""

    id: str
    label: str
    hop: str
    direction: str
    source: str  # "counters" (an average) or "pcap"
    points: list[tuple[float, float]]  # (offset, B/s): steps from each point to the next
    end: float  # where the last step ends
    colour: int


def rate_plot_series(trace: SessionTrace, captures: Sequence[CaptureSummary], axis: Axis
                     ) -> list[Series]:
    """The plot's lines: per hop and direction the average of its counters, per capture and
    direction its rate from the packets."""
    series: list[Series] = []
    for hop in trace.hops:
        span = hop.last - hop.first
        for direction, traffic in (("up", hop.up), ("down", hop.down)):
            if not hop.closed or traffic.bytes is None or span < 1e-3:
                continue
            first = hop.first - trace.start
            series.append(Series(f"s{len(series)}", f"{hop.name} {direction}: average of its "
                                 "session:closed counters", hop.name, direction, "counters",
                                 [(first, traffic.bytes / span)], first + span,
                                 len(series) % len(PALETTE)))
    for capture in captures:
        if not capture.packets:
            continue
        rates = rate_series(capture, trace.start, trace.start + axis.t1,
                            begin=trace.start + axis.t0)
        for direction, points in (("up", rates.up), ("down", rates.down)):
            label = (f"{capture_label(capture)} {direction}: from the packets "
                     f"({_bin(rates.bin)} bins)")
            series.append(Series(f"s{len(series)}", label, capture.where, direction, "pcap",
                                 points, axis.t0 + rates.bin * len(points),
                                 len(series) % len(PALETTE)))
    return series


def _bin(width: float) -> str:
    return f"{width * 1000:g} ms" if width < 1 else f"{width:g} s"


def _rate(value: float) -> str:
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B/s"


def plot_svg(series: Sequence[Series], axis: Axis) -> str:
    """Bytes per second, one line per series, on the lanes' time axis."""
    top, bottom = 22.0, 22.0 + PLOT_HEIGHT
    peak = max((rate for s in series for _t, rate in s.points), default=0.0)
    step = nice_step(peak or 1.0, 5)
    ceiling = step * max(1, math.ceil(peak / step - 1e-9))

    def y(rate: float) -> float:
        return bottom - rate / ceiling * (bottom - top)

    parts = _grid(axis, top, bottom)
    for i in range(int(round(ceiling / step)) + 1):
        value = i * step
        parts.append(f'<line class="tick" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{_n(y(value))}" '
                     f'y2="{_n(y(value))}"/>')
        parts.append(f'<text class="axis-label" x="{LEFT - 6}" y="{_n(y(value) + 3)}" '
                     f'text-anchor="end">{esc(_rate(value))}</text>')
    for line in series:
        points: list[str] = []
        ends = [t for t, _r in line.points[1:]] + [line.end]
        for (t, rate), t_end in zip(line.points, ends):
            points.append(f"{_n(axis.x(t))},{_n(y(rate))}")
            points.append(f"{_n(axis.x(t_end))},{_n(y(rate))}")
        d = "M" + " L".join(points)
        average = " average" if line.source == "counters" else ""
        parts.append(f'<g class="series" data-series="{line.id}" data-hop="{esc(line.hop)}" '
                     f'data-direction="{line.direction}" data-source="{line.source}">'
                     f'<title>{esc(line.label)}</title>'
                     f'<path class="rate c{line.colour}{average}" d="{d}"/></g>')
    if not series:
        parts.append(f'<text x="{LEFT + 8}" y="{_n(top + 20)}">no counters (no hop logged '
                     'the end of the session) and no packets to plot</text>')
    parts.append(f'<line class="cursor hidden" x1="0" x2="0" y1="{_n(top)}" '
                 f'y2="{_n(bottom)}"/>')
    return "\n".join([
        f'<svg class="timed plot" viewBox="0 0 {WIDTH} {_n(bottom + 8)}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="bytes per second per '
        f'hop and direction" {axis.attributes()}>', *parts, "</svg>"])


def _legend(series: Sequence[Series]) -> str:
    items = [f'<li data-series="{s.id}"><span class="swatch c{s.colour}"></span>'
             f'{esc(s.label)}</li>' for s in series]
    return '<ul class="legend">' + "".join(items) + "</ul>"


def _traffic(traffic: Traffic) -> str:
    parts = [] if traffic.bytes is None else [f"{traffic.bytes:,} B"]
    if traffic.packets is not None:
        parts.append(f"{traffic.packets:,} packets")
    if traffic.envelopes_in is not None or traffic.envelopes_out is not None:
        parts.append(f"envelopes {traffic.envelopes_in} in, {traffic.envelopes_out} out")
    return ", ".join(parts) or "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[int]
           = frozenset(), cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    return (f'<table class="{cls}">' if cls else "<table>") + \
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _hops_table(trace: SessionTrace) -> str:
    rows = []
    for index, hop in enumerate(trace.hops, 1):
        state = (f"closed: {esc(hop.close_reason or '(no reason)')}" if hop.closed
                 else "no end logged")
        drops = ", ".join(f"{esc(r)} x{c}" for r, c in sorted(hop.drops.items())) or "none"
        reconnects = "<br>".join(
            f"{esc(_seconds(e.time - trace.start))} {esc(e.event)}"
            + (f": {esc(e.reason)}" if e.reason else "") for e in hop.reconnects) or "-"
        who = esc(hop.user or "?") + (f" (uid {hop.uid})" if hop.uid is not None else "")
        rows.append([str(index), esc(hop.name), esc(hop.role), who, esc(hop.peer or "-"),
                     esc(hop.next_hop or "-"),
                     f"{esc(_seconds(hop.first - trace.start))} .. "
                     f"{esc(_seconds(hop.last - trace.start))}",
                     state, esc(_traffic(hop.up)), esc(_traffic(hop.down)), drops, reconnects])
    return _table(["#", "node", "role", "user", "from", "to", "span", "state",
                   "up (to the target)", "down (to the user)", "drops", "reconnects"],
                  rows, cls="hops")


def _side(d: Direction) -> str:
    text = f"{d.packets:,} packets, {d.bytes:,} B"
    extra = [f"{n} {w}" for n, w in ((d.retransmissions, "retransmissions"), (d.resets, "resets"),
                                      (d.zero_windows, "zero windows"),
                                      (d.dup_acks, "duplicate ACKs")) if n]
    return esc(", ".join([text, *extra]))


def _flows_table(capture: CaptureSummary, start: float) -> str:
    rows = []
    for flow in capture.flows:
        first = flow.first
        last = flow.last
        rows.append([
            f'<span class="mono">{esc(flow.name)}</span>',
            f"{esc(_seconds(flow.start - start))} .. {esc(_seconds(flow.end - start))}",
            esc(flow.state or "-"), _side(flow.up), _side(flow.down),
            "" if first is None else f'<span class="mono">{esc(_seconds(first.time - start))} '
            f"{esc(first.direction)} {esc(first.text)}</span>",
            "" if last is None else f'<span class="mono">{esc(_seconds(last.time - start))} '
            f"{esc(last.direction)} {esc(last.text)}</span>"])
    return _table(["flow", "span", "state", "up", "down", "first packet", "last packet"],
                  rows, cls="flows")


def _timeline_table(trace: SessionTrace) -> str:
    rows = []
    for record in trace.timeline:
        offset = (record_time(record) or trace.start) - trace.start
        node = record.get("node") or record.get("role") or "?"
        rows.append([esc(f"+{offset:.3f}s"), esc(node), esc(record.get("event", "?")),
                     f'<span class="mono">{esc(_details(record))}</span>'])
    return _table(["time", "node", "event", "details"], rows, numeric=frozenset({0}),
                  cls="timeline")


def render_html(trace: SessionTrace, captures: Sequence[CaptureSummary] = ()) -> str:
    """The page of ``trace`` (and the captures read for it), as one HTML document."""
    axis = _axis_for(trace, captures)
    series = rate_plot_series(trace, captures, axis)
    uid = f" (uid {trace.uid})" if trace.uid is not None else ""
    state = "closed" if trace.closed else "open (no end logged by the client or server)"
    chain = " &gt; ".join(esc(hop.name) for hop in trace.hops) or "(no hops)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{content_security_policy()}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>pvpn trace {esc(trace.session)} ({esc(trace.user or '?')})</title>",
        f"<style>{STYLE}</style></head><body>",
        f'<h1>session <code>{esc(trace.session)}</code> of {esc(trace.user or "?")}{uid}</h1>',
        f'<p class="meta">{esc(format_time(trace.start))}, '
        f'{esc(f"{trace.end - trace.start:.3f}")} s, {esc(state)}</p>',
        f'<p class="meta">chain: {chain}</p>',
        *(f'<p class="warning">warning: {esc(line)}</p>' for line in trace.foreign),
        '<h2>The hops on one time axis</h2>',
        '<p class="hint">Point at a marker for its record; the cursor line reads the time '
        'in both plots. <span id="cursor-time"></span></p>',
        lanes_svg(trace, captures, axis),
        '<h2>Bytes per second, per hop and direction</h2>',
        '<p class="meta">Dashed: a hop\'s average over its span, from its session:closed '
        'counters (the records count totals only; a gateway counts the next hop\'s '
        'ciphertext). Solid: from the packets of a capture. Up is towards the target.</p>',
        '<p class="hint">Click a legend entry to hide or show its line.</p>',
        plot_svg(series, axis),
        _legend(series),
        "<h2>Hops</h2>",
        _hops_table(trace),
    ]
    for capture in captures:
        parts.append(f"<h2>Packets {esc(where_text(capture))}: "
                     f"<code>{esc(capture.path)}</code></h2>")
        up, down = capture.direction_totals("up"), capture.direction_totals("down")
        parts.append(f'<p class="meta">{capture.packets:,} packets, {capture.bytes:,} B; up '
                     f"{up[0]:,} packets, {up[1]:,} B; down {down[0]:,} packets, "
                     f"{down[1]:,} B</p>")
        if capture.error:
            parts.append(f'<p class="warning">{esc(capture.error)}</p>')
        if capture.flows:
            parts.append(_flows_table(capture, trace.start))
    parts += ["<h2>Timeline</h2>", _timeline_table(trace),
              f"<script>{SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(parts)
