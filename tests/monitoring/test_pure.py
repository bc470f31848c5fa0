"""The pure parts of monitoring, in process: the listen address, the monitoring-plugin verdict,
the label values the metrics derive from events, the metrics' own bookkeeping (histograms,
datastore, textfile), and the admin kubeconfig's line-based read and in-place rewrite (quoted
values, CRLF line ends, more than one user)."""

from __future__ import annotations

import base64
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rke2certd.config import Config
from rke2certd.daemon.metrics import Metrics, reason_category, rejection_category, route_label
from rke2certd.node.node import Node
from rke2certd.node.node_files import (
    admin_kubeconfig_stale,
    kubeconfig_certs,
    refresh_admin_kubeconfig,
)
from rke2certd.plan.inventory import CertFacts, Row, Status
from rke2certd.plan.kubeconfigs import MISSING, KubeconfigRead, judge
from rke2certd.plan.listen import parse_listen
from rke2certd.plan.verdict import Level, verdict

NOW = datetime(2027, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:9347", ("127.0.0.1", 9347)),
        ("[::1]:9347", ("::1", 9347)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:9100", ("localhost", 9100)),
        ("", None),
        ("off", None),
    ],
)
def test_listen_addresses(text: str, want: tuple[str, int] | None) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("9347", "not host:port"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:70000", "0-65535"),
        ("metrics.example:9347", "IP address or localhost"),
    ],
)
def test_bad_listen_addresses_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_listen(text)


def _row(status: Status, path: str = "/d/a.crt", days_left: int = 300) -> Row:
    return Row(
        Path(path),
        "kubelet",
        0,
        "cn",
        "ca",
        ("ClientAuth",),
        NOW - DAY,
        NOW + days_left * DAY,
        "0a",
        status,
        days_left * DAY,
    )


def test_verdict_levels_worst_first() -> None:
    ok, warn = _row(Status.OK), _row(Status.WARNING, "/d/b.crt", 30)
    expired = _row(Status.EXPIRED, "/d/c.crt", -1)
    assert verdict([ok], []).level is Level.OK
    assert verdict([ok], []).text.startswith("all 1 certificates valid")
    assert verdict([ok, warn], []).level is Level.WARNING
    assert "/d/b.crt" in verdict([ok, warn], []).text
    assert verdict([ok], [], ["rke2.yaml: stale"]).level is Level.WARNING
    assert verdict([ok, warn], ["/d/x.crt: not a PEM file"]).level is Level.UNKNOWN
    assert verdict([ok, warn, expired], ["/d/x.crt: bad"]).level is Level.CRITICAL
    assert verdict([], []).level is Level.UNKNOWN
    assert [int(level) for level in Level] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("missing; key missing", "missing"),
        ("expired", "expired"),
        ("expires within 90 days", "window"),
        ("not yet valid", "not_yet_valid"),
        ("key does not match certificate", "key"),
        ("SAN missing: 10.0.0.1", "san"),
        ("signed by another CA (AKI does not match the CA's SKI)", "ca_changed"),
        ("CN changed ('a' -> 'b')", "subject"),
        ("something new", "other"),
        ("", "unknown"),
    ],
)
def test_renewal_reasons_become_bounded_labels(reason: str, label: str) -> None:
    assert reason_category(reason) == label


def test_rejections_and_routes_become_bounded_labels() -> None:
    assert rejection_category("no chain of trust from the new CA to server-ca") == "chain"
    assert rejection_category("whatever else") == "other"
    known = frozenset({"/cacerts"})
    assert route_label("/cacerts", known) == "/cacerts"
    assert route_label("/cacerts?x=1", known) == "/cacerts"
    assert route_label("/../../etc/passwd", known) == "other"
    assert route_label(None, known) == "other"


