"""PURE: the rollout rules. Given what the datastore holds (members, live registrations,
rollouts, per-node statuses, restart slots), what should this node do next, and why not yet?

The order (docs/RKE2-COMPATIBILITY.md §10: RKE2 documents it and leaves it to the operator):

- A node's phase is its earliest role: etcd < control-plane < agent.
- Rollouts are handled one at a time, oldest first: once a node has applied a rollout (new files
  on disk), any restart loads them, so no later rollout may restart it out of that order.
- A node restarts only when every member of every earlier phase of the rollout has reported
  done, and it holds a restart slot of its phase. Slots are shared by all rollouts, so no two
  rollouts ever take one phase below its availability floor together.
- Per phase at most `max-unavailable` nodes are unavailable, counting members that are down;
  for etcd never more than keeps quorum, (n-1)//2 of n members (at least 1, so that one- and
  two-member clusters can rotate at all).
- A member that is down blocks its phase until it returns or is removed, except an agent
  that stays down past `agent-unavailable-grace` into its turn: with `agent-unavailable: skip`
  (the default) it is marked SKIPPED and the rollout goes on without it; it catches up on its
  own when it returns (applies the generation, takes a slot, restarts, reports done). Servers
  are never skipped (an etcd or control-plane node that is down is reported, and waited for):
  the rollout's later phases rely on every server having the new files.

Every decision carries its reason in words for STATUS=, the journal and `rke2certd status`.

The parts: `cluster_view.py` (the records and the view of them), `next_step.py` (this node's
next step and whom a change wakes), `rollout_progress.py` (rollouts to close, members blocking
past their grace, status rows). Callers import every name from here.
"""

from __future__ import annotations

from rke2certd.plan.cluster_view import (
    CATCHING_UP,
    PHASES,
    SERVER_PHASES,
    TERMINAL_NODE_STATES,
    Availability,
    ClusterView,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
    Unavailable,
    phase_of,
)
from rke2certd.plan.next_step import (
    Apply,
    Idle,
    ReportStopped,
    Restart,
    Step,
    TakeSlot,
    Wait,
    current_phase,
    down_members,
    down_text,
    is_done,
    next_step,
    node_text,
    over_limit,
    participants,
    phase_limit,
    reported,
    restart_slot,
    restarting_since,
    skipped,
    to_wake,
    when_text,
)
from rke2certd.plan.rollout_progress import (
    Blocked,
    Finish,
    NodeRow,
    blocked,
    finished_rollouts,
    newly_down,
    next_blocking,
    node_rows,
    superseded,
    turn_started,
)

__all__ = [
    "CATCHING_UP",
    "PHASES",
    "SERVER_PHASES",
    "TERMINAL_NODE_STATES",
    "Apply",
    "Availability",
    "Blocked",
    "ClusterView",
    "Finish",
    "Idle",
    "Member",
    "NodeRow",
    "NodeState",
    "NodeStatus",
    "Phase",
    "Registration",
    "ReportStopped",
    "Restart",
    "Rollout",
    "RolloutKind",
    "RolloutState",
    "Slot",
    "Step",
    "TakeSlot",
    "Unavailable",
    "Wait",
    "blocked",
    "current_phase",
    "down_members",
    "down_text",
    "finished_rollouts",
    "is_done",
    "newly_down",
    "next_blocking",
    "next_step",
    "node_rows",
    "node_text",
    "over_limit",
    "participants",
    "phase_limit",
    "phase_of",
    "reported",
    "restart_slot",
    "restarting_since",
    "skipped",
    "superseded",
    "to_wake",
    "turn_started",
    "when_text",
]
