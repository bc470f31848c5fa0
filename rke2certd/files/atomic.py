"""The only place rke2certd writes files.

Single file: a temp file in the same directory, created with its final mode, written, fsynced,
renamed over the target, then the directory fsynced. A reader sees the old bytes or the new ones.

Several files that must change together (a cert and its key, a whole CA set): every new file is
first written as a fsynced temp beside its target; then an intent journal naming every
(temp, target) pair is written atomically; then the temps are renamed; then the journal is
removed. After a crash:
  - no journal: the change never committed; `recover` deletes the stray temps (old set stays);
  - journal present: every temp was complete before it was written; `recover` finishes the
    renames (new set wins).
So the set is always old or new, never a mix, once `recover` has run (every writer runs it
under the node lock before doing anything else).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rke2certd.errors import StorageError

TEMP_MARK = ".rke2certd-tmp-"
JOURNAL_NAME = ".rke2certd-journal.json"


@dataclass(frozen=True)
class FileWrite:
    """One file of a change: its final path, bytes and mode."""

    path: Path
    data: bytes
    mode: int = 0o644
    # The file's mtime (Unix ns) instead of the write's time: a file taken from RKE2's
    # bootstrap data carries its Timestamp, as RKE2 writes it (its reconcile compares them).
    mtime_ns: int | None = None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _explain(exc: OSError, path: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        why = "the disk is full; free space and run again"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied; run as root or fix the directory's owner and mode"
    elif exc.errno == errno.EROFS:
        why = "the file system is read-only"
    else:
        why = exc.strerror or str(exc)
    return StorageError(f"cannot write {path}: {why} (nothing was changed)")


def ensure_dir(path: Path, mode: int = 0o700) -> None:
    """Create a directory (and parents) with `mode`; an existing one is left as it is."""
    try:
        created: list[Path] = []
        p = path
        while not p.exists():
            created.append(p)
            p = p.parent
        for d in reversed(created):
            try:
                os.mkdir(d, mode)
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # another process made it between our check and mkdir
            os.chmod(d, mode)  # umask must not loosen it
            _fsync_dir(d.parent)
    except OSError as exc:
        raise _explain(exc, path) from exc


def _write_temp(target: Path, data: bytes, mode: int, mtime_ns: int | None = None) -> Path:
    """Write `data` to a fsynced temp file beside `target`, created with `mode` (and the
    mtime `mtime_ns`, when given; a rename keeps it)."""
    ensure_dir(target.parent)
    tmp = target.parent / f"{TEMP_MARK}{target.name}.{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not change the final mode
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _explain(exc, target) from exc
    return tmp


def write_file(path: Path, data: bytes, mode: int = 0o644, mtime_ns: int | None = None) -> None:
    """Atomically replace `path` with `data` (mode set at creation, never looser)."""
    tmp = _write_temp(path, data, mode, mtime_ns)
    try:
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _explain(exc, path) from exc


def write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write only when bytes or mode differ, so an idle run changes no byte and no mtime."""
    try:
        st = path.stat()
        if (st.st_mode & 0o7777) == mode and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _explain(exc, path) from exc
    write_file(path, data, mode)
    return True


def write_files(root: Path, files: Iterable[FileWrite], *, anywhere: bool = False) -> list[Path]:
    """Apply several file writes as one change: after a crash, all or none (see module doc).

    `root` holds the journal; every file must be under it, unless `anywhere` (config files in
    /etc, which may be read-only but for themselves, journaled in the node's data dir: its
    `recover` finishes them). Files whose bytes and mode are already right are skipped.
    Returns the paths that changed.
    """
    wanted: list[FileWrite] = []
    for fw in files:
        try:
            if not anywhere:
                fw.path.relative_to(root)
        except ValueError as exc:
            raise StorageError(f"{fw.path} is outside {root}") from exc
        try:
            st = fw.path.stat()
            if (st.st_mode & 0o7777) == fw.mode and fw.path.read_bytes() == fw.data:
                continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _explain(exc, fw.path) from exc
        wanted.append(fw)
    if not wanted:
        return []
    if len(wanted) == 1:
        write_file(wanted[0].path, wanted[0].data, wanted[0].mode, wanted[0].mtime_ns)
        return [wanted[0].path]

    temps: list[tuple[Path, Path]] = []
    try:
        for fw in wanted:
            temps.append((_write_temp(fw.path, fw.data, fw.mode, fw.mtime_ns), fw.path))
    except StorageError:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    journal = root / JOURNAL_NAME
    entries = [{"temp": str(t), "target": str(p)} for t, p in temps]
    try:
        write_file(journal, json.dumps(entries).encode(), 0o600)
    except StorageError:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    _finish(journal, entries)
    return [p for _, p in temps]


def _finish(journal: Path, entries: list[dict[str, str]]) -> None:
    dirs: set[Path] = set()
    for entry in entries:
        tmp, target = Path(entry["temp"]), Path(entry["target"])
        if tmp.exists():
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise _explain(exc, target) from exc
        dirs.add(target.parent)
    for d in dirs:
        _fsync_dir(d)
    journal.unlink()
    _fsync_dir(journal.parent)


def recover(root: Path, extra_dirs: Iterable[Path] = ()) -> list[str]:
    """Finish or undo a multi-file change that a crash interrupted. Returns what it did.

    Must run under the node lock, before any other write.
    """
    done: list[str] = []
    journal = root / JOURNAL_NAME
    if journal.exists():
        try:
            entries = json.loads(journal.read_bytes())
        except (OSError, ValueError):
            # The journal is written atomically, so a torn one cannot exist; an unreadable one
            # means someone edited it. Roll back: temps are removed below.
            entries = []
        if entries:
            _finish(journal, entries)
            done.extend(f"completed interrupted write of {e['target']}" for e in entries)
        else:
            journal.unlink()
    # Only the named dirs, not a recursive walk: a real data dir holds container images.
    for d in sorted({root, *extra_dirs}):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(TEMP_MARK):
                with contextlib.suppress(OSError):
                    p.unlink()
                done.append(f"removed unfinished temp file {p}")
    return done


def remove_file(path: Path) -> bool:
    """Remove a file durably; False when it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _explain(exc, path) from exc
    _fsync_dir(path.parent)
    return True


def read_optional(path: Path) -> bytes | None:
    """Bytes of `path`, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def move(src: Path, dest: Path) -> None:
    """Rename a file or directory within one file system, durably (both dirs fsynced)."""
    try:
        os.rename(src, dest)
        _fsync_dir(dest.parent)
        if src.parent != dest.parent:
            _fsync_dir(src.parent)
    except OSError as exc:
        raise _explain(exc, dest) from exc


def create_file(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create `path` with `data` unless it exists (False then; the existing file is kept). The
    file appears whole or not at all, and of two processes creating it at once one wins."""
    tmp = _write_temp(path, data, mode)
    try:
        os.link(tmp, path)
        _fsync_dir(path.parent)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise _explain(exc, path) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
