"""The Grafana dashboard (packaging/grafana/rke2certd.json) queries only metrics the daemon
exports (every optional family filled in, through the daemon's own metrics code), and every
query is valid PromQL (promtool checks them as recording rules)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rke2certd.daemon.metrics import Metrics
from rke2certd.plan.inventory import Row, Status
from rke2certd.plan.verdict import Level, Verdict

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "rke2certd.json"
METRIC = re.compile(r"\b((?:x509|rke2certd)_[a-zA-Z0-9_]+)\b")
NOW = datetime(2027, 1, 1, tzinfo=UTC)


def queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    out += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return out


def exported() -> set[str]:
    """Every sample name the daemon's metrics code writes, with every optional family set."""
    m = Metrics(lambda: NOW, frozenset({"/cacerts"}))
    try:
        day = timedelta(days=1)
        row = Row(
            Path("/d/agent/client-kubelet.crt"),
            "kubelet",
            0,
            "system:node:a",
            "ca",
            ("ClientAuth",),
            NOW - day,
            NOW + 300 * day,
            "0a",
            Status.OK,
            300 * day,
        )
        ca = Row(
            Path("/d/server/tls/client-ca.crt"),
            "ca",
            0,
            "ca",
            "ca",
            ("CertSign",),
            NOW - day,
            NOW + 3000 * day,
            "01",
            Status.OK,
            3000 * day,
        )
        m.update(
            rows=[row],
            ca_rows=[ca],
            verdict=Verdict(Level.OK, "ok"),
            generation="abc",
            datastore_up=True,
            last_rescan=NOW.timestamp(),
            rollout=("r1", "ca-rotation", "active"),
        )
        for event, fields in [
            ("cert_renewed", {"cert_service": "kubelet", "reason": "expired"}),
            ("staged_set_applied", {}),
            ("request_served", {"http_path": "/cacerts", "http_status": 200}),
            ("request_refused", {"http_path": "/x", "http_status": 404}),
            ("rollout_node_done", {"restart_seconds": 3.0, "health_seconds": 5.0}),
        ]:
            m.observe(event, fields)
        text = m.text().decode()
    finally:
        m.close()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_the_dashboard_queries_only_exported_metrics() -> None:
    used = {name for q in queries() for name in METRIC.findall(q)}
    assert used, "the dashboard queries rke2certd's metrics"
    have = exported()
    assert used - have == set(), f"not exported: {sorted(used - have)}"
    # it covers what the issue asks for: expiry per node and service, rollouts, renewals
    for needed in (
        "x509_cert_not_after",
        "rke2certd_cert_status",
        "rke2certd_rollout_state",
        "rke2certd_rollout_node_step",
        "rke2certd_renewals_total",
    ):
        assert needed in used


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, q in enumerate(queries()):
        if q.startswith("label_values("):  # Grafana's variable query, not PromQL
            q = q.removeprefix("label_values(").rsplit(",", 1)[0]
        expr = q.replace("$__rate_interval", "5m").replace("$__range", "1h")
        expr = expr.replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
