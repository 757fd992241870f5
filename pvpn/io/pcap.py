"""A classic pcap file of a session's inner IP packets, written with struct (no scapy on the
packet path).

The link type is LINKTYPE_RAW (101): every record is a bare IPv4 or IPv6 packet, told apart
by its version nibble, so Wireshark and tcpdump read both families from one file.  The file
format is the one of libpcap's ``pcap-savefile(5)``: a 24-byte global header, then per packet
a 16-byte record header (seconds, microseconds, captured length, original length) and the
bytes.

Records are buffered and written whole (never half a record), at the latest
:data:`FLUSH_INTERVAL` seconds after the last write or when :data:`FLUSH_BYTES` wait, and on
every :meth:`PcapWriter.flush` the caller does after a batch: a process that crashes leaves a
file that ends at a record boundary and reads cleanly.  The file is bounded: once a record
would take it past ``max_bytes``, the writer stops writing for good and says so once through
``on_stop`` (a write error stops it the same way): a capture never fills a disk or fails the
session it watches.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from pvpn.config import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, DEFAULT_MAX_TOTAL_BYTES
from pvpn.errors import ConfigError
from pvpn.names import (
    CAPTURE_CLOSED, CAPTURE_DELETED, CAPTURE_FAILED, CAPTURE_OPENED, CAPTURE_SKIPPED,
    CAPTURE_STOPPED,
)
from pvpn.records import Record

LINKTYPE_RAW = 101
PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
SNAPLEN = 262144  # what tcpdump uses; larger than any inner packet (MAX_PACKET is 65575)
FLUSH_BYTES = 64 * 1024
FLUSH_INTERVAL = 1.0  # seconds

_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
GLOBAL_HEADER_SIZE = _GLOBAL_HEADER.size
RECORD_HEADER_SIZE = _RECORD_HEADER.size


def encode_global_header(snaplen: int = SNAPLEN, linktype: int = LINKTYPE_RAW) -> bytes:
    """The pcap global header: magic, version 2.4, UTC, no sigfigs, snaplen, link type."""
    return _GLOBAL_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype)


def encode_record(packet: bytes, timestamp: float, snaplen: int = SNAPLEN) -> bytes:
    """One pcap record: header and packet (cut to ``snaplen``, original length kept)."""
    micros = max(0, round(timestamp * 1_000_000))
    seconds, micros = divmod(micros, 1_000_000)
    data = packet[:snaplen]
    return _RECORD_HEADER.pack(seconds & 0xFFFFFFFF, micros, len(data), len(packet)) + data


class PcapWriter:
    """Appends packets to a new pcap file at ``path`` (mode 0600, owned by the caller).

    Driven by :meth:`write` (one packet and its wall-clock time) or :meth:`write_packets`
    (a batch, flushed at once), :meth:`flush` and :meth:`close`.  Raises
    :class:`~pvpn.errors.ConfigError` if the file can't be created (FileExistsError if
    ``exclusive`` and it exists: an existing file is otherwise replaced); later write errors
    and the size bound stop the capture (``on_stop(reason)``, once) instead of raising.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
                 on_stop: Callable[[str], None] | None = None, exclusive: bool = False
                 ) -> None:
        if max_bytes < GLOBAL_HEADER_SIZE:
            raise ConfigError(f"the pcap size limit {max_bytes} is too small for even the "
                              f"file header ({GLOBAL_HEADER_SIZE} bytes)")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._on_stop = on_stop
        self._buffer = bytearray()
        self._last_flush: float | None = None
        self.size = 0  # bytes written or buffered, header included
        self.packets = 0
        self.stopped: str | None = None  # why it writes no more
        try:
            # O_NOFOLLOW: never write through a symlink someone planted where the file goes.
            # exclusive: a new file or an error (FileExistsError), never an old one emptied.
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
        except FileExistsError:
            raise
        except OSError as exc:
            raise ConfigError(f"cannot create the pcap file {self.path}: "
                              f"{exc.strerror or exc}") from None
        try:
            os.fchmod(self._fd, 0o600)  # also when an older file was there
            header = encode_global_header()
            os.write(self._fd, header)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"cannot write the pcap file {self.path}: "
                              f"{exc.strerror or exc}") from None
        self.size = len(header)

    def write(self, packet: bytes, timestamp: float) -> None:
        """Add one packet seen at ``timestamp`` (seconds since the epoch)."""
        if self.stopped is not None or self._fd is None:
            return
        record = encode_record(packet, timestamp)
        if self.size + len(record) > self.max_bytes:
            self.flush()
            self._stop(f"reached its size limit of {self.max_bytes} bytes; later packets "
                       "are not written")
            return
        self._buffer += record
        self.size += len(record)
        self.packets += 1
        if self._last_flush is None:
            self._last_flush = timestamp
        if len(self._buffer) >= FLUSH_BYTES or timestamp - self._last_flush >= FLUSH_INTERVAL:
            self.flush(timestamp)

    def write_packets(self, packets: Iterable[bytes], timestamp: float) -> None:
        """Add a batch seen at ``timestamp`` and flush it."""
        for packet in packets:
            self.write(packet, timestamp)
        self.flush(timestamp)

    def flush(self, timestamp: float | None = None) -> None:
        """Write the buffered records (whole records only)."""
        if timestamp is not None:
            self._last_flush = timestamp
        if not self._buffer or self._fd is None:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self._stop(f"write failed: {exc.strerror or exc}")

    def stop(self, reason: str) -> None:
        """Write no more (what is buffered is dropped); ``on_stop`` is told, once."""
        self._stop(reason)

    def _stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            self._buffer.clear()
            if self._on_stop is not None:
                self._on_stop(f"pcap {self.path} {reason}")

    def close(self) -> None:
        if self._fd is None:
            return
        self.flush()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionCaptures:
    """The server's captures: one pcap file per session, ``<directory>/<session hex>.pcap``.

    Driven by :meth:`write` (a CapturePacket command), :meth:`flush` (after each batch of
    commands), :meth:`close` (a SessionClosed command) and :meth:`close_all`.  At most
    :attr:`MAX_OPEN` files are open at once; a session beyond that, or whose file can't be
    created, is not captured, and ``log`` says so once per session.

    The directory as a whole is bounded too, so a user reconnecting endlessly can fill
    neither the disk nor the directory: at most ``max_files`` capture files and
    ``max_total_bytes`` bytes, those of earlier runs included. To make room, the capture
    closed longest ago is deleted first (a ring of files, as ``tcpdump -W`` keeps); when only
    open captures are left, the one being written stops.
    """

    MAX_OPEN = 256
    _NAME = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?\.pcap$")

    def __init__(self, directory: Path, max_bytes: int, log: Callable[[Record], None],
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                 max_files: int = DEFAULT_MAX_FILES) -> None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the capture directory {directory} ([server] "
                              f"pcap_dir): {exc.strerror or exc}") from None
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.max_files = max_files
        self._log = log
        self.writers: dict[bytes, PcapWriter] = {}
        self._skipped: set[bytes] = set()
        self._dirty: set[PcapWriter] = set()
        # Closed capture files, closed (or last written) longest ago first, and their sizes.
        self._closed: OrderedDict[Path, int] = OrderedDict()
        self.total = 0  # bytes of every capture file, open or closed
        self._scan()

    def _scan(self) -> None:
        """Account for the captures earlier runs left (regular files named like ours)."""
        found: list[tuple[float, Path, int]] = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            if not self._NAME.match(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found.append((info.st_mtime, Path(entry.path), info.st_size))
        for _, path, size in sorted(found):
            self._closed[path] = size
            self.total += size

    def _delete_oldest(self, reason: str) -> bool:
        """Delete the capture closed longest ago; False if there is none."""
        if not self._closed:
            return False
        path, size = self._closed.popitem(last=False)
        self.total -= size
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            reason = f"{reason}; but it could not be deleted: {exc.strerror or exc}"
        self._log(Record(CAPTURE_DELETED, reason=reason, bytes=size,
                         extra={"path": str(path)}))
        return True

    def _over_total(self) -> bool:
        while self.total > self.max_total_bytes:
            if not self._delete_oldest(f"the capture directory keeps at most "
                                       f"{self.max_total_bytes} bytes (pcap_max_total_bytes)"):
                return True
        return False

    MAX_NAMES = 100  # <session>.pcap, then <session>-2.pcap ... for a session id used again

    def path_for(self, session: bytes, attempt: int = 1) -> Path:
        suffix = "" if attempt == 1 else f"-{attempt}"
        return self.directory / f"{session.hex()}{suffix}.pcap"

    def write(self, session: bytes, packet: bytes, timestamp: float) -> None:
        writer = self.writers.get(session)
        if writer is None:
            writer = self._open(session)
            if writer is None:
                return
        before = writer.size
        writer.write(packet, timestamp)
        if writer.size != before:
            self.total += writer.size - before
            if self.total > self.max_total_bytes and self._over_total():
                writer.stop(f"stopped: the open captures fill the capture directory's "
                            f"{self.max_total_bytes} bytes (pcap_max_total_bytes)")
        self._dirty.add(writer)

    def _open(self, session: bytes) -> PcapWriter | None:
        if session in self._skipped:
            return None
        sid = session.hex()
        if len(self.writers) >= self.MAX_OPEN:
            self._skipped.add(session)
            self._log(Record(CAPTURE_SKIPPED, session=sid,
                             reason=f"{self.MAX_OPEN} captures are open already"))
            return None
        while len(self._closed) + len(self.writers) >= self.max_files:
            if not self._delete_oldest(f"the capture directory keeps at most "
                                       f"{self.max_files} files (pcap_max_files)"):
                self._skipped.add(session)
                self._log(Record(CAPTURE_SKIPPED, session=sid,
                                 reason=f"{self.max_files} captures are open (pcap_max_files)"))
                return None
        if self._over_total() or self.total + GLOBAL_HEADER_SIZE > self.max_total_bytes:
            self._skipped.add(session)
            self._log(Record(CAPTURE_SKIPPED, session=sid, reason="the open captures fill "
                             f"the capture directory's {self.max_total_bytes} bytes"))
            return None
        def stopped(reason: str) -> None:
            self._log(Record(CAPTURE_STOPPED, session=sid, reason=reason))

        # A session id seen before (a server restarted under a resumed chain, an id proposed
        # again) gets a file of its own: an earlier capture is never overwritten.
        writer: PcapWriter | None = None
        for attempt in range(1, self.MAX_NAMES + 1):
            try:
                writer = PcapWriter(self.path_for(session, attempt), self.max_bytes,
                                    on_stop=stopped, exclusive=True)
                break
            except FileExistsError:
                continue
            except ConfigError as exc:
                self._skipped.add(session)
                self._log(Record(CAPTURE_FAILED, session=sid, reason=str(exc)))
                return None
        if writer is None:
            self._skipped.add(session)
            self._log(Record(CAPTURE_FAILED, session=sid,
                             reason=f"{self.MAX_NAMES} capture files of this session exist"))
            return None
        self.writers[session] = writer
        self.total += writer.size
        self._closed.pop(writer.path, None)  # an old file of that name was replaced
        self._log(Record(CAPTURE_OPENED, session=sid, extra={"path": str(writer.path)}))
        return writer

    def flush(self) -> None:
        for writer in self._dirty:
            writer.flush()
        self._dirty.clear()

    def close(self, session: bytes) -> None:
        self._skipped.discard(session)
        writer = self.writers.pop(session, None)
        if writer is not None:
            self._dirty.discard(writer)
            writer.close()
            try:
                size = writer.path.stat().st_size  # less than counted if it stopped early
            except OSError:
                size = 0
            self.total += size - writer.size
            if size:
                self._closed[writer.path] = size
            self._log(Record(CAPTURE_CLOSED, session=session.hex(), bytes=writer.size,
                             extra={"path": str(writer.path), "packets": writer.packets}))

    def close_all(self) -> None:
        for session in list(self.writers):
            self.close(session)
        self._skipped.clear()
