"""Watches the staging dir with watchdog (inotify) and turns events into set states.

The observer thread only records what happened and wakes the main loop; all decisions are made
on the main loop by the pure rules of plan/staging.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from rke2certd.plan.staging import READY_MARKER, Arrival, SetState


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


class StagingWatcher(FileSystemEventHandler):
    """Keeps one SetState per top-level entry of the staging dir."""

    def __init__(self, staging: Path, wake: Callable[[], None]) -> None:
        self.staging = staging
        self._wake = wake
        self._lock = threading.Lock()
        self._states: dict[str, SetState] = {}
        self._observer: Observer | None = None  # type: ignore[valid-type]

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
        observer = Observer()
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
                src = self._top(event.src_path)
                if src and src[1]:
                    self._states.pop(src[0], None)  # renamed away (e.g. filed by us)
                dest = self._top(event.dest_path)
                if dest and dest[1]:
                    self._states[dest[0]] = SetState(dest[0], Arrival.RENAMED, now, False)
                elif dest:
                    self._touch(dest[0], now)
            else:
                top = self._top(event.src_path)
                if top is None:
                    return
                name, itself = top
                if event.event_type == "deleted" and itself:
                    self._states.pop(name, None)
                elif itself and event.event_type == "created":
                    self._states[name] = SetState(name, self._arrival(event, name), now, False)
                else:
                    self._touch(name, now)
        self._wake()

    def _arrival(self, event: FileSystemEvent, name: str) -> Arrival:
        # watchdog reports a directory moved in from outside the watch as "created"; unlike a
        # mkdir, it already has content when the event arrives.
        if isinstance(event, DirCreatedEvent):
            try:
                with os.scandir(self.staging / name) as it:
                    return Arrival.RENAMED if any(True for _ in it) else Arrival.CREATED
            except OSError:
                return Arrival.CREATED
        return Arrival.CREATED

    def _touch(self, name: str, now: float) -> None:
        old = self._states.get(name)
        arrival = old.arrival if old else Arrival.CREATED
        self._states[name] = SetState(name, arrival, now, False)

    # -- main loop ------------------------------------------------------------------------

    def states(self) -> list[SetState]:
        """Current states, with the READY marker looked up now."""
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
