"""The endpoint a server runs for agents (CSRs, CAs, the coordination keys), as the daemon
keeps it: started at the start and each rescan until the port binds, its limits following the
fleet's size, stopped before a reload or the stop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rke2certd.clock import Clock
from rke2certd.datastore.base import KV, Datastore
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.plan.rollout import Member

if TYPE_CHECKING:
    from rke2certd.supervisor.cluster_api import ClusterAPI
    from rke2certd.supervisor.fleet_limits import Limits
    from rke2certd.supervisor.server import SupervisorHandle
    from rke2certd.supervisor.watch_hub import WatchHub

LIMITS_EVERY = 60.0  # seconds between looks at the fleet's size


class Endpoint:
    def __init__(self, clock: Clock, limits_every: float = LIMITS_EVERY) -> None:
        self.clock = clock
        self.limits_every = limits_every
        self.handle: SupervisorHandle | None = None
        self.error: str | None = None  # why it does not serve (the port in use, ...)
        self._ds: Datastore | None = None  # the cluster route's connection
        self._hub: WatchHub | None = None  # the one watch for all agents
        self._api: ClusterAPI | None = None  # the cluster route
        self._next_limits = 0.0  # when the limits follow the fleet's size again
        self._limits: Limits | None = None

    def start(self, node: Node, ds: Datastore | None, connection: Callable[[], Datastore]) -> None:
        """Serve agents, with the cluster route when the datastore is open. A port in use is
        logged and retried at the next rescan: renewing this node's certificates goes on."""
        if self.handle is not None:
            return
        from rke2certd.supervisor import server
        from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA

        cfg = node.cfg
        api = None
        if ds is not None:
            if self._ds is None:
                self._ds = connection()
            from rke2certd.supervisor.watch_hub import WatchHub

            if self._hub is None:  # kept while the port is retried at each rescan
                self._hub = WatchHub(self._ds).start()
            limits = self._fleet_limits(ds)
            self._next_limits = time.monotonic() + self.limits_every
            api = self._api = ClusterAPI(
                self._ds,
                self.clock,
                lambda: ServedCA.on_disk(node.layout),
                availability=cfg.availability,
                hub=self._hub,
                max_watches=limits.watches,
                max_connections=limits.connections,
                home=limits.home,
            )
        try:
            self.handle = server.start(
                node, host=cfg.supervisor_bind_address, cluster=api, clock=self.clock
            )
            self.error = None
        except Rke2certdError as exc:
            self.error = str(exc)
            log.error("supervisor_failed", port=cfg.supervisor_port, reason=str(exc))

    def deadline(self) -> float:
        """When the limits follow the fleet again (monotonic; inf: no cluster route). The main
        loop wakes for it: a fleet that joins changes nothing a server's rollout waits on."""
        return self._next_limits if self._api is not None else math.inf

    def follow_fleet(self, ds: Datastore | None) -> None:
        """When due: the limits for the fleet's size now."""
        if self._api is None or time.monotonic() < self._next_limits:
            return
        self._next_limits = time.monotonic() + self.limits_every  # (the loop's deadline)
        if ds is None:
            return
        limits = self._fleet_limits(ds)
        self._api.resize(limits.connections, limits.watches, limits.home)

    def _fleet_limits(self, ds: Datastore) -> Limits:
        """The endpoint's limits for the fleet the datastore knows now."""
        import resource

        from rke2certd.plan.rollout import Phase
        from rke2certd.rollout import records as rec
        from rke2certd.supervisor.fleet_limits import fleet_limits

        try:
            members = [m for kv in ds.snapshot(rec.MEMBERS).kvs if (m := _member(kv)) is not None]
        except Rke2certdError as exc:
            log.warning("fleet_unknown", reason=str(exc))
            members = []
        agents = sum(1 for m in members if m.phase is Phase.AGENT)
        servers = max(1, len(members) - agents)
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limits = fleet_limits(agents, servers, open_files if open_files > 0 else 1024)
        old = self._limits
        if old is None or (old.connections, old.watches, old.home) != (
            limits.connections,
            limits.watches,
            limits.home,
        ):
            log.info(
                "supervisor_limits",
                connections=limits.connections,
                watches=limits.watches,
                home=limits.home,
                reason=limits.reason,
            )
        self._limits = limits
        return limits

    def stop(self, ds: Datastore | None) -> None:
        """`ds`: the daemon's main connection (shared with SQLite: not closed here)."""
        if self.handle is not None:
            self.handle.stop()
            self.handle = None
        if self._hub is not None:
            self._hub.stop()
            self._hub = None
        self._api = None
        if self._ds is not None:
            if self._ds is not ds:
                self._ds.close()
            self._ds = None


def _member(kv: KV) -> Member | None:
    from rke2certd.rollout import records as rec

    try:
        return rec.decode_member(kv)
    except (ValueError, KeyError, TypeError):
        return None
