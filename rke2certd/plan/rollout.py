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
"""

from __future__ import annotations

import dataclasses
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
    APPLIED = "applied"  # new files on disk, waiting for its turn
    # restart command, then health gate: now said by the node's slot (see restart_slot), not
    # written; an earlier version's record, or an earlier run's, still reads
    RESTARTING = "restarting"
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
CATCHING_UP = frozenset({NodeState.SKIPPED, NodeState.APPLIED, NodeState.RESTARTING})


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


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "an unknown time"


def down_text(m: Member) -> str:
    return (
        f"not running since {_when(m.down_since)}; start rke2certd there or run "
        f"`rke2certd node remove {m.name}`"
    )


def restart_slot(view: ClusterView, rollout: Rollout, node: str) -> Slot | None:
    """The slot `node` holds for `rollout`: it is restarting for it (its status still says
    applied until it reports done: the slot is the record of a restart in progress)."""
    return next((s for s in view.slots if s.node == node and s.rollout == rollout.id), None)


def _restarting(view: ClusterView, rollout: Rollout, node: str) -> str | None:
    st = view.status(rollout, node)
    slot = restart_slot(view, rollout, node)
    if slot is None or (st is not None and st.state in TERMINAL_NODE_STATES):
        return None
    return f"since {_when(slot.since)}"


def node_text(view: ClusterView, rollout: Rollout, m: Member) -> str:
    """What `m` is doing for `rollout`, as the others see it."""
    st = view.status(rollout, m.name)
    if m.name not in view.live and (st is None or st.state not in TERMINAL_NODE_STATES):
        return down_text(m)
    if (since := _restarting(view, rollout, m.name)) is not None:
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
        # APPLIED, or RESTARTING left by an earlier run of this daemon: (re)do the restart.
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
    queue = _queue(view, r, me.phase)
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
    return Wait(r, reason, ahead, "queue")


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
        queue = _queue(view, r, phase)
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


def _queue(view: ClusterView, r: Rollout, phase: Phase) -> list[str]:
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
            and st.state in (NodeState.APPLIED, NodeState.RESTARTING)
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
            f"{m.phase} node {m.name} not running since {_when(m.down_since)}, "
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
        if (since := _restarting(view, rollout, m.name)) is not None:
            state, message = NodeState.RESTARTING.value, since
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
