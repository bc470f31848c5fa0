"""The housekeeping any server may do for the cluster: record members whose lease expired as
down, report members that miss their turn past the grace (and skip agents, by policy), close
rollouts that are over (one node failed: stopped; all done or skipped: done), drop old history.

Servers run it at each tick; agent-only nodes, which may not write other nodes' records, ask a
server to run it (the endpoint's cluster route). Every write is a compare-and-swap, so several
servers doing it at once agree: the first one wins, the others find nothing left to do.
"""

from __future__ import annotations

from datetime import datetime

from rke2certd.log import log
from rke2certd.plan.rollout import (
    Availability,
    NodeState,
    NodeStatus,
    RolloutState,
    blocked,
    finished_rollouts,
    newly_down,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore


def housekeep(
    store: ClusterStore, parsed: rec.Parsed, now: datetime, policy: Availability | None = None
) -> bool:
    """Do what is due in `parsed`; True when something was written (read again)."""
    view, wrote = parsed.view, False
    for name in newly_down(view):
        if store.mark_down(name, now):
            m = view.members[name]
            log.warning("node_down", node=name, phase=m.phase.value, reason="its lease expired")
        wrote = True
    if _report_blocked(store, parsed, now, policy or Availability()):
        parsed, wrote = store.read(), True
        view = parsed.view
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


def _report_blocked(
    store: ClusterStore, parsed: rec.Parsed, now: datetime, policy: Availability
) -> bool:
    """Log `rollout_blocked` once per member and rollout attempt (the server that skips it, or
    each server once, for a member waited for); skip agents by policy. True if it wrote."""
    wrote = False
    for b in blocked(parsed.view, now, policy):
        r, m = b.rollout, b.member
        mark = (r.id, m.name, r.attempt)
        first = mark not in store.blocked_reported
        store.blocked_reported.add(mark)
        if b.skip:
            status = NodeStatus(m.name, NodeState.SKIPPED, b.reason, None, finished=now)
            if not store.skip(r, status, parsed):
                continue  # another server did, or the node came back meanwhile
            wrote = True
        elif not first:
            continue
        log.warning(
            "rollout_blocked",
            rollout_id=r.id,
            ca_generation=r.ca_generation,
            node=m.name,
            phase=m.phase.value,
            action="skip" if b.skip else "wait",
            since=b.since.isoformat(),
            reason=b.reason,
        )
    return wrote
