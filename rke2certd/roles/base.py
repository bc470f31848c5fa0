"""The one place where a server and an agent-only node differ.

A server holds the datastore: it renews from the CA set there, serves agents, watches the
staging dir, starts rollouts and does the cluster's housekeeping. An agent-only node holds no
datastore credentials: it gets its certificates, and reaches the coordination keys, through a
server's endpoint, and may write only its own records. `role_for` (roles/__init__.py) picks one
of the two from the config once; the daemon and the CLI then call the `NodeRole` they hold and
never ask which kind it is. The rollout runner gets its own narrower view of the same role
(`rollout_role`, rollout/role.py's protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Protocol

from rke2certd.commands.renew import RenewResult
from rke2certd.commands.rotate import RotateResult
from rke2certd.datastore.base import Datastore
from rke2certd.errors import Rke2certdError
from rke2certd.node.node import Node
from rke2certd.rollout.role import RolloutRole

RenewHook = Callable[[str], object]  # the daemon's renew (logs, rollouts, metrics): why -> _


class NodeRole(Protocol):
    node: Node

    # -- what it has ------------------------------------------------------------------------
    @property
    def unit(self) -> str:
        """The RKE2 unit whose certificates these are."""
        ...

    @property
    def datastore(self) -> Datastore | None:
        """The CA datastore, while open (agents: never)."""
        ...

    @property
    def store(self) -> Datastore | None:
        """The coordination keys: the datastore, or a server's endpoint (None: not open)."""
        ...

    @property
    def serves_agents(self) -> bool:
        """Runs the endpoint agents renew and coordinate through."""
        ...

    @property
    def staging(self) -> Path | None:
        """The staging dir it takes CA sets from (None: none, they are saved on servers)."""
        ...

    @property
    def joins_late(self) -> bool:
        """May start, and join the rollouts, while no server answers (then tries again)."""
        ...

    @property
    def served_routes(self) -> frozenset[str]:
        """The endpoint's routes it serves (the metrics count requests per route)."""
        ...

    def ca_files(self) -> list[Path]:
        """The CA certificate files this node holds (the metrics show when each expires)."""
        ...

    def disk_generation(self) -> str | None:
        """The CA generation of the CA set on this disk (None: the node holds no CA set)."""
        ...

    # -- the daemon --------------------------------------------------------------------------
    def open(self) -> None:
        """Open the store (raises what keeps it closed)."""
        ...

    def close(self) -> None: ...

    def own_connection(self) -> Datastore:
        """A connection to the store for a helper thread (the store must be open)."""
        ...

    def first_start(self) -> str | None:
        """What to wait for before RKE2's first start on this node (None: it has run)."""
        ...

    def waits_for(self, exc: Rke2certdError) -> bool:
        """`exc` is cured by waiting (a datastore not answering yet), not fatal."""
        ...

    def renew(self, now: datetime) -> RenewResult:
        """The node's certificates created or renewed, under the node lock."""
        ...

    def after_renew(
        self, result: RenewResult, before: str | None, after: str | None, why: str, now: datetime
    ) -> None:
        """A renew's consequences for the cluster (a server starts the rollout it needs)."""
        ...

    def rollout_role(self) -> RolloutRole:
        """What the rollout runner asks of this node (the store must be open)."""
        ...

    # -- the command line --------------------------------------------------------------------
    def renew_hook(self, *, dry_run: bool, offline_ok: bool) -> RenewResult:
        """`rke2certd renew`: the startup hook."""
        ...

    def rotate(self, services: Sequence[str], now: datetime) -> RotateResult:
        """`certificate rotate`: new keys and certificates now."""
        ...

    def cluster_datastore(self, needs: str) -> AbstractContextManager[Datastore]:
        """The datastore for a command that writes to it; `needs`: why agents cannot."""
        ...

    def status(self, output: str, now: datetime) -> str:
        """`rke2certd status`: the cluster's rollouts and nodes, rendered."""
        ...
