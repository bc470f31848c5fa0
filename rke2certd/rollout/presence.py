"""What this node says about itself in the cluster: its registration, on its lease.

The registration carries the CA generation on disk, the last restart's health and a one-line
summary; it is written again only when the generation or the health changes (every write is an
event every node's watch receives), the summary riding along.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from rke2certd import __version__
from rke2certd.plan.rollout import Phase, Registration
from rke2certd.rollout.cluster_store import ClusterStore


@dataclass
class Presence:
    name: str
    roles: tuple[str, ...]
    phase: Phase
    since: datetime  # when this run registered first
    gen: str | None  # the CA generation on disk
    lease: int | None = None  # the lease the registration is on (None: not registered yet)
    health: str = "unknown"  # the last restart's: ok, failed: <why>
    summary: str = "starting"
    _written: tuple[str | None, str] | None = None

    def write(self, store: ClusterStore, now: datetime, force: bool = False) -> None:
        """Register (`force`: a new lease) or report a changed generation or health."""
        state = (self.gen, self.health)
        if not force and state == self._written:
            return
        lease = self.lease
        assert lease is not None
        reg = Registration(
            self.name,
            self.roles,
            self.phase,
            __version__,
            self.gen,
            self.health,
            self.summary,
            self.since,
            now,
        )
        if force:
            store.register(reg, lease)
        else:
            store.report(reg, lease)
        self._written = state
