"""pvpn-server's worker processes, the pure part (docs/design.md "Server workers").

With ``[server] workers = N`` (N > 1) one supervised pvpn-server forks N workers. Each is a
whole server for its share of the users: its own SO_REUSEPORT listening socket on the same
addresses, its own disjoint slice of ``nat_ports``, its own reply queue (``queue + i``), its
own TUN device for the largest replies, its own state file, its own control socket, and its
share of the per-user limits. What a worker is given is computed here, from the config the
parent read; so is the classic-BPF program the parent attaches to each listening group to
send a source address's next connection to the worker that holds the session it resumes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from pvpn.config import ServerConfig
from pvpn.errors import ConfigError

MAX_WORKERS = 16
#: Source addresses the listening groups route to a named worker at once (the program's
#: size); each entry lives REDIRECT_TTL seconds: time for a user's process to reconnect.
MAX_REDIRECTS = 32
REDIRECT_TTL = 15.0


#: A worker that ended is started again this long after its start at the soonest; one that
#: ended before it served (a config, module, queue or permission it lacks), after twice as
#: long each time in a row, up to MAX_RESTART_DELAY.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
#: Failed starts in a row (ended before it served) after which the parent stops the server,
#: for a worker that never served since the parent started: the server cannot run as
#: configured, and started again each second for ever it would leave its share of the new
#: connections waiting unserved. One that served before is only started again, later each
#: time: the others serve on meanwhile.
MAX_FAILED_STARTS = 3


def after_end(failed: int, served: bool, ever_served: bool) -> tuple[int, float | None]:
    """After a worker ended: its failed starts in a row, and how long after its start to
    start it again (None: give up, stop the server). ``served``: it said it serves (this
    run); ``ever_served``: any run of it did."""
    if served:
        return 0, RESTART_DELAY
    failed += 1
    if not ever_served and failed >= MAX_FAILED_STARTS:
        return failed, None
    return failed, min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (failed - 1))


def port_slices(ports: tuple[int, int], workers: int) -> list[tuple[int, int]]:
    """``ports`` (inclusive) cut into ``workers`` disjoint contiguous slices covering it, the
    first ones one port longer when it does not divide evenly."""
    low, high = ports
    total = high - low + 1
    if not 1 <= workers <= total:
        raise ConfigError(f"nat_ports {low}-{high} cannot be shared by {workers} workers")
    size, extra = divmod(total, workers)
    slices: list[tuple[int, int]] = []
    start = low
    for i in range(workers):
        end = start + size + (1 if i < extra else 0) - 1
        slices.append((start, end))
        start = end + 1
    return slices


def worker_path(path: Path, index: int) -> Path:
    """Worker ``index``'s own file beside ``path`` (state file, control socket)."""
    return path.with_name(f"{path.name}.w{index}")


def worker_controls(config: ServerConfig) -> list[Path]:
    """The server's status sockets: its own, or one per worker."""
    n = config.workers
    return [config.control] if n < 2 else [worker_path(config.control, i) for i in range(n)]


