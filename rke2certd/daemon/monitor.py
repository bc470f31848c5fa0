"""What the daemon tells the outside about its certificates: the "all OK" signal (an
`all_certificates_ok` event and STATUS=) and, when configured, the metrics endpoint and the
node_exporter textfile (daemon/metrics.py, which alone imports prometheus_client).

The loop calls `certs` with each fresh `certificate check` result (after every renew), `rescanned`
after a successful rescan, and `tick` once per turn (datastore, rollout, textfile).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from rke2certd.clock import Clock
from rke2certd.commands.check import CheckResult
from rke2certd.config import Config
from rke2certd.log import log
from rke2certd.plan.inventory import Row, rows_for
from rke2certd.plan.verdict import Level, Verdict, verdict

if TYPE_CHECKING:
    from rke2certd.daemon.loop import Daemon
    from rke2certd.daemon.metrics import Metrics
    from rke2certd.roles.base import NodeRole


class Monitor:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.verdict: Verdict | None = None
        self.metrics: Metrics | None = None
        self.cfg: Config | None = None

    # configuration ------------------------------------------------------------------------------

    def configure(self, cfg: Config, role: NodeRole) -> None:
        """Start, move or stop the endpoint and the textfile for this config."""
        old, self.cfg = self.cfg, cfg
        wanted = bool(cfg.metrics_address.strip()) or cfg.textfile_dir is not None
        if not wanted:
            self.close()
            return
        if self.metrics is None:
            from rke2certd.daemon.metrics import Metrics  # prometheus_client: ~15 ms, daemon only

            self.metrics = Metrics(self.clock, role.served_routes)
        elif old is not None and old.metrics_address != cfg.metrics_address:
            self.metrics.stop()
        self.metrics.update(
            window=timedelta(days=cfg.renew_before_days), rescan_interval=cfg.rescan_interval
        )
        self.metrics.start(cfg.metrics_address)

    def retry(self) -> None:
        """At each rescan: an endpoint that could not bind tries again."""
        if self.metrics is not None and self.cfg is not None:
            self.metrics.start(self.cfg.metrics_address)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # the loop's news -------------------------------------------------------------------------

    def certs(self, role: NodeRole, result: CheckResult) -> None:
        """A fresh inventory (right after a renew): the verdict, the all-OK event, the metrics."""
        new = verdict(result.rows, result.errors, result.warnings, result.kubeconfigs)
        old, self.verdict = self.verdict, new
        if new.level is Level.OK and old is not None and old.level is not Level.OK:
            log.info("all_certificates_ok", reason=new.text, previous=old.level.name)
        elif new.level is not Level.OK and (old is None or old.text != new.text):
            log.warning("certificates_not_ok", verdict=new.level.name, reason=new.text)
        if self.metrics is None:
            return
        from rke2certd.daemon.metrics import overdue_rows

        self.metrics.update(
            rows=list(result.rows),
            ca_rows=ca_rows(role, result),
            errors=list(result.errors),
            overdue=overdue_rows(result.rows),
            verdict=new,
            generation=role.disk_generation(),
        )

    def rescanned(self) -> None:
        if self.metrics is not None:
            self.metrics.update(last_rescan=self.clock().timestamp())
            self.metrics.dirty = True  # statuses move with time: the textfile at least per rescan

    def tick(self, daemon: Daemon) -> None:
        if self.metrics is None:
            return
        self.metrics.update(datastore_up=_datastore_up(daemon), **_rollout(daemon))
        self.metrics.write_textfile(daemon.cfg.textfile_dir)

    def status_text(self) -> str:
        """For STATUS=: says so when all is well, and what is wrong first otherwise."""
        if self.verdict is None:
            return ""
        if self.verdict.level is Level.OK:
            return "all certificates OK"
        return f"{self.verdict.level.name}: {self.verdict.text}"


def ca_rows(role: NodeRole, result: CheckResult) -> list[Row]:
    """The CA files' certificates (x509 series and the soonest CA expiry); not in `check`."""
    from rke2certd.daemon.metrics import CA_SERVICE
    from rke2certd.errors import PKIError
    from rke2certd.files.atomic import read_optional
    from rke2certd.node.cert_facts import FactsCache

    cache = FactsCache.for_data_dir(role.node.layout.data_dir)
    window = timedelta(days=result.window_days)
    rows: list[Row] = []
    for path in role.ca_files():
        data = read_optional(path)
        if data is None:
            continue
        try:
            rows += rows_for(path, CA_SERVICE, cache.facts(data, path), result.now, window)
        except PKIError as exc:
            result.errors.append(str(exc))
    cache.save()
    return rows


def _datastore_up(d: Daemon) -> bool:
    if d.role.joins_late:  # through its servers: up once one answered and it joined
        return d.role.store is not None and d.deferred is None and d.runner is not None
    link = d.runner.link if d.runner is not None else None
    return d.role.datastore is not None and not (link is not None and link.error)


def _rollout(d: Daemon) -> dict[str, object]:
    runner = d.runner
    if runner is None:
        return {"step": "idle"}
    if runner.running is not None:
        step = "health_gate" if runner.running.job.step == "health" else "restarting"
    elif runner.waiting is not None:
        step = "waiting"
    elif runner.health.startswith("failed"):
        step = "failed"
    else:
        step = "idle"
    out: dict[str, object] = {"step": step}
    view = runner.view
    if view is not None and view.rollouts:
        r = view.rollouts[-1]
        out["rollout"] = (r.id, r.kind.value, r.state.value)
    return out
