"""TUN devices: the client host delivers each session's replies into its own TUN device, so
the kernel sees them arrive on an interface that marks their connections (firewall.py)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

from pvpn.errors import MalformedPacket, PvpnError
from pvpn.fragments import NFQUEUE_MAX_COPY, Reassembler, undo_copy

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_READ_SIZE = 1 << 17  # more than the device's MTU, so no packet is cut


def open_tun(name: str) -> int:
    """Create (or attach to) TUN device ``name``, bring it up, and return its fd.

    The device disappears when the fd is closed, also when the process dies.
    """
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PvpnError(f"cannot open /dev/net/tun: {exc} (is the tun module loaded?)") from None
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
        # Replies arrive from addresses routed elsewhere; strict reverse-path filtering on this
        # device would drop them (the effective value is max(all, device)).
        _sysctl(f"net/ipv4/conf/{name}/rp_filter", "0")
        # The largest MTU: the kernel's copies of datagrams too large for an NFQUEUE message
        # leave by this device (firewall.tee), in as few pieces as it allows.
        subprocess.run(["ip", "link", "set", name, "mtu", "65535", "up"], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        os.close(fd)
        raise PvpnError(f"cannot set up TUN device {name}: {exc}") from None
    return fd


def read_copies(fd: int, reassembler: Reassembler, now: float, hop: int, clear_df: bool,
                limit: int = 256) -> list[bytes]:
    """The datagrams the kernel's copies (firewall.tee) brought out of a TUN device: its
    packets read (at most ``limit``), put together (the kernel fragments the copies to the
    device's MTU or to the fragments it reassembled), and restored as they were
    (``fragments.undo_copy``). Anything else leaving the device (the kernel's own router
    solicitations, say) is no datagram too large for a queue message, and is left out."""
    out = []
    for _ in range(limit):
        try:
            packet = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            break
        try:
            whole = reassembler.feed(packet, now)
        except MalformedPacket:
            continue
        if whole is not None and len(whole) > NFQUEUE_MAX_COPY:
            out.append(undo_copy(whole, hop, clear_df))
    return out


def strict_rp_filter() -> bool:
    try:
        with open("/proc/sys/net/ipv4/conf/all/rp_filter") as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


def _sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key}", "w") as handle:
        handle.write(value)
