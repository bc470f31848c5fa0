"""The periodic look (rollout/look.py): which keys stand in for a full read after each step,
what the last full read saw of them, and when the look gives way to a full read again."""

from __future__ import annotations

from datetime import UTC, datetime

from rke2certd.datastore.base import KV
from rke2certd.plan.rollout import (
    PHASES,
    Apply,
    Idle,
    Phase,
    Restart,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
    TakeSlot,
    Wait,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.look import LOOKS_PER_READ, MAX_KEYS, Look, look_for

NOW = datetime(2030, 1, 2, tzinfo=UTC)
R = Rollout("ca-g2", RolloutKind.CA, "g2", PHASES, None, RolloutState.ACTIVE, "test", NOW, "e1")
SLOTS = f"{rec.SLOTS}agent/"


def _kv(key: str, revision: int, value: bytes = b"{}") -> KV:
    return KV(key, value, revision, revision)


def _slot(index: int, node: str, revision: int, phase: Phase = Phase.AGENT) -> KV:
    value = rec.encode_slot(Slot(phase, index, node, "ca-g2", NOW))
    return _kv(rec.slot_key(phase, index), revision, value)


FLEET = [
    _kv(rec.rollout_key("ca-g2"), 10),
    _kv(rec.status_key("ca-g2", "c1"), 11),
    _kv(rec.status_key("ca-g2", "c10"), 12),  # c1's key is a prefix of c10's
    _kv(rec.node_key("c1"), 13),
    _kv(rec.member_key("c1"), 14),
    _slot(0, "c1", 15),
    _slot(0, "s0", 16, Phase.CONTROL_PLANE),
    _slot(1, "x9", 17),  # another node's slot, further up the line
]


def test_an_idle_node_looks_at_the_rollout_records_without_limit() -> None:
    look = look_for(Idle(), Phase.AGENT, False, FLEET)
    assert look is not None
    assert (look.prefixes, look.keys, look.left) == ((rec.ROLLOUTS,), (), None)
    assert look.marks == {(rec.rollout_key("ca-g2"), 10)}
    assert look.next() is look  # never a full read for its own sake


def test_a_server_idle_in_a_rollout_in_progress_reads_everything() -> None:
    # done with it, but the rollout's progress is what its status line says, and it keeps house
    for phase in (Phase.ETCD, Phase.CONTROL_PLANE):
        assert look_for(Idle(), phase, True, FLEET) is None


def test_an_agent_idle_in_a_rollout_in_progress_looks_at_the_rollout_records() -> None:
    # a fleet's done agents do not read the whole fleet at each recheck while the line goes on
    # (their status line says the agents' phase until the rollout record moves); a full read
    # every LOOKS_PER_READ looks, as a waiter's, covers what only a full read sees
    look = look_for(Idle(), Phase.AGENT, True, FLEET)
    assert look is not None
    assert (look.prefixes, look.keys, look.left) == ((rec.ROLLOUTS,), (), LOOKS_PER_READ)
    assert look.marks == {(rec.rollout_key("ca-g2"), 10)}
    moved = [kv if kv.key != rec.rollout_key("ca-g2") else _kv(kv.key, 99) for kv in FLEET]
    assert look.seen(moved) != look.marks  # the rollout finished or stopped: a full read


def test_a_queue_waiter_looks_at_the_node_ahead_and_the_slots_it_holds() -> None:
    wait = Wait(R, "in line", "c1", "queue")
    look = look_for(wait, Phase.AGENT, True, FLEET)
    assert look is not None
    assert (look.prefixes, look.holder) == ((rec.ROLLOUTS, SLOTS), "c1")
    assert look.keys == (rec.status_key("ca-g2", "c1"),)
    assert look.marks == {
        (rec.rollout_key("ca-g2"), 10),
        (rec.status_key("ca-g2", "c1"), 11),  # not c10's, whose key it is a prefix of
        (rec.slot_key(Phase.AGENT, 0), 15),  # c1's; not the control-plane slot, not x9's
    }
    assert look.left == LOOKS_PER_READ


def test_a_queue_waiter_looks_at_the_node_before_its_blocker_too() -> None:
    look = look_for(Wait(R, "in line", "c1", "queue", then="c10"), Phase.AGENT, True, FLEET)
    assert look is not None and look.holder == "c1"
    assert look.keys == (rec.status_key("ca-g2", "c1"), rec.status_key("ca-g2", "c10"))
    assert (rec.status_key("ca-g2", "c10"), 12) in look.marks


def test_a_queue_waiter_does_not_move_for_hand_offs_up_the_line() -> None:
    """Slots taken and freed by others leave its marks alone (in a line of a thousand, a
    hand-off every fraction of a second would make every look a full read); the node ahead
    taking or freeing one, or a slot it cannot read, moves them."""
    look = look_for(Wait(R, "in line", "c1", "queue"), Phase.AGENT, True, FLEET)
    assert look is not None
    others = [kv for kv in FLEET if kv.key != rec.slot_key(Phase.AGENT, 1)]
    assert look.seen(others) == look.marks  # x9 freed its slot
    assert look.seen([*others, _slot(1, "x10", 30)]) == look.marks  # x10 took it
    assert look.seen([*others, _slot(1, "c1", 30)]) != look.marks  # c1 took a second one
    freed = [kv for kv in FLEET if kv.key != rec.slot_key(Phase.AGENT, 0)]
    assert look.seen(freed) != look.marks  # c1 freed its slot
    unreadable = [*others, _kv(rec.slot_key(Phase.AGENT, 1), 31, b"not json")]
    assert look.seen(unreadable) != look.marks


def test_a_wait_for_a_node_down_looks_at_its_status_and_registration() -> None:
    look = look_for(Wait(R, "down", "c1", "down"), Phase.AGENT, True, FLEET)
    assert look is not None
    assert look.prefixes == (rec.ROLLOUTS,)
    assert look.keys == (rec.status_key("ca-g2", "c1"), rec.node_key("c1"))
    assert (rec.node_key("c1"), 13) in look.marks


def test_a_barrier_looks_at_each_pending_node_up_to_a_limit() -> None:
    few = Wait(R, "barrier", "s1", "barrier", ("s1", "s2"))
    look = look_for(few, Phase.AGENT, True, FLEET)
    assert look is not None
    assert look.keys == (rec.status_key("ca-g2", "s1"), rec.status_key("ca-g2", "s2"))
    many = tuple(f"s{i}" for i in range(MAX_KEYS + 1))
    assert look_for(Wait(R, "barrier", "s0", "barrier", many), Phase.AGENT, True, FLEET) is None


def test_a_slot_waiter_looks_at_the_slots() -> None:
    look = look_for(Wait(R, "slot", "c1", "slot"), Phase.AGENT, True, FLEET)
    assert look is not None
    assert (look.prefixes, look.keys, look.holder) == ((rec.ROLLOUTS, SLOTS), (), None)
    freed = [kv for kv in FLEET if kv.key != rec.slot_key(Phase.AGENT, 1)]
    assert look.seen(freed) != look.marks  # any slot freed: it may take it
    # with nobody holding one (blocker None) too: a slot freed is what it waits for
    assert look_for(Wait(R, "slot", None, "slot"), Phase.AGENT, True, FLEET) is not None


def test_a_node_about_to_act_reads_everything() -> None:
    slot = Slot(Phase.AGENT, 0, "me", "ca-g2", NOW)
    for step in (Apply(R), TakeSlot(R, Phase.AGENT, 0), Restart(R, slot)):
        assert look_for(step, Phase.AGENT, True, FLEET) is None
    assert look_for(Wait(R, "queue", None, "queue"), Phase.AGENT, True, FLEET) is None


def test_a_waiting_look_gives_way_to_a_full_read_after_its_count() -> None:
    look: Look | None = look_for(Wait(R, "in line", "c1", "queue"), Phase.AGENT, True, FLEET)
    taken = 0
    while look is not None:
        look = look.next()
        taken += 1
    assert taken == LOOKS_PER_READ


def test_the_marks_change_with_any_covered_key() -> None:
    look = look_for(Wait(R, "in line", "c1", "queue"), Phase.AGENT, True, FLEET)
    assert look is not None
    assert look.seen(FLEET) == look.marks
    others = [kv for kv in FLEET if kv.key != rec.node_key("c1")] + [_kv(rec.node_key("c1"), 99)]
    assert look.seen(others) == look.marks  # not a key it covers
    for key in (rec.status_key("ca-g2", "c1"), rec.slot_key(Phase.AGENT, 0)):
        moved = [kv if kv.key != key else KV(key, kv.value, 99, 99) for kv in FLEET]
        assert look.seen(moved) != look.marks, key
        gone = [kv for kv in FLEET if kv.key != key]
        assert look.seen(gone) != look.marks, key
    new_slot = [*FLEET, _slot(2, "c1", 20)]
    assert look.seen(new_slot) != look.marks
