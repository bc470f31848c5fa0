"""The node lock: one exclusive fcntl lock held by every command that writes.

A second writer waits (bounded) instead of interleaving; the kernel drops the lock when the
holder dies, so a kill -9 never leaves a stale lock behind.

The lock file is truncated and gets our pid, so it must be ours: it is opened without following
a symlink (and without blocking on a FIFO), and anything but a regular file owned by us with a
single link is refused, never written through (a link planted there would make every run
truncate its target).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rke2certd.errors import LockTimeout, StorageError
from rke2certd.files.atomic import ensure_dir

LOCK_NAME = "rke2certd.lock"
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FIX = "remove it (rm) and run again; rke2certd creates a plain file there"


@contextmanager
def node_lock(data_dir: Path, timeout: float = 120.0, poll: float = 0.05) -> Iterator[None]:
    """Hold the node's exclusive lock for the duration of the block."""
    ensure_dir(data_dir, 0o755)
    path = data_dir / LOCK_NAME
    fd = _open_lock(path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    raise LockTimeout(
                        f"another rke2certd process{holder} has held {path} for more than "
                        f"{timeout:.0f}s; wait for it to finish, or stop it and run again"
                    ) from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _open_lock(path: Path) -> int:
    """An fd of the lock file, which is a regular file of ours (see the module doc)."""
    try:
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(f"the node lock {path} is a symbolic link; {_FIX}") from None
        if exc.errno == errno.EISDIR:
            raise StorageError(f"the node lock {path} is a directory; {_FIX}") from None
        raise StorageError(f"cannot open the node lock {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file (a FIFO, socket or device)"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links (another name for another file)"
    if problem is not None:
        os.close(fd)
        raise StorageError(f"the node lock {path} {problem}; {_FIX}")
    return fd


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
