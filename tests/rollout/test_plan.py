"""plan/rollout.py: the pure ordering rules, on hand-built cluster views (no store, no clock)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from rke2certd.plan.rollout import (
    PHASES,
    SERVER_PHASES,
    Apply,
    ClusterView,
    Idle,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    ReportStopped,
    Restart,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
    TakeSlot,
    Wait,
    current_phase,
    finished_rollouts,
    newly_down,
    next_step,
    node_rows,
    over_limit,
    participants,
    phase_limit,
    phase_of,
    reported,
    superseded,
    to_wake,
)

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
E, CP, A = Phase.ETCD, Phase.CONTROL_PLANE, Phase.AGENT
ROLES = {E: ("etcd",), CP: ("control-plane",), A: ("agent",)}


def member(name: str, phase: Phase, down_since: datetime | None = None) -> Member:
    return Member(name, ROLES[phase], phase, down_since)


def ca(rid: str = "ca-1", revision: int = 10, **kw: object) -> Rollout:
    base: dict[str, object] = dict(
        id=rid,
        kind=RolloutKind.CA,
        ca_generation="gen1",
        phases=PHASES,
        nodes=None,
        state=RolloutState.ACTIVE,
        reason="test",
        created=T0,
        created_by="e1",
        revision=revision,
    )
    base.update(kw)
    return Rollout(**base)  # type: ignore[arg-type]


class Cluster:
    """A view under construction: `c.add("e1", E)`, `c.status("ca-1", "e1", DONE)`..."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.live: dict[str, Registration] = {}
        self.rollouts: list[Rollout] = []
        self.statuses: dict[tuple[str, str], NodeStatus] = {}
        self.slots: list[Slot] = []

    def add(
        self, name: str, phase: Phase, live: bool = True, down: datetime | None = None
    ) -> Cluster:
        self.members[name] = member(name, phase, down)
        if live:
            self.live[name] = Registration(name, ROLES[phase], phase)
        else:
            self.live.pop(name, None)
        return self

    def rollout(self, r: Rollout) -> Cluster:
        self.rollouts.append(r)
        return self

    def status(
        self, rid: str, node: str, state: NodeState, message: str = "", attempt: int = 1
    ) -> Cluster:
        # the store's create revision: the order in which nodes first reported (applied)
        old = self.statuses.get((rid, node))
        rev = old.revision if old else len(self.statuses) + 1
        self.statuses[(rid, node)] = NodeStatus(node, state, message, attempt=attempt, revision=rev)
        return self

    def slot(self, phase: Phase, index: int, node: str, rid: str = "ca-1") -> Cluster:
        self.slots.append(Slot(phase, index, node, rid))
        return self

    @property
    def view(self) -> ClusterView:
        rollouts = tuple(sorted(self.rollouts, key=lambda r: r.revision))
        return ClusterView(self.members, self.live, rollouts, self.statuses, tuple(self.slots))


def standard() -> Cluster:
    """Three etcd nodes, two control-plane nodes, one agent; one active CA rollout."""
    c = Cluster().add("e1", E).add("e2", E).add("e3", E).add("c1", CP).add("c2", CP).add("a1", A)
    return c.rollout(ca())


def all_applied(c: Cluster, rid: str = "ca-1") -> Cluster:
    for name in c.members:
        c.status(rid, name, NodeState.APPLIED)
    return c


# -- phases and limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "phase"),
    [
        (["etcd"], E),
        (["control-plane"], CP),
        (["agent"], A),
        (["agent", "control-plane"], CP),
        (["control-plane", "etcd", "agent"], E),
        (["agent", "etcd"], E),
    ],
)
def test_phase_is_the_earliest_role(roles: list[str], phase: Phase) -> None:
    assert phase_of(roles) is phase


def test_phase_of_nothing_known() -> None:
    with pytest.raises(ValueError, match="no known role"):
        phase_of(["worker"])


