"""Take a private copy of a staged set: the only bytes the daemon then checks and applies.

A set in the watched dir may have been made by someone other than root, and whoever held a
handle on it before it was renamed into the 0700 staging dir can still change it through that
handle. So the set is walked once, every directory and file opened relative to its parent with
O_NOFOLLOW (nothing is followed, a FIFO never blocks), and each entry is checked on the
object opened (fstat), not on a path:

  - owned by the expected owner (root: the daemon's euid);
  - not writable by group or others (a directory: anyone could add or swap files; a file:
    anyone could change it);
  - a directory or a regular file: a symlink, FIFO, socket or device is refused, not read;
  - bounded: a file over SIZE_LIMIT is not read, and the walk stops at MAX_ENTRIES entries,
    MAX_DEPTH levels or MAX_COPY bytes.

What passes is copied into a fresh dir under the daemon's private work dir; later changes to
the original cannot reach the copy. The copy is scratch (a crash discards it and the set is
taken again from the staging dir), so it is written without the fsyncs of files/atomic.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from rke2certd.plan.staged_set import SIZE_LIMIT

MAX_ENTRIES = 256  # a set holds 11 files and a few dirs
MAX_DEPTH = 8
MAX_COPY = 16 << 20  # bytes copied at most (the files that matter are a few KiB each)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class SetGone(Exception):
    """The set was removed or renamed away before it could be opened."""


def shown(name: str) -> str:
    """A name as text that can always be printed, logged and encoded: bytes that are not UTF-8
    become \\xNN, control characters \\uNNNN (a name is whatever bytes the writer chose)."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


@dataclass
class Snapshot:
    """What the walk found. `problems` empty: `copy` holds the whole set as it was read."""

    copy: Path
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # relative paths of the regular files
    seen_bytes: int = 0  # sizes of every regular file found (read or not)
    complete: bool = True  # False when a bound stopped the walk (sizes then unknown)


@dataclass
class _Walk:
    snap: Snapshot
    owner: int
    label: str
    entries: int = 0
    copied: int = 0

    def problem(self, rel: str, text: str) -> None:
        where = f"{self.label}/{shown(rel)}" if rel else self.label
        self.snap.problems.append(f"{where} {text}")


def snapshot(
    parent: Path, name: str, dest: Path, *, owner: int | None = None, label: str = ""
) -> Snapshot:
    """Walk `parent/name` (a directory) and copy it into `dest` (created, 0700).

    `owner` is the uid every entry must have (default: our euid). Raises SetGone when the set
    is not there any more; every other finding is a problem of the snapshot.
    """
    walk = _Walk(Snapshot(dest), os.geteuid() if owner is None else owner, label or shown(name))
    pfd = os.open(parent, _DIR)
    try:
        try:
            fd = os.open(name, _DIR, dir_fd=pfd)
        except FileNotFoundError as exc:
            raise SetGone(str(exc)) from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                walk.problem("", "is not a directory (symlinks and plain files are refused)")
                return walk.snap
            raise
    finally:
        os.close(pfd)
    try:
        os.mkdir(dest, 0o700)
        _check_entry(walk, "", os.fstat(fd), is_dir=True)
        _walk_dir(walk, fd, "", dest, 0)
    finally:
        os.close(fd)
    return walk.snap


def _check_entry(walk: _Walk, rel: str, st: os.stat_result, *, is_dir: bool) -> None:
    if st.st_uid != walk.owner:
        walk.problem(
            rel,
            f"is owned by uid {st.st_uid}, not by uid {walk.owner}: everything in a staged set "
            "must belong to root (`chown -R root:root` it), so that no one else can change it",
        )
    if st.st_mode & 0o022:
        what = "directory" if is_dir else "file"
        walk.problem(
            rel,
            f"is a {what} writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "run `chmod -R go-w` on the set and stage it again",
        )


