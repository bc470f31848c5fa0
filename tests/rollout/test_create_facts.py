"""rollout/create.py decides from plain facts (RenewFacts, RotationFacts), not from the commands'
result types; the commands' results say their facts. On a real store (the embedded SQLite file)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rke2certd.commands.renew import Change, RenewResult
from rke2certd.commands.rotate_ca import RotateCAResult
from rke2certd.datastore import SQLiteDatastore
from rke2certd.plan.rollout import PHASES, SERVER_PHASES, NodeState, Phase, RolloutKind
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.create import RenewFacts, RotationFacts, after_renew, after_rotation
from tests.conftest import FrozenClock

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[SQLiteDatastore]:
    with SQLiteDatastore(tmp_path / "db.sqlite", clock=FrozenClock(T0), poll_interval=0.01) as s:
        yield s


def _change(service: str, old_serial: str | None) -> Change:
    return Change(
        Path(f"/x/{service}.crt"), service, "rke2-server", "renew", ("expiring",), old_serial
    )


def test_renew_result_facts_name_only_replaced_certs() -> None:
    result = RenewResult(
        dry_run=False,
        extracted=["ServerCA"],
        changes=[_change("kubelet", "01"), _change("new-one", None), _change("api", "02")],
    )
    assert result.rollout_facts() == RenewFacts(("ServerCA",), ("api", "kubelet"))


def test_rotation_result_facts() -> None:
    result = RotateCAResult(
        Path("/s"),
        dry_run=False,
        force=False,
        saved=True,
        new_generation="g2",
        changed=["tls/service.key"],
    )
    assert result.rollout_facts() == RotationFacts(True, False, "g2", ("tls/service.key",))


def test_a_renewal_rollout_from_replaced_certs(ds: SQLiteDatastore) -> None:
    facts = RenewFacts(replaced=("kubelet",))
    r = after_renew(ds, "n1", Phase.AGENT, facts, "g1", "g1", "timer", T0)
    assert r is not None and r.kind is RolloutKind.RENEWAL and r.nodes == ("n1",)
    assert "kubelet" in r.reason
    status = ClusterStore(ds).read().view.status(r, "n1")
    assert status is not None and status.state is NodeState.APPLIED
    assert after_renew(ds, "n1", Phase.AGENT, RenewFacts(), "g1", "g1", "timer", T0) is None


def test_a_ca_rollout_from_a_generation_taken(ds: SQLiteDatastore) -> None:
    only_service_key = RenewFacts(extracted=("ServiceKey",))  # servers only restart
    r = after_renew(ds, "n1", Phase.AGENT, only_service_key, "g1", "g2", "start", T0)
    assert r is not None and r.kind is RolloutKind.CA and r.ca_generation == "g2"
    assert r.phases == SERVER_PHASES
    assert after_renew(ds, "n1", Phase.AGENT, only_service_key, None, "g2", "start", T0) is None


def test_a_ca_rollout_from_a_saved_rotation(ds: SQLiteDatastore) -> None:
    saved = RotationFacts(True, False, "g3", ("tls/client-ca.crt",))
    r = after_rotation(ds, "n1", saved, "rotate-ca", T0)
    assert r is not None and r.id == "ca-g3" and r.phases == PHASES
    assert after_rotation(ds, "n1", RotationFacts(False, False, "g4", ()), "x", T0) is None
    assert after_rotation(ds, "n1", RotationFacts(True, True, "g5", ()), "x", T0) is None
