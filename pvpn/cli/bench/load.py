"""The bench's own traffic programs, run inside a lab host's namespace as a user.

``python -m pvpn.cli.bench.load http ...``  WebStone-style HTTP load: one process per concurrent
    client, each looping connect / GET / read everything / close for a fixed time (a new TCP
    connection per request, as WebStone does), then one JSON summary on stdout.
``python -m pvpn.cli.bench.load rr ...``    request/response round trips over one TCP connection
    kept open (TCP_NODELAY, one byte each way); JSON summary of the round-trip times.
``python -m pvpn.cli.bench.load echo ...``  the tiny TCP echo server ``rr`` talks to (started on
    the target for the bench, stopped with SIGTERM).

Only the standard library, raw sockets; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Bounds on everything a worker keeps or does.
MAX_REQUESTS = 10_000_000  # per worker and cell; the deadline ends a cell long before
MAX_SAMPLES = 200_000  # response times kept per worker for percentiles (the mean is exact)
MAX_HEADER = 16 * 1024  # an HTTP response head longer than this is an error
MAX_RESPONSE_SECONDS = 120.0  # a whole response, however slow
RECV_SIZE = 256 * 1024
MAX_ECHO_CONNECTIONS = 64
MAX_ROUND_TRIPS = 1_000_000


@dataclass
class WorkerResult:
    """What one load process measured: requests done, bytes read, response times."""

    requests: int = 0
    errors: int = 0
    bytes: int = 0  # everything read: status line, headers and body (WebStone counts all)
    body_bytes: int = 0
    latency_sum: float = 0.0
    first_error: str = ""
    started: float = 0.0  # wall clock (time.time()) when the worker began its loop
    ended: float = 0.0
    samples: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank of sorted ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def _header_end(head: bytes) -> int:
    end = head.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def fetch(host: str, port: int, request: bytes, buf: bytearray, timeout: float
          ) -> tuple[int, int]:
    """One WebStone request on a new connection: connect, send, read to EOF, close.

    Returns (bytes read, body bytes); raises OSError or ValueError (a bad response).
    """
    view = memoryview(buf)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        head = b""
        total = 0
        header_len = -1
        # ``timeout`` bounds each wait (a stalled connection is an error, a slow one is
        # not); this deadline bounds the whole response, along with EOF.
        deadline = time.monotonic() + MAX_RESPONSE_SECONDS
        while time.monotonic() < deadline:
            n = sock.recv_into(view)
            if n == 0:
                break
            total += n
            if header_len < 0:
                head += bytes(view[:n])
                header_len = _header_end(head)
                if header_len < 0 and len(head) > MAX_HEADER:
                    raise ValueError("response head too long")
        else:
            raise TimeoutError(f"response not complete in {MAX_RESPONSE_SECONDS:g} s")
    if header_len < 0 or not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        raise ValueError(f"bad response: {head[:40]!r}")
    body = total - header_len
    expected = _content_length(head[:header_len])
    if expected is not None and body != expected:
        raise ValueError(f"short body: {body} of {expected} bytes")
    return total, body


def http_worker(host: str, port: int, path: str, start_at: float, duration: float,
                timeout: float) -> WorkerResult:
    """Loop requests from ``start_at`` (wall clock) for ``duration`` seconds."""
    request = (f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: pvpn-bench\r\n"
               "Connection: close\r\n\r\n").encode()
    buf = bytearray(RECV_SIZE)
    result = WorkerResult()
    wait = start_at - time.time()
    if wait > 0:
        time.sleep(min(wait, 60.0))
    result.started = time.time()
    deadline = time.monotonic() + duration
    for _ in range(MAX_REQUESTS):
        if time.monotonic() >= deadline:
            break
        t0 = time.monotonic()
        try:
            total, body = fetch(host, port, request, buf, timeout)
        except (OSError, ValueError) as exc:
            result.errors += 1
            if not result.first_error:
                result.first_error = f"{type(exc).__name__}: {exc}"
            # A refused or reset connection fails at once: don't spin on it.
            time.sleep(0.01)
            continue
        elapsed = time.monotonic() - t0
        result.requests += 1
        result.bytes += total
        result.body_bytes += body
        result.latency_sum += elapsed
        if len(result.samples) < MAX_SAMPLES:
            result.samples.append(elapsed)
    result.ended = time.time()
    return result


def _child(conn: multiprocessing.connection.Connection, host: str, port: int, path: str,
           start_at: float, duration: float, timeout: float) -> None:
    try:
        conn.send(asdict(http_worker(host, port, path, start_at, duration, timeout)))
    finally:
        conn.close()


def summarize_http(results: list[WorkerResult], clients: int) -> dict[str, Any]:
    """One cell: throughput over the common window, mean and percentiles of response times."""
    done = [r for r in results if r.ended > 0]
    requests = sum(r.requests for r in done)
    nbytes = sum(r.bytes for r in done)
    if done:
        window = max(r.ended for r in done) - min(r.started for r in done)
    else:
        window = 0.0
    samples = [s for r in done for s in r.samples]
    latency_sum = sum(r.latency_sum for r in done)
    first_error = next((r.first_error for r in done if r.first_error), "")
    return {
        "clients": clients,
        "workers_reported": len(done),
        "requests": requests,
        "errors": sum(r.errors for r in done),
        "first_error": first_error,
        "bytes": nbytes,
        "body_bytes": sum(r.body_bytes for r in done),
        "seconds": window,
        "throughput": nbytes / window if window > 0 else 0.0,
        "requests_per_second": requests / window if window > 0 else 0.0,
        "avg_response": latency_sum / requests if requests else None,
        "p50_response": _percentile(samples, 0.5),
        "p99_response": _percentile(samples, 0.99),
    }


def run_http(host: str, port: int, path: str, clients: int, duration: float,
             timeout: float, start_at: float | None) -> dict[str, Any]:
    """Fork ``clients`` load processes that start together; gather their results."""
    ctx = multiprocessing.get_context("fork")
    # Forking takes a moment per child: start them all, then release them at once.
    begin = start_at if start_at is not None else time.time() + 0.01 * clients + 0.05
    children: list[tuple[Any, multiprocessing.connection.Connection]] = []
    for _ in range(clients):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child,
                           args=(child_end, host, port, path, begin, duration, timeout))
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
    results: list[WorkerResult] = []
    limit = (time.monotonic() + max(0.0, begin - time.time()) + duration + timeout
             + MAX_RESPONSE_SECONDS + 10)
    for proc, conn in children:
        left = max(0.1, limit - time.monotonic())
        if conn.poll(left):
            try:
                data = conn.recv()
                results.append(WorkerResult(**data))
            except (EOFError, TypeError):
                pass
        proc.join(timeout=max(0.1, limit - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    return summarize_http(results, clients)


# --- request/response round trips --------------------------------------------------------


def run_rr(host: str, port: int, count: int, warmup: int, timeout: float) -> dict[str, Any]:
    """``count`` one-byte round trips over one TCP connection (after ``warmup`` unmeasured)."""
    count = min(count, MAX_ROUND_TRIPS)
    times: list[float] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + timeout + count * 0.5
        for i in range(warmup + count):
            if time.monotonic() > deadline:
                raise TimeoutError("round trips took too long")
            t0 = time.perf_counter()
            sock.sendall(b"x")
            if not sock.recv(1):
                raise ConnectionError("echo server closed the connection")
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {
        "count": len(times),
        "median": statistics.median(times),
        "p99": _percentile(times, 0.99),
        "mean": statistics.fmean(times),
        "min": min(times),
        "max": max(times),
    }


def _echo_connection(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(300)
        for _ in range(MAX_ROUND_TRIPS * 2):
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)


def run_echo(bind: str, port: int) -> None:
    """Echo every byte back on each TCP connection (a thread per connection, bounded)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((bind, port))
    server.listen(MAX_ECHO_CONNECTIONS)
    signal.signal(signal.SIGTERM, lambda _s, _f: os._exit(0))
    print(f"echo listening on {bind}:{port}", flush=True)
    # Served for a bench's life at most; the bench stops it with SIGTERM long before.
    deadline = time.monotonic() + 24 * 3600
    while time.monotonic() < deadline:
        conn, _addr = server.accept()
        if threading.active_count() > MAX_ECHO_CONNECTIONS:
            conn.close()
            continue
        threading.Thread(target=_echo_connection, args=(conn,), daemon=True).start()


