"""A real Prometheus scrapes the real daemon and evaluates the shipped rules: the alerts fire on
a node with an expired certificate (dynamiclistener's cache, expired while RKE2 was down) and one
inside the renewal window that rke2certd cannot renew (a watched CI kubeconfig's cert), and clear
once both are renewed (RKE2 regenerates its cache, the operator replaces the CI cert) and the
daemon rescanned.

The shipped rules are loaded with their `for:` durations set to 0 (the promtool unit tests,
tests/monitoring/test_rules.py, check the durations); scrapes and evaluations run every second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon.support import DaemonNode, free_port
from tests.harness.wait import SAFETY
from tests.monitoring.support import (
    admin_kubeconfig,
    days,
    dynamic_cert_json,
    make_cert,
    wait_for,
)

RULES = Path(__file__).resolve().parents[2] / "packaging" / "prometheus" / "rke2certd.rules.yml"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing: scripts/ci-system-deps.sh installs it"
)


class Prometheus:
    def __init__(self, workdir: Path, target_port: int, log: Path) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule.pop("for", None)
        (workdir / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yml")],
            "scrape_configs": [
                {
                    "job_name": "rke2certd",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=workdir,
            )

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=SAFETY) as r:
            return json.loads(r.read())

    def ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=SAFETY) as r:
            return bool(r.status == 200)

    def firing(self) -> dict[str, list[dict[str, str]]]:
        out: dict[str, list[dict[str, str]]] = {}
        for alert in self.get("/api/v1/alerts")["data"]["alerts"]:
            if alert["state"] == "firing":
                out.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return out

    def scraped_up(self) -> bool:
        result = self.get("/api/v1/query?query=up")["data"]["result"]
        return bool(result) and result[0]["value"][1] == "1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def prometheus_for(tmp_path: Path, node: DaemonNode) -> Iterator[Prometheus]:
    port = int(str(node.settings["metrics-address"]).rsplit(":", 1)[1])
    prom = Prometheus(tmp_path / "prometheus", port, node.logs.new_file(f"{node.label}-prometheus"))
    try:
        yield prom
    finally:
        prom.stop()


def test_alerts_fire_on_an_expired_and_an_unrenewed_cert_and_clear_after_renewal(
    node: DaemonNode, prometheus_for: Prometheus, tmp_path: Path
) -> None:
    node.cli("renew")
    tls = node.data / "server/tls"
    ca = ((tls / "server-ca.crt").read_bytes(), (tls / "server-ca.key").read_bytes())
    dynamic = tls / "dynamic-cert.json"
    dynamic.write_text(dynamic_cert_json(*make_cert("rke2", days(-400), days(-30), ca)))
    ci = tmp_path / "ci"
    ci.mkdir()
    ci_config = ci / "deploy.kubeconfig"
    soon = make_cert("ci-deployer", days(-300), days(20), ca)
    ci_config.write_text(admin_kubeconfig(ca[0], *soon))
    node.write_config(watch_files=[f"{ci}/*.kubeconfig"])

    with node.daemon() as d:
        d.notify.expect("READY")
        wait_for("prometheus ready", prometheus_for.ready)
        wait_for("the daemon scraped", prometheus_for.scraped_up)

        def both_firing() -> dict[str, list[dict[str, str]]] | None:
            firing = prometheus_for.firing()
            wanted = {"RKE2CertificateExpired", "RKE2CertificateRenewalOverdue"}
            return firing if wanted <= set(firing) else None

        firing = wait_for("the alerts firing", both_firing)
        (expired,) = firing["RKE2CertificateExpired"]
        assert expired["filepath"] == str(dynamic)
        assert expired["service"] == "rke2-server" and expired["status"] == "expired"
        assert expired["severity"] == "critical"
        overdue = {a["filepath"]: a["service"] for a in firing["RKE2CertificateRenewalOverdue"]}
        assert overdue == {str(ci_config): "watched", str(dynamic): "rke2-server"}
        for quiet in (
            "RKE2CAExpiresWithinTwoYears",
            "RKE2CertdRolloutStopped",
            "RKE2CertdNotRescanning",
            "RKE2CertdDatastoreUnreachable",
        ):
            assert quiet not in firing

        # RKE2 regenerated its cache at its start; the CI kubeconfig got a fresh cert
        fresh = make_cert("rke2", days(0), days(365), ca)
        tmp = tls / ".dynamic-cert.json.new"
        tmp.write_text(dynamic_cert_json(*fresh))
        os.replace(tmp, dynamic)
        tmp = ci / ".deploy.new"
        tmp.write_text(admin_kubeconfig(ca[0], *make_cert("ci-deployer", days(0), days(365), ca)))
        os.replace(tmp, ci_config)
        d.signal(signal.SIGHUP)  # a rescan now (the reload renews and rereads everything)
        d.wait_event("all_certificates_ok")

        def cleared() -> bool:
            firing = prometheus_for.firing()
            return not ({"RKE2CertificateExpired", "RKE2CertificateRenewalOverdue"} & set(firing))

        wait_for("the alerts cleared", cleared)
        assert d.stop() == 0
