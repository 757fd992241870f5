"""The batch verdict message pvpn sends on an NFQUEUE's netlink socket, field by field."""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable

import pytest

from pvpn.io import nfqueue
from pvpn.io.nfqueue import verdict_batch_message


def test_verdict_batch_message_layout() -> None:
    message = verdict_batch_message(queue_num=0x1234, last_id=0xA0B0C0D, seq=7)
    # struct nlmsghdr: length, type (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT_BATCH),
    # flags (NLM_F_REQUEST), sequence, port id 0 (the kernel): host byte order.
    length, mtype, flags, seq, portid = struct.unpack_from("=IHHII", message)
    assert (length, mtype, flags, seq, portid) == (len(message), 0x0303, 1, 7, 0)
    assert length == 16 + 4 + 12
    # struct nfgenmsg: AF_UNSPEC, NFNETLINK_V0, the queue number in network order.
    family, version, res_id = struct.unpack_from("=BB2s", message, 16)
    assert (family, version, res_id) == (socket.AF_UNSPEC, 0, b"\x12\x34")
    # One attribute, NFQA_VERDICT_HDR (2): struct nfqnl_msg_verdict_hdr, both fields big-endian.
    nla_len, nla_type = struct.unpack_from("=HH", message, 20)
    assert (nla_len, nla_type) == (12, 2)
    assert message[24:] == b"\x00\x00\x00\x00" + b"\x0a\x0b\x0c\x0d"  # NF_DROP, the last id


def test_verdict_batch_message_sequence_wraps() -> None:
    message = verdict_batch_message(queue_num=1, last_id=1, seq=2**32 + 5)
    assert struct.unpack_from("=I", message, 8)[0] == 5


# --- BatchedQueue's verdict logic, with NetfilterQueue and the netlink socket faked ---------

class _FakePacket:
    def __init__(self, packet_id: int, payload: bytes) -> None:
        self.id = packet_id
        self._payload = payload
        self.accepted = False

    def get_payload(self) -> bytes:
        return self._payload

    def accept(self) -> None:
        self.accepted = True


class _FakeQueue:
    waiting: list[_FakePacket] = []

    def bind(self, num: int, callback: Callable[[Any], None], max_len: int) -> None:
        self.callback = callback

    def get_fd(self) -> int:
        return 99

    def run(self, block: bool) -> None:
        while self.waiting:
            self.callback(self.waiting.pop(0))

    def unbind(self) -> None:
        pass


class _FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.fail = False

    def sendto(self, data: bytes, address: tuple[int, int]) -> None:
        if self.fail:
            raise OSError("ENOBUFS")
        self.sent.append(data)

    def close(self) -> None:
        pass


def _last_ids(sock: _FakeSocket) -> list[int]:
    return [struct.unpack(">I", message[-4:])[0] for message in sock.sent]


@pytest.fixture
def fake_queue(monkeypatch: pytest.MonkeyPatch) -> _FakeSocket:
    sock = _FakeSocket()
    monkeypatch.setattr(nfqueue, "NetfilterQueue", _FakeQueue)
    monkeypatch.setattr(nfqueue.socket, "fromfd", lambda *args: sock)
    _FakeQueue.waiting = []
    return sock


def test_taken_packets_get_one_verdict_per_read_and_the_rest_are_accepted(
        fake_queue: _FakeSocket) -> None:
    queue = nfqueue.BatchedQueue(7, lambda payload: payload != b"let through", max_len=100)
    passed = _FakePacket(3, b"let through")
    _FakeQueue.waiting = [_FakePacket(1, b"a"), _FakePacket(2, b"b"), passed,
                          _FakePacket(4, b"c")]
    queue.drain()
    assert passed.accepted
    assert _last_ids(fake_queue) == [4]  # one message: drop everything queued up to id 4
    queue.drain()  # nothing new: no message
    assert len(fake_queue.sent) == 1


def test_a_full_batch_is_dropped_at_once(fake_queue: _FakeSocket) -> None:
    queue = nfqueue.BatchedQueue(7, lambda payload: True, max_len=1000)
    _FakeQueue.waiting = [_FakePacket(n, b"x") for n in range(1, nfqueue.BATCH + 11)]
    queue.drain()
    assert _last_ids(fake_queue) == [nfqueue.BATCH, nfqueue.BATCH + 10]


def test_a_failing_decision_drops_the_packet_and_is_raised(fake_queue: _FakeSocket) -> None:
    def take(payload: bytes) -> bool:
        raise ValueError("bug")

    queue = nfqueue.BatchedQueue(7, take, max_len=100)
    packet = _FakePacket(5, b"x")
    _FakeQueue.waiting = [packet]
    with pytest.raises(ValueError):
        queue.drain()
    assert not packet.accepted and _last_ids(fake_queue) == [5]  # fail closed


def test_a_failed_verdict_is_covered_by_the_next(fake_queue: _FakeSocket) -> None:
    queue = nfqueue.BatchedQueue(7, lambda payload: True, max_len=100)
    fake_queue.fail = True
    _FakeQueue.waiting = [_FakePacket(1, b"x")]
    queue.drain()
    assert queue.verdict_errors == 1 and not fake_queue.sent
    fake_queue.fail = False
    _FakeQueue.waiting = [_FakePacket(2, b"y")]
    queue.drain()
    assert _last_ids(fake_queue) == [2]  # covers packet 1 as well
