"""The daemon's Prometheus metrics: served on `metrics-address` and written as a node_exporter
textfile (`textfile-dir`/rke2certd.prom), the same families in both.

Per certificate, x509-certificate-exporter's schema (so that its dashboards and alerts work):
`x509_cert_not_after`, `x509_cert_not_before`, `x509_cert_expired` with the labels `filename`,
`filepath`, `serial_number` (decimal), `subject_CN`, `issuer_CN`, `embedded_kind`,
`embedded_key` (kubeconfigs), and `x509_read_errors` (unlabelled: files that could not be read).
rke2certd's own families are named `rke2certd_*`.

Counters are fed by the events the code logs anyway (`rke2certd.log.add_observer`), so counting
touches no module but this one; gauges are set by the daemon's loop (`refresh`). Certificate
statuses are worked out at collection time from the facts read at the last rescan, so a
certificate that crosses into the window or expires shows at the next scrape.

prometheus_client is imported here only, and this module only by the daemon.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, StateSetMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from rke2certd import __version__
from rke2certd.clock import Clock
from rke2certd.log import add_observer, log, remove_observer
from rke2certd.plan.inventory import CertFacts, Row, Status, status
from rke2certd.plan.listen import parse_listen
from rke2certd.plan.verdict import Level, Verdict

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

TEXTFILE = "rke2certd.prom"
CERT_LABELS = (
    "filename",
    "filepath",
    "serial_number",
    "subject_CN",
    "issuer_CN",
    "embedded_kind",
    "embedded_key",
)
STATUS_NAMES = {
    Status.OK: "ok",
    Status.WARNING: "warning",
    Status.EXPIRED: "expired",
    Status.NOT_YET_VALID: "not_yet_valid",
    Status.CHAIN_BROKEN: "chain_broken",
}
STEPS = ("idle", "waiting", "applied", "restarting", "health_gate", "done", "failed")
ROLLOUT_STATES = ("active", "done", "stopped", "superseded")
DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
CA_SERVICE = "ca"

# --- pure helpers --------------------------------------------------------------------------------

_REASONS = (
    ("missing", "missing"),
    ("expired", "expired"),
    ("expires within", "window"),
    ("not yet valid", "not_yet_valid"),
    ("key", "key"),
    ("CN changed", "subject"),
    ("O changed", "subject"),
    ("SAN missing", "san"),
    ("signed by another CA", "ca_changed"),
    ("forced", "forced"),
)


def reason_category(reason: str) -> str:
    """A renewal's first reason as a bounded label value (the text is in the journal)."""
    first = reason.split(";", 1)[0].strip()
    for prefix, name in _REASONS:
        if first.startswith(prefix):
            return name
    return "other" if first else "unknown"


def rejection_category(reason: str) -> str:
    """A staged set's rejection reason as a bounded label value."""
    text = reason.lower()
    for word, name in (
        ("chain", "chain"),
        ("service", "service_key"),
        ("missing", "incomplete"),
        ("not a directory", "layout"),
        ("unexpected", "layout"),
        ("key", "key"),
        ("expired", "validity"),
        ("valid", "validity"),
    ):
        if word in text:
            return name
    return "other"


def route_label(path: Any, known: frozenset[str]) -> str:
    """A request's path as a label: a route rke2certd serves, or `other` (anyone can send any
    path: it must not grow the series)."""
    text = str(path or "").split("?", 1)[0]
    return text if text in known else "other"


def serial_decimal(serial_hex: str) -> str:
    try:
        return str(int(serial_hex, 16))
    except ValueError:
        return serial_hex


def cert_labels(row: Row) -> list[str]:
    return [
        row.path.name,
        str(row.path),
        serial_decimal(row.serial),
        row.subject,
        row.issuer,
        row.embedded_kind,
        row.embedded_key,
    ]


def _facts(row: Row) -> CertFacts:
    return CertFacts(row.subject, row.issuer, row.usages, row.not_before, row.not_after, row.serial)


# --- state the loop sets -------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What the last rescan read; the collector turns it into series at each scrape."""

    rows: list[Row] = field(default_factory=list)  # leaves, kubeconfigs, watched files
    ca_rows: list[Row] = field(default_factory=list)  # the CA files
    errors: list[str] = field(default_factory=list)
    overdue: set[tuple[str, int]] = field(default_factory=set)  # (path, index) still in window
    window: timedelta = timedelta(days=90)
    verdict: Verdict | None = None
    generation: str | None = None
    datastore_up: bool | None = None
    last_rescan: float | None = None
    rescan_interval: float = 3600.0
    rollout: tuple[str, str, str] | None = None  # (id, kind, state) of the newest rollout
    step: str = "idle"


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        with self.m.lock:
            snap = self.m.snap
            now = self.m.clock()
        yield from _cert_families(snap, now)
        yield from _state_families(snap)


