"""pvpn's NFQUEUE reader: the netlink messages it sends and parses, field by field, and its
verdict logic over a fake netlink socket."""

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


# --- what the kernel sends: NFQNL_MSG_PACKET messages ---------------------------------------

def attribute(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def packet_message(packet_id: int, payload: bytes, original: int | None = None,
                   queue: int = 7) -> bytes:
    """As nfqnl_build_packet_message lays one out: the packet header first, some metadata,
    NFQA_CAP_LEN when the packet was cut, the payload last."""
    attrs = (attribute(1, struct.pack(">IHBx", packet_id, 0x0800, 3))  # id, protocol, hook
             + attribute(5, struct.pack(">I", 2))  # NFQA_IFINDEX_INDEV
             + attribute(9, b"\0" * 12)  # NFQA_HWADDR
             + (attribute(13, struct.pack(">I", original)) if original is not None else b"")
             + attribute(14, struct.pack(">I", 0))  # NFQA_SKB_INFO
             + attribute(10, payload))
    body = struct.pack(">BBH", socket.AF_INET, 0, queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x0300, 0, 0, 0) + body


def error_message(seq: int, error: int) -> bytes:
    return struct.pack("=IHHIIi", 36, 2, 0, seq, 0, -error) + b"\0" * 16


def test_config_copies_whole_packets_and_never_fails_open() -> None:
    message = nfqueue.config_message(0x0102, max_len=4096, seq=1)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", message)
    assert (length, mtype, flags, seq) == (len(message), 0x0302, 1 | 4, 1)  # REQUEST | ACK
    assert message[16:20] == b"\x00\x00\x01\x02"
    attrs = parse_attributes(message[20:])
    assert 1 not in attrs  # NetfilterQueue has bound the queue: no command
    bind = parse_attributes(nfqueue.config_message(0x0102, 4096, bind=True)[20:])
    assert bind[1] == b"\x01\x00\x00\x00"  # NFQNL_CFG_CMD_BIND
    assert attrs[2] == struct.pack(">IB", 0xFFFF, 2) + b"\0" * 3  # whole packets
    assert attrs[3] == struct.pack(">I", 4096)
    assert 5 not in attrs  # no flags: never NFQA_CFG_F_FAIL_OPEN
    gso = parse_attributes(nfqueue.config_message(1, 10, flags=4)[20:])
    assert gso[5] == gso[4] == struct.pack(">I", 4)  # NFQA_CFG_F_GSO, for issue 12


def parse_attributes(data: bytes) -> dict[int, bytes]:
    out, at = {}, 0
    while at + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, at)
        out[kind] = data[at + 4:at + size] + b"\0" * (-size % 4)
        at += (size + 3) & ~3
    return out


def test_packets_parse_out_of_one_read_with_their_original_length() -> None:
    big = bytes(range(256)) * 256
    buffer = bytearray(packet_message(5, b"small") + error_message(9, 2)
                       + packet_message(6, big[:65531], original=65535)
                       + b"\xff" * 40)  # junk after the last whole message
    got = list(nfqueue.parse_packets(buffer, len(buffer)))
    assert got == [(5, b"small", 5), (6, big[:65531], 65535)]
    assert list(nfqueue.parse_packets(buffer, 30)) == []  # a message that does not fit
    assert nfqueue.ack_error(error_message(9, 16), 9) == 16 and nfqueue.ack_error(b"", 9) is None


def test_a_single_verdict_accepts_one_packet() -> None:
    message = nfqueue.verdict_message(7, 0x01020304, seq=3)
    assert struct.unpack_from("=IHHII", message)[:4] == (len(message), 0x0301, 1, 3)
    assert message[-8:] == struct.pack(">II", 1, 0x01020304)  # NF_ACCEPT


# --- BatchedQueue over a fake netlink socket ----------------------------------------------

class FakeNetlink:
    """The kernel's end: answers the bind, hands out queued messages, records verdicts."""

    bind_error = 0

    def __init__(self, *args: Any) -> None:
        self.incoming: list[bytes] = []
        self.sent: list[bytes] = []
        self.fail = False
        self.answers: list[bytes] = []
        self.configured: list[bytes] = []
        FAKES.append(self)

    def bind(self, address: Any) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def settimeout(self, timeout: float | None) -> None:
        pass

    def setblocking(self, flag: bool) -> None:
        pass

    def send(self, data: bytes) -> int:
        if struct.unpack_from("=H", data, 4)[0] == 0x0302:  # config: the kernel answers
            self.configured.append(data)
            self.answers.append(error_message(struct.unpack_from("=I", data, 8)[0],
                                              self.bind_error))
            return len(data)
        if self.fail:
            raise OSError("ENOBUFS")
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.answers.pop(0)

    def recv_into(self, buffer: bytearray) -> int:
        if not self.incoming:
            raise BlockingIOError
        data = self.incoming.pop(0)
        buffer[:len(data)] = data
        return len(data)

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        pass


FAKES: list[FakeNetlink] = []


def verdicts(sock: FakeNetlink) -> list[tuple[int, int, int]]:
    """(message type, verdict, id) of each verdict sent."""
    return [(struct.unpack_from("=H", m, 4)[0], *struct.unpack(">II", m[-8:])) for m in sock.sent]


