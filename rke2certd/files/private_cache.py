"""The cache dir: root-only space for caches, default /var/cache/rke2certd (kept across reboots:
the first RKE2 start after a boot finds the caches warm).

The unit makes it (`CacheDirectory=rke2certd`, mode 0700); a command run outside the unit
makes it 0700 when it can. `RKE2CERTD_CACHE_DIR` moves it; set empty, no cache is used.

Caches only save time: when the dir cannot be made or written, or a cache file is not one we
could have written (another owner, group/world access, a symlink), rke2certd works without it,
silently. A cache may hold the join token: files are 0600, written through files.atomic.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rke2certd.errors import StorageError
from rke2certd.files.atomic import ensure_dir, write_file

DEFAULT_CACHE_DIR = Path("/var/cache/rke2certd")
ENV = "RKE2CERTD_CACHE_DIR"
MAX_CACHE_BYTES = 1 << 20


def cache_dir() -> Path | None:
    """Where caches live; None when caching is turned off (`RKE2CERTD_CACHE_DIR=`)."""
    value = os.environ.get(ENV)
    if value is None:
        return DEFAULT_CACHE_DIR
    return Path(value) if value else None


def _ours(st: os.stat_result, too_open: int) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & too_open


def _safe_dir(d: Path) -> bool:
    """A real dir (not a symlink) of ours that nobody else can write to."""
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _ours(st, 0o022)


def read_private(path: Path) -> bytes | None:
    """The bytes of a cache file only we could have written; None when it is missing, not ours,
    group/world accessible, a symlink, in a dir others can write to, or unreadable."""
    if not _safe_dir(path.parent):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _ours(st, 0o077) or st.st_size > MAX_CACHE_BYTES:
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> bool:
    """Write a cache file, 0600, making its dir 0700 when only the dir itself is missing.
    False (and nothing said) when that cannot be done safely."""
    d = path.parent
    try:
        if not os.path.lexists(d) and os.path.isdir(d.parent):
            ensure_dir(d, 0o700)
        if not _safe_dir(d):
            return False
        write_file(path, data, 0o600)
    except (OSError, StorageError):
        return False
    return True