# --- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvpn.cli.bench.load")
    sub = parser.add_subparsers(dest="mode", required=True)
    http = sub.add_parser("http", help="WebStone-style HTTP load")
    http.add_argument("--host", required=True)
    http.add_argument("--port", type=int, default=80)
    http.add_argument("--path", required=True, help="URL path, e.g. /1k")
    http.add_argument("--clients", type=int, default=1)
    http.add_argument("--duration", type=float, default=5.0)
    http.add_argument("--timeout", type=float, default=10.0,
                      help="seconds a request may wait for any one step (connect, data)")
    http.add_argument("--start-at", type=float, help="wall-clock time to start (time.time())")
    rr = sub.add_parser("rr", help="one-byte request/response round trips")
    rr.add_argument("--host", required=True)
    rr.add_argument("--port", type=int, required=True)
    rr.add_argument("--count", type=int, default=2000)
    rr.add_argument("--warmup", type=int, default=50)
    rr.add_argument("--timeout", type=float, default=10.0)
    echo = sub.add_parser("echo", help="TCP echo server for rr")
    echo.add_argument("--bind", default="0.0.0.0")
    echo.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.mode == "http":
        if not 1 <= args.clients <= 256:
            parser.error("--clients must lie between 1 and 256")
        out = run_http(args.host, args.port, args.path, args.clients, args.duration,
                       args.timeout, args.start_at)
    elif args.mode == "rr":
        try:
            out = run_rr(args.host, args.port, args.count, args.warmup, args.timeout)
        except OSError as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        run_echo(args.bind, args.port)
        return 0
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