class FakeBinding:
    """NetfilterQueue: binds the queue (in the kernel, with its 4,016-byte copy range) and
    gives its socket; its receive path is never run."""

    bound: list[tuple[int, int]] = []

    def bind(self, queue_num: int, callback: Any, max_len: int, sock_len: int) -> None:
        self.bound.append((queue_num, max_len))

    def get_fd(self) -> int:
        return 99

    def unbind(self) -> None:
        self.bound.pop()

    def run(self, block: bool = True) -> None:
        raise AssertionError("NetfilterQueue's receive path must not be used")


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Callable[[], FakeNetlink]:
    FAKES.clear()
    FakeNetlink.bind_error = 0
    FakeBinding.bound = []
    monkeypatch.setattr(nfqueue, "NetfilterQueue", FakeBinding)
    monkeypatch.setattr(nfqueue.socket, "fromfd", lambda fd, *args: FakeNetlink())
    return lambda: FAKES[-1]


def test_taken_packets_get_one_verdict_per_read_and_the_rest_are_accepted(
        kernel: Callable[[], FakeNetlink]) -> None:
    queue = nfqueue.BatchedQueue(7, lambda payload: payload != b"let through", max_len=100)
    sock = kernel()
    sock.incoming = [packet_message(1, b"a"), packet_message(2, b"b") + packet_message(
        3, b"let through"), packet_message(4, b"c")]
    queue.drain()
    # packet 3 accepted on its own, at once; one message drops everything queued up to 4
    assert verdicts(sock) == [(0x0301, 1, 3), (0x0303, 0, 4)]
    queue.drain()  # nothing new: no message
    assert len(sock.sent) == 2


def test_a_full_batch_is_dropped_at_once(kernel: Callable[[], FakeNetlink]) -> None:
    queue = nfqueue.BatchedQueue(7, lambda payload: True, max_len=1000)
    kernel().incoming = [packet_message(n, b"x") for n in range(1, nfqueue.BATCH + 11)]
    queue.drain()
    assert [v[2] for v in verdicts(kernel())] == [nfqueue.BATCH, nfqueue.BATCH + 10]


def test_a_packet_the_kernel_cut_is_dropped_unseen(kernel: Callable[[], FakeNetlink]) -> None:
    seen: list[bytes] = []
    queue = nfqueue.BatchedQueue(7, lambda payload: seen.append(payload) is not None,
                                 max_len=100)
    kernel().incoming = [packet_message(1, b"x" * 65531, original=65535),
                         packet_message(2, b"whole")]
    queue.drain()
    assert seen == [b"whole"] and queue.truncated == 1
    assert verdicts(kernel()) == [(0x0301, 1, 2), (0x0303, 0, 1)]  # never accepted


def test_a_failing_decision_drops_the_packet_and_is_raised(
        kernel: Callable[[], FakeNetlink]) -> None:
    def take(payload: bytes) -> bool:
        raise ValueError("bug")

    queue = nfqueue.BatchedQueue(7, take, max_len=100)
    kernel().incoming = [packet_message(5, b"x")]
    with pytest.raises(ValueError):
        queue.drain()
    assert verdicts(kernel()) == [(0x0303, 0, 5)]  # fail closed


def test_a_failed_verdict_is_covered_by_the_next(kernel: Callable[[], FakeNetlink]) -> None:
    queue = nfqueue.BatchedQueue(7, lambda payload: True, max_len=100)
    sock = kernel()
    sock.fail = True
    sock.incoming = [packet_message(1, b"x")]
    queue.drain()
    assert queue.verdict_errors == 1 and not sock.sent
    sock.fail = False
    sock.incoming = [packet_message(2, b"y")]
    queue.drain()
    assert verdicts(sock) == [(0x0303, 0, 2)]  # covers packet 1 as well


def test_a_queue_someone_else_holds_is_refused(kernel: Callable[[], FakeNetlink],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def held(self: FakeBinding, *args: Any, **kwargs: Any) -> None:
        raise OSError("Failed to create queue 7.")  # what NetfilterQueue says

    monkeypatch.setattr(FakeBinding, "bind", held)
    with pytest.raises(OSError, match="queue 7"):
        nfqueue.BatchedQueue(7, lambda payload: True, max_len=100)


def test_a_refused_configuration_unbinds_what_netfilterqueue_bound(
        kernel: Callable[[], FakeNetlink]) -> None:
    """The kernel refusing pvpn's own copy-range configuration (say, EPERM) leaves no queue
    bound with NetfilterQueue's 4,016-byte copies behind."""
    FakeNetlink.bind_error = 1  # EPERM
    with pytest.raises(OSError, match="NFQUEUE 7"):
        nfqueue.BatchedQueue(7, lambda payload: True, max_len=100)
    assert FakeBinding.bound == []


def test_the_copy_range_netfilterqueue_sets_is_raised_to_whole_packets(
        kernel: Callable[[], FakeNetlink]) -> None:
    """NetfilterQueue 1.1.0 sets the queue's copy range to 4,016 bytes; pvpn configures the
    queue again on the same socket, for whole packets, and unbinds it on close."""
    queue = nfqueue.BatchedQueue(7, lambda payload: True, max_len=100, flags=4)
    assert FakeBinding.bound == [(7, 100)]
    (configured,) = kernel().configured
    attrs = parse_attributes(configured[20:])
    assert 1 not in attrs and attrs[2][:5] == struct.pack(">IB", 0xFFFF, 2)
    assert attrs[5] == struct.pack(">I", 4)  # the flags asked for (issue 12's GSO)
    queue.close()
    assert FakeBinding.bound == []