@pytest.mark.parametrize(
    ("n", "max_unavailable", "limit"),
    [(1, 1, 1), (2, 1, 1), (3, 1, 1), (3, 3, 1), (4, 3, 1), (5, 3, 2), (5, 1, 1), (7, 5, 3)],
)
def test_etcd_limit_keeps_quorum(n: int, max_unavailable: int, limit: int) -> None:
    c = Cluster()
    for i in range(n):
        c.add(f"e{i}", E)
    assert phase_limit(c.view, E, max_unavailable) == limit


def test_other_phases_take_max_unavailable() -> None:
    c = Cluster().add("c1", CP).add("c2", CP).add("c3", CP)
    assert phase_limit(c.view, CP, 2) == 2
    assert phase_limit(c.view, A, 5) == 5


# -- next step -------------------------------------------------------------------------------------


def test_no_rollout_is_idle() -> None:
    assert isinstance(next_step(Cluster().add("e1", E).view, "e1", 1), Idle)


def test_not_a_member_is_idle() -> None:
    step = next_step(standard().view, "stranger", 1)
    assert isinstance(step, Idle) and "not a registered member" in step.reason


def test_first_apply() -> None:
    step = next_step(standard().view, "c1", 1)
    assert isinstance(step, Apply) and step.rollout.id == "ca-1"


def test_first_applied_etcd_node_takes_the_slot_the_next_waits_for_it() -> None:
    c = all_applied(standard())  # applied in the order e1, e2, e3, ...
    assert next_step(c.view, "e1", 1) == TakeSlot(c.rollouts[0], E, 0)
    step = next_step(c.view, "e2", 1)
    assert isinstance(step, Wait) and step.on == "slot"
    step = next_step(c.view, "e3", 1)
    assert isinstance(step, Wait) and (step.on, step.blocker) == ("queue", "e2")
    assert step.reason.endswith("2 node(s) ahead in line, e2 last before this one")
    # e2 goes when e1 is done with the slot it is about to take: e3 reads again then
    assert step.then == "e1" and step.queue_nodes == ("e2", "e1")


def test_the_queue_moves_when_the_head_takes_its_slot() -> None:
    c = all_applied(standard()).slot(E, 0, "e1")  # e1 restarting: APPLIED, holding its slot
    step = next_step(c.view, "e2", 1)
    assert isinstance(step, Wait) and step.on == "slot" and step.blocker == "e1"
    assert step.reason == "waiting for an etcd restart slot: 1 of 1 restarting: e1 (ca-1)"
    step = next_step(c.view, "e3", 1)
    assert isinstance(step, Wait) and (step.on, step.blocker, step.then) == ("queue", "e2", "e1")
    c.slots.clear()
    c.status("ca-1", "e1", NodeState.DONE)
    assert next_step(c.view, "e2", 1) == TakeSlot(c.rollouts[0], E, 0)


def test_each_in_line_also_hears_the_node_that_lets_its_blocker_go() -> None:
    """`then`: the report that lets the node ahead go wakes this one to read too, so that its
    own turn starts from a fresh read."""
    c = Cluster().add("e1", E)
    for i in range(1, 6):
        c.add(f"a{i}", A)
    c = all_applied(c.rollout(ca())).status("ca-1", "e1", NodeState.DONE)
    assert isinstance(next_step(c.view, "a1", 1), TakeSlot)
    steps = {n: next_step(c.view, n, 1) for n in ("a2", "a3", "a4", "a5")}
    assert isinstance(steps["a2"], Wait) and steps["a2"].on == "slot"
    waits = [(s.on, s.blocker, s.then) for s in steps.values() if isinstance(s, Wait)]
    assert waits[1:] == [("queue", "a2", "a1"), ("queue", "a3", "a2"), ("queue", "a4", "a3")]
    c.slot(A, 0, "a1")  # a1 restarting: a2 waits for its slot, a3 hears a1's report too
    step = next_step(c.view, "a3", 1)
    assert isinstance(step, Wait) and (step.blocker, step.then) == ("a2", "a1")