def _samples(m: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(m.text().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def test_events_feed_the_counters_histograms_and_datastore_gauge(tmp_path: Path) -> None:
    m = Metrics(lambda: NOW, frozenset({"/cacerts"}))
    try:
        m.update(datastore_up=True)
        m.observe("cert_renewed", {"cert_service": "etcd", "reason": "expired", "dry_run": False})
        m.observe("cert_renewed", {"cert_service": "etcd", "reason": "expired", "dry_run": True})
        m.observe("staged_set_rejected", {"reason": "no chain of trust"})
        m.observe("rollout_node_done", {"restart_seconds": 4.0, "health_seconds": 7.5})
        m.observe("rollout_failed", {"restart_seconds": 700.0, "health_seconds": None})
        m.observe("cluster_link_failed", {"reason": "etcd away"})
        got = _samples(m)
        assert got["rke2certd_renewals_total"] == [({"service": "etcd", "reason": "expired"}, 1.0)]
        assert got["rke2certd_staged_sets_total"] == [
            ({"result": "rejected", "reason": "chain"}, 1.0)
        ]
        assert got["rke2certd_restart_duration_seconds_count"] == [({}, 2.0)]
        assert got["rke2certd_restart_duration_seconds_sum"] == [({}, 704.0)]
        assert got["rke2certd_health_gate_duration_seconds_count"] == [({}, 1.0)]
        assert got["rke2certd_datastore_reachable"] == [({}, 0.0)]
        m.observe("cluster_link_restored", {})
        assert _samples(m)["rke2certd_datastore_reachable"] == [({}, 1.0)]
        assert "rke2certd_renewals_created" not in got, "no *_created series"

        # the textfile: written when something changed, not at every turn
        assert m.write_textfile(tmp_path / "tf") is True
        assert m.write_textfile(tmp_path / "tf") is False
        m.update(datastore_up=True)  # no change
        assert m.write_textfile(tmp_path / "tf") is False
        m.update(datastore_up=False)
        assert m.write_textfile(tmp_path / "tf") is True
        prom = tmp_path / "tf" / "rke2certd.prom"
        assert stat.S_IMODE(prom.stat().st_mode) == 0o644
        assert "rke2certd_datastore_reachable 0.0" in prom.read_text()
        # a dir it cannot write: said once, tried again at each turn, said when it works
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where the dir should be")
        m.update(datastore_up=True)
        assert m.write_textfile(blocked) is False
        assert m.dirty, "tried again at the next turn"
        blocked.unlink()
        assert m.write_textfile(blocked) is True
        assert (blocked / "rke2certd.prom").exists()
    finally:
        m.close()


def test_statuses_move_with_the_clock_between_rescans() -> None:
    now = [NOW]
    m = Metrics(lambda: now[0])
    try:
        m.update(rows=[_row(Status.OK, days_left=100)], window=timedelta(days=90))

        def current() -> str:
            (state,) = [
                lab["status"] for lab, v in _samples(m)["rke2certd_cert_status"] if v == 1.0
            ]
            return state

        assert current() == "ok"
        now[0] = NOW + 11 * DAY
        assert current() == "warning"
        now[0] = NOW + 101 * DAY
        assert current() == "expired"
        assert _samples(m)["x509_cert_expired"][0][1] == 1.0
    finally:
        m.close()


def _server(tmp_path: Path) -> Node:
    cfg = Config.from_mapping(
        {"data-dir": str(tmp_path / "data"), "write-kubeconfig": str(tmp_path / "rke2.yaml")}
    )
    tls = tmp_path / "data/server/tls"
    tls.mkdir(parents=True)
    for name, data in (
        ("client-admin.crt", b"CERT"),
        ("client-admin.key", b"KEY"),
        ("server-ca.crt", b"CA"),
    ):
        (tls / name).write_bytes(data)
    return Node.from_config(cfg)


def _b(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_quoted_crlf_admin_kubeconfig_is_rewritten_in_place(tmp_path: Path) -> None:
    node = _server(tmp_path)
    path = tmp_path / "rke2.yaml"
    text = (
        "apiVersion: v1\r\nclusters:\r\n- cluster:\r\n"
        f'    certificate-authority-data: "{_b(b"OLDCA")}"\r\n'
        "    server: https://127.0.0.1:6443  # the apiserver\r\n  name: default\r\n"
        "users:\r\n- name: default\r\n  user:\r\n"
        f"    client-certificate-data: '{_b(b'OLD')}'\r\n"
        f"    client-key-data: {_b(b'KEY')}\r\n"
    )
    path.write_bytes(text.encode())
    path.chmod(0o600)
    assert admin_kubeconfig_stale(node, text.encode()) == (
        "its client certificate is not client-admin.crt; "
        "its certificate-authority-data is not server-ca.crt (old CA)"
    )
    assert kubeconfig_certs(text.encode(), path) == [("client-certificate-data", b"OLD")]
    assert refresh_admin_kubeconfig(node) is True
    want = text.replace(_b(b"OLDCA"), _b(b"CA")).replace(_b(b"OLD"), _b(b"CERT"))
    assert path.read_bytes() == want.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert refresh_admin_kubeconfig(node) is False, "nothing stale any more"


def test_an_admin_kubeconfig_with_two_users_is_reported_not_rewritten(tmp_path: Path) -> None:
    node = _server(tmp_path)
    path = tmp_path / "rke2.yaml"
    text = (
        f"users:\n- name: a\n  user:\n    client-certificate-data: {_b(b'OLD')}\n"
        f"- name: b\n  user:\n    client-certificate-data: {_b(b'OTHER')}\n"
    )
    path.write_text(text)
    assert refresh_admin_kubeconfig(node) is False
    assert path.read_text() == text
    assert admin_kubeconfig_stale(node, text.encode()) is not None


def test_the_admin_kubeconfig_path_follows_rke2s_config_dir(tmp_path: Path) -> None:
    default = Config.from_mapping({})
    assert default.kubeconfig_file == Path("/etc/rancher/rke2/rke2.yaml")
    beside = Config.from_mapping({"rke2-config": str(tmp_path / "rke2" / "config.yaml")})
    assert beside.kubeconfig_file == tmp_path / "rke2" / "rke2.yaml"
    named = Config.from_mapping(
        {"rke2-config": str(tmp_path / "config.yaml"), "write-kubeconfig": "/root/kube.yaml"}
    )
    assert named.kubeconfig_file == Path("/root/kube.yaml")


def _client(cn: str, issuer: str, serial: str, days_left: float) -> CertFacts:
    return CertFacts(cn, issuer, ("ClientAuth",), NOW - 10 * DAY, NOW + days_left * DAY, serial)


def _read(facts: CertFacts | None, **kw: object) -> KubeconfigRead:
    base: dict[str, object] = {
        "leaf_file": "/d/server/tls/client-scheduler.crt",
        "leaf_serial": "aa",
        "signers": ("rke2-client-ca@2", "rke2-client-ca@1"),  # a bundle mid-rotation
        "ca_current": True,
    }
    base.update(kw)
    return KubeconfigRead(
        "/d/server/cred/scheduler.kubeconfig",
        "scheduler",
        "/d/server/tls/client-scheduler.crt",
        "/d/server/tls/server-ca.crt",
        facts,
        **base,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("case", "read", "status", "problem", "level"),
    [
        ("current", _read(_client("s", "rke2-client-ca@1", "aa", 300)), "OK", "", Level.OK),
        (
            "inside the window",
            _read(_client("s", "rke2-client-ca@2", "aa", 20)),
            "WARNING",
            "its client certificate expires within 30 days",
            Level.WARNING,
        ),
        (
            "expired",
            _read(_client("s", "rke2-client-ca@2", "aa", -1)),
            "EXPIRED",
            "its client certificate expired at 2027-05-31T00:00:00+00:00",
            Level.CRITICAL,
        ),
        (
            "another CA",
            _read(_client("s", "rke2-client-ca@0", "bb", 300)),
            "CHAIN BROKEN",
            "its client certificate was issued by rke2-client-ca@0, not rke2-client-ca@2 or "
            "rke2-client-ca@1; its client certificate is not the current "
            "/d/server/tls/client-scheduler.crt",
            Level.CRITICAL,
        ),
        (
            "a copy, not the current leaf",
            _read(_client("s", "rke2-client-ca@2", "bb", 300)),
            "WARNING",
            "its client certificate is not the current /d/server/tls/client-scheduler.crt",
            Level.WARNING,
        ),
        (
            "an old server CA",
            _read(_client("s", "rke2-client-ca@2", "aa", 300), ca_current=False),
            "WARNING",
            "its certificate authority is not the current server CA",
            Level.WARNING,
        ),
        (
            "missing",
            _read(None, unreadable="its client certificate /x.crt does not exist"),
            MISSING,
            "its client certificate /x.crt does not exist",
            Level.OK,  # the file's error makes it UNKNOWN (check's `errors`), not the entry
        ),
        (
            "no expectation (a watch-files copy)",
            _read(_client("s", "other", "bb", 300), leaf_serial=None, signers=(), ca_current=None),
            "OK",
            "",
            Level.OK,
        ),
    ],
)
def test_kubeconfig_entries_say_what_is_wrong(
    case: str, read: KubeconfigRead, status: str, problem: str, level: Level
) -> None:
    entry = judge(read, NOW, 30 * DAY)
    assert (entry.status, entry.problem) == (status, problem), case
    leaf = Row(
        Path("/d/server/tls/client-scheduler.crt"),
        "scheduler",
        0,
        "s",
        "rke2-client-ca@2",
        ("ClientAuth",),
        NOW - DAY,
        NOW + 300 * DAY,
        "aa",
        Status.OK,
        300 * DAY,
    )
    assert verdict([leaf], [], [], [entry]).level is level, case
    assert verdict([leaf], [], []).level is Level.OK, "without kubeconfigs: today's verdict"
