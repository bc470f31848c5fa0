"""The fleet benchmark's load generator shares one decoding of each key-value among its
simulated agents (benchmarks/loadgen.py): what it hands an agent must be exactly what the
product's own decoding gives, for every kind of record and for a broken one, and a key-value
that differs in any part (value, revisions) must get its own decoding."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rke2certd.datastore.base import KV
from rke2certd.plan.cluster_view import (
    PHASES,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
)
from rke2certd.rollout import records as rec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loadgen

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _kvs() -> list[KV]:
    status = NodeStatus("a1", NodeState.APPLIED, "", "gen-1", NOW, None, None, 1, None, None, 0)
    return [
        KV(rec.member_key("a1"), rec.encode_member(Member("a1", ("agent",), Phase.AGENT)), 5, 5),
        KV(rec.status_key("r1", "a1"), rec.encode_status(status), 9, 7),
        KV(
            rec.slot_key(Phase.AGENT, 0),
            rec.encode_slot(Slot(Phase.AGENT, 0, "a1", "r1", NOW)),
            9,
            9,
        ),
        KV(
            rec.node_key("a1"),
            rec.encode_registration(Registration("a1", ("agent",), Phase.AGENT, registered=NOW)),
            6,
            6,
        ),
        KV(
            rec.rollout_key("r1"),
            rec.encode_rollout(
                Rollout(
                    "r1", RolloutKind.CA, "gen-1", PHASES, None, RolloutState.ACTIVE, "t", NOW, "e1"
                )
            ),
            8,
            8,
        ),
        KV(rec.member_key("bad"), b"{not json", 3, 3),  # unreadable: its problem text
        KV(rec.PREFIX + "future/x", b"{}", 4, 4),  # a key this version does not know: None
    ]


@pytest.fixture(autouse=True)
def _empty() -> None:
    loadgen._DECODED.clear()


def test_shared_decoding_gives_what_the_product_decodes() -> None:
    kinds = set()
    for kv in _kvs():
        record = loadgen._shared_decode(kv)
        assert record == rec.decode(kv)
        kinds.add(type(record))
    assert kinds == {Member, NodeStatus, Slot, Registration, Rollout, str, type(None)}


def test_an_equal_key_value_read_again_shares_the_first_decoding() -> None:
    kv = _kvs()[1]
    first = loadgen._shared_decode(kv)
    again = KV(kv.key, bytes(kv.value), kv.mod_revision, kv.create_revision)  # a new answer's
    assert loadgen._shared_decode(again) is first


def test_a_key_value_that_differs_in_any_part_is_decoded_on_its_own() -> None:
    kv = _kvs()[1]
    first = loadgen._shared_decode(kv)
    done = NodeStatus("a1", NodeState.DONE, "", "gen-1", NOW, NOW, NOW, 1, 1.0, 1.0, 0)
    for other in (
        KV(kv.key, rec.encode_status(done), kv.mod_revision, kv.create_revision),
        KV(kv.key, kv.value, kv.mod_revision + 1, kv.create_revision),
        KV(kv.key, kv.value, kv.mod_revision, kv.create_revision + 1),  # the status's revision
    ):
        record = loadgen._shared_decode(other)
        assert record == rec.decode(other)
        assert record is not first


def test_the_shared_decodings_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen, "_DECODED_MAX", 3)
    for i in range(10):
        kv = KV(
            rec.member_key(f"a{i}"),
            rec.encode_member(Member(f"a{i}", ("agent",), Phase.AGENT)),
            1,
            1,
        )
        assert loadgen._shared_decode(kv) == rec.decode(kv)
        assert len(loadgen._DECODED) <= 3
