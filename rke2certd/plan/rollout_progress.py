"""PURE: how rollouts stand for the cluster: the ones to close, the members blocking them past
their grace, the ones a new rollout supersedes, and the rows `rke2certd status` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rke2certd.plan.cluster_view import (
    PHASES,
    TERMINAL_NODE_STATES,
    Availability,
    ClusterView,
    Member,
    NodeState,
    Phase,
    Rollout,
    RolloutKind,
    RolloutState,
    Unavailable,
)
from rke2certd.plan.next_step import (
    down_members,
    down_text,
    is_done,
    participants,
    restarting_since,
    skipped,
    when_text,
)

# -- housekeeping any node may do ----------------------------------------------------------------


@dataclass(frozen=True)
class Finish:
    rollout: Rollout
    state: RolloutState
    reason: str


def finished_rollouts(view: ClusterView) -> list[Finish]:
    """Active rollouts that are over: a participant failed (stopped), or all are done."""
    out = []
    for r in view.rollouts:
        if not r.active:
            continue
        members = participants(view, r)
        failed = [
            (m, st)
            for m in members
            if (st := view.status(r, m.name)) is not None and st.state is NodeState.FAILED
        ]
        if failed:
            m, st = failed[0]
            reason = f"{m.phase} node {m.name} failed: {st.message or 'no message'}"
            out.append(Finish(r, RolloutState.STOPPED, reason))
        elif all(is_done(view, r, m.name) or skipped(view, r, m.name) for m in members):
            left = [m.name for m in members if skipped(view, r, m.name)]
            reason = f"{len(members) - len(left)} node(s) done"
            if left:
                reason += (
                    f", {len(left)} skipped (not running; each catches up when it returns): "
                    + ", ".join(left[:10])
                    + (f" and {len(left) - 10} more" if len(left) > 10 else "")
                )
            out.append(Finish(r, RolloutState.DONE, reason))
    return out


# -- members missing their turn ----------------------------------------------------------------


@dataclass(frozen=True)
class Blocked:
    """A member not running past the grace into its turn: reported; skipped if `skip`."""

    rollout: Rollout
    member: Member
    since: datetime  # missing its turn since: the later of its going down and its turn
    skip: bool
    reason: str


def turn_started(view: ClusterView, r: Rollout, m: Member) -> datetime | None:
    """When `m`'s turn in `r` began: the last report of an earlier phase (the rollout's start
    if there is none); None while an earlier phase is not done."""
    mine = PHASES.index(m.phase)
    times = [r.created]
    for p in participants(view, r):
        if PHASES.index(p.phase) >= mine:
            continue
        st = view.status(r, p.name)
        if st is None or st.state is not NodeState.DONE:
            return None
        if st.finished is not None:
            times.append(st.finished)
    return max(times)


def _missing(view: ClusterView) -> list[tuple[Rollout, Member, datetime]]:
    """Members of active rollouts that are down in their turn, and since when."""
    out = []
    for r in view.rollouts:
        if not r.active:
            continue
        for m in participants(view, r):
            if m.name in view.live or m.down_since is None:
                continue  # running, or its going down not recorded yet (housekeeping does)
            st = view.status(r, m.name)
            if st is not None and st.state in TERMINAL_NODE_STATES:
                continue
            turn = turn_started(view, r, m)
            if turn is not None:
                out.append((r, m, max(turn, m.down_since)))
    return out


def _span(d: timedelta) -> str:
    s = int(d.total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def blocked(view: ClusterView, now: datetime, policy: Availability) -> list[Blocked]:
    """Members that have missed their turn for longer than the grace, with what happens."""
    out = []
    for r, m, since in _missing(view):
        if now - since < policy.grace:
            continue
        skip = m.phase is Phase.AGENT and policy.agents is Unavailable.SKIP
        what = (
            "skipped: the rollout goes on without it, it catches up when its daemon returns"
            if skip
            else "the rollout waits for it: start rke2certd there or run "
            f"`rke2certd node remove {m.name}`"
            + ("" if m.phase is not Phase.AGENT else " (agent-unavailable: wait)")
        )
        reason = (
            f"{m.phase} node {m.name} not running since {when_text(m.down_since)}, "
            f"{_span(now - since)} into its turn (agent-unavailable-grace "
            f"{_span(policy.grace)}); {what}"
        )
        out.append(Blocked(r, m, since, skip, reason))
    return out


def next_blocking(view: ClusterView, now: datetime, policy: Availability) -> datetime | None:
    """When the next member still within its grace will be blocked (None: nobody is), so
    that a node that is not woken meanwhile looks again then."""
    due = [since + policy.grace for _, _, since in _missing(view) if since + policy.grace > now]
    return min(due, default=None)


def superseded(view: ClusterView, new: Rollout) -> list[Rollout]:
    """Active CA rollouts older than a new CA rollout: the new generation replaces them (every
    node applies the newest set anyway, and restarts for it in order)."""
    if new.kind is not RolloutKind.CA:
        return []
    return [
        r
        for r in view.rollouts
        if r.active and r.kind is RolloutKind.CA and r.id != new.id and r.revision < new.revision
    ]


def newly_down(view: ClusterView) -> list[str]:
    """Members gone from the registry whose down time nobody has recorded yet."""
    return [m.name for m in down_members(view) if m.down_since is None]


# -- reading it back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRow:
    name: str
    phase: Phase
    live: bool
    generation: str | None
    state: str
    message: str


def node_rows(view: ClusterView, rollout: Rollout) -> list[NodeRow]:
    rows = []
    for m in participants(view, rollout):
        reg = view.live.get(m.name)
        st = view.status(rollout, m.name)
        if (since := restarting_since(view, rollout, m.name)) is not None:
            state, message = "restarting", since
        elif st is not None:
            state, message = st.state.value, st.message
        elif rollout.state is RolloutState.STOPPED:
            state, message = "stopped", rollout.state_reason
        else:
            state, message = "pending", ""
        if reg is None and state not in {s.value for s in TERMINAL_NODE_STATES}:
            message = down_text(m)
        gen = reg.ca_generation if reg else st.generation if st else None
        rows.append(NodeRow(m.name, m.phase, reg is not None, gen, state, message))
    return rows