def _cert_families(snap: Snapshot, now: datetime) -> Iterator[Any]:
    after = GaugeMetricFamily(
        "x509_cert_not_after", "Indicates the certificate's not after timestamp", labels=CERT_LABELS
    )
    before = GaugeMetricFamily(
        "x509_cert_not_before",
        "Indicates the certificate's not before timestamp",
        labels=CERT_LABELS,
    )
    expired = GaugeMetricFamily(
        "x509_cert_expired", "Indicates if the certificate is expired", labels=CERT_LABELS
    )
    st = GaugeMetricFamily(
        "rke2certd_cert_status",
        "1 for the certificate's status now (ok, warning = inside the renewal window, expired, "
        "not_yet_valid, chain_broken = does not verify against its CA file), 0 for the others",
        labels=("filepath", "serial_number", "subject_CN", "issuer_CN", "service", "status"),
    )
    overdue = GaugeMetricFamily(
        "rke2certd_cert_renewal_overdue",
        "1 when the certificate was inside the renewal window (or expired) after the last "
        "rescan: rke2certd did not renew it",
        labels=("filepath", "serial_number", "subject_CN", "service"),
    )
    for row in [*snap.rows, *snap.ca_rows]:
        labels = cert_labels(row)
        after.add_metric(labels, row.not_after.timestamp())
        before.add_metric(labels, row.not_before.timestamp())
        expired.add_metric(labels, 1.0 if now > row.not_after else 0.0)
        if row.index > 0 and row.service != CA_SERVICE:
            continue  # a chain's CA: its x509 series are there; its status is the CA file's
        current = status(_facts(row), now, snap.window)
        short = [str(row.path), labels[2], row.subject, row.issuer, row.service]
        for s, name in STATUS_NAMES.items():
            st.add_metric([*short, name], 1.0 if s is current else 0.0)
        if row.service != CA_SERVICE:
            late = (str(row.path), row.index) in snap.overdue
            overdue.add_metric([str(row.path), labels[2], row.subject, row.service], float(late))
    yield after
    yield before
    yield expired
    yield GaugeMetricFamily(
        "x509_read_errors", "Indicates the number of read failure(s)", value=len(snap.errors)
    )
    yield st
    yield overdue
    ca = GaugeMetricFamily(
        "rke2certd_ca_not_after_seconds",
        "The soonest notAfter of each CA file's certificates (unix time)",
        labels=("filepath",),
    )
    soonest: dict[Path, float] = {}
    for row in snap.ca_rows:
        t = row.not_after.timestamp()
        soonest[row.path] = min(t, soonest.get(row.path, t))
    for path, t in sorted(soonest.items()):
        ca.add_metric([str(path)], t)
    yield ca
    if soonest:
        yield GaugeMetricFamily(
            "rke2certd_ca_soonest_not_after_seconds",
            "The soonest notAfter of all CA certificates on this node (unix time)",
            value=min(soonest.values()),
        )


def _state_families(snap: Snapshot) -> Iterator[Any]:
    if snap.verdict is not None:
        ok = GaugeMetricFamily(
            "rke2certd_certificates_ok",
            "1 when every certificate is valid and outside the renewal window",
            value=1.0 if snap.verdict.level is Level.OK else 0.0,
        )
        yield ok
        yield GaugeMetricFamily(
            "rke2certd_certificates_level",
            "The node's certificates as a monitoring plugin says it: 0 OK, 1 warning, "
            "2 critical, 3 unknown",
            value=int(snap.verdict.level),
        )
    info = InfoMetricFamily("rke2certd_build", "rke2certd's version")
    info.add_metric([], {"version": __version__})
    yield info
    if snap.generation is not None:
        gen = InfoMetricFamily("rke2certd_ca_generation", "The CA generation on this node's disk")
        gen.add_metric([], {"generation": snap.generation})
        yield gen
    if snap.datastore_up is not None:
        yield GaugeMetricFamily(
            "rke2certd_datastore_reachable",
            "1 when the datastore (agents: a server's endpoint) answered the last time it was used",
            value=1.0 if snap.datastore_up else 0.0,
        )
    if snap.last_rescan is not None:
        yield GaugeMetricFamily(
            "rke2certd_last_rescan_timestamp_seconds",
            "When the certificates were last scanned (and renewed) successfully (unix time)",
            value=snap.last_rescan,
        )
    yield GaugeMetricFamily(
        "rke2certd_rescan_interval_seconds",
        "Seconds between rescans (rescan-interval)",
        value=snap.rescan_interval,
    )
    step = StateSetMetricFamily(
        "rke2certd_rollout_node_step", "This node's step in the current rollout"
    )
    step.add_metric([], {s: s == snap.step for s in STEPS})
    yield step
    if snap.rollout is not None:
        rid, kind, state = snap.rollout
        rs = GaugeMetricFamily(
            "rke2certd_rollout_state",
            "1 for the newest rollout's state (active, done, stopped, superseded), 0 for others",
            labels=("rollout", "kind", "state"),
        )
        for s in ROLLOUT_STATES:
            rs.add_metric([rid, kind, s], 1.0 if s == state else 0.0)
        yield rs


# --- the registry, the observer, the endpoint, the textfile -------------------------------------


