"""PURE: what this node does next in a rollout (apply, wait, take a slot, restart), the facts it
is decided from, and whom a change wakes. The rules: plan/rollout.py's module doc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from rke2certd.plan.cluster_view import (
    CATCHING_UP,
    PHASES,
    TERMINAL_NODE_STATES,
    ClusterView,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
)

# -- facts ------------------------------------------------------------------------------------


def participants(view: ClusterView, rollout: Rollout) -> list[Member]:
    """Members that restart for `rollout`, in phase then name order."""
    out = [
        m
        for m in view.members.values()
        if m.phase in rollout.phases and (rollout.nodes is None or m.name in rollout.nodes)
    ]
    return sorted(out, key=lambda m: (PHASES.index(m.phase), m.name))


def is_done(view: ClusterView, rollout: Rollout, node: str) -> bool:
    st = view.status(rollout, node)
    return st is not None and st.state is NodeState.DONE


def current_phase(view: ClusterView, rollout: Rollout) -> Phase | None:
    """The earliest phase with a participant not done yet; None when all are done."""
    for m in participants(view, rollout):
        if not is_done(view, rollout, m.name) and not skipped(view, rollout, m.name):
            return m.phase
    return None


def phase_limit(view: ClusterView, phase: Phase, max_unavailable: int) -> int:
    """How many members of `phase` may be unavailable at once."""
    limit = max(1, max_unavailable)
    if phase is Phase.ETCD:
        n = sum(1 for m in view.members.values() if m.phase is Phase.ETCD)
        limit = min(limit, max(1, (n - 1) // 2))
    return limit


def down_members(view: ClusterView, phase: Phase | None = None) -> list[Member]:
    return sorted(
        (
            m
            for m in view.members.values()
            if m.name not in view.live and (phase is None or m.phase is phase)
        ),
        key=lambda m: m.name,
    )


def when_text(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "an unknown time"


def down_text(m: Member) -> str:
    return (
        f"not running since {when_text(m.down_since)}; start rke2certd there or run "
        f"`rke2certd node remove {m.name}`"
    )


def restart_slot(view: ClusterView, rollout: Rollout, node: str) -> Slot | None:
    """The slot `node` holds for `rollout`: it is restarting for it (its status still says
    applied until it reports done: the slot is the record of a restart in progress)."""
    return next((s for s in view.slots if s.node == node and s.rollout == rollout.id), None)


def restarting_since(view: ClusterView, rollout: Rollout, node: str) -> str | None:
    st = view.status(rollout, node)
    slot = restart_slot(view, rollout, node)
    if slot is None or (st is not None and st.state in TERMINAL_NODE_STATES):
        return None
    return f"since {when_text(slot.since)}"


def node_text(view: ClusterView, rollout: Rollout, m: Member) -> str:
    """What `m` is doing for `rollout`, as the others see it."""
    st = view.status(rollout, m.name)
    if m.name not in view.live and (st is None or st.state not in TERMINAL_NODE_STATES):
        return down_text(m)
    if (since := restarting_since(view, rollout, m.name)) is not None:
        return f"restarting ({since})"
    if st is None:
        return "not applied yet"
    if st.state is NodeState.APPLIED:
        return "applied, waiting for its turn"
    return st.state.value + (f" ({st.message})" if st.message else "")


# -- what this node does next ------------------------------------------------------------------


@dataclass(frozen=True)
class Idle:
    reason: str = "no rollout needs this node"


@dataclass(frozen=True)
class Apply:
    """Put the rollout's files on disk (for a CA generation: extract, re-issue, tokens)."""

    rollout: Rollout


@dataclass(frozen=True)
class Wait:
    rollout: Rollout
    reason: str
    blocker: str | None = None  # the node waited for, if one
    # what ends the wait: barrier (every node in `pending` done), queue (the blocker's
    # status), slot (a slot of my phase freed), down (the blocker returning or removed)
    on: str = "barrier"
    pending: tuple[str, ...] = ()  # a barrier's nodes not done yet, the blocker among them
    # A queue: the node whose report lets the blocker go (the one ahead of it, or a slot's
    # holder). Its report wakes this node too, to read while the blocker takes its turn, so
    # that this node's own turn starts from a fresh read (a small change), not a long catch-up.
    then: str | None = None

    @property
    def barrier_nodes(self) -> tuple[str, ...]:
        """The nodes whose statuses a barrier waits on: `pending`, or the blocker alone."""
        return self.pending or ((self.blocker,) if self.blocker else ())

    @property
    def queue_nodes(self) -> tuple[str, ...]:
        """The nodes whose statuses a queue waits on: the blocker, and `then`."""
        return tuple(n for n in (self.blocker, self.then) if n)


