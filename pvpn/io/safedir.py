"""Whether a directory may be trusted with what root makes in it, as OpenSSH's StrictModes
(``safe_path``) decides: nobody but a trusted owner may change it, or one above it, on its
real path. pvpn-client's socket and pvpn-server's state file are made only in such a one."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Container


def unsafe_directory(directory: Path, trusted: Container[int]) -> str | None:
    """Why ``directory`` (an existing one), or one above it, may be changed by someone whose
    uid is not in ``trusted``, or None. A sticky directory (/tmp) is safe: nobody renames
    what another made in it."""
    real = directory.resolve()
    for d in (real, *real.parents):
        st = d.stat()
        if st.st_uid not in trusted:
            return f"{d} is owned by uid {st.st_uid}, not root"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{d} is writable by other users"
    return None


def nearest_existing(path: Path) -> Path:
    """``path``, or the nearest directory above it that exists (the one to check before the
    missing ones are made in it)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    return existing
