"""pvpn-server's state across a restart (issue 10 section 2): the file format (pvpn.state)
round-trips, is bounded, and refuses whatever it did not make, saying why."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest

from pvpn.errors import StateError
from pvpn.flowtable import STATE_CLOSED, STATE_CLOSING, STATE_REPLIED, STATE_TIME_WAIT, SavedFlow
from pvpn.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from pvpn.state import (
    MAX_BYTES, MAX_SESSIONS, SavedSession, ServerState, decode_state, encode_state, token_hash,
)

V4, V4B, NAT4 = bytes([10, 0, 0, 2]), bytes([10, 9, 0, 5]), bytes([10, 9, 0, 1])
V6, V6B, NAT6 = bytes(15) + b"\x02", bytes(15) + b"\x05", bytes(15) + b"\x01"


def flows() -> tuple[SavedFlow, ...]:
    return (
        SavedFlow(FlowKey(PROTO_TCP, V4, 40000, V4B, 80), NAT4, 61000, 0.25, STATE_REPLIED, 0.0),
        SavedFlow(FlowKey(PROTO_TCP, V4, 40001, V4B, 80), NAT4, 61001, 3.0,
                  STATE_REPLIED | STATE_CLOSING | STATE_CLOSED | STATE_TIME_WAIT | 2 | 4, 2.5),
        SavedFlow(FlowKey(PROTO_UDP, V6, 5353, V6B, 53), NAT6, 61002, 1.0, 0, 0.0),
        SavedFlow(FlowKey(PROTO_ICMP, V4, 7, V4B, 7), NAT4, 61003, 9.0, STATE_REPLIED, 0.0),
        SavedFlow(FlowKey(PROTO_ICMPV6, V6, 9, V6B, 9), NAT6, 61004, 9.0, 0, 0.0),
    )


def sessions() -> tuple[SavedSession, ...]:
    return (
        SavedSession(b"a" * 16, token_hash(b"secret-token-a!!"), "alice", 1001, "clienthost",
                     "10.0.0.2:40000", ("10.9.0.0/24", "fd09::/64"), 120.5, None,
                     (1, 2, 3, 4), flows()),
        SavedSession(b"b" * 16, token_hash(b"secret-token-b!!"), "bob", 1002, "clienthost",
                     "[fd00::2]:40001", ("10.9.0.5/32",), 3.0, 1.5, (0, 0, 0, 0), ()),
    )


def state(**changes: Any) -> ServerState:
    fields: dict[str, Any] = {"node": "server", "saved_at": 1_800_000_000.5, "cursor": 5,
                              "sessions": sessions()}
    fields.update(changes)
    return ServerState(**fields)


def test_the_state_round_trips() -> None:
    data = encode_state(state())
    assert decode_state(data) == state()
    assert data.startswith(b"pvpn-server-state 1\n")
    assert b"secret-token" not in data  # only its hash


def forged(body: list[Any], version: int = 1) -> bytes:
    """A file with a valid checksum around ``body``: what someone who can write the file
    could make."""
    data = f"pvpn-server-state {version}\n".encode() + msgpack.packb(body, use_bin_type=True)
    return data + hashlib.sha256(data).digest()


def body(**changes: Any) -> list[Any]:
    """The msgpack body of state(), as lists, with some fields of the first session or its
    first mapping replaced."""
    top = msgpack.unpackb(encode_state(state())[len(b"pvpn-server-state 1\n"):-32], raw=False)
    for key, value in changes.items():
        where, _, index = key.partition("_")
        if where == "top":
            top[int(index)] = value
        elif where == "session":
            top[3][0][int(index)] = value
        else:
            top[3][0][10][0][int(index)] = value
    return list(top)


@pytest.mark.parametrize("data, why", [
    (b"", "not a pvpn-server state file"),
    (b"GIF89a", "not a pvpn-server state file"),
    (encode_state(state())[:-1], "checksum"),
    (encode_state(state())[:40], "truncated"),
    (encode_state(state())[:-40] + b"x" + encode_state(state())[-39:], "checksum"),
    (forged(body(), version=2), "version 2; this pvpn-server reads version 1"),
    (forged([1, 2, 3]), "the state: not a list of 4"),
    (forged(body(top_0="not a node!")), "node name"),
    (forged(body(session_0=b"short")), "the id: not 16 bytes"),
    (forged(body(session_2="Root")), "the user: not a valid name"),
    (forged(body(session_3="1001")), "the uid"),
    (forged(body(session_3=True)), "the uid"),
    (forged(body(session_6=[])), "no prefix"),
    (forged(body(session_6=["10.9.0.0/33"])), "not a prefix"),
    (forged(body(session_6=["fe80::1%eth0"])), "not a prefix"),
    (forged(body(session_7=-1.0)), "its age"),
    (forged(body(session_7=float("nan"))), "its age"),
    (forged(body(session_8=1e12)), "its time detached"),
    (forged(body(session_9=[1, 2, 3])), "the counters"),
    (forged(body(session_9=[-1, 0, 0, 0])), "a counter"),
    (forged(body(flow_0=47)), "protocol 47 has no NAT"),
    (forged(body(flow_0=PROTO_ICMP, flow_1=V6)), "the source: not 4 bytes"),
    (forged(body(flow_3=V6)), "the destination: not 4 bytes"),
    (forged(body(flow_6=0)), "the NAT port"),
    (forged(body(flow_6=70000)), "the NAT port"),
    (forged(body(flow_8=STATE_TIME_WAIT)), "TIME-WAIT but not closed"),
    (forged(body(flow_8=1 << 12)), "unknown state bits"),
    (forged(body(session_0=b"b" * 16)), "its id 62626262626262626262626262626262 is there "
                                        "twice"),
    (forged(body()[:3] + [[body()[3][0]] * (MAX_SESSIONS + 1)]), "the sessions: not a list"),
])
def test_anything_but_a_state_it_made_is_refused_saying_why(data: bytes, why: str) -> None:
    with pytest.raises(StateError, match=why.replace("(", r"\(").replace(")", r"\)")):
        decode_state(data)


def test_the_state_is_bounded_in_all() -> None:
    many = SavedSession(b"c" * 16, token_hash(b"t"), "carol", 1, "c", "p", ("10.9.0.0/24",),
                        1.0, None, (0, 0, 0, 0), ())
    with pytest.raises(StateError, match="sessions"):
        encode_state(state(sessions=tuple(many for _ in range(MAX_SESSIONS + 1))))
    flow = flows()[0]
    heavy = SavedSession(b"c" * 16, token_hash(b"t"), "carol", 1, "c", "p", ("10.9.0.0/24",),
                         1.0, None, (0, 0, 0, 0), (flow,) * 65537)
    with pytest.raises(StateError, match="mappings"):
        encode_state(state(sessions=(heavy,)))
    with pytest.raises(StateError, match="more than a state file holds"):
        decode_state(b"pvpn-server-state 1\n" + bytes(MAX_BYTES))
    # Mappings are counted over the whole file, not only per session.
    half = [body()[3][0][0], *body()[3][0][1:10], [body()[3][0][10][0]] * 40000]
    two = [half, [b"d" * 16, *half[1:]]]
    with pytest.raises(StateError, match="more than 65536 mappings"):
        decode_state(forged(body()[:3] + [two]))
