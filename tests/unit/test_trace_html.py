"""pvpn.cli.trace_html and `pvpn trace --html FILE` (issue 10 point 4): one self-contained page
with the hops as lanes on one time axis and bytes per second per hop and direction,
rendered in headless Chromium (Debian's package) to check what it shows, that its script
runs, that what other users chose is shown as text, and that it makes no network request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP

from pvpn.cli.main import main as pvpn_main
from pvpn.io.pcap import PcapWriter
from pvpn.trace import trace_session
from pvpn.cli.trace import read_records
from pvpn.cli.trace_html import SCRIPT, STYLE, content_security_policy, render_html

S = "5e55" * 8
T0 = 1_700_000_000.0
EVIL = '<script>alert("owned")</script><img src=x onerror=alert(1)>"\'&'
CHROMIUM_TIMEOUT = 60.0


def rec(t: float, role: str, node: str, event: str, **fields: Any) -> dict[str, Any]:
    return {"time": T0 + t, "role": role, "node": node, "event": event, "session": S,
            "user": "alice", "uid": 1001, **fields}


def session_logs(directory: Path) -> Path:
    """client > gw1 > server: gw1's link dies and the chain is rebuilt, the server holds the
    session meanwhile; reasons and peers carry markup (others choose them)."""
    logs = {
        "client": [rec(0.0, "client", "client", "session:attached"),
                   rec(2.0, "client", "client", "session:held", reason=EVIL),
                   rec(2.6, "client", "client", "session:reattached"),
                   rec(6.0, "client", "client", "session:closed", reason="ended by the user",
                       packets_out=40, packets_in=60, bytes_out=4_000, bytes_in=60_000)],
        "gw1": [rec(0.1, "gateway", "gw1", "session:opened", path=[], peer=EVIL,
                    next_hop="10.77.1.2:4433"),
                rec(1.9, "gateway", "gw1", "link:dead", reason="no word for 30 s"),
                rec(2.5, "gateway", "gw1", "session:opened", path=[], peer="10.77.0.1:2"),
                rec(5.9, "gateway", "gw1", "session:closed", reason="closed by the user",
                    bytes_to_next=5_000, bytes_from_next=70_000, envelopes_from_user=40,
                    envelopes_to_user=60, envelopes_to_next=40, envelopes_from_next=60)],
        "server": [rec(0.2, "server", "server", "session:opened", peer="10.77.1.1:4"),
                   rec(1.0, "server", "server", "packet:dropped", count=1, reason=EVIL),
                   rec(2.0, "server", "server", "session:detached", reason="connection lost"),
                   rec(2.7, "server", "server", "session:resumed"),
                   rec(5.95, "server", "server", "session:closed", reason=EVIL,
                       packets_out=38, packets_in=58, bytes_out=3_900, bytes_in=59_000,
                       drops={EVIL: 1})],
    }
    for node, records in logs.items():
        path = directory / node / "pvpn.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def capture(path: Path) -> Path:
    """The server's capture: a download whose request is sent twice, then reset; UDP."""
    user, target = "10.77.0.1", "10.77.4.2"
    up = IP(src=user, dst=target)
    down = IP(src=target, dst=user)
    request = b"GET / HTTP/1.1\r\n\r\n"
    packets = [(0.30, up / TCP(sport=40000, dport=80, flags="S", seq=0)),
               (0.31, down / TCP(sport=80, dport=40000, flags="SA", seq=0, ack=1)),
               (0.32, up / TCP(sport=40000, dport=80, flags="PA", seq=1, ack=1) / request),
               (0.60, up / TCP(sport=40000, dport=80, flags="PA", seq=1, ack=1) / request)]
    packets += [(0.61 + i * 0.05, down / TCP(sport=80, dport=40000, flags="A", seq=1 + 1400 * i,
                                            ack=19) / (b"d" * 1400)) for i in range(40)]
    packets += [(2.65, down / TCP(sport=80, dport=40000, flags="R", seq=56001)),
                (3.0, up / UDP(sport=5353, dport=7) / b"echo"),
                (3.01, down / UDP(sport=7, dport=5353) / b"echo")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with PcapWriter(path) as writer:
        for offset, packet in packets:
            writer.write(bytes(packet), T0 + offset)
    return path


class Elements(HTMLParser):
    """Every element of a document: tag, attributes, its own text and its parents' tags."""

    VOID = frozenset({"meta", "br", "img", "link", "input", "hr", "source", "wbr", "base"})

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = {"tag": tag, "attrs": dict(attrs), "text": "",
                   "parents": [e for e in self._open]}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append({"tag": tag, "attrs": dict(attrs), "text": "",
                              "parents": list(self._open)})

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index]["tag"] == tag:
                del self._open[index:]
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element["text"] += data

    def having(self, tag: str, cls: str = "", **attrs: str) -> list[dict[str, Any]]:
        return [e for e in self.elements if e["tag"] == tag
                and (not cls or cls in (e["attrs"].get("class") or "").split())
                and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]