class Metrics:
    def __init__(self, clock: Clock, routes: frozenset[str] = frozenset()) -> None:
        self.clock = clock
        self.routes = routes
        self.lock = threading.Lock()
        self.snap = Snapshot()
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `*_created` series: twice the lines, read by no dashboard
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.renewals = Counter(
            "rke2certd_renewals",
            "Certificates renewed, by service and first reason",
            ["service", "reason"],
            registry=r,
        )
        self.staged = Counter(
            "rke2certd_staged_sets",
            "Staged CA sets processed, by result and reason",
            ["result", "reason"],
            registry=r,
        )
        self.restart = Histogram(
            "rke2certd_restart_duration_seconds",
            "The restart command's run time in rollouts",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.health = Histogram(
            "rke2certd_health_gate_duration_seconds",
            "Time from the restart to a passing (or failed) health gate in rollouts",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "rke2certd_endpoint_requests",
            "Requests answered by the agents' endpoint",
            ["route", "status"],
            registry=r,
        )
        self.refusals = Counter(
            "rke2certd_endpoint_refusals",
            "Requests the agents' endpoint refused",
            ["route", "status"],
            registry=r,
        )
        self.all_ok = Counter(
            "rke2certd_all_ok_transitions",
            "Times the node went back to all certificates OK",
            registry=r,
        )
        r.register(_Collector(self))
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None
        self._last_text: bytes | None = None
        self.dirty = True  # something changed since the textfile was written
        self._textfile_error: str | None = None
        self._step_event: str | None = None
        add_observer(self.observe)

    # events -> counters (any thread)

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        self.dirty = True
        reason = str(fields.get("reason") or "")
        if event == "cert_renewed" and not fields.get("dry_run"):
            self.renewals.labels(str(fields.get("cert_service", "")), reason_category(reason)).inc()
        elif event == "kubeconfig_rewritten":
            self.renewals.labels("admin", "kubeconfig").inc()
        elif event in ("staged_set_applied", "staged_set_rejected"):
            applied = event.endswith("applied")
            why = "ok" if applied else rejection_category(reason)
            self.staged.labels("applied" if applied else "rejected", why).inc()
        elif event in ("request_served", "request_refused"):
            route = route_label(fields.get("http_path"), self.routes)
            code = str(fields.get("http_status") or "none")
            self.requests.labels(route, code).inc()
            if event == "request_refused":
                self.refusals.labels(route, code).inc()
        elif event in ("rollout_node_done", "rollout_failed"):
            for hist, key in ((self.restart, "restart_seconds"), (self.health, "health_seconds")):
                value = fields.get(key)
                if isinstance(value, int | float):
                    hist.observe(value)
        elif event == "cluster_link_failed":
            with self.lock:
                self.snap.datastore_up = False
        elif event == "cluster_link_restored":
            with self.lock:
                self.snap.datastore_up = True
        elif event == "all_certificates_ok":
            self.all_ok.inc()

    # the loop's view

    def update(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                if getattr(self.snap, key) != value:
                    setattr(self.snap, key, value)
                    self.dirty = True

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def start(self, address: str) -> None:
        """Serve on `address` (host:port; "" = not at all). A failure is logged: the daemon
        keeps renewing without its endpoint and tries again at each rescan."""
        listen = parse_listen(address)
        if listen is None or self.server is not None:
            return
        from prometheus_client import start_http_server

        host, port = listen
        try:
            self.server, self.thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            log.error("metrics_failed", host=host, port=port, reason=str(exc))
            return
        self.address = (host, int(self.server.server_port))
        log.info("metrics_started", host=host, port=self.address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            if self.thread is not None:
                self.thread.join(timeout=5)
            self.server = self.thread = None
            log.info("metrics_stopped", reason="stopping")

    def close(self) -> None:
        self.stop()
        remove_observer(self.observe)

    def write_textfile(self, directory: Path | None) -> bool:
        """`<dir>/rke2certd.prom`, atomically, when its bytes changed; node_exporter reads it."""
        if directory is None or not self.dirty:
            return False
        self.dirty = False
        data = self.text()
        if data == self._last_text:
            return False
        from rke2certd.errors import Rke2certdError
        from rke2certd.files.atomic import ensure_dir, write_file

        try:
            if not directory.is_dir():
                ensure_dir(directory, 0o755)
            write_file(directory / TEXTFILE, data, 0o644)
        except (Rke2certdError, OSError) as exc:
            if str(exc) != self._textfile_error:  # once per problem, not at every turn
                log.error("metrics_textfile_failed", cert_path=str(directory), reason=str(exc))
            self._textfile_error = str(exc)
            self.dirty = True  # tried again at the next turn
            return False
        if self._textfile_error is not None:
            log.info("metrics_textfile_written", cert_path=str(directory), reason="works again")
            self._textfile_error = None
        self._last_text = data
        return True


def overdue_rows(rows: Sequence[Row]) -> set[tuple[str, int]]:
    """PURE: the certificates a rescan left inside the window or expired (rows read after it)."""
    late = (Status.WARNING, Status.EXPIRED, Status.NOT_YET_VALID)
    return {(str(r.path), r.index) for r in rows if r.status in late}
