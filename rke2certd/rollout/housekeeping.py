"""The housekeeping any server may do for the cluster: record members whose lease expired as
down, close rollouts that are over (one node failed: stopped; all done: done), drop old history.

Servers run it at each tick; agent-only nodes, which may not write other nodes' records, ask a
server to run it (the endpoint's cluster route). Every write is a compare-and-swap, so several
servers doing it at once agree: the first one wins, the others find nothing left to do.
"""

from __future__ import annotations

from datetime import datetime

from rke2certd.log import log
from rke2certd.plan.rollout import RolloutState, finished_rollouts, newly_down
from rke2certd.rollout import records as rec
from rke2certd.rollout.store import ClusterStore


def housekeep(store: ClusterStore, parsed: rec.Parsed, now: datetime) -> bool:
    """Do what is due in `parsed`; True when something was written (read again)."""
    view, wrote = parsed.view, False
    for name in newly_down(view):
        if store.mark_down(name, now):
            m = view.members[name]
            log.warning("node_down", node=name, phase=m.phase.value, reason="its lease expired")
        wrote = True
    for fin in finished_rollouts(view):
        if store.finish(fin.rollout.id, fin.state, fin.reason, now):
            done = fin.state is RolloutState.DONE
            (log.info if done else log.error)(
                "rollout_done" if done else "rollout_failed",
                rollout_id=fin.rollout.id,
                ca_generation=fin.rollout.ca_generation,
                reason=fin.reason,
            )
        wrote = True
    return store.collect(parsed) > 0 or wrote
