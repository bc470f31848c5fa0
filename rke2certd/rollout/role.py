"""What the rollout runner asks of the kind of node it runs on.

A server reaches the coordination keys directly (the datastore), does the cluster's housekeeping
itself, starts the rollout of a newer CA set it finds, and wakes the servers that may go on
after its turn. An agent-only node reaches them through a server's endpoint, may write only its
own records, and asks a server for the rest. The runner holds one `RolloutRole` and never asks
which kind it is; rke2certd/roles/ implements it for both (the daemon passes it in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rke2certd.node.node import Node
from rke2certd.plan.rollout import ClusterView, Phase, Rollout, Step
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.link import ClusterLink
from rke2certd.rollout.look import Look


@dataclass(frozen=True)
class ApplyOutcome:
    generation: str | None  # the CA generation on disk after applying


class RolloutRole(Protocol):
    @property
    def restart_unit(self) -> str:
        """The RKE2 unit the default restart command restarts."""
        ...

    def apply(self, rollout: Rollout) -> ApplyOutcome:
        """The rollout's apply step: this node's new files (DatastoreUnavailable: later)."""
        ...

    def generation(self) -> str | None:
        """The CA generation this node holds now."""
        ...

    def link(self, node: Node, wake: Callable[[], None]) -> ClusterLink:
        """The background watch and lease keep-alive, on connections of their own."""
        ...

    def follow(self, link: ClusterLink, step: Step, phase: Phase, revision: int) -> None:
        """After a tick: narrow the link's watch to what `step` waits for (or keep it fixed)."""
        ...

    def unchanged(self, store: ClusterStore, look: Look) -> bool:
        """The periodic look (rollout/look.py): True when the keys it covers are as its marks
        say (the full read may be skipped); False always means read everything."""
        ...

    def housekeep(self, store: ClusterStore, parsed: rec.Parsed) -> bool:
        """At each tick: the cluster's housekeeping, if this node does it. True when something
        was written (read again)."""
        ...

    def after_report(self, store: ClusterStore, parsed: rec.Parsed) -> bool:
        """This node wrote a final status (done, failed, stopped), which may end a rollout:
        ask for the housekeeping if no tick of this node does it. True when it wrote."""
        ...

    def supersede(self, store: ClusterStore, rollout: Rollout, generation: str) -> bool:
        """Applying `rollout` found another CA generation in the datastore: start its rollout
        if this node may. True when it did and `rollout` is over (superseded)."""
        ...

    def to_wake(self, view: ClusterView, me: str, max_unavailable: int) -> list[str]:
        """The nodes to wake after this one freed a slot or reported (none: it may not)."""
        ...

    def stop_failed(self, store: ClusterStore, rollout: Rollout, reason: str) -> bool:
        """This node's restart failed: stop the rollout, or ask a server to. True when this
        node stopped it."""
        ...
