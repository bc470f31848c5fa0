"""A thread that follows RKE2's bootstrap key and wakes the main loop when it changes.

The bootstrap key holds the cluster's CA set. It changes when a rotation is saved: by this
node's daemon (a staged set), by another server, or by upstream's `rke2 certificate rotate-ca`,
which writes the key directly. The main loop then runs the same renew as for its own staged
set: it takes the new CA files (datastore wins, files stamped with their Timestamps), and a CA
generation that changed on disk starts (or joins) the same ordered rollout (rollout/create.py
`after_renew`). The thread decides nothing and writes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from rke2certd.datastore.base import Datastore, WatchCompacted
from rke2certd.datastore.codec import BOOTSTRAP_PREFIX
from rke2certd.errors import Rke2certdError
from rke2certd.log import log

WATCH_SLICE = 30.0  # longest single watch call; stop() ends an etcd one at once
BACKOFF_MAX = 30.0


class BootstrapWatch:
    def __init__(
        self,
        open_ds: Callable[[], Datastore],
        wake: Callable[[], None],
        *,
        owns_connection: bool,
        slice_seconds: float = WATCH_SLICE,
    ) -> None:
        """`open_ds` gives the connection to watch on; `owns_connection`: close it when done
        (an etcd connection of its own), or leave it (SQLite shares the main loop's)."""
        self._open = open_ds
        self._wake = wake
        self._owns = owns_connection
        self._slice = slice_seconds
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._ds: Datastore | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bootstrap-watch", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 1.0) -> None:
        self._stop.set()
        ds = self._ds
        if ds is not None and self._owns:
            ds.close()  # ends a watch that is waiting
        if self._thread is not None:
            self._thread.join(wait)
            self._thread = None

    def take_changed(self) -> bool:
        """True once per change (or burst of changes) since the last call."""
        if self._changed.is_set():
            self._changed.clear()
            return True
        return False

    def _changed_now(self) -> None:
        self._changed.set()
        self._wake()

    def _run(self) -> None:
        backoff = 1.0
        revision: int | None = None
        while not self._stop.is_set():
            try:
                self._ds = self._open()
                if revision is None:
                    revision = self._ds.snapshot(BOOTSTRAP_PREFIX).revision
                while not self._stop.is_set():
                    events = self._ds.watch_prefix(BOOTSTRAP_PREFIX, revision + 1, self._slice)
                    if events:
                        revision = events[-1].kv.mod_revision
                        log.info(
                            "bootstrap_changed",
                            reason="RKE2's bootstrap data (the CA set) was written",
                            revision=revision,
                        )
                        self._changed_now()
                    if self.error is not None:
                        log.info("bootstrap_watch_restored", reason="the datastore answers")
                        self.error = None
                    backoff = 1.0
            except WatchCompacted:
                revision = None  # changes may be lost: read again
                self._changed_now()
            except Rke2certdError as exc:
                if self._stop.is_set():
                    break
                if self.error is None:
                    log.warning("bootstrap_watch_failed", reason=str(exc), retry_in=backoff)
                self.error = str(exc)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            except Exception as exc:  # a closed connection at stop(), or a bug: go on
                if self._stop.is_set():
                    break
                self.error = str(exc) or type(exc).__name__
                log.warning("bootstrap_watch_failed", reason=self.error, retry_in=backoff)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            finally:
                if self._owns and self._ds is not None:
                    self._ds.close()
                self._ds = None