def test_a_down_node_leaves_the_queue() -> None:
    c = Cluster()
    for i in range(5):
        c.add(f"e{i}", E)
    c.rollout(ca())
    all_applied(c).add("e0", E, live=False, down=T0)
    # 5 members: 2 may be unavailable, e0 is one; e1 heads the queue for the one left
    assert next_step(c.view, "e1", 2) == TakeSlot(c.rollouts[0], E, 0)
    assert isinstance(next_step(c.view, "e2", 2), Wait)


def test_slot_holder_restarts() -> None:
    c = all_applied(standard()).slot(E, 0, "e2")
    step = next_step(c.view, "e2", 1)
    assert isinstance(step, Restart) and step.slot.node == "e2"


def test_one_etcd_restart_at_a_time() -> None:
    c = all_applied(standard()).slot(E, 0, "e2")
    step = next_step(c.view, "e1", 3)  # max-unavailable 3, but 3 members keep quorum with 1
    assert isinstance(step, Wait)
    assert step.reason == "waiting for an etcd restart slot: 1 of 1 restarting: e2 (ca-1)"
    assert step.blocker == "e2"


def test_five_etcd_members_restart_two_at_a_time() -> None:
    c = Cluster()
    for i in range(5):
        c.add(f"e{i}", E)
    c.rollout(ca())
    all_applied(c)
    # the two at the head of the queue take different slots: they never collide
    assert next_step(c.view, "e0", 2) == TakeSlot(c.rollouts[0], E, 0)
    assert next_step(c.view, "e1", 2) == TakeSlot(c.rollouts[0], E, 1)
    c.slot(E, 0, "e0")
    step = next_step(c.view, "e1", 2)
    assert isinstance(step, TakeSlot) and step.index == 1
    c.slot(E, 1, "e1")
    assert isinstance(next_step(c.view, "e2", 2), Wait)


def test_control_plane_waits_for_every_etcd_node() -> None:
    c = all_applied(standard())
    c.status("ca-1", "e1", NodeState.DONE).slot(E, 0, "e2")  # e2 restarting
    step = next_step(c.view, "c1", 1)
    assert isinstance(step, Wait)
    assert step.reason.startswith("waiting for etcd node e2: restarting (")
    assert step.reason.endswith(") (and 1 more)")
    assert step.on == "barrier" and step.pending == ("e2", "e3")  # it opens when both are done
    c.status("ca-1", "e2", NodeState.DONE)
    step = next_step(c.view, "c1", 1)
    assert isinstance(step, Wait) and step.blocker == "e3" and step.pending == ("e3",)
    assert "applied, waiting for its turn" in step.reason
    c.status("ca-1", "e3", NodeState.DONE)
    assert isinstance(next_step(c.view, "c1", 1), TakeSlot)


def test_agents_wait_for_control_plane_too() -> None:
    c = all_applied(standard())
    for n in ("e1", "e2", "e3", "c1"):
        c.status("ca-1", n, NodeState.DONE)
    step = next_step(c.view, "a1", 1)
    assert isinstance(step, Wait) and step.blocker == "c2"


def test_agents_apply_only_after_every_server_is_done() -> None:
    """Agents take their new CA and certs from the servers: applying before the servers have
    extracted it would fetch the old set."""
    c = standard()
    step = next_step(c.view, "a1", 1)
    assert isinstance(step, Wait) and step.blocker == "e1"
    assert isinstance(next_step(c.view, "c1", 1), Apply)  # servers apply at once
    for n in ("e1", "e2", "e3", "c1", "c2"):
        c.status("ca-1", n, NodeState.DONE)
    assert isinstance(next_step(c.view, "a1", 1), Apply)


def test_barrier_names_a_down_node_first_and_how_to_go_on() -> None:
    c = all_applied(standard()).add("e3", E, live=False, down=T0)
    step = next_step(c.view, "c1", 1)
    assert isinstance(step, Wait) and step.blocker == "e3"
    assert step.reason == (
        "waiting for etcd node e3: not running since 2030-01-02 03:04:05 UTC; start rke2certd "
        "there or run `rke2certd node remove e3` (and 2 more)"
    )


