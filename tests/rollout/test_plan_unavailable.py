"""plan/rollout.py: members that are not running when their turn comes (agent-unavailable-grace,
agent-unavailable: skip|wait), and an agent catching up when it returns. Pure: hand-built views,
`now` passed in."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from rke2certd.plan.rollout import (
    Apply,
    Availability,
    Idle,
    NodeState,
    NodeStatus,
    RolloutKind,
    RolloutState,
    TakeSlot,
    Unavailable,
    Wait,
    blocked,
    current_phase,
    finished_rollouts,
    next_blocking,
    next_step,
    node_rows,
    over_limit,
    turn_started,
)

from .test_plan import CP, T0, A, Cluster, E, ca, standard

GRACE = timedelta(minutes=10)
SKIP = Availability(GRACE, Unavailable.SKIP)
WAIT = Availability(GRACE, Unavailable.WAIT)
SERVERS_DONE = T0 + timedelta(minutes=5)


def servers_done(c: Cluster, rid: str = "ca-1") -> Cluster:
    """Every server reported done; the last one at SERVERS_DONE."""
    for name, m in c.members.items():
        if m.phase is not A:
            c.statuses[(rid, name)] = NodeStatus(
                name, NodeState.DONE, finished=SERVERS_DONE, revision=len(c.statuses) + 1
            )
    return c


def fleet(down_since: timedelta = timedelta(0)) -> Cluster:
    """The standard servers, agents a1..a3 running, a4 down since T0 + down_since."""
    c = standard().add("a2", A).add("a3", A).add("a4", A, live=False, down=T0 + down_since)
    return servers_done(c)


def skipped(c: Cluster, node: str, rid: str = "ca-1") -> Cluster:
    c.statuses[(rid, node)] = NodeStatus(node, NodeState.SKIPPED, "not running", revision=99)
    return c


def test_the_turn_of_agents_starts_when_the_last_server_is_done() -> None:
    c = fleet()
    assert turn_started(c.view, c.rollouts[0], c.members["a4"]) == SERVERS_DONE
    assert turn_started(c.view, c.rollouts[0], c.members["e1"]) == T0  # the rollout's start
    c.status("ca-1", "c2", NodeState.APPLIED)  # a server not done: no agent's turn yet
    assert turn_started(c.view, c.rollouts[0], c.members["a4"]) is None


def test_a_down_agent_is_blocked_only_after_the_grace_into_its_turn() -> None:
    c = fleet()  # down since before its turn: the grace counts from the turn
    view = c.view
    assert blocked(view, SERVERS_DONE + GRACE - timedelta(seconds=1), SKIP) == []
    assert next_blocking(view, SERVERS_DONE, SKIP) == SERVERS_DONE + GRACE
    [b] = blocked(view, SERVERS_DONE + GRACE, SKIP)
    assert (b.member.name, b.skip, b.since) == ("a4", True, SERVERS_DONE)
    assert "agent node a4 not running since 2030-01-02 03:04:05 UTC" in b.reason
    assert "10m00s into its turn" in b.reason and "skipped" in b.reason
    assert next_blocking(view, SERVERS_DONE + GRACE, SKIP) is None  # nothing left to wait for


def test_going_down_during_its_turn_counts_from_then() -> None:
    c = fleet(down_since=timedelta(minutes=7))  # after the servers were done
    later = T0 + timedelta(minutes=7) + GRACE
    assert blocked(c.view, later - timedelta(seconds=1), SKIP) == []
    assert [b.member.name for b in blocked(c.view, later, SKIP)] == ["a4"]


def test_no_agent_is_blocked_before_its_turn() -> None:
    c = standard().add("a4", A, live=False, down=T0).status("ca-1", "e1", NodeState.APPLIED)
    assert blocked(c.view, T0 + timedelta(days=1), SKIP) == []
    assert next_blocking(c.view, T0, SKIP) is None


def test_a_down_member_not_yet_recorded_down_is_not_blocked() -> None:
    c = servers_done(standard().add("a4", A, live=False))  # down_since not written yet
    assert blocked(c.view, T0 + timedelta(days=1), SKIP) == []


def test_wait_policy_reports_and_waits() -> None:
    c = fleet()
    [b] = blocked(c.view, SERVERS_DONE + GRACE, WAIT)
    assert not b.skip
    assert "rke2certd node remove a4" in b.reason and "agent-unavailable: wait" in b.reason


def test_etcd_and_control_plane_members_are_never_skipped() -> None:
    c = standard().add("e3", E, live=False, down=T0).add("c2", CP, live=False, down=T0)
    now = T0 + GRACE
    bs = {b.member.name: b for b in blocked(c.view, now, SKIP)}
    assert set(bs) == {"e3"}  # control-plane's turn has not come (etcd not done)
    assert not bs["e3"].skip and "the rollout waits for it" in bs["e3"].reason
    for name in ("e1", "e2", "e3", "x1"):
        c.statuses[("ca-1", name)] = NodeStatus(name, NodeState.DONE, finished=T0)
    bs = {b.member.name: b for b in blocked(c.view, now, SKIP)}
    assert set(bs) == {"c2"} and not bs["c2"].skip


def test_a_down_agent_blocks_the_others_until_skipped() -> None:
    c = fleet()
    for a in ("a1", "a2", "a3"):
        c.status("ca-1", a, NodeState.APPLIED)
    step = next_step(c.view, "a1", 1)
    assert isinstance(step, Wait) and step.on == "down" and step.blocker == "a4"
    skipped(c, "a4")
    step = next_step(c.view, "a1", 1)
    assert isinstance(step, TakeSlot) and step.phase is A
    c.slot(A, 0, "a1")
    assert not over_limit(c.view, A, 1, c.rollouts[0])  # the skipped node does not count
    assert over_limit(c.view, A, 1)  # without the rollout: every down member counts


def test_a_rollout_with_a_skipped_agent_finishes_done_and_says_so() -> None:
    c = fleet()
    for a in ("a1", "a2", "a3"):
        c.status("ca-1", a, NodeState.DONE)
    assert finished_rollouts(c.view) == []
    assert current_phase(c.view, c.rollouts[0]) is A
    skipped(c, "a4")
    assert current_phase(c.view, c.rollouts[0]) is None
    [fin] = finished_rollouts(c.view)
    assert fin.state is RolloutState.DONE
    assert fin.reason == (
        "8 node(s) done, 1 skipped (not running; each catches up when it returns): a4"
    )
    row = next(r for r in node_rows(c.view, c.rollouts[0]) if r.name == "a4")
    assert (row.live, row.state, row.message) == (False, "skipped", "not running")


def _returned(c: Cluster, state: RolloutState) -> Cluster:
    """a4 is back (live), skipped in ca-1, which is now in `state`."""
    for a in ("a1", "a2", "a3"):
        c.status("ca-1", a, NodeState.DONE)
    skipped(c, "a4").add("a4", A)
    c.rollouts[0] = dataclasses.replace(c.rollouts[0], state=state)
    return c


def test_a_returning_agent_catches_up_in_a_done_rollout() -> None:
    c = _returned(fleet(), RolloutState.DONE)
    step = next_step(c.view, "a4", 1)
    assert isinstance(step, Apply) and step.rollout.id == "ca-1"
    c.status("ca-1", "a4", NodeState.APPLIED)
    step = next_step(c.view, "a4", 1)
    assert isinstance(step, TakeSlot) and step.phase is A
    c.slot(A, 0, "a4")
    assert type(next_step(c.view, "a4", 1)).__name__ == "Restart"
    c.slots.clear()
    c.status("ca-1", "a4", NodeState.DONE)
    assert isinstance(next_step(c.view, "a4", 1), Idle)


def test_a_returning_agent_catches_up_in_an_active_rollout() -> None:
    c = _returned(fleet(), RolloutState.ACTIVE)
    assert isinstance(next_step(c.view, "a4", 1), Apply)


def test_a_returning_agent_waits_for_a_slot_like_the_others() -> None:
    c = _returned(fleet(), RolloutState.DONE).status("ca-1", "a4", NodeState.APPLIED)
    c.slot(A, 0, "a9", "renewal-x")
    step = next_step(c.view, "a4", 1)
    assert isinstance(step, Wait) and step.on == "slot"


def test_a_newer_ca_rollout_replaces_the_catch_up() -> None:
    c = _returned(fleet(), RolloutState.DONE)
    c.rollout(ca("ca-2", revision=20, ca_generation="gen2"))
    step = next_step(c.view, "a4", 1)
    assert isinstance(step, Wait) and step.rollout.id == "ca-2"  # ca-2's servers are not done


def test_no_catch_up_in_a_stopped_rollout_nor_for_servers() -> None:
    c = _returned(fleet(), RolloutState.STOPPED)
    assert isinstance(next_step(c.view, "a4", 1), Idle)
    c = standard()
    c.statuses[("ca-1", "e1")] = NodeStatus("e1", NodeState.SKIPPED)  # never written for servers
    c.rollouts[0] = dataclasses.replace(c.rollouts[0], state=RolloutState.DONE)
    assert isinstance(next_step(c.view, "e1", 1), Idle)


def test_renewal_rollouts_are_not_caught_up_by_kind() -> None:
    """A skipped agent in a done renewal rollout (agents start none; a server's rollout that
    named it) still catches up: only a newer CA rollout replaces the catch-up."""
    c = Cluster().add("e1", E).add("a1", A)
    r = ca("renew-1", kind=RolloutKind.RENEWAL, nodes=("a1",), state=RolloutState.DONE)
    c.rollout(r)
    skipped(c, "a1", "renew-1")
    assert isinstance(next_step(c.view, "a1", 1), Apply)
