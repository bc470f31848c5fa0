"""How a SQLite datastore's watch learns of a write by any process on this host: inotify on the
database's directory. SQLite cannot notify another process; every commit writes the WAL and
reads write nothing, so a write to the database, its WAL or journal is the change to wake for.
"""

from __future__ import annotations

import math
import os
import select
import struct
from pathlib import Path

SETTLE_MS = 5  # after a write wakes a watch, how long it lets the writer finish
_IN_MODIFY, _IN_MOVED_TO, _IN_ONLYDIR = 0x2, 0x80, 0x1000000
_IN_Q_OVERFLOW, _IN_IGNORED = 0x4000, 0x8000
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded


class ChangeWatch:
    """inotify on the database's directory (not recursive): wakes for a write to the database or
    its WAL/journal by any process on this host, or a file renamed over it. One per watch call
    and closed by it, so no inotify fd outlives its user."""

    def __init__(self, path: Path, interrupt: int) -> None:
        import ctypes  # only here: a CLI that never waits does not load it

        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        directory = os.fsencode(path.parent)
        if libc.inotify_add_watch(fd, directory, _IN_MODIFY | _IN_MOVED_TO | _IN_ONLYDIR) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {path.parent}: {os.strerror(err)}")
        self._names = {os.fsencode(path.name + suffix) for suffix in ("", "-wal", "-journal")}
        self._interrupt = interrupt
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._poller.register(interrupt, select.POLLIN)
        self.broken = False  # the directory went away: the caller polls instead

    def wait(self, timeout: float) -> bool:
        """Until a change, close() or `timeout` seconds; True unless it timed out."""
        ready = self._poller.poll(math.ceil(timeout * 1000))
        if any(fd == self._interrupt for fd, _ in ready):
            return True
        if not (ready and self._drain()):
            return False
        # Let the writer finish its commit (more writes, a sync): reading at its first write
        # would queue behind it for the connection lock and the GIL when it is this process
        # (the lease refresh), which costs both threads several more context switches.
        if self._poller.poll(SETTLE_MS):
            self._drain()
        return True

    def _drain(self) -> bool:
        changed = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return changed
            offset = 0
            while offset < len(buf):
                _wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(buf, offset)
                offset += _INOTIFY_EVENT.size
                name = buf[offset : offset + length].rstrip(b"\0")
                offset += length
                if mask & _IN_IGNORED:  # the directory was removed or unmounted
                    self.broken = changed = True
                elif mask & _IN_Q_OVERFLOW or name in self._names:
                    changed = True

    def close(self) -> None:
        os.close(self.fd)
