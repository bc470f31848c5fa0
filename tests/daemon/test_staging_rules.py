"""The pure rules of plan/ready_sets.py that the daemon's loop follows: which sets may go now, in
which order, and when to wake up next (a deadline in the past would make the loop spin)."""

from __future__ import annotations

from rke2certd.plan.ready_sets import Arrival, SetState, next_deadline, ready_sets

QUIET = 5.0


def renamed(name: str, at: float, ready: bool = False) -> SetState:
    return SetState(name, Arrival.RENAMED, at, ready)


def created(name: str, at: float, ready: bool = False) -> SetState:
    return SetState(name, Arrival.CREATED, at, ready)


def test_a_renamed_set_goes_after_the_quiet_period_a_created_one_only_with_its_marker() -> None:
    states = [renamed("a", 100.0), created("b", 0.0)]
    assert ready_sets(states, 104.9, QUIET) == []
    assert ready_sets(states, 105.0, QUIET) == ["a"]
    assert ready_sets(states, 10_000.0, QUIET) == ["a"]  # b: never without READY
    assert ready_sets([created("b", 0.0, ready=True)], 0.0, QUIET) == ["b"]


def test_sets_staged_together_go_in_name_order_whichever_came_first() -> None:
    # set-b renamed in a moment before set-a: set-b's quiet period ends first, but set-a is
    # still waiting for its own, so set-b waits for it
    states = [renamed("set-b", 100.0), renamed("set-a", 100.01)]
    assert ready_sets(states, 105.005, QUIET) == []
    assert ready_sets(states, 105.01, QUIET) == ["set-a", "set-b"]
    assert next_deadline(states, QUIET) == 105.01


def test_a_marked_set_waits_for_an_earlier_name_still_in_its_quiet_period() -> None:
    states = [renamed("a", 100.0), created("b", 101.0, ready=True)]
    assert ready_sets(states, 101.0, QUIET) == []
    assert next_deadline(states, QUIET) == 105.0  # not b's "now": the loop would spin
    assert ready_sets(states, 105.0, QUIET) == ["a", "b"]


def test_a_set_made_in_place_without_its_marker_holds_nothing_back() -> None:
    states = [created("a-still-writing", 100.0), renamed("b", 100.0)]
    assert ready_sets(states, 105.0, QUIET) == ["b"]
    assert next_deadline([created("a-still-writing", 100.0)], QUIET) is None


def test_next_deadline_is_the_earliest_time_a_set_may_go() -> None:
    assert next_deadline([], QUIET) is None
    assert next_deadline([renamed("a", 100.0), renamed("b", 90.0)], QUIET) == 105.0
    assert next_deadline([created("a", 0.0, ready=True)], QUIET) is None  # goes now
    startup = SetState("old", Arrival.STARTUP, 50.0, False)
    assert next_deadline([startup], QUIET) == 55.0
    assert ready_sets([startup], 55.0, QUIET) == ["old"]
