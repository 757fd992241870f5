"""pvpn-server's users' super-packets handed whole to the kernel's forwarding, through its TUN
device (pvpn.forwarding has the check's logic and why; docs/design.md "Super-packets").

The adapter: the device's settings (pvpn.io.tun.forward_from), the writes, and the count of
what left, read with iptables in a thread of the loop's executor so a big ruleset never stalls
the packet path."""

from __future__ import annotations

import asyncio
import errno
from typing import Callable

from pvpn import firewall
from pvpn.commands import InjectPacket
from pvpn.errors import PvpnError
from pvpn.forwarding import ForwardCheck
from pvpn.io import rules
from pvpn.io.tun import forward_from, forward_settings, write_packet
from pvpn.names import NODE_WARNING
from pvpn.records import Record

Counts = dict[int, int | None]
_TOOLS = {4: "iptables", 6: "ip6tables"}


class WholeUploads:
    """Writes super-packets into TUN device ``name`` (fd ``fd``) in the IP versions the
    check lets go whole (:attr:`versions`), for the server of NAT ports ``ports``; says in
    the log when a version goes back to segments, why and what to do."""

    def __init__(self, fd: int, name: str, instance: str, ports: tuple[int, int],
                 loop: asyncio.AbstractEventLoop, log: Callable[[Record], None]) -> None:
        self.fd, self.name = fd, name
        self.loop = loop
        self.log = log
        self.rule = firewall.forward_count(instance, ports)
        self.errors = 0
        self.reading = False  # a count is being read
        self.check = ForwardCheck((), {})
        self.start()

    @property
    def versions(self) -> frozenset[int]:
        return frozenset(self.check.whole)

    def start(self) -> None:
        """The device's settings (again: writing the host's ip_forward resets them), and
        every version that may, whole from now on (at start, on reload)."""
        reasons = forward_from(self.name)
        for version, why in sorted(reasons.items()):
            if why is not None:
                self.log(Record(NODE_WARNING, reason=f"IPv{version} uploads are segmented by "
                                f"pvpn-server (slower): {why}"))
        try:
            counted = rules.packets_counted(self.rule)
        except PvpnError as exc:
            self._not_read(exc)
            counted = {}
        self.check = ForwardCheck({v for v, why in reasons.items() if why is None}, counted)

    def write(self, cmd: InjectPacket) -> None:
        assert cmd.offload is not None
        version = cmd.packet[0] >> 4
        try:
            write_packet(self.fd, cmd.packet, cmd.offload)
        except OSError as exc:
            # Lost like any packet on a congested link; anything else the device refuses
            # is no reason to try its next one.
            self.errors += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM) and self.check.off(
                    version, self.loop.time()):
                self._say_off(version, f"the TUN device refused one: {exc.strerror or exc}")
            return
        self.check.wrote(version)

    def tick(self) -> None:
        """Once a second: a check when one is due, retries whose wait is over."""
        now = self.loop.time()
        retries = self.check.retries(now)
        if self.reading or not (retries or self.check.due(now)):
            return
        written = self.check.take(now)
        if retries:
            forward_from(self.name)  # the settings may be what failed
        self.reading = True
        future = self.loop.run_in_executor(None, rules.packets_counted, self.rule)
        check = self.check
        future.add_done_callback(lambda done: self._judge(done, check, written, retries))

    def _not_read(self, exc: BaseException) -> None:
        self.log(Record(NODE_WARNING, reason=f"the count of super-packets that left could not "
                        f"be read: {exc}; judged at the next check"))

    def _judge(self, done: asyncio.Future[Counts], check: ForwardCheck,
               written: dict[int, int], retries: list[int]) -> None:
        self.reading = False
        if done.cancelled() or check is not self.check:  # a reload started counting again
            return
        failed = done.exception()
        if failed is not None:  # iptables busy or gone: nothing judged this time
            self._not_read(failed)
            return
        counted = done.result()
        now = self.loop.time()
        for version, why in self.check.judge(written, counted, now).items():
            self._say_off(version, why)
        for version in retries:
            self.check.resume(version, counted.get(version))

    def _say_off(self, version: int, why: str) -> None:
        settings = forward_settings(self.name).get(version)
        cause = (f"{settings} (writing the host's ip_forward or all.forwarding resets every "
                 "device's)" if settings else "the host's FORWARD rules drop them")
        tool = _TOOLS[version]
        wait = self.check.next_try(version)
        when = "" if wait is None else f"; tried again in {wait - self.loop.time():.0f} s"
        self.log(Record(NODE_WARNING, reason=(
            f"IPv{version} uploads are segmented by pvpn-server (slower): {why}: {cause}. "
            f"Let the host forward what arrives on {self.name} ({tool} -I FORWARD -i "
            f"{self.name} -j ACCEPT, or its nftables forward chain's equivalent), then reload "
            f"pvpn-server (SIGHUP){when}")))
