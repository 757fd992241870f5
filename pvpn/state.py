"""What pvpn-server keeps across a restart, and its file format (``encode_state`` /
``decode_state``). A kernel-NAT VPN survives its daemon's restart because conntrack outlives
the daemon; pvpn's NAT lives in pvpn-server, so the server saves what a resume needs.

Saved, per session: its id, a SHA-256 of its resume token (never the token, never a key: a
resume still needs the user's key, and the file alone resumes nothing), the user and uid, the
client host's name and the peer (for the records), the prefixes it asked for, its age, how
long it had been detached (None: it was up), its counters; and its NAT mappings, each with its
flow, NAT address and port, state bits and ages (``pvpn.flowtable.SavedFlow``). Per file: the
node's name, when it was written (wall clock, set by the adapter) and where the round-robin
hand-out of NAT ports stands. Times are ages at the snapshot, so nothing depends on a
monotonic clock that a reboot resets.

The file is ``pvpn-server-state VERSION\\n``, a msgpack body, and a SHA-256 of both: a
truncated or damaged file is refused, not half-read (the adapter also writes atomically).
Everything is bounded before it is built: the file's size (:data:`MAX_BYTES`), sessions
(:data:`MAX_SESSIONS`), mappings (:data:`MAX_FLOWS` in all, the table's bound), every string
and list; and every field is type- and range-checked here. What depends on the server's
settings now (policies, keys, caps, NAT port range, its own addresses, ``resume_grace``) is
checked when the sessions are put back (``ServerNode.restore``). Nothing here reads a clock
or a file.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from pvpn.config import parse_prefix
from pvpn.errors import ConfigError, StateError
from pvpn.flowtable import MAX_AGE, SavedFlow, state_refusal
from pvpn.flowtable import MAX_FLOWS as _TABLE_FLOWS
from pvpn.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from pvpn.records import CLIENT_NAME, NODE_NAME, USER_NAME

VERSION = 1
_MAGIC = b"pvpn-server-state "
#: The largest file read or written: 65,536 mappings take about 3.1 MB, 16,384 sessions 3 MB.
MAX_BYTES = 16 << 20
#: Sessions one file holds (live and detached; a server has at most 4,096 links, and every
#: user at most ``sessions_per_user``).
MAX_SESSIONS = 16384
#: Mappings in all: the flow table's bound.
MAX_FLOWS = _TABLE_FLOWS
#: Prefixes of one session (a HELLO's ``want``: pvpn.nodes.base.MAX_WANT).
MAX_ALLOW = 64
TOKEN_HASH_LEN = 32
_MAX_COUNTER = (1 << 63) - 1
_MAX_UID = (1 << 32) - 1
_DIGEST = 32
_PROTOS = (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6)


def token_hash(token: bytes) -> bytes:
    """What the server keeps of a resume token: its SHA-256."""
    digest: bytes = hashlib.sha256(token).digest()
    return digest


@dataclass(frozen=True, slots=True)
class SavedSession:
    """One session as a restarted server gets it back (see the module docstring)."""

    id: bytes
    token_hash: bytes
    user: str
    uid: int
    client: str
    peer: str
    allow: tuple[str, ...]
    age: float  # seconds since it opened
    detached: float | None  # seconds since its link went; None: it was up
    counters: tuple[int, int, int, int]  # packets in, packets out, bytes in, bytes out
    flows: tuple[SavedFlow, ...]


@dataclass(frozen=True, slots=True)
class ServerState:
    node: str
    saved_at: float  # wall-clock seconds (time.time()) when it was taken
    cursor: int  # pvpn.flowtable.FlowTable.cursor
    sessions: tuple[SavedSession, ...]


def encode_state(state: ServerState) -> bytes:
    """The file's bytes. StateError if the state is beyond the bounds (it never is: the
    server saves at most what its table and sessions can hold)."""
    if len(state.sessions) > MAX_SESSIONS:
        raise StateError(f"{len(state.sessions)} sessions, more than {MAX_SESSIONS}")
    if sum(len(s.flows) for s in state.sessions) > MAX_FLOWS:
        raise StateError(f"more than {MAX_FLOWS} mappings")
    sessions = [[s.id, s.token_hash, s.user, s.uid, s.client, s.peer, list(s.allow),
                 float(s.age), None if s.detached is None else float(s.detached),
                 list(s.counters),
                 [[f.key.proto, f.key.src, f.key.sport, f.key.dst, f.key.dport, f.nat_src,
                   f.nat_port, float(f.idle), f.state, float(f.closed_for)] for f in s.flows]]
                for s in state.sessions]
    body: bytes = msgpack.packb([state.node, float(state.saved_at), state.cursor, sessions],
                                use_bin_type=True)
    head = _MAGIC + str(VERSION).encode() + b"\n"
    data = head + body
    if len(data) + _DIGEST > MAX_BYTES:
        raise StateError(f"the state takes {len(data)} bytes, more than {MAX_BYTES}")
    return data + hashlib.sha256(data).digest()


def decode_state(data: bytes) -> ServerState:
    """The state in a file's bytes; StateError, saying what is wrong, for anything that is
    not a file :func:`encode_state` made (truncated, damaged, another version, a field of
    the wrong type or out of its range, a bound exceeded, a session id twice)."""
    if len(data) > MAX_BYTES:
        raise StateError(f"{len(data)} bytes, more than a state file holds ({MAX_BYTES})")
    if not data.startswith(_MAGIC):
        raise StateError("not a pvpn-server state file")
    end = data.find(b"\n", len(_MAGIC), len(_MAGIC) + 12)
    version = data[len(_MAGIC):end]
    if end < 0 or not version.isdigit():
        raise StateError("not a pvpn-server state file (no version)")
    if int(version) != VERSION:
        raise StateError(f"a state file of version {int(version)}; this pvpn-server reads "
                         f"version {VERSION}")
    if len(data) < end + 1 + _DIGEST:
        raise StateError("truncated")
    body, digest = data[end + 1:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(data[:-_DIGEST]).digest() != digest:
        raise StateError("its checksum does not match: truncated or damaged")
    try:
        top = msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True, max_bin_len=64,
            max_str_len=1024, max_array_len=max(MAX_FLOWS, MAX_SESSIONS), max_map_len=0,
            max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise StateError(f"its body is not valid msgpack: {type(exc).__name__}") from None
    try:
        return _state(top)
    except _Bad as exc:
        raise StateError(str(exc)) from None


class _Bad(Exception):
    pass


def _list(value: Any, what: str, most: int, length: int | None = None) -> list[Any]:
    if not isinstance(value, list) or len(value) > most or (
            length is not None and len(value) != length):
        raise _Bad(f"{what}: not a list of {length if length is not None else f'at most {most}'}"
                   " items")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Bad(f"{what}: not a whole number from {low} to {high}")
    return value


def _age(value: Any, what: str) -> float:
    if type(value) is not float or not math.isfinite(value) or not 0 <= value <= MAX_AGE:
        raise _Bad(f"{what}: not an age from 0 to {MAX_AGE:.0f} seconds")
    return value


def _bytes(value: Any, what: str, *lengths: int) -> bytes:
    if type(value) is not bytes or len(value) not in lengths:
        raise _Bad(f"{what}: not {' or '.join(map(str, lengths))} bytes")
    return value


def _text(value: Any, what: str, pattern: Any = None, most: int = 100) -> str:
    if type(value) is not str or len(value) > most or not value.isprintable() or (
            pattern is not None and not pattern.fullmatch(value)):
        raise _Bad(f"{what}: not a valid name")
    return value


def _state(top: Any) -> ServerState:
    node, saved_at, cursor, sessions = _list(top, "the state", 4, 4)
    node = _text(node, "the node name", NODE_NAME)
    if type(saved_at) is not float or not math.isfinite(saved_at) or saved_at < 0:
        raise _Bad("the time it was saved: not a time")
    cursor = _int(cursor, "the port cursor", 0, 65535)
    out: list[SavedSession] = []
    seen: set[bytes] = set()
    flows = 0
    for index, entry in enumerate(_list(sessions, "the sessions", MAX_SESSIONS)):
        session = _session(entry, f"session {index}")
        if session.id in seen:
            raise _Bad(f"session {index}: its id {session.id.hex()} is there twice")
        seen.add(session.id)
        flows += len(session.flows)
        if flows > MAX_FLOWS:
            raise _Bad(f"more than {MAX_FLOWS} mappings")
        out.append(session)
    return ServerState(node, saved_at, cursor, tuple(out))


def _session(entry: Any, what: str) -> SavedSession:
    (sid, token, user, uid, client, peer, allow, age, detached, counters,
     flows) = _list(entry, what, 11, 11)
    sid = _bytes(sid, f"{what}: the id", 16)
    token = _bytes(token, f"{what}: the token hash", TOKEN_HASH_LEN)
    user = _text(user, f"{what}: the user", USER_NAME)
    uid = _int(uid, f"{what}: the uid", 0, _MAX_UID)
    client = _text(client, f"{what}: the client host", CLIENT_NAME)
    peer = _text(peer, f"{what}: the peer")
    prefixes: list[str] = []
    for text in _list(allow, f"{what}: the prefixes", MAX_ALLOW):
        text = _text(text, f"{what}: a prefix", most=64)
        try:
            parse_prefix(text)
        except ConfigError:
            raise _Bad(f"{what}: {text!r} is not a prefix") from None
        prefixes.append(text)
    if not prefixes:
        raise _Bad(f"{what}: no prefix")
    age = _age(age, f"{what}: its age")
    if detached is not None:
        detached = _age(detached, f"{what}: its time detached")
    counted = tuple(_int(c, f"{what}: a counter", 0, _MAX_COUNTER)
                    for c in _list(counters, f"{what}: the counters", 4, 4))
    saved = tuple(_flow(f, f"{what}, mapping {i}")
                  for i, f in enumerate(_list(flows, f"{what}: the mappings", MAX_FLOWS)))
    return SavedSession(sid, token, user, uid, client, peer, tuple(prefixes), age, detached,
                        (counted[0], counted[1], counted[2], counted[3]), saved)


def _flow(entry: Any, what: str) -> SavedFlow:
    proto, src, sport, dst, dport, nat_src, nat_port, idle, state, closed_for = _list(
        entry, what, 10, 10)
    proto = _int(proto, f"{what}: the protocol", 0, 255)
    if proto not in _PROTOS:
        raise _Bad(f"{what}: protocol {proto} has no NAT")
    family = (4,) if proto == PROTO_ICMP else (16,) if proto == PROTO_ICMPV6 else (4, 16)
    src = _bytes(src, f"{what}: the source", *family)
    dst = _bytes(dst, f"{what}: the destination", len(src))
    nat_src = _bytes(nat_src, f"{what}: the NAT address", len(src))
    sport = _int(sport, f"{what}: the source port", 0, 65535)
    dport = _int(dport, f"{what}: the destination port", 0, 65535)
    if proto in (PROTO_ICMP, PROTO_ICMPV6) and sport != dport:
        raise _Bad(f"{what}: an echo mapping with two identifiers")
    nat_port = _int(nat_port, f"{what}: the NAT port", 1, 65535)
    state = _int(state, f"{what}: the state", 0, 0xFFFF)
    refusal = state_refusal(proto, state)
    if refusal is not None:
        raise _Bad(f"{what}: {refusal}")
    return SavedFlow(FlowKey(proto, src, sport, dst, dport), nat_src, nat_port,
                     _age(idle, f"{what}: its idle time"),
                     state, _age(closed_for, f"{what}: its time closed"))


__all__ = ["MAX_BYTES", "MAX_FLOWS", "MAX_SESSIONS", "SavedSession", "ServerState", "VERSION",
           "decode_state", "encode_state", "token_hash"]
