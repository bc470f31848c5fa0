"""`rke2certd run`: the daemon's main loop.

Signal handlers only set a flag (and the kernel writes a byte to the wake-up pipe); the
watcher thread, the cluster link thread (lease keep-alive and datastore watch) and a restart
job's thread only record what happened and wake the loop (daemon/signals.py). Everything else
happens here, one thing at a time: staged sets, rescans, the node's rollout steps. The loop also
pings the systemd watchdog, so a stuck loop gets the daemon restarted; nothing it calls waits
without a bound. What a server does and an agent-only node does not (or otherwise) is the
node's role (rke2certd/roles/), chosen from the config at the start and at each reload.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rke2certd.clock import Clock, system_clock
from rke2certd.commands.apply_staged import StagingOutcome
from rke2certd.commands.check import check
from rke2certd.commands.renew import RenewResult
from rke2certd.config import Config
from rke2certd.daemon import signals
from rke2certd.daemon.bootstrap_watch import BootstrapWatch
from rke2certd.daemon.endpoint import LIMITS_EVERY, Endpoint
from rke2certd.daemon.monitor import Monitor
from rke2certd.daemon.notify import Notifier
from rke2certd.daemon.staging_dir import StagingDir
from rke2certd.daemon.status_line import StatusLine
from rke2certd.daemon.waiting import Waiting, first_line, waiting_text
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.node.ca_material import disk_generation
from rke2certd.node.node import Node
from rke2certd.roles import NodeRole, role_for
from rke2certd.roles.agent import FIRST_START as AGENT_FIRST_START
from rke2certd.roles.server import FIRST_START
from rke2certd.rollout.create import after_rotation
from rke2certd.rollout.runner import RECHECK, RolloutRunner

__all__ = ["AGENT_FIRST_START", "FIRST_START", "Daemon"]

AGENT_RETRY = 60.0  # seconds between renew attempts while an agent's servers do not answer


class Daemon:
    def __init__(
        self,
        load_config: Callable[[], Config],
        *,
        clock: Clock = system_clock,
        notifier: Notifier | None = None,
        quiet: float | None = None,
        recheck: float = RECHECK,
        limits_every: float = LIMITS_EVERY,
    ) -> None:
        """`quiet`: the staging dir's quiet time (None: the config's staging-quiet);
        `recheck`: seconds between rollout reads without a wake-up; `limits_every`: between
        looks at the fleet's size (tests shorten or lengthen both)."""
        self._load = load_config
        self.clock = clock
        self.notifier = notifier or Notifier()
        self._quiet = quiet
        self._recheck = recheck
        self.flags = signals.Flags()
        self.wake = signals.Wakeup()
        self.role: NodeRole = self._role(Node.from_config(load_config()))
        self.runner: RolloutRunner | None = None
        self.bootstrap_watch: BootstrapWatch | None = None  # servers: RKE2's CA set
        self.endpoint = Endpoint(clock, limits_every)  # servers: the one agents use
        self.staging = StagingDir()
        self.deferred: str | None = None  # why the last renew was put off (agents only)
        self.next_rescan = 0.0
        self.next_ping = 0.0
        self.status_line = StatusLine()
        self.monitor = Monitor(clock)  # all-OK signal, metrics endpoint, textfile
        self.waiting = Waiting()

    def _role(self, node: Node) -> NodeRole:
        return role_for(node, self.clock, renewed=self._renew)

    @property
    def node(self) -> Node:
        return self.role.node

    @property
    def cfg(self) -> Config:
        return self.role.node.cfg

    @property
    def quiet(self) -> float:
        return self._quiet if self._quiet is not None else self.cfg.staging_quiet

    # -- work -----------------------------------------------------------------------------

    def _open_datastore(self, role: NodeRole | None = None) -> None:
        """Open the store again (`role`: a new config's, replacing the current one)."""
        self._stop_bootstrap_watch()
        if self.role.datastore is not None and self.runner is not None:
            self.runner.stop_link()  # its threads may share the connection closed here
        self.role.close()
        self.role = role or self.role
        self.role.open()

    def _start_bootstrap_watch(self) -> None:
        """Follow RKE2's bootstrap key: a rotation saved anywhere (upstream's `rke2 certificate
        rotate-ca` included) is taken and rolled out as one staged here (see the module)."""
        self._stop_bootstrap_watch()
        ds = self.role.datastore
        if ds is None:
            return
        shared = isinstance(ds, SQLiteDatastore)  # see ServerNode.own_connection
        watch = BootstrapWatch(self.role.own_connection, self.wake.poke, owns_connection=not shared)
        self.bootstrap_watch = watch
        watch.start()

    def _stop_bootstrap_watch(self) -> None:
        if self.bootstrap_watch is not None:
            self.bootstrap_watch.stop()
            self.bootstrap_watch = None

    def _bootstrap_changed(self) -> None:
        if self.bootstrap_watch is not None and self.bootstrap_watch.take_changed():
            self._renew("RKE2's bootstrap data changed")

    def _renew(self, why: str) -> RenewResult:
        before = disk_generation(self.node.layout)
        result = self.role.renew(self.clock())
        self.status_line.certs = None
        after = disk_generation(self.node.layout)
        if result.changes or result.extracted:
            log.info(
                "restart_needed",
                reason=why,
                units=",".join(result.restart_units),
                files=len(result.changes),
            )
        self.role.after_renew(result, before, after, why, self.clock())
        if self.runner is not None:
            self.runner.renewed()
        return result

    def _start_renew(self) -> None:
        """The start's renew. A node that may start without its servers (an agent-only node:
        they may be rebooting too) starts on the certificates it has, if none is expired, and
        tries again every AGENT_RETRY seconds; without usable certificates it fails as before."""
        from rke2certd.supervisor.client import UnreachableError

        try:
            self._renew("start")
            self.monitor.rescanned()
        except UnreachableError as exc:
            if not self.role.joins_late or not self._certs_usable():
                raise
            self.deferred = str(exc)
            log.warning(
                "renew_deferred",
                reason=f"{exc}; using the certificates on disk",
                retry_in=AGENT_RETRY,
            )

    def _joining(self) -> bool:
        """A node that joins the rollouts late has its store but no runner yet."""
        return self.role.joins_late and self.role.store is not None and self.runner is None

    def _rescan_interval(self) -> float:
        """Soon while an agent waits for its servers (to renew, or to join rollouts)."""
        waiting = self.deferred or self._joining()
        return min(AGENT_RETRY, self.cfg.rescan_interval) if waiting else self.cfg.rescan_interval

    def _certs_usable(self) -> bool:
        from rke2certd.node.node_files import WATCHED
        from rke2certd.plan.inventory import failing

        # the node's own certificates: an operator's watched file does not stop the start
        rows = [r for r in check(self.node, [], self.clock()).rows if r.service != WATCHED]
        return bool(rows) and not failing(rows)

    def _rescan(self) -> None:
        self._renew("periodic rescan")
        if self.deferred:
            log.info("renew_resumed", reason="the server answered again")
        self.deferred = None
        self.monitor.rescanned()
        if self._joining():
            self._start_rollouts()

    def _rescan_or_wait(self) -> None:
        """A rescan; a datastore gone meanwhile (RKE2 stopped) is waited for as at start, unless
        this node's rollout restart is running: RKE2's etcd is down during it, and the runner
        reports the restart once the datastore is back (closing it would kill the restart)."""
        try:
            self._rescan()
        except Rke2certdError as exc:
            restarting = self.runner is not None and self.runner.running is not None
            if self.role.datastore is None or restarting or not self.role.waits_for(exc):
                raise
            self._wait_for_datastore(waiting_text(self.cfg, self.node, exc))
            self.next_rescan = time.monotonic() + self._rescan_interval()

    def _start_rollouts(self) -> None:
        """Join the cluster's rollouts: servers through the datastore, agent-only nodes through
        a server's endpoint (and a server does their housekeeping)."""
        store = self.role.store
        if store is None:
            return
        self.runner = RolloutRunner(
            self.node,
            store,
            self.role.rollout_role(),
            clock=self.clock,
            wake=self.wake.poke,
            recheck=self._recheck,
        )
        try:
            self.runner.start()
        except Rke2certdError as exc:
            if not self.role.joins_late:
                raise
            self.runner = None  # no server answers: join at the next attempt
            log.warning("rollout_join_deferred", reason=str(exc), retry_in=AGENT_RETRY)

    def _start_supervisor(self) -> None:
        if self.role.serves_agents:
            self.endpoint.start(self.node, self.role.datastore, self.role.own_connection)

    def _process_staging(self) -> None:
        self.staging.process(
            self.node,
            self.role.datastore,
            self.clock,
            self.quiet,
            self._roll_out,
            before=self._ping_if_due,
            after=self._status,
        )

    def _roll_out(self, outcome: StagingOutcome) -> None:
        """A staged set was saved: start its CA rollout, then take the new CAs here."""
        ds = self.role.datastore
        assert ds is not None and outcome.result is not None
        why = f"staged set {outcome.shown} applied on {self.cfg.node}"
        try:
            after_rotation(ds, self.cfg.node, outcome.result.rollout_facts(), why, self.clock())
        except Rke2certdError as exc:  # the renew below starts it, or a rescan
            log.error("rollout_start_failed", staged_set=outcome.shown, reason=str(exc))
        self._renew(f"staged set {outcome.shown} applied")

    def _tick_rollouts(self) -> None:
        if self.runner is not None:
            self.runner.tick()
        self.endpoint.follow_fleet(self.role.datastore)

    def _status(self) -> None:
        text = self.status_line.compose(self)
        if text != self.status_line.sent:
            self.status_line.sent = text
            self.notifier.status(text)

    def _ready(self) -> None:
        self.status_line.sent = self.status_line.compose(self)
        self.notifier.ready(self.status_line.sent)

    def _ping_if_due(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is not None and time.monotonic() >= self.next_ping:
            self.notifier.watchdog()
            self.next_ping = time.monotonic() + interval

    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading", reason="SIGHUP")
        if self.waiting.reason is not None:  # SIGHUP while waiting: the new config, a retry now
            try:
                # a new role: the config now holds the adopted token, if any
                self.role = self._role(Node.from_config(self._load()))
            except Rke2certdError as exc:
                log.error("reload_failed", reason=str(exc))
            self.waiting.delay = 0.0
            self._try_connect("SIGHUP")
            self.next_rescan = time.monotonic() + self._rescan_interval()
            self._ready()
            return
        try:
            role = self._role(Node.from_config(self._load()))
            self.endpoint.stop(self.role.datastore)
            self._open_datastore(role)
            self._start_bootstrap_watch()
            self._reload_runner()
        except Rke2certdError as exc:
            if self.role.waits_for(exc):  # wait for it, as at start
                self._wait_for_datastore(waiting_text(self.cfg, self.node, exc))
                self._ready()
                return
            log.error("reload_failed", reason=str(exc))
            if self.role.datastore is None and self.runner is not None:  # out until the next
                self.runner.close()
                self.runner = None
        self.monitor.configure(self.cfg, self.role)
        self._safe(lambda: self._renew("reload"))
        self._start_supervisor()
        self.staging.start(self.role.staging, self.wake.poke)
        self._safe(self._process_staging)
        self.next_rescan = time.monotonic() + self._rescan_interval()
        self._ready()

    def _reload_runner(self) -> None:
        store = self.role.store
        if self.runner is not None and store is not None and self.runner.me == self.cfg.node:
            self.runner.reconfigure(self.node, store, self.role.rollout_role())
            return
        if self.runner is not None:  # renamed or no datastore any more: leave, join anew
            self.runner.close()
            self.runner = None
        self._start_rollouts()

    def _safe(self, fn: Callable[[], object]) -> None:
        """Run a periodic task; an error is logged and retried at the next occasion. Any error:
        one the code did not foresee must not stop the daemon (and the endpoint with it)."""
        try:
            fn()
        except Rke2certdError as exc:
            log.error("task_failed", reason=str(exc))
        except Exception as exc:  # logged with its traceback, for a bug report
            log.error("task_failed", reason=f"{type(exc).__name__}: {exc}", exc_info=True)

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [self.next_rescan]
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            deadlines.append(self.next_ping)
        staged = self.staging.deadline(self.quiet)
        if staged is not None:
            deadlines.append(staged)
        if self.runner is not None:
            deadlines.append(self.runner.deadline())
        if self.waiting.reason is None:  # (a waiting loop does not tick the rollouts)
            deadlines.append(self.endpoint.deadline())
        else:
            deadlines.append(self.waiting.next_retry)
        return max(0.0, min(deadlines) - now)

    # -- start, and waiting for what it needs ------------------------------------------------

    def _start(self) -> None:
        """The start's work: the datastore, the start's renew, the endpoint, rollouts, the
        staging dir. Raises what stops it; a datastore that does not answer is one of those
        (`_try_connect` turns it into waiting)."""
        self._open_datastore()
        self._start_bootstrap_watch()
        self._start_renew()
        self._start_supervisor()
        self._start_rollouts()
        self.staging.start(self.role.staging, self.wake.poke)
        self._safe(self._process_staging)  # no staged set keeps the daemon from READY

    def _try_connect(self, trigger: str) -> bool:
        """Do the start's work, or wait (again) for what it needs. True: connected. Raises
        what waiting does not cure. On an RKE2 node RKE2 never started on, RKE2 creates or
        fetches the CA set and every certificate at its first start (rke2-agent: the CAs and
        its certificates from `server`); until then there is nothing here to use, and nothing
        rke2certd may create."""
        first_start = self.role.first_start()
        if first_start is not None:
            self._wait_for_datastore(first_start)
            return False
        try:
            self._start()
        except Rke2certdError as exc:
            if not self.role.waits_for(exc):
                raise
            self._wait_for_datastore(waiting_text(self.cfg, self.node, exc))
            return False
        if self.waiting.reason is not None:
            log.info(
                "datastore_answered", reason=f"no longer {self.waiting.reason}", trigger=trigger
            )
            self.waiting.reset()
        return True

    def _wait_for_datastore(self, why: str) -> None:
        """Stay up without the datastore: one event when the wait starts (or its reason
        changes), a retry after a pause doubling from datastore-retry-min up to -max, and
        meanwhile renewing from a complete CA set on disk (as `renew --offline-ok`)."""
        self._close()
        first_wait = self.waiting.reason is None
        delay = self.waiting.back_off(self.cfg.datastore_retry_min, self.cfg.datastore_retry_max)
        if first_wait or why != self.waiting.reason:
            log.warning("datastore_waiting", reason=why, retry_in=delay)
        else:
            log.debug("datastore_retry_failed", reason=why, retry_in=delay)
        self.waiting.reason = why
        if first_wait and not self.waiting.first_start:
            self._renew_from_disk()

    def _renew_from_disk(self) -> None:
        """While the datastore does not answer: what the startup hook does without it (leaves
        on a complete CA set on disk are renewed; a missing set is left to RKE2, and nothing is
        created without the datastore)."""
        if disk_generation(self.node.layout) is None:
            return
        self._safe(lambda: self._renew("renew from disk while the datastore does not answer"))

    def _fail(self, exc: Rke2certdError) -> int:
        """The start failed for good. A configuration error exits with its own status (the
        unit's RestartPreventExitStatus= names it: restarting cannot cure it); others 1."""
        from rke2certd.errors import ConfigError

        log.error("startup_failed", reason=str(exc))
        self.notifier.status(f"failed to start: {first_line(exc)}")
        self._close()
        self.monitor.close()
        signals.uninstall()
        return exc.exit_code if isinstance(exc, ConfigError) else 1

    def _waiting_tick(self) -> None:
        """The loop's work while waiting: a retry when due, else a rescan from disk."""
        now = time.monotonic()
        if now >= self.waiting.next_retry:
            self._ping_if_due()
            self._try_connect("retry")
        elif now >= self.next_rescan and not self.waiting.first_start:
            self._renew_from_disk()
        if now >= self.next_rescan:
            self.next_rescan = now + self._rescan_interval()

    # -- main -----------------------------------------------------------------------------

    def run(self) -> int:
        signals.install(self.flags, self.wake)
        try:
            self.monitor.configure(self.cfg, self.role)
            self._try_connect("start")
        except Rke2certdError as exc:
            return self._fail(exc)
        self.next_rescan = time.monotonic() + self._rescan_interval()
        self._ready()
        reason = self.waiting.reason or "certificates are valid"
        log.info("ready", reason=reason, staging=str(self.cfg.staging))
        self._ping_if_due()
        self.monitor.tick(self)
        while not self.flags.stop:
            self.wake.wait(self._timeout())
            self._ping_if_due()
            if self.flags.stop:
                break
            if self.flags.reload:
                self.flags.reload = False
                try:
                    self._reload()
                except Rke2certdError as exc:  # a retry's start failed for good
                    return self._fail(exc)
                continue
            if self.waiting.reason is not None:
                try:
                    self._waiting_tick()
                except Rke2certdError as exc:
                    return self._fail(exc)
                self._status()
                self.monitor.tick(self)
                continue
            self._tick()
        return self._shutdown()

    def _tick(self) -> None:
        """One turn of the loop once started: staged sets, RKE2's CA set, a rescan when due,
        the rollout."""
        self._safe(self._process_staging)
        self._safe(self._bootstrap_changed)
        if time.monotonic() >= self.next_rescan:
            self._safe(self._rescan_or_wait)
            if self.waiting.reason is not None:
                self._status()
                return
            self._start_supervisor()
            self.monitor.retry()
            self.next_rescan = time.monotonic() + self._rescan_interval()
        self._safe(self._tick_rollouts)
        self._status()
        self.monitor.tick(self)

    def _shutdown(self) -> int:
        self.notifier.stopping("stopping")
        log.info("stopping", reason=self.flags.stop_signal)
        self._close()
        self.monitor.close()
        signals.uninstall()
        self.wake.close()
        return 0

    def _close(self) -> None:
        self._stop_bootstrap_watch()
        self.endpoint.stop(self.role.datastore)
        self.staging.stop()
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        self.role.close()