def test_down_etcd_member_blocks_other_etcd_restarts_until_removed() -> None:
    c = all_applied(standard()).add("e3", E, live=False, down=T0)
    step = next_step(c.view, "e1", 1)
    assert isinstance(step, Wait) and step.blocker == "e3"
    assert "could lose etcd quorum" in step.reason
    assert "rke2certd node remove e3" in step.reason
    del c.members["e3"]  # `rke2certd node remove e3`
    assert isinstance(next_step(c.view, "e1", 1), TakeSlot)
    c.status("ca-1", "e1", NodeState.DONE).status("ca-1", "e2", NodeState.DONE)
    assert isinstance(next_step(c.view, "c1", 1), TakeSlot)  # the barrier forgot e3 too


def test_down_member_counts_against_max_unavailable() -> None:
    c = all_applied(standard()).add("c2", CP, live=False)
    for n in ("e1", "e2", "e3"):
        c.status("ca-1", n, NodeState.DONE)
    step = next_step(c.view, "c1", 1)
    assert isinstance(step, Wait) and "exceeds max-unavailable" in step.reason
    assert isinstance(next_step(c.view, "c1", 2), TakeSlot)


def test_a_returning_node_finds_its_work() -> None:
    """Down while the others went on; back, it applies and restarts in its turn."""
    c = all_applied(standard())
    del c.statuses[("ca-1", "c2")]
    for n in ("e1", "e2", "e3", "c1"):
        c.status("ca-1", n, NodeState.DONE)
    assert isinstance(next_step(c.view, "c2", 1), Apply)


def test_a_node_killed_during_its_restart_restarts_again() -> None:
    """A daemon killed during its restart left APPLIED (its slot gone with its lease): the new
    one takes a slot and redoes it."""
    c = all_applied(standard())
    assert isinstance(next_step(c.view, "e1", 1), TakeSlot)


def test_stopped_rollout_is_reported_and_nothing_restarts() -> None:
    r = ca(state=RolloutState.STOPPED, state_reason="etcd node e1 failed: health")
    c = standard()
    c.rollouts = [r]
    all_applied(c).status("ca-1", "e1", NodeState.FAILED).status("ca-1", "e2", NodeState.DONE)
    step = next_step(c.view, "c1", 1)
    assert step == ReportStopped(r, "stopped: etcd node e1 failed: health")
    assert isinstance(next_step(c.view, "e1", 1), Idle)  # failed: terminal
    assert isinstance(next_step(c.view, "e2", 1), Idle)  # done
    c.status("ca-1", "c1", NodeState.STOPPED)
    assert isinstance(next_step(c.view, "c1", 1), Idle)


def test_rollouts_are_handled_oldest_first() -> None:
    c = all_applied(standard())
    c.rollout(ca("renewal-c1", revision=20, kind=RolloutKind.RENEWAL, phases=(CP,), nodes=("c1",)))
    c.status("renewal-c1", "c1", NodeState.APPLIED)
    step = next_step(c.view, "c1", 1)
    assert isinstance(step, Wait) and step.rollout.id == "ca-1"
    for n in c.members:
        c.status("ca-1", n, NodeState.DONE)
    step = next_step(c.view, "c1", 1)
    assert isinstance(step, TakeSlot) and step.rollout.id == "renewal-c1"


def test_renewal_restarts_only_its_node() -> None:
    r = ca("renewal-c2", kind=RolloutKind.RENEWAL, phases=(CP,), nodes=("c2",))
    c = Cluster().add("e1", E).add("c1", CP).add("c2", CP).rollout(r)
    c.status("renewal-c2", "c2", NodeState.APPLIED)
    assert [m.name for m in participants(c.view, r)] == ["c2"]
    assert isinstance(next_step(c.view, "c2", 1), TakeSlot)  # no barrier: e1 takes no part
    assert isinstance(next_step(c.view, "c1", 1), Idle)
    assert isinstance(next_step(c.view, "e1", 1), Idle)


