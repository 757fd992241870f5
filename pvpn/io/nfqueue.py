"""NFQUEUE: bound with NetfilterQueue, read by pvpn itself on its socket, with batched drop
verdicts.

NetfilterQueue (libnetfilter_queue) binds and unbinds the queue; its own receive path is not
used: it reads into a fixed 4 KB buffer and sets the queue's copy range to 4,016 bytes, so
every packet over that arrived cut (docs/design.md "Datagrams of any size"). On the same
netlink socket (the kernel knows it as the queue's owner) pvpn then sends one NFQNL_MSG_CONFIG
of its own (copy whole packets, the queue's length, optional flags such as issue 12's
NFQA_CFG_F_GSO) and reads the packets itself (nfnetlink_queue's messages, parsed with
``struct``), with ``recv_into`` into one preallocated buffer large enough for the largest
message the kernel sends (a 65,531-byte packet and its attributes). The kernel
copies at most 65,531 bytes of a packet (``NFQNL_MAX_COPY_RANGE``: an attribute's length is
16 bits); a larger one comes cut, its length in NFQA_CAP_LEN, and is dropped here: pvpn's
rules send a copy of such datagrams through a TUN device instead (``pvpn.firewall``).

Verdicts: both pvpn-client and pvpn-server take almost every queued packet (the packet
travels on through the tunnel or as a rewritten copy; the original is dropped). The kernel's
NFQNL_MSG_VERDICT_BATCH gives one verdict to every packet still queued up to an id, so a
packet that is taken gets no verdict of its own, and the taken packets are dropped together:
every ``BATCH`` packets and whenever a read of the queue ends. A packet to let through is
accepted at once, on its own (packets are dequeued in id order, so the batch verdict after it
only finds the taken ones). No verdict ever says accept for a packet nobody judged: what the
reader cannot parse, what arrives cut, and what a callback fails on is dropped (fail closed),
and the queue is never configured to fail open.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import warnings
from typing import Any, Callable, Final, Iterator

from netfilterqueue import NetfilterQueue

from pvpn.packet import SKB_GSO

# linux/netlink.h, netfilter/nfnetlink.h, nfnetlink_queue.h, netfilter.h
_NLMSG_ERROR: Final = 2
_NLM_F_REQUEST: Final = 1
_NLM_F_ACK: Final = 4
_NETLINK_NETFILTER: Final = 12
_SOL_NETLINK: Final = 270
_NETLINK_NO_ENOBUFS: Final = 5
_SO_RCVBUFFORCE: Final = 33
_NFNL_SUBSYS_QUEUE: Final = 3
_NFQNL_MSG_PACKET: Final = 0
_NFQNL_MSG_VERDICT: Final = 1
_NFQNL_MSG_CONFIG: Final = 2
_NFQNL_MSG_VERDICT_BATCH: Final = 3
_NFQA_PACKET_HDR: Final = 1
_NFQA_VERDICT_HDR: Final = 2
_NFQA_PAYLOAD: Final = 10
_NFQA_CAP_LEN: Final = 13
_NFQA_SKB_INFO: Final = 14
_NFQA_CFG_CMD: Final = 1
_NFQA_CFG_PARAMS: Final = 2
_NFQA_CFG_QUEUE_MAXLEN: Final = 3
_NFQA_CFG_MASK: Final = 4
_NFQA_CFG_FLAGS: Final = 5
_NFQNL_CFG_CMD_BIND: Final = 1
_NFQNL_COPY_PACKET: Final = 2
_NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_NF_DROP: Final = 0
_NF_ACCEPT: Final = 1
_NF_QUEUE: Final = 3

_PACKET_TYPE: Final = (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET
_NLMSGHDR: Final = struct.Struct("=IHHII")
_NLATTR: Final = struct.Struct("=HH")
_BE32: Final = struct.Struct(">I")

#: NFQA_CFG_F_GSO: the kernel queues GSO packets (up to 64 KB) whole instead of segmenting
#: them, and leaves a CHECKSUM_PARTIAL packet's checksum unfinished (NFQA_SKB_CSUMNOTREADY: its
#: TCP or UDP checksum field holds the pseudo-header's sum only).
F_GSO: Final = 4
#: NFQA_SKB_INFO's flags (linux/netfilter/nfnetlink_queue.h): pvpn.packet.SKB_*.

#: Taken packets waiting for their verdict; well under any queue's max_len.
BATCH: Final = 64
#: The most a queue's kernel copies of one packet (NFQNL_MAX_COPY_RANGE).
MAX_COPY: Final = 0xFFFF - 4
#: One recv_into buffer: the largest message (MAX_COPY of payload and the metadata before it,
#: a few hundred bytes) fits with room to spare.
RECV_BUFFER: Final = 1 << 17
#: What the socket may hold for pvpn before the kernel drops queued packets (as
#: NetfilterQueue's default, about 2.4 MB asked, which the kernel doubles).
SOCKET_BUFFER: Final = 4 << 20
#: Reads per drain at most, so one busy queue cannot hold the event loop for ever; and
#: bytes, so a drain of super-packets (64 KB each) puts at most this much into the tunnel's
#: buffers before it is written (the rest waits in the kernel's socket).
MAX_READS: Final = 1024
MAX_DRAIN_BYTES: Final = 4 << 20


def _unused_callback(packet: Any) -> None:
    raise AssertionError("NetfilterQueue's receive path is not used")  # never run


def _message(mtype: int, flags: int, queue_num: int, attributes: bytes, seq: int) -> bytes:
    """nlmsghdr (host order), nfgenmsg (AF_UNSPEC, version 0, queue number big-endian), and
    the attributes."""
    body = struct.pack(">BBH", socket.AF_UNSPEC, 0, queue_num) + attributes
    return _NLMSGHDR.pack(16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | mtype, flags,
                          seq & 0xFFFFFFFF, 0) + body


def _attribute(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return _NLATTR.pack(size, kind) + data + b"\x00" * (-size % 4)


def config_message(queue_num: int, max_len: int, copy_range: int = 0xFFFF, flags: int = 0,
                   seq: int = 0, bind: bool = False) -> bytes:
    """One NFQNL_MSG_CONFIG for a queue this socket is bound to (``bind``: that binds it
    first): whole packets copied (NFQNL_COPY_PACKET, ``copy_range`` bytes at most: the kernel
    caps it at MAX_COPY), the queue's length and, if any, ``flags`` (NFQA_CFG_F_GSO for issue
    12's super-packets; never NFQA_CFG_F_FAIL_OPEN). The kernel applies a command before the
    parameters, and acknowledges the whole message (NLM_F_ACK)."""
    attributes = ((_attribute(_NFQA_CFG_CMD, struct.pack(">BxH", _NFQNL_CFG_CMD_BIND, 0))
                   if bind else b"")
                  + _attribute(_NFQA_CFG_PARAMS, struct.pack(">IB", copy_range,
                                                             _NFQNL_COPY_PACKET))
                  + _attribute(_NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", max_len)))
    if flags:
        attributes += (_attribute(_NFQA_CFG_FLAGS, struct.pack(">I", flags))
                       + _attribute(_NFQA_CFG_MASK, struct.pack(">I", flags)))
    return _message(_NFQNL_MSG_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK, queue_num, attributes, seq)


def verdict_message(queue_num: int, packet_id: int, verdict: int = _NF_ACCEPT,
                    seq: int = 0) -> bytes:
    """The verdict for one packet: NFQA_VERDICT_HDR (verdict and id, big-endian)."""
    return _message(_NFQNL_MSG_VERDICT, _NLM_F_REQUEST, queue_num,
                    _attribute(_NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id)), seq)


def requeue_verdict(queue_num: int) -> int:
    """The verdict that hands a packet to queue ``queue_num`` (NF_QUEUE_NR): a queue without
    NFQA_CFG_F_GSO gets a super-packet as the kernel's segments, their checksums done, and
    with nobody reading it the kernel drops (no bypass flag: fail closed)."""
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"no queue {queue_num}")
    return _NF_QUEUE | queue_num << 16


def verdict_batch_message(queue_num: int, last_id: int, verdict: int = _NF_DROP,
                          seq: int = 0) -> bytes:
    """The netlink message that gives ``verdict`` to every packet of the queue up to
    ``last_id``: nlmsghdr, nfgenmsg (AF_UNSPEC, version 0, queue number big-endian), and a
    NFQA_VERDICT_HDR attribute (verdict and id, big-endian)."""
    return _message(_NFQNL_MSG_VERDICT_BATCH, _NLM_F_REQUEST, queue_num,
                    _attribute(_NFQA_VERDICT_HDR, struct.pack(">II", verdict, last_id)), seq)


def parse_packets(buffer: bytearray | bytes | memoryview, length: int
                  ) -> Iterator[tuple[int, bytes, int]]:
    """:func:`packets_with_info` without the skb info."""
    for packet_id, payload, original, _ in packets_with_info(buffer, length):
        yield packet_id, payload, original


def packets_with_info(buffer: bytearray | bytes | memoryview, length: int
                      ) -> Iterator[tuple[int, bytes, int, int]]:
    """The packets in the first ``length`` bytes of ``buffer`` (what one recv gave):
    ``(packet id, payload, original length, skb info)`` each. The original length exceeds the
    payload's when the kernel cut the packet (NFQA_CAP_LEN); the skb info is NFQA_SKB_INFO's
    flags (SKB_*; 0 without it). Error and other messages are
    skipped; parsing stops at a message whose length does not fit (the kernel's messages
    always do), and a packet message without its header gives id -1 (dropped by the batch
    after it, never accepted)."""
    view = memoryview(buffer)
    at = 0
    while at + 16 <= length:
        size, kind = _NLMSGHDR.unpack_from(view, at)[:2]
        if size < 16 or at + size > length:
            return
        if kind == _PACKET_TYPE:
            packet_id, payload, original, info = -1, b"", -1, 0
            end = at + size
            a = at + 20  # nlmsghdr, nfgenmsg
            while a + 4 <= end:
                alen, atype = _NLATTR.unpack_from(view, a)
                if alen < 4 or a + alen > end:
                    break
                atype &= _NLA_TYPE_MASK
                if atype == _NFQA_PAYLOAD:
                    payload = bytes(view[a + 4:a + alen])
                elif atype == _NFQA_PACKET_HDR and alen >= 8:
                    packet_id = _BE32.unpack_from(view, a + 4)[0]
                elif atype == _NFQA_CAP_LEN and alen >= 8:
                    original = _BE32.unpack_from(view, a + 4)[0]
                elif atype == _NFQA_SKB_INFO and alen >= 8:
                    info = _BE32.unpack_from(view, a + 4)[0]
                a += (alen + 3) & ~3
            yield packet_id, payload, original if original >= 0 else len(payload), info
        at += (size + 3) & ~3


def ack_error(buffer: bytes, seq: int) -> int | None:
    """The errno of the NLMSG_ERROR answering message ``seq`` in ``buffer`` (0: success), or
    None if there is none."""
    at = 0
    while at + 20 <= len(buffer):
        size, kind, _, msg_seq, _ = _NLMSGHDR.unpack_from(buffer, at)
        if size < 16:
            return None
        if kind == _NLMSG_ERROR and msg_seq == seq:
            return -int(struct.unpack_from("=i", buffer, at + 16)[0])
        at += (size + 3) & ~3
    return None


class BatchedQueue:
    """One bound NFQUEUE. ``take(payload)`` decides per packet: True drops it (in the next
    batch), False accepts it now, an int (:func:`requeue_verdict`) is the verdict it gets
    now. An exception in ``take`` drops the packet (fail closed), and
    so does a packet the kernel had to cut (longer than MAX_COPY), which ``take`` never sees.
    ``flags`` are NFQA_CFG_F_* flags for the queue (none by default); with F_GSO, ``take`` is
    called as ``take(payload, info)``, info being the packet's NFQA_SKB_INFO flags (SKB_*)."""

    def __init__(self, queue_num: int, take: Callable[..., "bool | int"], max_len: int,
                 flags: int = 0, segment_to: int | None = None) -> None:
        self.queue_num = queue_num
        self._take = take
        # A super-packet longer than a message holds (BIG TCP's, above 64 KB) is handed to
        # this queue (no F_GSO: the kernel segments it there) rather than dropped cut.
        self._cut = None if segment_to is None else requeue_verdict(segment_to)
        self._with_info = bool(flags & F_GSO)
        # NetfilterQueue binds the queue (OSError if someone else holds it); its callback is
        # never called, as its receive path is never run.
        self._binding = NetfilterQueue()
        with warnings.catch_warnings():  # it warns when the kernel rounds the buffer size
            warnings.simplefilter("ignore", RuntimeWarning)
            self._binding.bind(queue_num, _unused_callback, max_len=max_len,
                               sock_len=SOCKET_BUFFER // 2)
        try:
            self._sock = socket.fromfd(self._binding.get_fd(), socket.AF_NETLINK,
                                       socket.SOCK_RAW, _NETLINK_NETFILTER)
        except BaseException:
            self._binding.unbind()
            raise
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, SOCKET_BUFFER)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            # A full socket buffer drops packets in the kernel (never accepted: the queue does
            # not fail open); the read goes on without an ENOBUFS error to handle.
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
            self._configure(config_message(queue_num, max_len, flags=flags, seq=1), 1)
        except BaseException:
            self._sock.close()
            self._binding.unbind()
            raise
        self._max_len = max_len
        self._buffer = bytearray(RECV_BUFFER)
        self._last_id = -1
        self._waiting = 0
        self._seq = 1
        self.verdict_errors = 0
        self.truncated = 0  # packets the kernel cut (their copy comes another way)

    def _configure(self, message: bytes, seq: int) -> None:
        """Send a config message and wait (bounded) for its acknowledgement; OSError with the
        kernel's errno if it refused (EBUSY: another process holds the queue)."""
        self._sock.settimeout(5.0)
        try:
            self._sock.send(message)
            for _ in range(64):  # packets queued meanwhile are skipped: the next batch drops them
                answer = self._sock.recv(RECV_BUFFER)
                error = ack_error(answer, seq)
                if error is None:
                    continue
                if error:
                    busy = " (bound by another process?)" if error == errno.EBUSY else ""
                    raise OSError(error, f"NFQUEUE {self.queue_num}: {os.strerror(error)}{busy}")
                return
            raise OSError(errno.EPROTO, f"NFQUEUE {self.queue_num}: no answer to the bind")
        finally:
            self._sock.setblocking(False)

    def set_flags(self, flags: int) -> None:
        """Give the queue these NFQA_CFG_F_* flags (OSError if the kernel refuses them: the
        queue stays as it was). With F_GSO, ``take`` is called with the skb info too. Before
        the rules send packets here: any queued meanwhile are dropped by the next batch."""
        self._seq += 1
        self._configure(config_message(self.queue_num, self._max_len, flags=flags,
                                       seq=self._seq), self._seq)
        self._with_info = bool(flags & F_GSO)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _on_packet(self, packet_id: int, payload: bytes, original: int, info: int) -> None:
        take: bool | int = True
        try:
            if original > len(payload):
                if info & SKB_GSO and self._cut is not None and packet_id >= 0:
                    take = self._cut
                else:
                    self.truncated += 1  # cut by the kernel: dropped, its copy comes by a TUN
            elif packet_id >= 0:
                take = self._take(payload, info) if self._with_info else self._take(payload)
        finally:
            if take is not True and take is not False and not (
                    type(take) is int and take & 0xFFFF == _NF_QUEUE):
                take = True  # anything but False or a queue's verdict drops it: fail closed
            if take is True:
                if packet_id > self._last_id:
                    self._last_id = packet_id
                self._waiting += 1
                if self._waiting >= BATCH:
                    self.flush()
            else:
                self._seq += 1
                verdict = _NF_ACCEPT if take is False else take
                try:
                    self._sock.send(verdict_message(self.queue_num, packet_id, verdict,
                                                    seq=self._seq))
                except OSError:
                    self.verdict_errors += 1  # it stays queued; the next batch drops it

    def drain(self) -> None:
        """Handle everything waiting in the queue, then drop the taken packets."""
        buffer = self._buffer
        read = 0
        try:
            for _ in range(MAX_READS):
                try:
                    length = self._sock.recv_into(buffer)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        continue
                    raise
                for packet_id, payload, original, info in packets_with_info(buffer, length):
                    self._on_packet(packet_id, payload, original, info)
                read += length
                if read >= MAX_DRAIN_BYTES:  # super-packets: the rest waits for the next drain
                    break
        finally:
            self.flush()

    def flush(self) -> None:
        if not self._waiting or self._last_id < 0:
            return
        self._seq += 1
        try:
            self._sock.send(verdict_batch_message(self.queue_num, self._last_id, seq=self._seq))
        except OSError:
            # The packets stay queued (nothing leaves); the next batch's verdict covers them.
            self.verdict_errors += 1
            return
        self._waiting = 0

    def close(self) -> None:
        """Unbind: packets still queued are dropped by the kernel."""
        self.flush()
        self._sock.close()
        self._binding.unbind()