@dataclass(frozen=True)
class TakeSlot:
    rollout: Rollout
    phase: Phase
    index: int


@dataclass(frozen=True)
class Restart:
    rollout: Rollout
    slot: Slot


@dataclass(frozen=True)
class ReportStopped:
    """The rollout stopped before this node's turn: say so, touch nothing."""

    rollout: Rollout
    reason: str


Step = Idle | Apply | Wait | TakeSlot | Restart | ReportStopped


def next_step(view: ClusterView, me: str, max_unavailable: int) -> Step:
    """The one next thing `me` does. The caller does it, reads the store again and asks again;
    a restart in progress is the caller's to finish (it does not ask meanwhile)."""
    member = view.members.get(me)
    if member is None:
        return Idle("this node is not a registered member")
    for r in view.rollouts:
        if member not in participants(view, r):
            continue
        st = view.status(r, me)
        if _catching_up(view, r, member, st):
            # back after the rollout went on without it: its own apply, slot and restart
            if st is not None and st.state is NodeState.SKIPPED:
                return Apply(r)
            return _barrier(view, r, member) or _slot(view, r, member, max_unavailable)
        if r.state is RolloutState.STOPPED:
            if st is None or st.state not in TERMINAL_NODE_STATES:
                return ReportStopped(r, f"stopped: {r.state_reason}")
            continue
        if not r.active or (st is not None and st.state in TERMINAL_NODE_STATES):
            continue  # a FAILED one is stopped by finished_rollouts()
        if st is None:
            # Agents get their new files from the servers: they apply once those are done.
            if member.phase is Phase.AGENT:
                return _barrier(view, r, member) or Apply(r)
            return Apply(r)
        # APPLIED (also after a daemon killed during its restart): (re)do the restart.
        return _barrier(view, r, member) or _slot(view, r, member, max_unavailable)
    return Idle()


def _catching_up(view: ClusterView, r: Rollout, me: Member, st: NodeStatus | None) -> bool:
    """An agent skipped in `r` that is running again: it applies and restarts for `r` (active
    or done) unless a newer CA rollout replaces it (that one's apply takes the newest set)."""
    if me.phase is not Phase.AGENT or st is None or st.state not in CATCHING_UP:
        return False
    if st.state is not NodeState.SKIPPED and r.state is not RolloutState.DONE:
        return False  # an active rollout's applied node: the ordinary path
    if r.state not in (RolloutState.ACTIVE, RolloutState.DONE):
        return False
    return not any(
        o.kind is RolloutKind.CA and o.revision > r.revision and o.state is not RolloutState.STOPPED
        for o in view.rollouts
    )


def skipped(view: ClusterView, r: Rollout, name: str) -> bool:
    st = view.status(r, name)
    return st is not None and st.state is NodeState.SKIPPED


def _blocking_down(view: ClusterView, phase: Phase, r: Rollout | None) -> list[Member]:
    """Down members of `phase` that count against its limit: all but those `r` skipped."""
    return [m for m in down_members(view, phase) if r is None or not skipped(view, r, m.name)]


def _barrier(view: ClusterView, r: Rollout, me: Member) -> Wait | None:
    mine = PHASES.index(me.phase)
    pending = [
        m
        for m in participants(view, r)
        if PHASES.index(m.phase) < mine and not is_done(view, r, m.name)
    ]
    if not pending:
        return None
    first = next((m for m in pending if m.name not in view.live), pending[0])  # down first
    more = f" (and {len(pending) - 1} more)" if len(pending) > 1 else ""
    reason = f"waiting for {first.phase} node {first.name}: {node_text(view, r, first)}{more}"
    return Wait(r, reason, first.name, pending=tuple(m.name for m in pending))


