"""A CA rotation staged on a running one-node cluster, seen in the metrics: the staged set
applied, the leaves renewed because their CA changed, the new CA generation, the restart and
health-gate durations, the rollout's state and this node's step; and a rollout whose restart
command fails, stopped."""

from __future__ import annotations

import os

import pytest

from tests.daemon.support import DaemonNode
from tests.monitoring.support import samples, scrape, wait_for

pytestmark = pytest.mark.slow  # whole CA rollouts through a daemon


def _port(node: DaemonNode) -> int:
    return int(str(node.settings["metrics-address"]).rsplit(":", 1)[1])


def _gauge(text: str, name: str, **labels: str) -> float | None:
    for lab, value in samples(text, name):
        if all(lab.get(k) == v for k, v in labels.items()):
            return value
    return None


def test_a_ca_rotation_rollout_in_the_metrics(node: DaemonNode) -> None:
    node.cli("renew")
    node.write_config(restart_command=["true"], health_command=["true"])
    with node.daemon() as d:
        d.notify.expect("READY")
        before = samples(scrape(_port(node)), "rke2certd_ca_generation_info")[0][0]["generation"]
        os.rename(node.stage_rotation("rotation-1"), node.incoming / "rotation-1")
        d.wait_event("rollout_node_done")

        def done() -> str | None:
            text = scrape(_port(node))
            return text if _gauge(text, "rke2certd_rollout_state", state="done") == 1.0 else None

        text = wait_for("the rollout done in the metrics", done)
        assert _gauge(text, "rke2certd_staged_sets_total", result="applied", reason="ok") == 1.0
        renewed = {
            lab["service"]
            for lab, v in samples(text, "rke2certd_renewals_total")
            if lab["reason"] == "ca_changed" and v > 0
        }
        assert {"kubelet", "api-server", "etcd"} <= renewed
        after = samples(text, "rke2certd_ca_generation_info")[0][0]["generation"]
        assert after != before
        assert _gauge(text, "rke2certd_restart_duration_seconds_count") == 1.0
        assert _gauge(text, "rke2certd_health_gate_duration_seconds_count") == 1.0
        (kind,) = {lab["kind"] for lab, _ in samples(text, "rke2certd_rollout_state")}
        assert kind
        assert (
            _gauge(text, "rke2certd_rollout_node_step", rke2certd_rollout_node_step="idle") == 1.0
        )
        assert d.stop() == 0


def test_a_failed_restart_stops_the_rollout_in_the_metrics(node: DaemonNode) -> None:
    node.cli("renew")
    node.write_config(restart_command=["false"], health_command=["true"])
    with node.daemon() as d:
        d.notify.expect("READY")
        os.rename(node.stage_rotation("rotation-1"), node.incoming / "rotation-1")
        d.wait_event("rollout_failed")

        def stopped() -> str | None:
            text = scrape(_port(node))
            hit = _gauge(text, "rke2certd_rollout_state", state="stopped") == 1.0
            return text if hit else None

        text = wait_for("the rollout stopped in the metrics", stopped)
        assert (
            _gauge(text, "rke2certd_rollout_node_step", rke2certd_rollout_node_step="failed") == 1.0
        )
        assert _gauge(text, "rke2certd_restart_duration_seconds_count") == 1.0
        assert _gauge(text, "rke2certd_health_gate_duration_seconds_count") == 0.0
        assert d.stop() == 0
