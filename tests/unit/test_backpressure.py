"""A chain whose writes wait above their high-water mark holds its session's queues (the
packets wait in the kernel, the user's TCP slows down by itself) instead of reading its
packets only to drop them as tunnel-congested; every other session's queue is read on. The
whole path: tests/integration/test_super_packets.py (a stalled server)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from pvpn.io.chainlink import HopConnections, _Hop
from pvpn.io.loop import Guard
from pvpn.io.sessiondevices import HOLD_MAX, HOLD_PAUSE, SessionDevices


class Tunnel:
    """What a hop's congestion touches of a HostedTunnel."""

    congested = False
    chain = None
    slot = 3


class Timer:
    def __init__(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        self.delay, self.callback, self.args = delay, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Readers:
    """The loop's readers, as add_reader / remove_reader leave them, and its timers."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.timers: list[Timer] = []

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        self.timers.append(Timer(delay, callback, *args))
        return self.timers[-1]

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    now = 0.0

    def time(self) -> float:
        return self.now


class Queue:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True


def hop_with(told: list[tuple[Any, bool]]) -> tuple[_Hop, Tunnel]:
    """The tunnel's current hop."""
    loop = asyncio.new_event_loop()
    try:
        hops = HopConnections(loop, Guard(lambda record: None), host=None,  # type: ignore[arg-type]
                              after=lambda: None, hold=lambda t, held: told.append((t, held)))
    finally:
        loop.close()
    tunnel = Tunnel()
    hop = _Hop(hops, tunnel)  # type: ignore[arg-type]
    hops.hops[tunnel] = hop  # type: ignore[index]
    return hop, tunnel


def test_an_old_hop_of_the_chain_never_clears_what_its_successor_says() -> None:
    """The chain failed and reconnected (same tunnel, a new hop); the old hop, closed by us,
    still drains or ends. Its resume_writing or connection_lost cleared the tunnel's
    congestion and released the new hop's hold, and the new hop, paused for good, was never
    told again: pvpn-client buffered a local user's packets without bound (the review
    reproduced 15 MB and growing, through a relay the user ran)."""
    told: list[tuple[Any, bool]] = []
    old, tunnel = hop_with(told)
    old.pause_writing()
    new = _Hop(old.hops, tunnel)  # type: ignore[arg-type]
    old.hops.hops[tunnel] = new  # type: ignore[index]
    new.pause_writing()
    assert tunnel.congested and told == [(tunnel, True), (tunnel, True)]
    old.closed = True
    old.resume_writing()
    old.connection_lost(None)
    assert tunnel.congested and told == [(tunnel, True), (tunnel, True)]
    new.resume_writing()
    assert not tunnel.congested and told[-1] == (tunnel, False)


def test_a_hop_that_cannot_write_holds_its_session_and_releases_it_when_it_drains() -> None:
    told: list[tuple[Any, bool]] = []
    hop, tunnel = hop_with(told)
    hop.pause_writing()
    assert tunnel.congested and told == [(tunnel, True)]
    hop.resume_writing()
    assert not tunnel.congested and told == [(tunnel, True), (tunnel, False)]


def test_a_hop_lost_while_it_could_not_write_leaves_nothing_held() -> None:
    """Else the next connection (which never paused) would find the session's queues
    unread for good."""
    told: list[tuple[Any, bool]] = []
    hop, tunnel = hop_with(told)
    hop.pause_writing()
    hop.closed = True  # closed by us: no news for the host
    hop.connection_lost(None)
    assert not tunnel.congested and told[-1] == (tunnel, False)


def devices_with_two_sessions() -> tuple[SessionDevices, Readers]:
    loop = Readers()
    devices = SessionDevices(loop, Guard(lambda record: None), lambda: None)  # type: ignore[arg-type]
    for slot, (segmenting, queue) in {3: (30, 31), 4: (40, 41)}.items():
        devices.segmenting[slot] = Queue(segmenting)  # type: ignore[assignment]
        devices.queues[slot] = Queue(queue)  # type: ignore[assignment]
        for fd in (segmenting, queue):
            def drain(fd: int = fd) -> None:
                pass
            devices.drains[fd] = drain
            loop.add_reader(fd, drain)
    return devices, loop


def test_a_held_session_s_queues_are_not_read_and_no_other_session_is_touched() -> None:
    devices, loop = devices_with_two_sessions()
    readers = dict(loop.readers)
    devices.hold(3, True, "alice's chain")
    assert set(loop.readers) == {40, 41}  # bob's queues are read on
    devices.hold(3, True, "alice's chain")  # twice: no harm
    devices.hold(3, False, "an old chain of that slot")  # not who asked: no end
    assert set(loop.readers) == {40, 41}
    devices.hold(3, False, "alice's chain")
    assert loop.readers == readers  # the same drains as before
    devices.hold(4, False)  # not held: nothing changes
    assert loop.readers == readers


def test_a_session_detached_while_held_is_not_held_after() -> None:
    devices, loop = devices_with_two_sessions()
    devices.hold(3, True)

    class Session:
        slot = 3
    devices.tun_fds.clear()
    devices.detach(Session())  # type: ignore[arg-type]
    assert devices.held == {} and 30 not in devices.drains and 31 not in devices.drains
    assert loop.timers[-1].cancelled
    devices.hold(3, False)  # its hop drains after it ended: nothing to read again
    assert set(loop.readers) == {40, 41}


def test_a_hold_ends_by_itself_after_hold_max() -> None:
    """A chain that stays backed up gets its session's packets read (and dropped as
    tunnel-congested) as before: what they pin in the kernel, and how long they wait, stays
    short whatever the chain does."""
    devices, loop = devices_with_two_sessions()
    readers = dict(loop.readers)
    devices.hold(3, True)
    (timer,) = loop.timers
    assert timer.delay == HOLD_MAX
    loop.now = HOLD_MAX
    timer.callback(*timer.args)  # the guard's call of the release
    assert loop.readers == readers and devices.held == {}
    devices.hold(3, False)  # the chain drains later: nothing more to do
    assert loop.readers == readers
    # A chain that backs up again at once is not held again for a while.
    devices.hold(3, True)
    assert loop.readers == readers and len(loop.timers) == 1
    loop.now = HOLD_MAX + HOLD_PAUSE
    devices.hold(3, True)
    assert set(loop.readers) == {40, 41}