def _slot(view: ClusterView, r: Rollout, me: Member, max_unavailable: int) -> Step:
    held = [s for s in view.slots if s.phase is me.phase]
    own = next((s for s in held if s.node == me.name), None)
    if own is not None:
        return Restart(r, own)
    limit = phase_limit(view, me.phase, max_unavailable)
    down = [m for m in _blocking_down(view, me.phase, r) if m.name != me.name]
    allowed = limit - len(down)
    if allowed <= 0:
        what = "could lose etcd quorum" if me.phase is Phase.ETCD else "exceeds max-unavailable"
        m = down[0]
        reason = (
            f"waiting for {m.phase} node {m.name}: {down_text(m)} (restarting another "
            f"{me.phase} node now {what}: {limit} of {me.phase} may be unavailable)"
        )
        return Wait(r, reason, m.name, "down")
    # A queue, first applied first: only the nodes at its head try for the free slots (each
    # its own slot index: no collision), the next one waits for a slot to be freed, and every
    # other one for the node just ahead of it. A hand-off then wakes one node, not the phase.
    queue = waiting_line(view, r, me.phase)
    place = queue.index(me.name) if me.name in queue else len(queue)
    free = _free_slots(view, me.phase, allowed)
    if place < len(free):
        return TakeSlot(r, me.phase, free[place])
    busy = ", ".join(f"{s.node} ({s.rollout})" for s in sorted(held, key=lambda s: s.index))
    article = "an" if me.phase.value[0] in "aeiou" else "a"
    waiting = (
        f"waiting for {article} {me.phase} restart slot: {len(held)} of {allowed} restarting"
        + (f": {busy}" if busy else "")
    )
    if place == len(free):
        return Wait(r, waiting, held[0].node if held else None, "slot")
    ahead = queue[place - 1]
    reason = f"{waiting}; {place} node(s) ahead in line, {ahead} last before this one"
    # the node ahead waits for a slot (a holder's report frees one), else for the node before it
    if place - 1 == len(free) and held:
        then: str | None = held[0].node
    else:
        then = queue[place - 2] if place >= 2 else None
    return Wait(r, reason, ahead, "queue", then=then)


def _free_slots(view: ClusterView, phase: Phase, allowed: int) -> list[int]:
    """The slot indexes of `phase` a node may take now, when `allowed` may be unavailable."""
    taken = {s.index for s in view.slots if s.phase is phase}
    return [k for k in range(allowed) if k not in taken]


def to_wake(view: ClusterView, me: str, max_unavailable: int) -> list[str]:
    """Server nodes to wake after `me` freed a restart slot or reported (the view read after
    that write): in each active rollout's current phase, the nodes a free slot goes to now; and
    when `me`'s report ended its phase, every node of the next one (their barrier opened: each
    has a new wait to say). The others in line are not woken at each hand-off (each would read
    the whole prefix to move up one place): they wake when their turn comes, and RECHECK
    refreshes the words of their wait.
    Servers watch only their wake key and the structural keys (rollout/link.py); agents watch
    everything through a server and are never in this list. The waker reads after its write,
    and a waiter reads after its own: whichever read comes later sees the other's write, so
    no wake-up is lost (RECHECK covers a writer that died in between)."""
    out: dict[str, None] = {}
    mine = view.members.get(me)
    for r in view.rollouts:
        phase = current_phase(view, r) if r.active else None
        if phase is None or phase is Phase.AGENT:
            continue
        queue = waiting_line(view, r, phase)
        limit = phase_limit(view, phase, max_unavailable)
        free = _free_slots(view, phase, limit - len(down_members(view, phase)))
        opened = (
            mine is not None
            and PHASES.index(mine.phase) < PHASES.index(phase)
            and is_done(view, r, me)
        )
        for name in queue if opened else queue[: len(free)]:
            out.setdefault(name)
    out.pop(me, None)
    return list(out)


def reported(view: ClusterView, r: Rollout, status: NodeStatus, freed: Slot) -> ClusterView:
    """`view` as it is once `status.node` has reported `status` in `r` and freed `freed`: the
    reporter's own writes, to wake the next node before it reads the store again."""
    statuses = {**view.statuses, (r.id, status.node): status}
    slots = tuple(s for s in view.slots if s != freed)
    return dataclasses.replace(view, statuses=statuses, slots=slots)


def waiting_line(view: ClusterView, r: Rollout, phase: Phase) -> list[str]:
    """Live nodes of `phase` waiting for a slot in `r`, in the order they applied it."""
    holders = {s.node for s in view.slots}
    waiting = []
    for m in participants(view, r):
        st = view.status(r, m.name)
        if (
            m.phase is phase
            and m.name in view.live
            and m.name not in holders
            and st is not None
            and st.state is NodeState.APPLIED
        ):
            waiting.append((st.revision, m.name))
    return [name for _, name in sorted(waiting)]


def over_limit(
    view: ClusterView, phase: Phase, max_unavailable: int, rollout: Rollout | None = None
) -> bool:
    """True when slots plus down members (but those `rollout` skipped) exceed the phase's
    limit (two nodes raced on stale views): the one that just took a slot gives it back."""
    held = sum(1 for s in view.slots if s.phase is phase)
    down = _blocking_down(view, phase, rollout)
    return held + len(down) > phase_limit(view, phase, max_unavailable)
