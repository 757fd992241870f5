"""The local channel: envelopes on the unix socket between pvpn-client and its users' processes
(`pvpn connect`, `pvpn status`, `pvpn disconnect`) and on a node's control socket (`pvpn status
--node`, pvpn.io.control), one framer for every peer of them.

Sans-IO, as h11: bytes in (:meth:`LocalChannel.receive`, envelopes out, bounded by the
envelope decoder: frame size, sequence numbers, types), envelopes out as bytes
(:meth:`LocalChannel.control`, :meth:`LocalChannel.packet`, :meth:`LocalChannel.status`),
each numbered by the channel's own sequence. Whoever owns the socket writes the bytes.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from pvpn.envelope import (
    Envelope, EnvelopeDecoder, MsgType, Sequencer, decode_control, encode_control,
    encode_envelope, status_pages,
)

class LocalChannel:
    """One end of one connection on the local socket: its decoder (the peer's envelopes, in
    sequence from 0) and its sequencer (ours, from 0). Driven by :meth:`receive` with the bytes
    read; raises RemoteProtocolError (MalformedFrame, SequenceError) on garbage, after which
    it stays failed."""

    __slots__ = ("decoder", "seq")

    def __init__(self) -> None:
        self.decoder = EnvelopeDecoder()
        self.seq = Sequencer()

    def receive(self, data: bytes) -> Iterator[Envelope]:
        """Every whole envelope in the stream so far, one at a time (an envelope before a
        malformed one is yielded before the error is raised)."""
        return self.decoder.feed(data)

    def control(self, mtype: MsgType, session: bytes, uid: int,
                fields: Mapping[str, Any]) -> bytes:
        """A control envelope (REGISTER, REGISTERED, ERROR, STATUS_REPLY, ...), numbered."""
        return encode_envelope(mtype, session, uid, self.seq.take(), encode_control(fields))

    def packet(self, session: bytes, uid: int, payload: bytes) -> bytes:
        """A PACKET envelope carrying one IP packet, numbered."""
        return encode_envelope(MsgType.PACKET, session, uid, self.seq.take(), payload)

    def status(self, session: bytes, uid: int,
               sessions: Sequence[Mapping[str, Any]]) -> list[bytes]:
        """STATUS_REPLY in as many pages as the sessions need (status_pages), numbered."""
        return [self.control(MsgType.STATUS_REPLY, session, uid, page)
                for page in status_pages(sessions)]


class Answer:
    """The answer to one question on a fresh connection (`pvpn status`, `pvpn disconnect`):
    an ERROR, or STATUS_REPLY pages until the one that says more=False. Driven by
    :meth:`receive`, which gives the answer once it is whole (None until then)."""

    def __init__(self) -> None:
        self.channel = LocalChannel()
        self.sessions: list[Any] = []

    def receive(self, data: bytes) -> tuple[MsgType, dict[str, Any]] | None:
        for envelope in self.channel.receive(data):
            if envelope.type is MsgType.ERROR:
                return envelope.type, decode_control(envelope)
            if envelope.type is MsgType.STATUS_REPLY:
                # The answer may come in pages; the last says more=False.
                page = decode_control(envelope)
                self.sessions += page["sessions"]
                if not page["more"]:
                    return envelope.type, {"sessions": self.sessions}
        return None


def one_question(mtype: MsgType, uid: int, fields: Mapping[str, Any]) -> bytes:
    """The single envelope of a one-question connection (`pvpn status`, `pvpn disconnect`):
    sequence 0, no session."""
    return LocalChannel().control(mtype, b"", uid, fields)