def test_renewal_still_shares_the_phase_slots() -> None:
    """A renewal never restarts a node while another of its phase restarts for a CA rollout."""
    r = ca("renewal-e2", revision=5, kind=RolloutKind.RENEWAL, phases=(E,), nodes=("e2",))
    c = all_applied(standard()).rollout(r).status("renewal-e2", "e2", NodeState.APPLIED)
    c.status("ca-1", "e2", NodeState.DONE).slot(E, 0, "e1")
    step = next_step(c.view, "e2", 1)
    assert isinstance(step, Wait) and step.rollout.id == "renewal-e2" and step.blocker == "e1"


def test_service_key_rollout_leaves_agents_alone() -> None:
    c = all_applied(standard())
    c.rollouts = [ca(phases=SERVER_PHASES)]
    assert isinstance(next_step(c.view, "a1", 1), Idle)
    assert "a1" not in [m.name for m in participants(c.view, c.rollouts[0])]


def test_done_and_superseded_rollouts_are_skipped() -> None:
    c = standard()
    c.rollouts = [
        ca(state=RolloutState.SUPERSEDED),
        ca("ca-2", revision=11, state=RolloutState.DONE),
    ]
    assert isinstance(next_step(c.view, "e1", 1), Idle)


# -- housekeeping ----------------------------------------------------------------------------------


def test_all_done_finishes_the_rollout() -> None:
    c = standard()
    for n in c.members:
        c.status("ca-1", n, NodeState.DONE)
    [fin] = finished_rollouts(c.view)
    assert fin.state is RolloutState.DONE and fin.reason == "6 node(s) done"
    assert current_phase(c.view, c.rollouts[0]) is None


def test_removed_pending_member_lets_the_rollout_finish() -> None:
    c = standard()
    for n in c.members:
        if n != "a1":
            c.status("ca-1", n, NodeState.DONE)
    assert finished_rollouts(c.view) == []
    assert current_phase(c.view, c.rollouts[0]) is A
    del c.members["a1"]
    assert [f.state for f in finished_rollouts(c.view)] == [RolloutState.DONE]


def test_a_failure_stops_the_rollout_with_its_reason() -> None:
    c = all_applied(standard()).status("ca-1", "e2", NodeState.FAILED, "health failed: refused")
    [fin] = finished_rollouts(c.view)
    assert fin.state is RolloutState.STOPPED
    assert fin.reason == "etcd node e2 failed: health failed: refused"


def test_current_phase_moves_on() -> None:
    c = all_applied(standard())
    r = c.rollouts[0]
    assert current_phase(c.view, r) is E
    for n in ("e1", "e2", "e3"):
        c.status("ca-1", n, NodeState.DONE)
    assert current_phase(c.view, r) is CP


def test_newer_ca_rollout_supersedes_older_active_ones() -> None:
    c = standard()
    c.rollout(ca("renewal-x", revision=11, kind=RolloutKind.RENEWAL, phases=(E,), nodes=("e1",)))
    c.rollout(ca("ca-old-done", revision=5, state=RolloutState.DONE))
    new = ca("ca-2", revision=12)
    c.rollout(new)
    assert [r.id for r in superseded(c.view, new)] == ["ca-1"]
    renewal = c.view.rollout("renewal-x")
    assert renewal is not None and superseded(c.view, renewal) == []


def test_newly_down_is_reported_once() -> None:
    c = Cluster().add("e1", E).add("e2", E, live=False).add("e3", E, live=False, down=T0)
    assert newly_down(c.view) == ["e2"]


def test_over_limit_after_a_race() -> None:
    c = standard().slot(E, 0, "e1")
    assert not over_limit(c.view, E, 1)
    c.slot(E, 1, "e2")
    assert over_limit(c.view, E, 1)


