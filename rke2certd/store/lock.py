"""The node lock: one exclusive fcntl lock held by every command that writes.

A second writer waits (bounded) instead of interleaving; the kernel drops the lock when the
holder dies, so a kill -9 never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rke2certd.errors import LockTimeout, StorageError
from rke2certd.store.atomic import ensure_dir

LOCK_NAME = "rke2certd.lock"


@contextmanager
def node_lock(data_dir: Path, timeout: float = 120.0, poll: float = 0.05) -> Iterator[None]:
    """Hold the node's exclusive lock for the duration of the block."""
    ensure_dir(data_dir, 0o755)
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open the node lock {path}: {exc.strerror}") from exc
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


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
