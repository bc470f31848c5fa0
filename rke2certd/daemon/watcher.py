"""Watches the staging dir with watchdog (inotify) and turns events into set states.

The observer thread only records what happened and wakes the main loop; all decisions are made
on the main loop by the pure rules of plan/ready_sets.py.

How an entry arrived comes from inotify itself: the observer reports "full" events, so a
directory renamed in from outside the staging dir is a move (IN_MOVED_TO) and a directory made in
place is a creation (IN_CREATE), whatever it holds by the time the event is handled. (Guessing
from its content misreads `mkdir d && cp … d/` as a rename: the files are there before the
event is seen, and such a half-written set would be applied after a pause of the writer.)
A `mv` from another filesystem is a copy, so it counts as made in place and needs a READY marker.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.events import DirMovedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from rke2certd.commands.apply_staged import refusal
from rke2certd.log import log
from rke2certd.plan.ready_sets import READY_MARKER, Arrival, SetState

# watchdog (7.x) warns on stderr, outside our logs and as several raw lines in the journal, each
# time a watched directory moves inside the watched tree, as every set does when it is filed
# away: the watch is kept and only re-keyed, there is nothing to act on.
warnings.filterwarnings(
    "ignore",
    message=r"Callback with id .* already exists",
    category=RuntimeWarning,
    module=r"watchdog\.",
)


def _newest_mtime(path: Path, limit: int = 1000) -> float:
    """The newest mtime in a tree, looking at `limit` entries at most (a hostile set may be
    thousands of dirs deep: no recursion, and a bound on the work done at start)."""
    newest, todo, seen = path.lstat().st_mtime, [str(path)], 0
    while todo and seen < limit:
        try:
            entries = list(os.scandir(todo.pop()))
        except OSError:
            continue
        for e in entries:
            seen += 1
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                newest = max(newest, st.st_mtime)
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
    return newest


class StagingWatcher(FileSystemEventHandler):
    """Keeps one SetState per top-level entry of the staging dir."""

    def __init__(self, staging: Path, wake: Callable[[], None]) -> None:
        self.staging = staging
        self._wake = wake
        self._lock = threading.Lock()
        self._states: dict[str, SetState] = {}
        self._observer: InotifyObserver | None = None
        # Why the dir is refused now, when it became unsafe after start (see states()).
        self.refused: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Record what is there now (sets staged while the daemon was down), then watch."""
        now_mono, now_wall = time.monotonic(), time.time()
        with self._lock:
            for entry in sorted(os.listdir(self.staging)):
                if entry.startswith("."):
                    continue
                try:
                    age = max(0.0, now_wall - _newest_mtime(self.staging / entry))
                except OSError:
                    age = 0.0
                self._states[entry] = SetState(entry, Arrival.STARTUP, now_mono - age, False)
        # full events: a move in from outside arrives as a move with an empty source, not as
        # a creation (see the module docstring)
        observer = InotifyObserver(generate_full_events=True)
        observer.schedule(self, str(self.staging), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # -- events (observer thread) ---------------------------------------------------------

    def _top(self, path: str | bytes) -> tuple[str, bool] | None:
        """(top-level name, is the entry itself) for a path under the staging dir."""
        text = os.fsdecode(path)
        try:
            rel = Path(text).relative_to(self.staging)
        except ValueError:
            return None
        parts = rel.parts
        if not parts or parts[0].startswith("."):
            return None
        return parts[0], len(parts) == 1

    def on_any_event(self, event: FileSystemEvent) -> None:
        now = time.monotonic()
        with self._lock:
            if isinstance(event, DirMovedEvent | FileMovedEvent):
                # Either side may be empty: moved in from, or out to, a place not watched.
                src = self._top(event.src_path) if event.src_path else None
                if src and src[1]:
                    self._states.pop(src[0], None)  # renamed away (e.g. filed by us)
                elif src:
                    self._touch(src[0], now)
                dest = self._top(event.dest_path) if event.dest_path else None
                if dest and dest[1]:
                    self._states[dest[0]] = SetState(dest[0], Arrival.RENAMED, now, False)
                elif dest:
                    self._touch(dest[0], now)
            else:
                top = self._top(event.src_path)
                if top is None:
                    if os.fsdecode(event.src_path) == str(self.staging):
                        self._wake()  # e.g. its mode changed: states() checks it again
                    return
                name, itself = top
                if event.event_type == "deleted" and itself:
                    self._states.pop(name, None)
                elif itself and event.event_type == "created":
                    # made in place (a move in is a moved event): may still be being written
                    self._states[name] = SetState(name, Arrival.CREATED, now, False)
                elif event.event_type in ("opened", "closed_no_write"):
                    return  # reading is not changing (we read the set ourselves)
                else:
                    self._touch(name, now)
        self._wake()

    def _touch(self, name: str, now: float) -> None:
        old = self._states.get(name)
        if old is None and not os.path.lexists(self.staging / name):
            # late events of a set already filed away (e.g. the writes of its result files
            # before the move): do not bring it back as a phantom
            return
        arrival = old.arrival if old else Arrival.CREATED
        self._states[name] = SetState(name, arrival, now, False)

    # -- main loop ------------------------------------------------------------------------

    def states(self) -> list[SetState]:
        """Current states, with the READY marker looked up now; none while the staging dir is
        unsafe (its owner or mode changed since the daemon checked it at start)."""
        error = refusal(self.staging)
        if error is not None:
            if self.refused is None:
                log.error("staging_refused", cert_path=str(self.staging), reason=str(error))
            self.refused = str(error)
            return []
        if self.refused is not None:
            self.refused = None
            log.info("staging_watched", cert_path=str(self.staging), reason="safe again")
        with self._lock:
            current = list(self._states.values())
        out = []
        for s in current:
            marker = self.staging / s.name / READY_MARKER
            ready = marker.is_file() and not marker.is_symlink()
            out.append(SetState(s.name, s.arrival, s.last_change, ready))
        return out

    def forget(self, name: str) -> None:
        with self._lock:
            self._states.pop(name, None)
