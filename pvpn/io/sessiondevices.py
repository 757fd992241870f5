"""Each client-host session's own devices on the event loop: its TUN device (replies
written in, the kernel's copies of its too-large datagrams read out) and its NFQUEUE (its
packets read). What becomes of a packet is pvpn.nodes.client.ClientHost's (``take``)."""

from __future__ import annotations

import asyncio
import os
from typing import Callable

from pvpn.errors import PvpnError
from pvpn.fragments import Reassembler
from pvpn.io.loop import Guard
from pvpn.io.nfqueue import F_GSO, BatchedQueue
from pvpn.io.tun import VNET_HDR_LEN, has_vnet_header, open_tun, read_copies
from pvpn.nodes.client import SlotSession

#: A packet of a session and its NFQA_SKB_INFO flags: True, taken (dropped by the queue: it
#: never leaves the host in clear), or the verdict that hands it to its segmenting queue.
Take = Callable[[bytes, int], "bool | int"]
#: Seconds a session's queues stay unread while its chain's writes are backed up (hold),
#: and after a hold that lasted that long, how long before the next may start: a chain kept
#: backed up (a hop that reads just enough, on purpose) holds its queues at most a sixth of
#: the time, and meanwhile its packets are read and dropped (tunnel-congested) as before.
HOLD_MAX = 0.2
HOLD_PAUSE = 1.0


class SessionDevices:
    """The sessions' queues and TUN devices by slot. After each batch read, ``flush``
    writes out what the batch gave the local connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, guard: Guard,
                 flush: Callable[[], None]) -> None:
        self.loop = loop
        self.guard = guard
        self.flush = flush
        self.queues: dict[int, BatchedQueue] = {}
        # Each session's segmenting queue (no NFQA_CFG_F_GSO): the super-packets it hands
        # back to the kernel come in here as segments, their checksums done.
        self.segmenting: dict[int, BatchedQueue] = {}
        self.tun_fds: dict[int, int] = {}
        self.vnet: set[int] = set()  # the TUN fds whose packets carry a virtio_net_hdr
        self.drains: dict[int, Callable[[], None]] = {}  # by queue fd: what reads it
        # Slots whose queues are not read: who asked (the chain) and the hold's end.
        self.held: dict[int, tuple[object, asyncio.TimerHandle]] = {}
        self.no_hold_until: dict[int, float] = {}  # by slot: after a hold that timed out

    def attach(self, session: SlotSession, take: Take) -> None:
        """The session's TUN device and queue, read from now on (PvpnError: neither is kept)."""
        fd = open_tun(session.tun)  # with a virtio_net_hdr: replies may be super-packets
        self.tun_fds[session.slot] = fd
        if has_vnet_header(fd):
            self.vnet.add(fd)
        queues: list[BatchedQueue] = []
        try:
            # Its packets as the local stack made them: TCP super-packets whole, checksums
            # left undone (ClientHost.queued); the segmenting queue takes what it cannot send.
            # (number, flags, segment_to) of each queue, the segmenting one first; without
            # one the session's queue has no F_GSO: the kernel segments everything first.
            segmenting = session.segmenting_queue
            specs = [(session.queue, 0, None)] if segmenting < 0 else [
                (segmenting, 0, None), (session.queue, F_GSO, segmenting)]
            for number, flags, segment_to in specs:
                queues.append(BatchedQueue(number, take, max_len=4096, flags=flags,
                                           segment_to=segment_to))
        except OSError as exc:  # the queue is bound by someone else, say
            for bound in queues:
                bound.close()
            self.vnet.discard(fd)
            os.close(self.tun_fds.pop(session.slot))
            raise PvpnError(f"cannot bind NFQUEUE {number}: {exc}") from None
        except BaseException:
            for bound in queues:
                bound.close()
            self.vnet.discard(fd)
            os.close(self.tun_fds.pop(session.slot))
            raise
        if len(queues) == 2:
            self.segmenting[session.slot] = queues[0]
        self.queues[session.slot] = queues[-1]

        for queue in queues:
            def drain(queue: BatchedQueue = queue) -> None:
                # A packet whose handling failed is dropped (fail closed), the rest go on.
                self.guard.call("queue drain", queue.drain)
                self.guard.call("flush", self.flush)

            self.drains[queue.fileno()] = drain
            self.loop.add_reader(queue.fileno(), drain)
        copies = Reassembler()

        def read_big() -> None:
            # The session's datagrams too large for a queue message: the kernel's copies,
            # out of its TUN device (firewall.tee), handled as the queue's packets are.
            self.guard.call("tun copies", self._take_copies, fd, copies, take)
            self.guard.call("flush", self.flush)

        self.loop.add_reader(fd, read_big)

    def _take_copies(self, fd: int, copies: Reassembler, take: Take) -> None:
        # The kernel's copy carries DF (nf_dup_ipv4 sets it); its sender set none.
        for datagram in read_copies(fd, copies, self.loop.time(), 0, True,
                                    header=VNET_HDR_LEN if fd in self.vnet else 0):
            take(datagram, 0)

    def attached(self, session: SlotSession) -> bool:
        return session.slot in self.queues

    def hold(self, slot: int, held: bool, owner: object = None) -> None:
        """Stop reading slot ``slot``'s queues (its tunnel's writes wait above their
        high-water mark), or read them again. Meanwhile its packets wait in the kernel's
        queue, bounded by its max_len (beyond, the kernel drops: fail closed), and its TCP
        senders slow down by themselves (their unsent data counts against them, TCP Small
        Queues), where reading them only to drop them (tunnel-congested) lost up to 64 KB
        each and made them retransmit. No other session's queue is touched. A hold lasts
        at most HOLD_MAX: a chain that stays backed up longer gets its packets read (and
        dropped as tunnel-congested) as before, so what a user's packets pin in the kernel
        and how long they wait stay short whatever their chain does. Only ``owner`` (the
        chain that asked) ends its hold early: an old chain of the slot cannot end a new one's."""
        if held == (slot in self.held):
            return
        queues = [q for q in (self.segmenting.get(slot), self.queues.get(slot)) if q is not None]
        if held:
            if self.loop.time() < self.no_hold_until.get(slot, 0.0):
                return
            timer = self.loop.call_later(HOLD_MAX, self.guard.call, "queue hold",
                                         self._timed_out, slot)
            self.held[slot] = (owner, timer)
            for queue in queues:
                self.loop.remove_reader(queue.fileno())
            return
        if self.held[slot][0] is owner:
            self._release(slot)

    def _timed_out(self, slot: int) -> None:
        self.no_hold_until[slot] = self.loop.time() + HOLD_PAUSE
        self._release(slot)

    def _release(self, slot: int) -> None:
        """Read the slot's queues again (every one of them, whatever fails)."""
        found = self.held.pop(slot, None)
        if found is None:
            return
        found[1].cancel()
        for queue in (self.segmenting.get(slot), self.queues.get(slot)):
            if queue is not None:
                self.guard.call("queue hold", self.loop.add_reader, queue.fileno(),
                                self.drains[queue.fileno()])

    def detach(self, session: SlotSession) -> None:
        """The session's queue and TUN device are closed (if it had them)."""
        found = self.held.pop(session.slot, None)
        if found is not None:
            found[1].cancel()
        self.no_hold_until.pop(session.slot, None)
        for queues in (self.queues, self.segmenting):
            queue = queues.pop(session.slot, None)
            if queue is not None:
                self.loop.remove_reader(queue.fileno())
                self.drains.pop(queue.fileno(), None)
                queue.close()
        fd = self.tun_fds.pop(session.slot, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            self.vnet.discard(fd)
            os.close(fd)