def page(tmp_path: Path, packets: bool = True) -> str:
    logs = session_logs(tmp_path / "logs")
    records = list(read_records(sorted(logs.rglob("*.log"))))
    trace = trace_session(records, S)
    captures = []
    if packets:
        from pvpn.cli.trace_packets import read_capture

        captures = [read_capture(capture(tmp_path / "pcap" / f"{S}.pcap"), "server")]
    return render_html(trace, captures)


def test_the_page_loads_nothing_and_shows_what_others_chose_as_text(tmp_path: Path) -> None:
    text = page(tmp_path)
    doc = Elements(text)
    tags = {e["tag"] for e in doc.elements}
    assert not tags & {"img", "iframe", "link", "object", "embed", "base", "form", "frame"}
    assert [e["attrs"] for e in doc.having("script")] == [{}]  # one, inline
    for element in doc.elements:
        for name, value in element["attrs"].items():
            assert not name.startswith("on") and name not in ("src", "href"), element
            if name != "xmlns":
                assert "://" not in (value or ""), element
    assert "url(" not in STYLE and "@import" not in STYLE
    [csp] = doc.having("meta", http_equiv="Content-Security-Policy")
    assert csp["attrs"]["content"] == content_security_policy()
    assert "default-src 'none'" in csp["attrs"]["content"]
    assert f"<style>{STYLE}</style>" in text and f"<script>{SCRIPT}</script>" in text
    # Others' strings: never markup, always the text they are.
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;" in text
    cells = [e["text"] for e in doc.having("td")]
    assert any(EVIL in cell for cell in cells)
    tips = [e["text"] for e in doc.having("title") if EVIL in e["text"]]
    assert tips, "the markers' tooltips show the reason as text"


