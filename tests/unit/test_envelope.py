"""Envelope codec: round trips whole and byte by byte; any bytes -> envelopes or the remote error."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvpn.envelope import (
    MAX_PACKET, Envelope, EnvelopeDecoder, MsgType, Sequencer, decode_control, encode_control,
    encode_envelope,
)
from pvpn.errors import LocalProtocolError, MalformedFrame, RemoteProtocolError, SequenceError

SID = bytes(range(16))


def frames(n: int, size: int = 100) -> bytes:
    return b"".join(encode_envelope(MsgType.PACKET, SID, 1001, i, bytes([i % 256]) * size)
                    for i in range(n))


def test_round_trip_whole_and_byte_by_byte() -> None:
    data = frames(20)
    whole = list(EnvelopeDecoder().feed(data))
    decoder = EnvelopeDecoder()
    one_by_one = [e for i in range(len(data)) for e in decoder.feed(data[i:i + 1])]
    assert whole == one_by_one
    assert [e.seq for e in whole] == list(range(20))
    assert whole[3] == Envelope(MsgType.PACKET, SID, 1001, 3, 16, bytes([3]) * 100)


def test_large_reads_are_fine() -> None:
    data = frames(300, 1500)  # ~450 KB in one read, more than the buffer bound
    assert len(list(EnvelopeDecoder().feed(data))) == 300


def test_an_optional_field_may_be_left_out_but_is_checked_when_given() -> None:
    """A `pvpn connect` older than the chain fields still registers with a newer pvpn-client."""
    def register(fields: dict[str, object]) -> dict[str, object]:
        return decode_control(Envelope(MsgType.REGISTER, b"", 0, 0, 16, encode_control(fields)))
    old = {"prefixes": ["10.1.0.0/16"], "server": "s:4433"}
    assert register(old) == old
    assert register({**old, "via": ["gw1:4433"]})["via"] == ["gw1:4433"]
    for bad in ({**old, "via": "gw1:4433"}, {**old, "nodes": []}, {"server": "s", "via": []}):
        with pytest.raises(MalformedFrame):
            register(bad)


def test_control_body_checked_against_schema() -> None:
    body = encode_control({"nonce": b"x" * 32, "node": "server"})
    env = Envelope(MsgType.CHALLENGE, b"", 0, 0, 16, body)
    assert decode_control(env) == {"nonce": b"x" * 32, "node": "server"}
    for bad in ({"nonce": "text", "node": "s"}, {"nonce": b"x"}, {"nonce": b"", "node": "s", "x": 1}):
        with pytest.raises(MalformedFrame):
            decode_control(Envelope(MsgType.CHALLENGE, b"", 0, 0, 16, encode_control(bad)))
    with pytest.raises(MalformedFrame):
        decode_control(Envelope(MsgType.CHALLENGE, b"", 0, 0, 16, b"\xc1"))
    with pytest.raises(MalformedFrame):
        decode_control(Envelope(MsgType.PACKET, b"", 0, 0, 16, b""))


@pytest.mark.parametrize("obj, words", [
    ([2, 6, SID, 0, 0, 16, b""], "version"),
    ([1, 99, SID, 0, 0, 16, b""], "type"),
    ([1, 6, b"short", 0, 0, 16, b""], "session"),
    ([1, 6, SID, "root", 0, 16, b""], "uid"),
    ([1, 6, SID, 0, -1, 16, b""], "sequence"),
    ([1, 6, SID, 0, 0, 300, b""], "hop"),
    ([1, 6, SID, 0, 0, 16, "text"], "body"),
    ([1, 6, SID, 0, 0, 16], "7 fields"),
    ({"a": 1}, "array"),
])
def test_wrong_fields_are_refused(obj: object, words: str) -> None:
    with pytest.raises(MalformedFrame, match=words):
        list(EnvelopeDecoder().feed(msgpack.packb(obj, use_bin_type=True)))


def test_replayed_duplicated_and_skipped_sequence_numbers() -> None:
    first = encode_envelope(MsgType.PACKET, SID, 0, 0, b"a")
    decoder = EnvelopeDecoder()
    assert len(list(decoder.feed(first))) == 1
    with pytest.raises(SequenceError, match="replayed or duplicated"):
        list(decoder.feed(first))
    with pytest.raises(SequenceError):
        list(decoder.feed(b""))  # the decoder stays failed
    with pytest.raises(SequenceError, match="out of order"):
        list(EnvelopeDecoder().feed(encode_envelope(MsgType.PACKET, SID, 0, 5, b"a")))


def test_oversize_frame() -> None:
    with pytest.raises(LocalProtocolError):
        encode_envelope(MsgType.PACKET, SID, 0, 0, b"x" * (MAX_PACKET + 1))
    huge = msgpack.packb([1, 6, SID, 0, 0, 16, b"x" * (MAX_PACKET * 4)], use_bin_type=True)
    with pytest.raises(MalformedFrame):
        list(EnvelopeDecoder().feed(huge))


def test_sequencer() -> None:
    seq = Sequencer()
    assert [seq.take() for _ in range(3)] == [0, 1, 2]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_give_envelopes_or_the_remote_error(data: bytes) -> None:
    for chunking in (len(data) or 1, 1):
        decoder = EnvelopeDecoder()
        try:
            for i in range(0, len(data), chunking):
                for envelope in decoder.feed(data[i:i + chunking]):
                    assert isinstance(envelope, Envelope)
                    if envelope.type not in (MsgType.PACKET, MsgType.DATA):
                        try:
                            decode_control(envelope)
                        except MalformedFrame:
                            pass
        except RemoteProtocolError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=2000), max_size=20))
def test_valid_streams_round_trip(bodies: list[bytes]) -> None:
    data = b"".join(encode_envelope(MsgType.PACKET, SID, 7, i, b) for i, b in enumerate(bodies))
    assert [e.body for e in EnvelopeDecoder().feed(data)] == bodies


@pytest.mark.parametrize("obj", [
    [b"v" * 60000, 6, SID, 0, 0, 16, b""],        # a 60 KB version field
    [1, "t" * 4000, SID, 0, 0, 16, b""],          # a 4 KB type
    [1, [b"x" * 4000] * 10, SID, 0, 0, 16, b""],
])
def test_malformed_frame_messages_never_quote_whole_fields(obj: list[object]) -> None:
    """Issue 9 point 7: the message of a malformed frame went into a log record as the repr
    of the field (160 KB for one frame); it quotes no more than a few words now."""
    with pytest.raises(MalformedFrame) as caught:
        list(EnvelopeDecoder().feed(msgpack.packb(obj, use_bin_type=True)))
    assert len(str(caught.value)) < 200


def test_a_control_body_with_many_long_field_names_gets_a_short_message() -> None:
    body = msgpack.packb({("k" * 4000) + str(n): 1 for n in range(30)}, use_bin_type=True)
    with pytest.raises(MalformedFrame) as caught:
        decode_control(Envelope(MsgType.HELLO, b"", 0, 0, 16, body))
    assert len(str(caught.value)) < 600
