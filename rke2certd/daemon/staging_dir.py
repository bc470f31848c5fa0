"""The staging dir as the daemon keeps it: watched (servers), each finished set taken one at a
time once it has been quiet long enough (commands/apply_staged.py: no set stops the daemon, a
saved set is rolled out before it is filed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rke2certd.clock import Clock
from rke2certd.commands.apply_staged import StagingOutcome, prepare, process_set
from rke2certd.daemon.watcher import StagingWatcher
from rke2certd.datastore.base import Datastore
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.plan.ready_sets import next_deadline, ready_sets


class StagingDir:
    def __init__(self) -> None:
        self.watcher: StagingWatcher | None = None
        self.refused: str | None = None  # why the dir is not watched (see the journal)

    def start(self, staging: Path | None, wake: Callable[[], None]) -> None:
        """Watch `staging` (None: this node takes no staged sets)."""
        self.stop()
        self.refused = None
        if staging is None:
            return
        try:
            prepare(staging)
        except Rke2certdError as exc:
            self.refused = str(exc)
            log.error("staging_refused", cert_path=str(staging), reason=str(exc))
            return
        self.watcher = StagingWatcher(staging, wake)
        self.watcher.start()
        log.info("staging_watched", cert_path=str(staging))

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def deadline(self, quiet: float) -> float | None:
        """When the next set has been quiet long enough (monotonic; None: no set pending)."""
        return next_deadline(self.watcher.states(), quiet) if self.watcher is not None else None

    def process(
        self,
        node: Node,
        ds: Datastore | None,
        clock: Clock,
        quiet: float,
        roll_out: Callable[[StagingOutcome], None],
        before: Callable[[], None],
        after: Callable[[], None],
    ) -> None:
        """Each finished set, one at a time; `before` and `after` each (the watchdog, the
        status line)."""
        if self.watcher is None or ds is None:
            return
        for name in ready_sets(self.watcher.states(), time.monotonic(), quiet):
            before()
            try:
                process_set(node, node.cfg.staging, name, clock(), ds, roll_out=roll_out)
            finally:
                self.watcher.forget(name)
            after()

    def status_text(self) -> str | None:
        if self.watcher is not None:
            return f"watching {self.watcher.staging}"
        if self.refused:
            return "REFUSING the staging dir (see the journal)"
        return None
