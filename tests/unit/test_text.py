"""Strings from peers: clipped before they are logged, escaped before a person reads them."""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from pvpn.drops import Drop, DropCounter
from pvpn.envelope import (
    MAX_PACKET, MsgType, decode_control, encode_control, encode_envelope, status_pages,
)
from pvpn.envelope import EnvelopeDecoder
from pvpn.text import clip, printable, quoted


def test_clip_keeps_short_strings_and_says_how_much_it_cut() -> None:
    assert clip("alice") == "alice"
    cut = clip("x" * 160_000)
    assert len(cut) < 300 and cut.endswith("(159744 more characters)")


def test_printable_escapes_terminal_control_sequences() -> None:
    assert printable("alice") == "alice"
    assert printable("\x1b]0;pwned\x07\x1b[2J") == "\\x1b]0;pwned\\x07\\x1b[2J"
    assert printable("a\nb\rc\x00") == "a\\nb\\rc\\x00"
    assert printable("h\u00e9llo \u2603") == "h\u00e9llo \u2603"  # printable unicode stays


@given(st.text())
def test_quoted_is_always_printable_and_bounded(text: str) -> None:
    out = quoted(text, 100)
    assert out.isprintable()
    assert len(out) <= 100 * 10 + 40  # each char escapes to at most \\U0010ffff


def test_drop_counter_logs_the_first_of_each_code_then_a_bounded_rate() -> None:
    counter = DropCounter(burst=5, rate=1.0)
    logged = [counter.count(Drop.REPLY_NO_FLOW, 100.0) for _ in range(1000)]
    assert logged[0] == 1 and sum(1 for n in logged if n) == 5
    assert counter.count(Drop.TUN_FULL, 100.0) == 1  # a new code is always told once
    assert counter.take_unlogged() == 995 and counter.take_unlogged() == 0
    assert counter.count(Drop.REPLY_NO_FLOW, 103.0) == 1001  # refilled: logged with its count
    assert counter.as_dict() == {"reply-no-flow": 1001, "tun-full": 1}
    assert all(drop.description for drop in Drop)


def test_status_pages_fit_envelopes_and_keep_every_session() -> None:
    sessions = [{"session": f"{n:032x}", "server": "s" * 4000} for n in range(500)]
    pages = status_pages(sessions)
    assert len(pages) > 1 and [p["more"] for p in pages] == [True] * (len(pages) - 1) + [False]
    decoder = EnvelopeDecoder()
    back = []
    for seq, page in enumerate(pages):
        data = encode_envelope(MsgType.STATUS_REPLY, b"", 0, seq, encode_control(page))
        (envelope,) = list(decoder.feed(data))
        back += decode_control(envelope)["sessions"]
    assert back == sessions
    assert status_pages([]) == [{"sessions": [], "more": False}]


def test_a_description_too_large_for_a_page_is_shown_by_its_id() -> None:
    (page,) = status_pages([{"session": "ab", "blob": [b"x" * 4000] * 20}])
    assert page["sessions"][0]["session"] == "ab" and "too large" in page["sessions"][0]["error"]
    assert len(msgpack.packb(page)) < MAX_PACKET