def _walk_dir(walk: _Walk, fd: int, rel: str, dest: Path, depth: int) -> None:
    if depth >= MAX_DEPTH:
        walk.problem(rel, f"is nested more than {MAX_DEPTH} levels deep; a set is tls/ and etcd/")
        walk.snap.complete = False
        return
    for name in sorted(os.listdir(fd)):
        walk.entries += 1
        if walk.entries > MAX_ENTRIES:
            walk.problem("", f"holds more than {MAX_ENTRIES} entries; a set holds 11 files")
            walk.snap.complete = False
            return
        child = f"{rel}/{name}" if rel else name
        try:
            st = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            walk.problem(child, "disappeared while the set was read; stage the set again")
            continue
        if stat.S_ISLNK(st.st_mode):
            walk.problem(
                child,
                "is a symbolic link; copy the real file into the set (nothing in a staged set "
                "may be a link: it could pull in a file that is not in the set)",
            )
        elif stat.S_ISDIR(st.st_mode):
            _take_dir(walk, fd, name, child, dest / name, st, depth)
        elif stat.S_ISREG(st.st_mode):
            walk.snap.seen_bytes += st.st_size
            _take_file(walk, fd, name, child, dest / name, st)
        else:
            walk.problem(child, "is not a regular file (a FIFO, socket or device); stage files")
        if not walk.snap.complete:
            return


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _take_dir(
    walk: _Walk, fd: int, name: str, rel: str, dest: Path, st: os.stat_result, depth: int
) -> None:
    try:
        sub = os.open(name, _DIR, dir_fd=fd)
    except OSError as exc:
        walk.problem(rel, f"cannot be opened as a directory ({exc.strerror}); stage it again")
        return
    try:
        opened = os.fstat(sub)
        if not _same(st, opened):
            walk.problem(rel, "was replaced while the set was read; stage the set again")
            return
        _check_entry(walk, rel, opened, is_dir=True)
        if not walk.snap.problems:
            os.mkdir(dest, 0o700)
        _walk_dir(walk, sub, rel, dest, depth + 1)
    finally:
        os.close(sub)


def _take_file(walk: _Walk, fd: int, name: str, rel: str, dest: Path, st: os.stat_result) -> None:
    if st.st_size > SIZE_LIMIT:
        walk.problem(
            rel,
            f"is {st.st_size} bytes, over the {SIZE_LIMIT // 1024} KiB limit of a staged file "
            "(a CA or key file is a few KiB); it was not read",
        )
        return
    try:
        src = os.open(name, _FILE, dir_fd=fd)
    except OSError as exc:
        walk.problem(rel, f"cannot be opened ({exc.strerror}); stage the set again")
        return
    try:
        opened = os.fstat(src)
        if not stat.S_ISREG(opened.st_mode) or not _same(st, opened):
            walk.problem(rel, "was replaced while the set was read; stage the set again")
            return
        _check_entry(walk, rel, opened, is_dir=False)
        data = _read_at_most(src, SIZE_LIMIT + 1)
    finally:
        os.close(src)
    if len(data) > SIZE_LIMIT:
        walk.problem(rel, f"grew over the {SIZE_LIMIT // 1024} KiB limit while it was read")
        return
    walk.copied += len(data)
    if walk.copied > MAX_COPY:
        walk.problem("", f"holds more than {MAX_COPY >> 20} MiB of files; a set is a few KiB")
        walk.snap.complete = False
        return
    walk.snap.files.append(rel)
    if walk.snap.problems:
        return  # refused anyway: nothing more is copied
    out = os.open(dest, _NEW, stat.S_IMODE(opened.st_mode) & 0o755)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
    finally:
        os.close(out)


def _read_at_most(fd: int, count: int) -> bytes:
    chunks: list[bytes] = []
    while count > 0:
        try:
            chunk = os.read(fd, min(count, 65536))
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def remove_tree(path: Path) -> bool:
    """Remove whatever is at `path` (a tree that may hold anything, however deep); False when
    it could not be removed entirely.

    Links are removed, never followed: every step works on dir fds. No recursion and two fds
    at a time: a subdirectory of a directory being emptied is first renamed up into the top
    directory, so a hostile tree thousands of levels deep needs neither a deep stack nor
    thousands of open fds. A tree that keeps growing while it is removed (someone holds a
    handle in it) is given up after a bounded number of passes.
    """
    try:
        parent = os.open(path.parent, _DIR)
    except FileNotFoundError:
        return True
    try:
        try:
            st = os.lstat(path.name, dir_fd=parent)
        except FileNotFoundError:
            return True
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path.name, dir_fd=parent)
            return True
        top = os.open(path.name, _DIR, dir_fd=parent)
        try:
            emptied = _empty(top)
        finally:
            os.close(top)
        if emptied:
            os.rmdir(path.name, dir_fd=parent)
        return emptied
    except OSError:
        return False
    finally:
        os.close(parent)


def _empty(top: int, passes: int = 100) -> bool:
    for _ in range(passes):
        names = os.listdir(top)
        if not names:
            return True
        for name in names:
            if not stat.S_ISDIR(os.lstat(name, dir_fd=top).st_mode):
                os.unlink(name, dir_fd=top)
                continue
            sub = os.open(name, _DIR, dir_fd=top)
            try:
                for child in os.listdir(sub):
                    if stat.S_ISDIR(os.lstat(child, dir_fd=sub).st_mode):
                        os.rename(
                            child, f".rm-{secrets.token_hex(8)}", src_dir_fd=sub, dst_dir_fd=top
                        )
                    else:
                        os.unlink(child, dir_fd=sub)
            finally:
                os.close(sub)
            with contextlib.suppress(OSError):  # not empty: something was added, next pass
                os.rmdir(name, dir_fd=top)
    return not os.listdir(top)