def test_node_rows_say_what_each_node_does() -> None:
    c = standard().add("c2", CP, live=False, down=T0)
    c.status("ca-1", "e1", NodeState.DONE, "restart 1.0s").status("ca-1", "e2", NodeState.APPLIED)
    c.slots.append(Slot(E, 0, "e2", "ca-1", T0))  # its restart: a slot, no status write
    rows = {r.name: r for r in node_rows(c.view, c.rollouts[0])}
    assert (rows["e1"].state, rows["e1"].message) == ("done", "restart 1.0s")
    assert (rows["e2"].state, rows["e2"].message) == ("restarting", "since 2030-01-02 03:04:05 UTC")
    assert rows["e3"].state == "pending"
    step = next_step(c.status("ca-1", "c1", NodeState.APPLIED).view, "c1", 1)
    assert isinstance(step, Wait)
    since = "since 2030-01-02 03:04:05 UTC"
    assert step.reason == f"waiting for etcd node e2: restarting ({since}) (and 1 more)"
    assert not rows["c2"].live and "node remove c2" in rows["c2"].message
    c.rollouts = [ca(state=RolloutState.STOPPED, state_reason="e9 failed")]
    rows = {r.name: r for r in node_rows(c.view, c.rollouts[0])}
    assert (rows["e3"].state, rows["e3"].message) == ("stopped", "e9 failed")


def test_resumed_rollout_forgets_the_last_attempts_failures() -> None:
    """`rollout resume` = attempt 2: failed and stopped nodes start over, done ones stay done."""
    c = all_applied(standard())
    c.status("ca-1", "e1", NodeState.DONE).status("ca-1", "e2", NodeState.FAILED, "gate")
    c.status("ca-1", "c1", NodeState.STOPPED, "stopped: e2 failed")
    c.rollouts = [ca(attempt=2)]
    assert finished_rollouts(c.view) == []
    assert isinstance(next_step(c.view, "e2", 1), Apply)
    assert isinstance(next_step(c.view, "c1", 1), Apply)
    assert isinstance(next_step(c.view, "e1", 1), Idle)
    c.status("ca-1", "e2", NodeState.FAILED, "gate again", attempt=2)
    [fin] = finished_rollouts(c.view)
    assert fin.state is RolloutState.STOPPED and "gate again" in fin.reason


# -- whom a hand-off wakes (servers watch only their wake key and the structural keys) ----------


def test_a_freed_slot_wakes_the_head_of_the_queue_only() -> None:
    c = all_applied(standard()).slot(E, 0, "e1")
    c.slots.clear()  # e1 done: its slot is free again
    c.status("ca-1", "e1", NodeState.DONE)
    assert to_wake(c.view, "e1", 1) == ["e2"]  # e2 takes it; e3 wakes when it is its turn
    c.slot(E, 0, "e2")
    assert to_wake(c.view, "e2", 1) == []  # the slot is taken: nobody can go on


def test_with_two_free_slots_two_nodes_are_woken() -> None:
    c = Cluster()
    for i in range(5):
        c.add(f"e{i}", E)
    c.rollout(ca())
    all_applied(c).status("ca-1", "e0", NodeState.DONE)
    assert to_wake(c.view, "e0", 2) == ["e1", "e2"]  # 5 members: 2 may restart at once


def test_the_last_report_of_a_phase_wakes_every_node_of_the_next_one() -> None:
    c = all_applied(standard())
    for n in ("e1", "e2"):
        c.status("ca-1", n, NodeState.DONE)
    assert to_wake(c.view, "e2", 1) == ["e3"]  # the last etcd node: it takes the slot
    c.status("ca-1", "e3", NodeState.DONE)
    # the barrier opened: every control-plane node has a new wait to say, c1 takes the slot
    assert to_wake(c.view, "e3", 1) == ["c1", "c2"]
    c.status("ca-1", "c1", NodeState.DONE).status("ca-1", "c2", NodeState.DONE)
    assert to_wake(c.view, "c2", 1) == []  # agents: they watch everything through a server


