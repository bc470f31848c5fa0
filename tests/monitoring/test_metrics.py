"""The daemon's metrics over real HTTP scrapes, and the node_exporter textfile: the families and
labels of x509-certificate-exporter for each certificate, rke2certd's own families, the "all
OK" signal (event, STATUS=, metrics at once), the endpoint's requests, and the off switch."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
from pathlib import Path

from tests.daemon.support import DaemonNode, cert_serial, free_port
from tests.harness.wait import SAFETY
from tests.monitoring.support import days, families, make_cert, samples, scrape, wait_for


def _port(node: DaemonNode) -> int:
    return int(str(node.settings["metrics-address"]).rsplit(":", 1)[1])


def _https_get(node: DaemonNode, path: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(node.data / "server/tls/server-ca.crt"))
    ctx.check_hostname = False
    port = int(node.settings["supervisor-port"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


def test_scrape_has_the_x509_exporter_schema_and_rke2certds_families(node: DaemonNode) -> None:
    with node.daemon() as d:
        d.notify.expect("READY")
        d.wait_event("metrics_started", port=_port(node))
        text = scrape(_port(node))

        admin = node.data / "server/tls/client-admin.crt"
        after = [
            (lab, v)
            for lab, v in samples(text, "x509_cert_not_after")
            if lab["filepath"] == str(admin)
        ]
        leaf = next(lab for lab, _ in after if lab["subject_CN"] == "system:admin")
        assert leaf["filename"] == "client-admin.crt"
        assert leaf["serial_number"] == str(int(cert_serial(admin), 16)), "decimal, as the exporter"
        assert leaf["issuer_CN"].startswith("rke2-client-ca@")
        assert leaf["embedded_kind"] == "" and leaf["embedded_key"] == ""
        assert {v for _, v in samples(text, "x509_cert_expired")} == {0.0}
        assert samples(text, "x509_read_errors") == [({}, 0.0)]
        assert samples(text, "x509_cert_not_before")

        status = {
            lab["status"]: v
            for lab, v in samples(text, "rke2certd_cert_status")
            if lab["filepath"] == str(admin) and lab["subject_CN"] == "system:admin"
        }
        assert status == {
            "ok": 1.0,
            "warning": 0.0,
            "expired": 0.0,
            "not_yet_valid": 0.0,
            "chain_broken": 0.0,
        }
        services = {lab["service"] for lab, _ in samples(text, "rke2certd_cert_status")}
        assert {"admin", "kubelet", "etcd", "api-server", "ca"} <= services
        assert samples(text, "rke2certd_certificates_ok") == [({}, 1.0)]
        assert samples(text, "rke2certd_certificates_level") == [({}, 0.0)]
        assert samples(text, "rke2certd_datastore_reachable") == [({}, 1.0)]
        (gen,) = samples(text, "rke2certd_ca_generation_info")
        assert gen[0]["generation"]
        ((_, rescan),) = samples(text, "rke2certd_last_rescan_timestamp_seconds")
        assert rescan > 0
        ((_, soonest),) = samples(text, "rke2certd_ca_soonest_not_after_seconds")
        ca_after = [v for lab, v in samples(text, "rke2certd_ca_not_after_seconds")]
        assert soonest == min(ca_after) and len(ca_after) >= 5
        renewals = {
            (lab["service"], lab["reason"]): v
            for lab, v in samples(text, "rke2certd_renewals_total")
        }
        assert renewals[("admin", "missing")] == 1.0
        step = {
            lab["rke2certd_rollout_node_step"]: v
            for lab, v in samples(text, "rke2certd_rollout_node_step")
        }
        assert step["idle"] == 1.0 and sum(step.values()) == 1.0

        # the endpoint's requests, by route and status; an unknown path is `other`
        assert _https_get(node, "/cacerts").startswith(b"HTTP/1.1 200")
        _https_get(node, "/no/such/route?x=1")

        def counted() -> dict[tuple[str, str], float] | None:
            got = {
                (lab["route"], lab["status"]): v
                for lab, v in samples(scrape(_port(node)), "rke2certd_endpoint_requests_total")
            }
            return got if ("/cacerts", "200") in got and len(got) >= 2 else None

        requests = wait_for("the requests counted", counted)
        assert requests[("/cacerts", "200")] == 1.0
        refused = samples(scrape(_port(node)), "rke2certd_endpoint_refusals_total")
        assert [lab["route"] for lab, _ in refused] == ["other"]

        # the textfile: the same families, written atomically, world-readable for node_exporter
        prom = Path(node.settings["textfile-dir"]) / "rke2certd.prom"
        wait_for("the textfile", prom.exists)
        assert families(prom.read_text()) == families(scrape(_port(node)))
        assert stat.S_IMODE(prom.stat().st_mode) == 0o644
        assert not [p for p in prom.parent.iterdir() if p != prom], "no temp file left"
        assert d.stop() == 0
    assert not d.stray_lines()


def test_an_expired_file_makes_it_critical_and_all_ok_shows_at_once_when_it_is_gone(
    node: DaemonNode, tmp_path: Path
) -> None:
    watched = tmp_path / "ci"
    watched.mkdir()
    old = watched / "ci-client.pem"
    old.write_bytes(make_cert("ci-client", days(-400), days(-35))[0])
    node.write_config(watch_files=[f"{watched}/*.pem"])
    with node.daemon() as d:
        ready = d.notify.expect("READY")
        assert "CRITICAL" in ready.fields["STATUS"] and str(old) in ready.fields["STATUS"]
        d.wait_event("certificates_not_ok", verdict="CRITICAL")
        text = scrape(_port(node))
        assert samples(text, "rke2certd_certificates_ok") == [({}, 0.0)]
        assert samples(text, "rke2certd_certificates_level") == [({}, 2.0)]
        expired = {lab["filepath"]: v for lab, v in samples(text, "x509_cert_expired")}
        assert expired[str(old)] == 1.0
        assert sum(expired.values()) == 1.0, "only the watched file"
        status = {
            lab["status"]
            for lab, v in samples(text, "rke2certd_cert_status")
            if lab["filepath"] == str(old) and v == 1.0
        }
        assert status == {"expired"}

        # the operator replaces it (rke2certd never writes watched files); a reload rescans
        new = watched / ".ci-client.pem.new"
        new.write_bytes(make_cert("ci-client", days(-1), days(300))[0])
        os.replace(new, old)
        d.signal(signal.SIGHUP)
        ready = d.notify.expect("READY")
        ok = d.wait_event("all_certificates_ok")
        assert ok["previous"] == "CRITICAL"
        assert "all certificates OK" in ready.fields["STATUS"]
        text = scrape(_port(node))
        assert samples(text, "rke2certd_certificates_ok") == [({}, 1.0)]
        assert samples(text, "rke2certd_all_ok_transitions_total") == [({}, 1.0)]
        assert len(d.events("all_certificates_ok")) == 1
        assert d.stop() == 0


def test_metrics_off_serves_nothing_and_writes_no_textfile(
    node: DaemonNode, tmp_path: Path
) -> None:
    port = free_port()
    node.write_config(metrics_address="", textfile_dir=None)
    node.settings.pop("textfile-dir")
    node.write_config()
    with node.daemon() as d:
        ready = d.notify.expect("READY")
        assert "all certificates OK" in ready.fields["STATUS"], "the signal needs no metrics"
        assert not d.events("metrics_started")
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
        assert not (tmp_path / "textfile").exists()
        assert d.stop() == 0


def test_a_bad_metrics_address_is_refused_with_every_problem(node: DaemonNode) -> None:
    node.write_config(metrics_address="metrics.example:99999", watch_files=["relative/*.pem"])
    r = node.cli("certificate", "check", check=False)
    assert r.returncode != 0
    log = sorted(node.logs.dir.glob(f"{node.label[:100]}*cli-certificate*"))[-1].read_text()
    assert "metrics-address" in log and "watch-files" in log
