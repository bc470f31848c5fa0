"""PURE: a cluster rollout as the datastore holds it: phases, rollouts, members, registrations,
per-node statuses, restart slots, and the view of them all that the rollout rules read
(next_step.py, rollout_progress.py; the rules themselves: plan/rollout.py's module doc).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum


class Phase(StrEnum):
    ETCD = "etcd"
    CONTROL_PLANE = "control-plane"
    AGENT = "agent"


PHASES: tuple[Phase, ...] = (Phase.ETCD, Phase.CONTROL_PLANE, Phase.AGENT)
SERVER_PHASES: tuple[Phase, ...] = (Phase.ETCD, Phase.CONTROL_PLANE)


def phase_of(roles: Iterable[str]) -> Phase:
    """The earliest phase among the roles (role names are the phase names)."""
    present = {str(r) for r in roles}
    for phase in PHASES:
        if phase.value in present:
            return phase
    raise ValueError(f"no known role in {sorted(present)}")


class RolloutKind(StrEnum):
    CA = "ca"  # a new CA generation saved in the datastore
    RENEWAL = "renewal"  # one node's leaves were renewed; only that node restarts


class RolloutState(StrEnum):
    ACTIVE = "active"
    DONE = "done"
    STOPPED = "stopped"  # a node failed; nothing later restarts
    SUPERSEDED = "superseded"  # a newer CA generation took over


class NodeState(StrEnum):
    APPLIED = "applied"  # new files on disk, waiting for its turn (restarting: its slot says so)
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"  # the rollout stopped before this node's turn
    # an agent not running past the grace into its turn: the rollout went on without it; it
    # catches up when it returns (terminal for everyone else)
    SKIPPED = "skipped"


TERMINAL_NODE_STATES = frozenset(
    {NodeState.DONE, NodeState.FAILED, NodeState.STOPPED, NodeState.SKIPPED}
)
# what a returning agent still has to do in a rollout that went on (or finished) without it
CATCHING_UP = frozenset({NodeState.SKIPPED, NodeState.APPLIED})


class Unavailable(StrEnum):
    """What a rollout does about an agent that is not running past the grace."""

    SKIP = "skip"  # go on without it; it catches up when it returns
    WAIT = "wait"  # report it, and wait (for it, or `rke2certd node remove`)


@dataclass(frozen=True)
class Availability:
    """The policy for members that are not running when their turn comes."""

    grace: timedelta = timedelta(minutes=10)
    agents: Unavailable = Unavailable.SKIP


@dataclass(frozen=True)
class Member:
    """A node that belongs to the cluster until `rke2certd node remove`, running or not."""

    name: str
    roles: tuple[str, ...]
    phase: Phase
    down_since: datetime | None = None  # set by the first node that saw it gone


@dataclass(frozen=True)
class Registration:
    """A running daemon (the key lives on its lease)."""

    name: str
    roles: tuple[str, ...]
    phase: Phase
    version: str = ""
    ca_generation: str | None = None
    health: str = "unknown"
    activity: str = ""
    registered: datetime | None = None
    updated: datetime | None = None


@dataclass(frozen=True)
class Rollout:
    id: str
    kind: RolloutKind
    ca_generation: str
    phases: tuple[Phase, ...]  # phases whose nodes restart, in phase order
    nodes: tuple[str, ...] | None  # only these nodes (a renewal); None = every member
    state: RolloutState
    reason: str
    created: datetime
    created_by: str
    revision: int = 0  # the store's create revision: the order of rollouts
    state_reason: str = ""
    finished: datetime | None = None
    attempt: int = 1  # `rollout resume` starts another: failures of earlier ones are forgotten

    @property
    def active(self) -> bool:
        return self.state is RolloutState.ACTIVE


@dataclass(frozen=True)
class NodeStatus:
    node: str
    state: NodeState
    message: str = ""
    generation: str | None = None
    applied_at: datetime | None = None
    restart_started: datetime | None = None
    finished: datetime | None = None
    attempt: int = 1
    restart_seconds: float | None = None  # how long the restart command and the gate took
    health_seconds: float | None = None
    revision: int = 0  # the store's create revision of the status: the order nodes applied


@dataclass(frozen=True)
class Slot:
    phase: Phase
    index: int
    node: str
    rollout: str
    since: datetime | None = None


@dataclass(frozen=True)
class ClusterView:
    members: Mapping[str, Member]
    live: Mapping[str, Registration]
    rollouts: tuple[Rollout, ...]  # oldest first
    statuses: Mapping[tuple[str, str], NodeStatus] = field(default_factory=dict)
    slots: tuple[Slot, ...] = ()

    def status(self, rollout: Rollout, node: str) -> NodeStatus | None:
        """The node's status in the rollout's current attempt: a failure or a stop reported in
        an earlier attempt no longer counts (what was applied or done still does)."""
        st = self.statuses.get((rollout.id, node))
        stale = st is not None and st.attempt < rollout.attempt
        if stale and st is not None and st.state in (NodeState.FAILED, NodeState.STOPPED):
            return None
        return st

    def rollout(self, rollout_id: str) -> Rollout | None:
        return next((r for r in self.rollouts if r.id == rollout_id), None)