def test_trace_html_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = session_logs(tmp_path / "logs")
    out = tmp_path / "page.html"
    out.write_text("old")
    out.chmod(0o644)
    assert pvpn_main(["trace", S[:8], "--logs", str(logs), "--html", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote the page of session {S} to {out}\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    doc = Elements(out.read_text())
    assert [e["attrs"]["data-hop"] for e in doc.having("g", "hop")] == [
        "client", "gw1", "server"]
    assert not doc.having("g", "capture")  # no --packets: no capture read
    assert pvpn_main(["trace", S, "--logs", str(logs), "--html", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["session"] == S
    assert pvpn_main(["trace", "--user", "alice", "--logs", str(logs), "--html",
                      str(out)]) == 2
    assert "give SESSION or --all" in capsys.readouterr().err
    link = tmp_path / "link.html"
    link.symlink_to(tmp_path / "elsewhere.html")
    assert pvpn_main(["trace", S, "--logs", str(logs), "--html", str(link)]) == 2
    assert "cannot write the page" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere.html").exists()


# ---------------------------------------------------------------- in a real browser


def chromium() -> str:
    program = shutil.which("chromium") or shutil.which("chromium-browser")
    if program is None:
        reason = "needs Debian's chromium package (bash scripts/run test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return program


def render(program: str, page_file: Path, work: Path) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran, and every request the page itself started
    (Chromium's net log; the browser's own background requests, which carry no initiator,
    are left out).  Names resolve to nothing: no test run reaches the network."""
    netlog = work / "netlog.json"
    argv = [program, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-extensions",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={work / 'profile'}",
            f"--log-net-log={netlog}", "--dump-dom", page_file.as_uri()]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        dom, _ = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its helpers, if any outlived it
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    assert proc.returncode == 0, proc.returncode
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [event["params"]["url"] for event in log["events"]
                if event["type"] == start_job
                and event.get("params", {}).get("initiator", "not an origin") != "not an origin"]
    return dom.decode("utf-8"), requests


def test_chromium_shows_the_lanes_the_events_and_the_plot(tmp_path: Path) -> None:
    program = chromium()
    # The detector first: a page that fetches an image is caught.
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><title>c</title><img src="http://pvpn-control.invalid/'
                       'x.png">')
    _dom, requests = render(program, control, tmp_path / "control")
    assert requests == ["http://pvpn-control.invalid/x.png"]

    page_file = tmp_path / "page.html"
    page_file.write_text(page(tmp_path))
    dom, requests = render(program, page_file, tmp_path / "page")
    assert requests == []
    doc = Elements(dom)
    [root] = doc.having("html")
    assert "interactive" in root["attrs"]["class"].split()  # the script ran (CSP let it)

    # The hops as lanes on one time axis, in chain order, each with its events named.
    lanes = doc.having("g", "hop")
    assert [lane["attrs"]["data-hop"] for lane in lanes] == ["client", "gw1", "server"]

    def labels(hop: str) -> list[str]:
        return [e["text"] for e in doc.having("text", "event-label")
                if any(p["attrs"].get("data-hop") == hop for p in e["parents"])]

    assert labels("client") == ["session:attached", "session:held", "session:reattached",
                                "session:closed"]
    assert labels("gw1") == ["session:opened", "link:dead", "session:opened",
                             "session:closed"]
    assert set(labels("server")) == {"session:opened", "packet:dropped", "session:detached",
                                     "session:resumed", "session:closed"}
    assert [e["attrs"]["data-event"] for e in doc.having("g", "ev-dead")] == ["link:dead"]
    ticks = [e["text"] for e in doc.having("text", "axis-label")]
    assert "+1 s" in ticks and "+5 s" in ticks

    # The capture's lane: its flows, the retransmission and the reset marked.
    [lane] = doc.having("g", "capture")
    flows = [e for e in doc.having("g", "flow") if lane in e["parents"]]
    assert [f["attrs"]["data-flow"] for f in flows] == [
        "tcp 10.77.0.1:40000 > 10.77.4.2:80", "udp 10.77.0.1:5353 > 10.77.4.2:7"]
    marks = [e["attrs"]["data-kind"] for e in doc.having("rect", "mark")]
    assert marks == ["retransmission", "reset"]

    # Bytes per second: per hop and direction from the counters, and the capture's packets.
    series = doc.having("g", "series")
    assert [(s["attrs"]["data-hop"], s["attrs"]["data-direction"], s["attrs"]["data-source"])
            for s in series] == [
        ("client", "up", "counters"), ("client", "down", "counters"),
        ("gw1", "up", "counters"), ("gw1", "down", "counters"),
        ("server", "up", "counters"), ("server", "down", "counters"),
        ("server", "up", "pcap"), ("server", "down", "pcap")]
    paths = [e for e in doc.having("path", "rate")]
    assert len(paths) == len(series)
    heights = {float(point.split(",")[1]) for point in
               paths[-1]["attrs"]["d"].lstrip("M").split(" L")}
    assert len(heights) > 3  # the download's rate rises and falls
    legend = [e["text"] for e in doc.having("li") if "data-series" in e["attrs"]]
    assert len(legend) == len(series)
    assert legend[0] == "client up: average of its session:closed counters"
    assert legend[-1].startswith("server down: from the packets")

    # What others chose is on the page as text, and nothing it held became markup.
    assert len(doc.having("script")) == 1 and not doc.having("img")
    assert any(EVIL in e["text"] for e in doc.having("td"))
