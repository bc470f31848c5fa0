"""`rke2certd run`: the daemon's main loop.

Signal handlers only set a flag (and the kernel writes a byte to the wake-up pipe); the
watcher thread only records events. Everything else happens here, one thing at a time, in
this loop, which also pings the systemd watchdog, so a stuck loop gets the daemon restarted.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import structlog

from rke2certd.clock import Clock, system_clock
from rke2certd.config import Config
from rke2certd.daemon.notify import Notifier
from rke2certd.daemon.watcher import StagingWatcher
from rke2certd.datastore.base import Datastore
from rke2certd.errors import Rke2certdError
from rke2certd.ops.check import check
from rke2certd.ops.node import Node
from rke2certd.ops.renew import RenewResult, renew
from rke2certd.ops.staging import apply_set, prepare
from rke2certd.plan.staging import DEFAULT_QUIET, next_deadline, ready_sets
from rke2certd.store.lock import node_lock

log = structlog.get_logger("rke2certd")


class Wakeup:
    """A self-pipe: signals (via set_wakeup_fd) and the watcher thread write to it."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: already awake
            os.write(self.w, b"w")

    def wait(self, timeout: float) -> None:
        select.select([self.r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 512):
                pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@dataclass
class Flags:
    stop: bool = False
    reload: bool = False
    signals: list[int] = field(default_factory=list)


class Daemon:
    def __init__(
        self,
        load_config: Callable[[], Config],
        *,
        clock: Clock = system_clock,
        notifier: Notifier | None = None,
        quiet: float = DEFAULT_QUIET,
    ) -> None:
        self._load = load_config
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.quiet = quiet
        self.flags = Flags()
        self.wake = Wakeup()
        self.cfg: Config = load_config()
        self.node = Node.from_config(self.cfg)
        self.ds: Datastore | None = None
        self.watcher: StagingWatcher | None = None
        self.staging_refused: str | None = None
        self.next_rescan = 0.0
        self.next_ping = 0.0

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only set flags: the work happens on the main loop.
        if signum == signal.SIGHUP:
            self.flags.reload = True
        else:
            self.flags.stop = True

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self.wake.w, warn_on_full_buffer=False)

    # -- work -----------------------------------------------------------------------------

    def _open_datastore(self) -> None:
        if self.ds is not None:
            self.ds.close()
            self.ds = None
        if self.cfg.is_server:
            from rke2certd.ops.bootstrap import open_for

            self.ds = open_for(self.node)

    def _renew(self, why: str) -> RenewResult:
        with node_lock(self.cfg.data_dir, self.cfg.lock_timeout):
            result = renew(self.node, self.clock(), datastore=self.ds)
        if result.changes or result.extracted:
            log.info(
                "restart_needed",
                reason=why,
                units=",".join(result.restart_units),
                files=len(result.changes),
            )
        return result

    def _start_staging(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self.staging_refused = None
        if not self.cfg.is_server:
            return
        staging = self.cfg.staging
        try:
            prepare(staging)
        except Rke2certdError as exc:
            self.staging_refused = str(exc)
            log.error("staging_refused", cert_path=str(staging), reason=str(exc))
            return
        self.watcher = StagingWatcher(staging, self.wake.poke)
        self.watcher.start()
        log.info("staging_watched", cert_path=str(staging))

    def _process_staging(self) -> None:
        if self.watcher is None or self.ds is None:
            return
        for name in ready_sets(self.watcher.states(), time.monotonic(), self.quiet):
            self._ping_if_due()
            outcome = apply_set(self.node, self.cfg.staging, name, self.clock(), self.ds)
            self.watcher.forget(name)
            if outcome.status == "applied":
                self._renew(f"staged set {name} applied")
            self._status()

    def _status_text(self) -> str:
        parts = []
        if self.watcher is not None:
            parts.append(f"watching {self.watcher.staging}")
        elif self.staging_refused:
            parts.append("REFUSING the staging dir (see the journal)")
        rows = [r for r in check(self.node, [], self.clock()).rows if r.index == 0]
        if rows:
            first = min(rows, key=lambda r: r.not_after)
            parts.append(
                f"{len(rows)} certificates; next expiry {first.path.name} on "
                f"{first.not_after.strftime('%Y-%m-%d %H:%M')} UTC"
            )
        return "; ".join(parts) or "running"

    def _status(self) -> None:
        self.notifier.status(self._status_text())

    def _ping_if_due(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is not None and time.monotonic() >= self.next_ping:
            self.notifier.watchdog()
            self.next_ping = time.monotonic() + interval

    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading", reason="SIGHUP")
        try:
            self.cfg = self._load()
            self.node = Node.from_config(self.cfg)
            self._open_datastore()
        except Rke2certdError as exc:
            log.error("reload_failed", reason=str(exc))
        self._safe(lambda: self._renew("reload"))
        self._start_staging()
        self._process_staging()
        self.next_rescan = time.monotonic() + self.cfg.rescan_interval
        self.notifier.ready(self._status_text())

    def _safe(self, fn: Callable[[], object]) -> None:
        """Run a periodic task; an error is logged and retried at the next occasion."""
        try:
            fn()
        except Rke2certdError as exc:
            log.error("task_failed", reason=str(exc))

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [self.next_rescan]
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            deadlines.append(self.next_ping)
        if self.watcher is not None:
            d = next_deadline(self.watcher.states(), self.quiet)
            if d is not None:
                deadlines.append(d)
        return max(0.0, min(deadlines) - now)

    # -- main -----------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            self._open_datastore()
            self._renew("start")
            self._start_staging()
            self._process_staging()
        except Rke2certdError as exc:
            log.error("startup_failed", reason=str(exc))
            self.notifier.status(f"failed to start: {str(exc).splitlines()[0]}")
            return 1
        self.next_rescan = time.monotonic() + self.cfg.rescan_interval
        self.notifier.ready(self._status_text())
        log.info("ready", reason="certificates are valid", staging=str(self.cfg.staging))
        self._ping_if_due()
        while not self.flags.stop:
            self.wake.wait(self._timeout())
            self._ping_if_due()
            if self.flags.stop:
                break
            if self.flags.reload:
                self.flags.reload = False
                self._reload()
                continue
            self._safe(self._process_staging)
            if time.monotonic() >= self.next_rescan:
                self._safe(lambda: self._renew("periodic rescan"))
                self.next_rescan = time.monotonic() + self.cfg.rescan_interval
                self._status()
        return self._shutdown()

    def _shutdown(self) -> int:
        self.notifier.stopping("stopping")
        log.info("stopping", reason="SIGTERM")
        if self.watcher is not None:
            self.watcher.stop()
        if self.ds is not None:
            self.ds.close()
        signal.set_wakeup_fd(-1)
        self.wake.close()
        return 0