def test_the_reporter_knows_whom_to_wake_before_it_reads_again() -> None:
    """`reported`: the view the restart began on, plus the reporter's own two writes."""
    c = all_applied(standard()).slot(E, 0, "e1")
    done = NodeStatus("e1", NodeState.DONE)
    after = reported(c.view, c.rollouts[0], done, Slot(E, 0, "e1", "ca-1"))
    assert after.slots == () and after.statuses[("ca-1", "e1")] == done
    assert to_wake(after, "e1", 1) == ["e2"]
    assert c.view.slots and c.view.statuses[("ca-1", "e1")].state is NodeState.APPLIED  # as was


def test_nobody_to_wake_without_an_active_rollout_or_a_queue() -> None:
    c = standard()
    assert to_wake(c.view, "e1", 1) == []  # nobody applied yet: each goes on by itself
    c.rollouts = [ca(state=RolloutState.DONE)]
    assert to_wake(all_applied(c).view, "e1", 1) == []


def test_renewal_waiters_are_woken_by_a_slot_another_rollout_freed() -> None:
    c = all_applied(standard())
    c.rollout(ca("renewal-c2", 20, kind=RolloutKind.RENEWAL, phases=(CP,), nodes=("c2",)))
    c.status("renewal-c2", "c2", NodeState.APPLIED)
    for n in ("e1", "e2", "e3"):
        c.status("ca-1", n, NodeState.DONE)
    # c1 restarted for ca-1 and freed the control-plane slot: c2 waits in both rollouts
    c.status("ca-1", "c1", NodeState.DONE)
    assert "c2" in to_wake(c.view, "c1", 1)


@pytest.mark.parametrize("seed", range(40))
def test_a_rollout_woken_only_by_to_wake_never_stalls(seed: int) -> None:
    """A model of the servers' watches: a node acts when the rollout appears (structural) and
    then only when `to_wake` names it, or after its own step. Random sizes, max-unavailable,
    apply order and restart lengths: every rollout ends with every node done, never with all
    nodes asleep, and the limits hold throughout."""
    rnd = random.Random(seed)
    c = Cluster()
    n_etcd, n_cp = rnd.randint(1, 5), rnd.randint(0, 6)
    for i in range(n_etcd):
        c.add(f"e{i}", E)
    for i in range(n_cp):
        c.add(f"c{i}", CP)
    c.rollout(ca(phases=SERVER_PHASES))
    mu = rnd.randint(1, 3)
    awake = set(c.members)  # the rollout record: every node hears it
    busy: set[str] = set()  # restarting (holding a slot)
    for _ in range(10_000):
        r = c.rollouts[0]
        if all(
            c.view.status(r, n) and c.view.status(r, n).state is NodeState.DONE for n in c.members
        ):  # type: ignore[union-attr]
            break
        assert awake or busy, f"stalled: {c.view.statuses}, slots {c.slots}"
        if busy and (not awake or rnd.random() < 0.3):
            name = rnd.choice(sorted(busy))  # a restart finishes: done, the slot freed
            busy.discard(name)
            c.slots = [s for s in c.slots if s.node != name]
            c.status(r.id, name, NodeState.DONE)
            awake.update(to_wake(c.view, name, mu))
            continue
        name = rnd.choice(sorted(awake))
        step = next_step(c.view, name, mu)
        if isinstance(step, Apply):
            c.status(r.id, name, NodeState.APPLIED)
        elif isinstance(step, TakeSlot):
            c.slot(step.phase, step.index, name)
            for phase in SERVER_PHASES:
                held = sum(1 for s in c.slots if s.phase is phase)
                assert held <= phase_limit(c.view, phase, mu)
        elif isinstance(step, Restart):
            awake.discard(name)
            busy.add(name)
            cp_started = step.slot.phase is CP
            if cp_started:  # never before every etcd node is done
                assert all(c.view.status(r, f"e{i}").state is NodeState.DONE for i in range(n_etcd))  # type: ignore[union-attr]
        else:
            awake.discard(name)  # a wait: asleep until woken
    else:
        raise AssertionError("the rollout did not end")