def worker_share(limit: int, workers: int) -> int:
    """A per-user limit a worker applies so that the user's total over the whole server stays
    within ``limit``: an even share, at least 1 (so a limit below ``workers`` bounds the
    user at ``workers``, one per worker)."""
    return max(1, limit // workers)


def worker_config(config: ServerConfig, index: int) -> ServerConfig:
    """What worker ``index`` of ``config.workers`` serves with."""
    n = config.workers
    if not 0 <= index < n:
        raise ConfigError(f"worker {index} of {n} does not exist")
    per_user = worker_share(config.nat_flows_per_user, n)
    return replace(
        config, worker=index,
        nat_ports=port_slices(config.nat_ports, n)[index],
        queue=config.queue + index,
        control=worker_path(config.control, index),
        state_file=None if config.state_file is None else worker_path(config.state_file, index),
        sessions_per_user=worker_share(config.sessions_per_user, n),
        nat_flows_per_user=per_user,
        nat_flows_per_session=min(config.nat_flows_per_session, per_user),
    )


def token_worker(token: bytes | None, workers: int) -> int | None:
    """The worker a session's resume token names (its first byte, set by the worker that
    made it), or None (no token, one worker, a token no worker of these made)."""
    if workers < 2 or token is None or len(token) != 16 or token[0] >= workers:
        return None
    return token[0]


def worker_token(random16: bytes, worker: int, workers: int) -> bytes:
    """A new session's token, naming its worker when there are several (15 random bytes
    left: 120 bits)."""
    return random16 if workers < 2 else bytes([worker]) + random16[1:]


# ---------------------------------------------------------------- the listening groups' program

# Classic BPF (linux/filter.h), as SO_ATTACH_REUSEPORT_CBPF takes it: the program returns the
# index of the socket in the group (the order they were listened on: the worker's number);
# an index past the group falls back to the kernel's hash of the connection.
BPF_LD_B_ABS = 0x30
BPF_LD_W_ABS = 0x20
BPF_RSH_K = 0x74
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
SKF_NET_OFF = -0x100000
FALLBACK = 0xFFFFFFFF
SO_ATTACH_REUSEPORT_CBPF = 51


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return code, jt, jf, k & 0xFFFFFFFF


def redirect_program(redirects: Iterable[tuple[str, int]]) -> list[tuple[int, int, int, int]]:
    """The program that gives each (source address, worker) its worker and every other
    connection the kernel's hash: (code, jt, jf, k) instructions. At most MAX_REDIRECTS."""
    v4: list[tuple[int, int]] = []
    v6: list[tuple[bytes, int]] = []
    for text, worker in list(redirects)[:MAX_REDIRECTS]:
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if isinstance(address, ipaddress.IPv4Address):
            v4.append((int(address), worker))
        else:
            v6.append((address.packed, worker))
    v4_part: list[tuple[int, int, int, int]] = [_insn(BPF_LD_W_ABS, SKF_NET_OFF + 12)]
    for value, worker in v4:
        v4_part += [_insn(BPF_JEQ_K, value, 0, 1), _insn(BPF_RET_K, worker)]
    v4_part.append(_insn(BPF_RET_K, FALLBACK))
    v6_part: list[tuple[int, int, int, int]] = []
    for packed, worker in v6:
        words = struct.unpack("!4I", packed)
        # Each word that differs skips to the next entry: 4 loads, 4 tests and a return.
        for i, word in enumerate(words):
            left = 2 * (3 - i)  # instructions after this test up to the return
            v6_part += [_insn(BPF_LD_W_ABS, SKF_NET_OFF + 8 + 4 * i),
                        _insn(BPF_JEQ_K, word, 0, left + 1)]
        v6_part.append(_insn(BPF_RET_K, worker))
    v6_part.append(_insn(BPF_RET_K, FALLBACK))
    head = [_insn(BPF_LD_B_ABS, SKF_NET_OFF), _insn(BPF_RSH_K, 4),
            _insn(BPF_JEQ_K, 6, len(v4_part), 0)]
    return head + v4_part + v6_part


def encode_program(program: list[tuple[int, int, int, int]]) -> bytes:
    """struct sock_filter[] of ``program``."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


def run_program(program: list[tuple[int, int, int, int]], network_header: bytes) -> int:
    """What the kernel's classic-BPF interpreter returns for ``program`` on a packet whose
    network header is ``network_header`` (only the instructions redirect_program uses; for
    tests and `pvpn-server` itself to check a program before attaching it)."""
    a, pc = 0, 0
    for _ in range(len(program) + 1):
        code, jt, jf, k = program[pc]
        if code in (BPF_LD_B_ABS, BPF_LD_W_ABS):
            offset = (k - (1 << 32)) - SKF_NET_OFF if k & 0x80000000 else k
            size = 1 if code == BPF_LD_B_ABS else 4
            if offset < 0 or offset + size > len(network_header):
                return 0  # the kernel's answer to a load out of the packet
            a = int.from_bytes(network_header[offset:offset + size], "big")
        elif code == BPF_RSH_K:
            a >>= k
        elif code == BPF_JEQ_K:
            pc += jt if a == k else jf
        elif code == BPF_RET_K:
            return k
        else:
            raise ValueError(f"instruction {code:#x} not known")
        pc += 1
    raise ValueError("the program does not end")
