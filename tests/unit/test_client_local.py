"""The local channel's one framer (pvpn.local): both ends of the unix socket in memory."""

from __future__ import annotations

import pytest

from pvpn.envelope import MAX_PAGE_ITEMS, MsgType, decode_control
from pvpn.errors import RemoteProtocolError
from pvpn.local import Answer, LocalChannel, one_question

SID = bytes(range(16))


def test_both_ends_number_their_envelopes_and_read_each_other_byte_by_byte() -> None:
    ours, theirs = LocalChannel(), LocalChannel()
    data = (ours.control(MsgType.REGISTER, SID, 1001,
                         {"prefixes": ["10.0.0.0/8"], "server": "s:1"})
            + ours.packet(SID, 1001, b"\x45" + bytes(19)))
    got = [e for i in range(len(data)) for e in theirs.receive(data[i:i + 1])]
    assert [(e.type, e.seq, e.session, e.uid) for e in got] == [
        (MsgType.REGISTER, 0, SID, 1001), (MsgType.PACKET, 1, SID, 1001)]
    assert decode_control(got[0])["server"] == "s:1"
    assert got[1].body == b"\x45" + bytes(19)


def test_a_replayed_envelope_is_the_remote_error_and_the_channel_stays_failed() -> None:
    ours, theirs = LocalChannel(), LocalChannel()
    first = ours.control(MsgType.STATUS, b"", 0, {})
    assert [e.type for e in theirs.receive(first)] == [MsgType.STATUS]
    with pytest.raises(RemoteProtocolError):
        list(theirs.receive(first))
    with pytest.raises(RemoteProtocolError):
        list(theirs.receive(ours.control(MsgType.STATUS, b"", 0, {})))


def test_an_envelope_before_garbage_is_given_before_the_error() -> None:
    ours, theirs = LocalChannel(), LocalChannel()
    stream = theirs.receive(ours.control(MsgType.STATUS, b"", 0, {}) + b"\xc1")
    assert next(stream).type is MsgType.STATUS
    with pytest.raises(RemoteProtocolError):
        next(stream)


def test_status_comes_in_pages_and_the_answer_joins_them() -> None:
    sessions = [{"session": f"{i:032x}", "user": "alice"} for i in range(MAX_PAGE_ITEMS + 5)]
    pages = LocalChannel().status(b"", 0, sessions)
    assert len(pages) == 2
    answer = Answer()
    assert answer.receive(pages[0]) is None
    assert answer.receive(pages[1]) == (MsgType.STATUS_REPLY, {"sessions": sessions})


def test_an_error_is_the_answer() -> None:
    error = LocalChannel().control(MsgType.ERROR, b"", 0, {"code": "refused", "reason": "no"})
    assert Answer().receive(error) == (MsgType.ERROR, {"code": "refused", "reason": "no"})


def test_one_question_is_sequence_zero_without_a_session() -> None:
    (envelope,) = LocalChannel().receive(one_question(MsgType.STATUS, 1001, {}))
    assert (envelope.type, envelope.seq, envelope.session, envelope.uid) == (
        MsgType.STATUS, 0, b"", 1001)
