"""Members not running in their turn, on a real store (the embedded SQLite file): housekeeping
reports them (`rollout_blocked`, once), skips agents by policy (never servers), finishes the
rollout; `rke2certd status` says who blocks and why; the config keys and their bad values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from rke2certd.commands.status import render_status
from rke2certd.config import Config
from rke2certd.datastore import SQLiteDatastore
from rke2certd.errors import ConfigError
from rke2certd.plan.rollout import (
    Availability,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    RolloutState,
    Unavailable,
)
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.create import ca_rollout, start
from rke2certd.rollout.housekeeping import housekeep
from tests.conftest import FrozenClock

T0 = datetime(2030, 1, 1, tzinfo=UTC)
GRACE = timedelta(seconds=60)


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[SQLiteDatastore]:
    with SQLiteDatastore(tmp_path / "db.sqlite", clock=FrozenClock(T0)) as store:
        yield store


def _fleet(ds: SQLiteDatastore, down: tuple[str, ...]) -> ClusterStore:
    """e1 (etcd) done, agents a1, a2 live and done, the `down` ones recorded down at T0."""
    store = ClusterStore(ds)
    lease = ds.grant_lease(600)
    for name, phase in (("e1", Phase.ETCD), ("a1", Phase.AGENT), ("a2", Phase.AGENT)):
        store.ensure_member(Member(name, (phase.value,), phase))
        store.register(Registration(name, (phase.value,), phase), lease)
    for name in down:
        phase = Phase.AGENT if name.startswith("a") else Phase.CONTROL_PLANE
        store.ensure_member(Member(name, (phase.value,), phase))
        store.mark_down(name, T0)
    r, _ = start(ds, ca_rollout("g2", None, "e1", "test", T0), T0)
    for name in ("e1", "a1", "a2"):
        store.set_status(r, NodeStatus(name, NodeState.DONE, finished=T0))
    return store


def test_a_down_agent_is_skipped_after_the_grace_and_the_rollout_finishes(
    ds: SQLiteDatastore,
) -> None:
    store = _fleet(ds, ("a3",))
    policy = Availability(GRACE, Unavailable.SKIP)
    with structlog.testing.capture_logs() as logs:
        housekeep(store, store.read(), T0 + GRACE - timedelta(seconds=1), policy)
        assert store.read().view.rollouts[0].active
        housekeep(store, store.read(), T0 + GRACE, policy)
        housekeep(ClusterStore(ds), store.read(), T0 + GRACE, policy)  # a second server
    view = store.read().view
    [r] = view.rollouts
    assert r.state is RolloutState.DONE and "1 skipped" in r.state_reason
    st = view.status(r, "a3")
    assert st is not None and st.state is NodeState.SKIPPED and "into its turn" in st.message
    events = [e for e in logs if e["event"] == "rollout_blocked"]
    assert [(e["node"], e["action"]) for e in events] == [("a3", "skip")]  # once, by the writer


def test_wait_policy_reports_an_agent_once_and_waits(ds: SQLiteDatastore) -> None:
    store = _fleet(ds, ("a3",))
    policy = Availability(GRACE, Unavailable.WAIT)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            housekeep(store, store.read(), T0 + GRACE, policy)
    [r] = store.read().view.rollouts
    assert r.active and store.read().view.status(r, "a3") is None
    events = [(e["node"], e["action"]) for e in logs if e["event"] == "rollout_blocked"]
    assert events == [("a3", "wait")]
    table = render_status(ds, "table", T0 + GRACE, policy)
    assert "BLOCKED by a3: agent node a3 not running since 2030-01-01 00:00:00 UTC" in table
    assert "(agent-unavailable: wait)" in table


def test_a_down_server_is_reported_never_skipped(ds: SQLiteDatastore) -> None:
    """c9 (control-plane) is down in its turn: reported and waited for, whatever the policy;
    the agents' turn has not come (c9 is not done), so a3 is not reported yet."""
    store = _fleet(ds, ("a3", "c9"))
    policy = Availability(GRACE, Unavailable.SKIP)
    with structlog.testing.capture_logs() as logs:
        housekeep(store, store.read(), T0 + GRACE, policy)
    [r] = store.read().view.rollouts
    assert r.active and store.read().view.status(r, "c9") is None
    events = [(e["node"], e["action"]) for e in logs if e["event"] == "rollout_blocked"]
    assert events == [("c9", "wait")]
    doc = json.loads(render_status(ds, "json", T0 + GRACE, policy))
    [b] = doc["rollouts"][0]["blocked"]
    assert (b["node"], b["phase"], b["action"]) == ("c9", "control-plane", "wait")
    assert "rke2certd node remove c9" in b["reason"]
    assert json.loads(render_status(ds, "json"))["rollouts"][0]["blocked"] == []  # no clock


def test_the_config_keys() -> None:
    cfg = Config.from_mapping({"agent-unavailable-grace": 90, "agent-unavailable": "wait"})
    assert cfg.availability == Availability(timedelta(seconds=90), Unavailable.WAIT)
    assert Config.from_mapping({}).availability == Availability()
    with pytest.raises(ConfigError) as err:
        Config.from_mapping({"agent-unavailable-grace": -1, "agent-unavailable": "never"})
    text = str(err.value) + " ".join(err.value.problems)
    assert "agent-unavailable-grace" in text and "agent-unavailable" in text
