"""TUN devices: the client host delivers each session's replies into its own TUN device, so
the kernel sees them arrive on an interface that marks their connections (firewall.py)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

from pvpn.envelope import Offload
from pvpn.errors import MalformedPacket, PvpnError
from pvpn.fragments import NFQUEUE_MAX_COPY, Reassembler, undo_copy

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNGETIFF = 0x800454D2
#: A struct virtio_net_hdr (linux/virtio_net.h) in the device's byte order (the host's: the
#: kernel's default for a TUN device): flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset. With IFF_VNET_HDR every packet read or written starts with one.
_VNET_HDR = struct.Struct("=BBHHHH")
VNET_HDR_LEN = _VNET_HDR.size
#: The header of a packet with no offload: a whole packet, its checksums done.
PLAIN_HDR = bytes(VNET_HDR_LEN)
_READ_SIZE = 1 << 17  # more than the device's MTU, so no packet is cut


def open_tun(name: str, vnet: bool = True) -> int:
    """Create (or attach to) TUN device ``name``, bring it up, and return its fd.

    ``vnet`` (unless told otherwise): IFF_VNET_HDR, every packet written or read starts with a virtio_net_hdr
    (:func:`vnet_header`), so a TCP super-packet written whole is delivered (or segmented)
    by the kernel. No TUNSETOFFLOAD: what the kernel hands out of the device comes in
    packets of its MTU with their checksums done, as before.

    The device disappears when the fd is closed, also when the process dies.
    """
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PvpnError(f"cannot open /dev/net/tun: {exc} (is the tun module loaded?)") from None
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI
                                                 | (_IFF_VNET_HDR if vnet else 0)))
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


def forward_from(name: str) -> dict[int, str | None]:
    """Let the kernel forward the packets written into TUN device ``name`` (pvpn.forwarding),
    from the host's own addresses (the server's NAT sources): per IP version, None where it
    does, else why not. Only this device's settings change, and they go with it: IPv4's
    forwarding and accept_local, IPv6's force_forwarding (Linux 6.17; the host's
    ``net.ipv6.conf.all.forwarding`` would make every interface a router's)."""
    out: dict[int, str | None] = {}
    if strict_rp_filter():
        out[4] = ("net.ipv4.conf.all.rp_filter is 1 (strict): packets from the host's own "
                  "addresses would be dropped as they arrive on the device")
    else:
        out[4] = _set_all({f"net/ipv4/conf/{name}/forwarding": "1",
                           f"net/ipv4/conf/{name}/accept_local": "1"})
    if not os.path.exists(f"/proc/sys/net/ipv6/conf/{name}/force_forwarding"):
        out[6] = "this kernel has no net.ipv6.conf.<device>.force_forwarding (Linux 6.17)"
    else:
        out[6] = _set_all({f"net/ipv6/conf/{name}/force_forwarding": "1"})
    return out


def forward_settings(name: str) -> dict[int, str | None]:
    """What of :func:`forward_from`'s settings of device ``name`` is no longer set, per IP
    version (None: all is)."""
    keys = {4: ("net/ipv4/conf/{}/forwarding", "net/ipv4/conf/{}/accept_local"),
            6: ("net/ipv6/conf/{}/force_forwarding",)}
    out: dict[int, str | None] = {}
    for version, paths in keys.items():
        out[version] = None
        for path in paths:
            try:
                with open(f"/proc/sys/{path.format(name)}") as handle:
                    value = handle.read().strip()
            except OSError:
                continue
            if value != "1":
                out[version] = f"{path.format(name).replace('/', '.')} is {value}"
                break
    return out


def _set_all(settings: dict[str, str]) -> str | None:
    for key, value in settings.items():
        try:
            _sysctl(key, value)
        except OSError as exc:
            return f"cannot set {key.replace('/', '.')}: {exc.strerror or exc}"
    return None


def write_packet(fd: int, packet: bytes, offload: Offload | None) -> None:
    """Write ``packet`` into a device opened with ``vnet``, its virtio_net_hdr first (one
    system call, no copy of the packet)."""
    os.writev(fd, (vnet_header(offload), packet))


def has_vnet_header(fd: int) -> bool:
    """Whether ``fd`` is a TUN device whose packets carry a virtio_net_hdr (TUNGETIFF)."""
    try:
        answer = fcntl.ioctl(fd, _TUNGETIFF, bytes(40))
    except OSError:
        return False
    return bool(struct.unpack_from("16sH", answer)[1] & _IFF_VNET_HDR)


def vnet_header(offload: Offload | None) -> bytes:
    """The virtio_net_hdr a packet is written with into a device opened with ``vnet``."""
    if offload is None:
        return PLAIN_HDR
    return _VNET_HDR.pack(offload.flags, offload.gso_type, offload.hdr_len, offload.gso_size,
                          offload.csum_start, offload.csum_offset)


def read_copies(fd: int, reassembler: Reassembler, now: float, hop: int, clear_df: bool,
                limit: int = 256, header: int = 0) -> list[bytes]:
    """The datagrams the kernel's copies (firewall.tee) brought out of a TUN device: its
    packets read (at most ``limit``), put together (the kernel fragments the copies to the
    device's MTU or to the fragments it reassembled), and restored as they were
    (``fragments.undo_copy``). Anything else leaving the device (the kernel's own router
    solicitations, say) is no datagram too large for a queue message, and is left out.
    ``header``: the bytes of virtio_net_hdr each read starts with (a ``vnet`` device's)."""
    out = []
    for _ in range(limit):
        try:
            packet = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            break
        if header:
            packet = packet[header:]
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
