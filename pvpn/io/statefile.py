"""pvpn-server's state on disk ([server] state_file): written so that a crash at any moment
leaves the last good file or the new one, never a part of one, and read back only if it is
root's alone.

:class:`StateFile` is the file: :meth:`~StateFile.write` puts the bytes in a temporary file
beside it (created 0600, exclusively, never through a symlink), fsyncs it, renames it over
the old file and fsyncs the directory; :meth:`~StateFile.read` opens it without following a
symlink and refuses one that is not a regular file, not root's, writable by anyone else, or
larger than a state file can be. The directory is made 0700 if missing; one that someone
other than root may change (or a directory above it) is a ConfigError, as OpenSSH's
StrictModes refuses such paths: whoever could change it could forge the sessions in it.

:class:`StateKeeper` decides when to save: at most every ``state_interval`` seconds while the
state changes (``version`` says when), and never more than 2 % of the time (a snapshot of a
full table takes about 0.2 s: the interval grows to 50 times what the last one took), the
writing and fsync in a thread, off the event loop; an unchanged file is only touched (its
mtime says until when the server was alive, so a restart knows how long it was away); and
once more, synchronously, on an orderly stop. Nothing is done per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable

from pvpn.errors import ConfigError, StateError
from pvpn.io.safedir import nearest_existing, unsafe_directory
from pvpn.names import NODE_STATE, NODE_STATE_REFUSED, NODE_WARNING
from pvpn.records import Record
from pvpn.state import MAX_BYTES, ServerState, decode_state, encode_state

#: The longest the keeper waits between two saves of a changing state, whatever the snapshots
#: cost (the interval adapts to what they take, up to this).
MAX_INTERVAL = 60.0
#: A snapshot may take at most this share of the event loop's time.
SHARE = 0.02


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.refused = path.with_name(f"{path.name}.refused")
        directory = path.parent
        # root's, or the uid pvpn-server runs as
        unsafe = unsafe_directory(nearest_existing(directory), (0, os.geteuid()))
        if unsafe is not None:
            raise ConfigError(f"[server] state_file {path}: {unsafe}; whoever may change it "
                              "could forge the sessions it holds: give it a directory only "
                              "root may change (/var/lib/pvpn, 0700)")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"[server] state_file {path}: cannot make its directory: "
                              f"{exc.strerror or exc}") from None
        if not directory.is_dir():
            raise ConfigError(f"[server] state_file {path}: {directory} is not a directory")

    def read(self) -> tuple[bytes, float] | None:
        """The file's bytes and its mtime (wall clock), or None if there is none.
        StateError if it may not be used (the message says why)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot open it: {exc.strerror or exc} (a symlink is never "
                             "followed)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StateError("not a regular file")
            if st.st_uid not in (0, os.geteuid()):
                raise StateError(f"owned by uid {st.st_uid}, not root")
            if st.st_mode & 0o022:
                raise StateError(f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o}):"
                                 " whoever can write it could forge sessions")
            if st.st_size > MAX_BYTES:
                raise StateError(f"{st.st_size} bytes, more than a state file holds "
                                 f"({MAX_BYTES})")
            chunks: list[bytes] = []
            size = 0
            for _ in range(MAX_BYTES // 65536 + 2):  # bounded, whatever the file does
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BYTES:
                    raise StateError(f"more than {MAX_BYTES} bytes")
            return b"".join(chunks), st.st_mtime
        except OSError as exc:
            raise StateError(f"cannot read it: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def write(self, data: bytes) -> None:
        """Replace the file by ``data``, atomically and durably: the old file stays whole
        until the new one is, on disk, in its place. StateError if it could not be written
        (the old file is then untouched and no temporary file is left)."""
        try:
            self.tmp.unlink(missing_ok=True)  # left by a write that crashed
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
            self._sync_directory()
        except OSError as exc:
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError:
                pass  # nothing more to do; the next write removes it first
            raise StateError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _sync_directory(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def touch(self) -> bool:
        """Say the server is alive (the file's mtime); False if the file is gone."""
        try:
            os.utime(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError:
            return False
        return True

    def set_aside(self) -> str:
        """Move a refused file out of the way (``<name>.refused``, replacing an earlier one),
        for root to look at; says where it went."""
        try:
            os.replace(self.path, self.refused)
        except FileNotFoundError:
            return "it is gone"
        except OSError as exc:
            return f"it could not be moved aside: {exc.strerror or exc}"
        return f"moved to {self.refused}"

    def remove(self) -> bool:
        """Remove the file (and a temporary one); False if there was none."""
        self.tmp.unlink(missing_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


#: How long a stop waits for a save under way (a disk that takes longer: see discard).
SETTLE_WAIT = 10.0


class StateKeeper:
    """Saves the server's state when due (see the module docstring) and loads it at start.

    ``snapshot(now)`` gives the state (ServerState, its ``saved_at`` filled in here from the
    wall clock), ``version()`` a number that changes whenever it does; ``log`` writes
    records; ``now`` is the event loop's clock."""

    def __init__(self, store: StateFile, snapshot: Callable[[float], ServerState],
                 version: Callable[[], int], log: Callable[[Record], None],
                 interval: float) -> None:
        self.store = store
        self._snapshot = snapshot
        self._version = version
        self._log = log
        self.interval = interval
        self._wait = interval  # grows with what a snapshot costs
        self._saved_version: int | None = None
        self._last = float("-inf")  # when it last saved or touched (loop clock)
        self._writing: asyncio.Future[None] | None = None
        self._said: tuple[str, float] = ("", float("-inf"))  # the last failure, and when
        self._done = False  # stopped: final() or discard() ran, no more saves
        self._discarded = False  # discard() is done: no file may stay
        self.saves = 0

    # -- start
    def load(self, grace: float) -> tuple[ServerState, float] | None:
        """The saved state and how long the server was away (seconds, from the wall clock:
        the file's mtime says until when the last server was alive), or None: no file, a
        refused one (logged, moved aside), or a stale one (saved longer than ``grace`` ago:
        every session in it expired; logged)."""
        path = self.store.path
        try:
            found = self.store.read()
            if found is None:
                self._log(Record(NODE_STATE, reason=f"no saved state at {path}: starting "
                                 "without sessions"))
                return None
            data, mtime = found
            state = decode_state(data)
        except StateError as exc:
            self.refuse(str(exc))
            return None
        wall = time.time()
        alive_at = min(wall, max(state.saved_at, mtime))
        downtime = max(0.0, wall - alive_at)
        if downtime > grace:
            self._log(Record(NODE_STATE_REFUSED, reason=(
                f"stale: saved {downtime:.0f} s ago, longer than resume_grace ({grace:g} s): "
                f"its {len(state.sessions)} sessions have all expired"),
                extra={"path": str(path), "sessions": len(state.sessions)}))
            return None
        return state, downtime

    def refuse(self, reason: str) -> None:
        """A state that cannot be used: say why, move it aside."""
        where = self.store.set_aside()
        self._log(Record(NODE_STATE_REFUSED, reason=f"{reason}; {where}; starting without "
                         "its sessions", extra={"path": str(self.store.path)}))

    # -- running
    def tick(self, now: float) -> None:
        """From the daemon's timer: save a changed state when due (written in a thread), or
        say the server is alive."""
        if self._done or self._writing is not None or now - self._last < self._wait:
            return
        version = self._version()
        if version == self._saved_version:
            self._last = now
            if not self.store.touch():
                self._saved_version = None  # the file is gone: write it again next time
            return
        data = self._encode(now)
        self._last = now
        if data is None:
            return
        future = asyncio.get_running_loop().run_in_executor(None, self.store.write, data)
        self._writing = future

        def written(done: asyncio.Future[None]) -> None:
            self._writing = None
            failure = done.exception() if not done.cancelled() else None
            if failure is None and self._discarded:
                # A save that outlasted the stop's wait for it (SETTLE_WAIT): its file goes
                # after all.
                with contextlib.suppress(OSError):
                    self.store.remove()
            elif failure is None:
                self._saved_version = version
                self.saves += 1
            else:
                self._failed(str(failure), now)

        future.add_done_callback(written)

    def _encode(self, now: float) -> bytes | None:
        started = time.perf_counter()
        try:
            state = self._snapshot(now)
            data = encode_state(ServerState(state.node, time.time(), state.cursor,
                                            state.sessions))
        except StateError as exc:
            self._failed(str(exc), now)
            return None
        took = time.perf_counter() - started
        self._wait = min(MAX_INTERVAL, max(self.interval, took / SHARE))
        return data

    def _failed(self, reason: str, now: float) -> None:
        said, when = self._said
        if reason != said or now - when >= 60:  # each failure once a minute, not each try
            self._said = (reason, now)
            self._log(Record(NODE_WARNING, reason=f"state not saved: {reason}",
                             extra={"path": str(self.store.path)}))

    async def _settle(self) -> None:
        """Wait for a write under way (its thread would otherwise put a file back after the
        stop removed it), and save no more."""
        self._done = True
        if self._writing is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writing), SETTLE_WAIT)
            except (asyncio.TimeoutError, StateError):
                pass

    async def final(self, now: float) -> bool:
        """The last save, on an orderly stop (after any write under way). False if it
        failed (logged)."""
        await self._settle()
        data = self._encode(now)
        if data is None:
            return False
        try:
            self.store.write(data)
        except StateError as exc:
            self._failed(str(exc), float("inf"))
            return False
        self.saves += 1
        return True

    async def discard(self) -> bool:
        """On a stop with nothing to keep: remove the file, after any write under way (a save
        that landed after the removal left a file of ended sessions behind, which made the
        parent of workers keep its rules and the next server restore those sessions).
        False if there was none."""
        await self._settle()
        self._discarded = True
        return self.store.remove()

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.store.path), "saves": self.saves}


__all__ = ["StateFile", "StateKeeper"]
