"""Read a staged CA dir (server layout: DIR/tls/server-ca.crt …) for `rotate-ca`.

Nothing is followed: every directory below DIR and every file is opened relative to its parent
with O_NOFOLLOW, so a link anywhere inside the staged set is seen and refused, never read. A
file over the size limit, a FIFO or a device is not read at all. DIR itself may be a link (the
operator named it).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from rke2certd.errors import StorageError
from rke2certd.plan.staged_set import ROTATABLE, SIZE_LIMIT, StagedFile, StagedSet

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted in the dir must not hang the command.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _LinkedDir(Exception):
    """A directory on the way to a staged file is a symlink."""


def read_staged_dir(path: Path, limit: int = SIZE_LIMIT, label: str | None = None) -> StagedSet:
    """The 11 rotatable files of the staged dir `path`, as the input of validate_staged_set;
    messages name the set `label` (default: `path`)."""
    root = path.resolve()
    if not root.is_dir():
        raise StorageError(
            f"{path} is not a directory; --path takes the dir that holds tls/ (the server layout)"
        )
    files = {rel: _read_one(root, rel, limit) for rel in ROTATABLE}
    return StagedSet(files, label or str(path))


def _read_one(root: Path, rel: str, limit: int) -> StagedFile:
    *parents, name = rel.split("/")
    try:
        dir_fd = _open_dirs(root, parents)
    except _LinkedDir:
        return StagedFile(rel, None, exists=True, is_symlink=True, is_regular=False)
    if dir_fd is None:
        return StagedFile.missing(rel)
    try:
        return _read_file(dir_fd, rel, name, limit, root)
    finally:
        os.close(dir_fd)


def _open_dirs(root: Path, parents: list[str]) -> int | None:
    """An fd of root/parents…, walking without following links; None when one is missing."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    where = root
    for part in parents:
        where = where / part
        try:
            child = _open_subdir(fd, part, where)
        finally:
            os.close(fd)
        if child is None:
            return None
        fd = child
    return fd


def _open_subdir(fd: int, part: str, where: Path) -> int | None:
    try:
        st = os.lstat(part, dir_fd=fd)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _LinkedDir(part)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{where} is not a directory; the staged set needs the server layout")
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link between lstat and open
            raise _LinkedDir(part) from exc
        raise StorageError(f"cannot read {where}: {exc.strerror}") from exc


def _read_file(dir_fd: int, rel: str, name: str, limit: int, root: Path) -> StagedFile:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return StagedFile.missing(rel)
    except OSError as exc:
        raise StorageError(f"cannot read {root / rel}: {exc.strerror}") from exc
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return StagedFile(rel, None, is_symlink=True, is_regular=False, mode=mode)
    if not stat.S_ISREG(st.st_mode):
        return StagedFile(rel, None, is_regular=False, mode=mode, size=st.st_size)
    if st.st_size > limit:
        return StagedFile(rel, None, mode=mode, size=st.st_size)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return StagedFile(rel, None, is_symlink=True, is_regular=False, mode=mode)
        raise StorageError(f"cannot read {root / rel}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)  # the file we opened, not the one lstat saw
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            return StagedFile(rel, None, is_regular=False, mode=mode, size=st.st_size)
        data = _read_at_most(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew after fstat
        return StagedFile(rel, None, mode=mode, size=len(data))
    return StagedFile(rel, data or None, mode=mode, size=len(data))


def _read_at_most(fd: int, count: int) -> bytes:
    chunks: list[bytes] = []
    left = count
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def staged_file_names(path: Path, limit: int = 256) -> list[str]:
    """Relative paths of the regular files in the staged dir (links not followed), looking at
    `limit` entries at most: what the layout check (plan/staged_layout.py) needs."""
    out: list[str] = []
    seen = 0
    for root, dirs, files in os.walk(path.resolve()):
        seen += len(dirs) + len(files)
        rel = Path(root).relative_to(path.resolve())
        out += [
            (rel / f).as_posix()
            for f in files
            if not os.path.islink(os.path.join(root, f)) and os.path.isfile(os.path.join(root, f))
        ]
        if seen > limit:
            break
    return sorted(out)


def current_files(tls_dir: Path) -> dict[str, bytes]:
    """The current bytes of the rotatable files under a live `server/tls` (missing: left out).

    Keys are ROTATABLE names ("tls/server-ca.crt" …), the form validate_staged_set takes.
    """
    out: dict[str, bytes] = {}
    for rel in ROTATABLE:
        path = tls_dir / rel.removeprefix("tls/")
        try:
            out[rel] = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    return out
