"""The lab's local users (alice, bob, carol) and the registry of who created them.

Several labs may run at once and share the users.  ``/run/pvpn-lab/users.json``, guarded by
an flock on that same file, lists the users a lab *created* and the labs still using each;
``down`` deletes a user only when a lab created it and no other lab still uses it.  A user
that existed before any lab never enters the registry and is never deleted.  The GECOS field
of a lab-created user carries :data:`GECOS_MARK`, so a registry lost with /run (a reboot)
still recognises the lab's users.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pvpn.cli.lab.commands import run
from pvpn.cli.lab.errors import LabError
from pvpn.cli.lab.topology import LAB_ROOT

REGISTRY = LAB_ROOT / "users.json"
GECOS_MARK = "pvpn lab user"
# Bounds the retries when a concurrent `down` removes the registry under our feet.
_LOCK_TRIES = 20


@dataclass(frozen=True)
class LabUser:
    name: str
    uid: int
    gid: int
    home: Path


def lookup(name: str) -> LabUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return LabUser(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


def require_user(name: str) -> LabUser:
    user = lookup(name)
    if user is None:
        raise LabError(f"no local user {name!r} (is the lab up?)")
    return user


@contextlib.contextmanager
def _locked_registry() -> Iterator[int]:
    """Hold the flock on the registry file; yields its file descriptor.

    The file may be unlinked by a ``down`` that found the registry empty while we waited
    for the lock; we then hold a lock on a dead inode, so check and retry.
    """
    for _ in range(_LOCK_TRIES):
        LAB_ROOT.mkdir(mode=0o755, exist_ok=True)
        fd = os.open(REGISTRY, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(REGISTRY)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(fd).st_ino:
                try:
                    yield fd
                finally:
                    os.close(fd)
                    fd = -1
                return
        finally:
            if fd >= 0:
                os.close(fd)
    raise LabError(f"could not lock {REGISTRY}: it keeps being replaced")


def _read(fd: int) -> dict[str, list[str]]:
    """The registry: lab-created user -> labs using it."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
        users = data["users"]
        return {str(user): [str(lab) for lab in labs] for user, labs in users.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        # A torn write (crash mid-update): lab-created users are still recognised by
        # their GECOS mark, so starting afresh loses nothing that matters.
        print(f"pvpn lab: warning: {REGISTRY} is unreadable; starting it afresh", file=sys.stderr)
        return {}


def _write(fd: int, registry: dict[str, list[str]]) -> None:
    data = json.dumps({"users": registry}, indent=2, sort_keys=True).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def is_lab_created(name: str) -> bool:
    """True if the user carries the GECOS mark of a user that a lab created."""
    try:
        return pwd.getpwnam(name).pw_gecos == GECOS_MARK
    except KeyError:
        return False


def acquire(lab: str, names: tuple[str, ...]) -> dict[str, LabUser]:
    """Make sure the users exist and record that ``lab`` uses them."""
    users: dict[str, LabUser] = {}
    with _locked_registry() as fd:
        registry = _read(fd)
        for name in names:
            if lookup(name) is None:
                run(["useradd", "--create-home", "--shell", "/bin/bash",
                     "--comment", GECOS_MARK, name])
                registry.setdefault(name, [])
            elif name not in registry and is_lab_created(name):
                registry[name] = []  # created by a lab whose registry was lost
            if name in registry and lab not in registry[name]:
                registry[name].append(lab)
            # Record after each user, so a failure on the next still leaves this one known.
            _write(fd, registry)
            users[name] = require_user(name)
    return users


def release(lab: str) -> list[str]:
    """Forget that ``lab`` uses its users; delete lab-created users no lab uses any more.

    Returns warnings (a user that could not be deleted stays in the registry with no lab,
    and the next ``down`` of any lab tries again).  Never raises for a missing piece.
    """
    warnings: list[str] = []
    with _locked_registry() as fd:
        registry = _read(fd)
        for name in sorted(registry):
            labs = [other for other in registry[name] if other != lab]
            registry[name] = labs
            if labs:
                continue
            if lookup(name) is None:
                del registry[name]
                continue
            result = run(["userdel", "--remove", name], check=False)
            # userdel exits 12 when only the home or mail spool could not be removed; the
            # user itself is gone then.
            if lookup(name) is None:
                del registry[name]
            else:
                stderr = result.stderr.decode(errors="replace").strip()
                warnings.append(f"could not delete user {name}: {stderr}")
        _write(fd, registry)
        if not registry:
            _remove_empty_root()
    return warnings


def _remove_empty_root() -> None:
    """Remove the registry and /run/pvpn-lab when no lab and no lab user is left.

    Called with the registry lock held; a waiter on the old file sees its inode is gone and
    retries (see :func:`_locked_registry`).
    """
    try:
        others = [p for p in LAB_ROOT.iterdir() if p != REGISTRY]
    except FileNotFoundError:
        return
    if others:
        return
    with contextlib.suppress(FileNotFoundError):
        REGISTRY.unlink()
    with contextlib.suppress(OSError):
        LAB_ROOT.rmdir()


def registered(lab: str) -> list[str]:
    """The lab-created users that ``lab`` uses (for tests and ``info``)."""
    if not REGISTRY.exists():
        return []
    with _locked_registry() as fd:
        registry = _read(fd)
    return sorted(name for name, labs in registry.items() if lab in labs)


def create_lab_dir(path: Path) -> bool:
    """Create a lab's state directory (0755) under the registry lock; False if it exists.

    Holding the lock keeps a concurrent ``down`` from removing /run/pvpn-lab between our
    mkdir of the root and that of the lab's directory.
    """
    with _locked_registry():
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            return False
        os.chmod(path, 0o755)
    return True


def remove_root_if_unused() -> None:
    """After a ``down``: drop /run/pvpn-lab if nothing is left in it."""
    if not LAB_ROOT.exists():
        return
    with _locked_registry() as fd:
        if not _read(fd):
            _remove_empty_root()
