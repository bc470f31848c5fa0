"""`rke2certd run`: the daemon's main loop.

Signal handlers only set a flag (and the kernel writes a byte to the wake-up pipe); the
watcher thread, the cluster link thread (lease keep-alive and datastore watch) and a restart
job's thread only record what happened and wake the loop. Everything else happens here, one
thing at a time: staged sets, rescans, the node's rollout steps. The loop also pings the systemd
watchdog, so a stuck loop gets the daemon restarted; nothing it calls waits without a bound.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from rke2certd.clock import Clock, system_clock
from rke2certd.config import Config
from rke2certd.daemon.bootstrap_watch import BootstrapWatch
from rke2certd.daemon.monitor import Monitor
from rke2certd.daemon.notify import Notifier
from rke2certd.daemon.watcher import StagingWatcher
from rke2certd.datastore.base import KV, Datastore
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.ops.ca_material import disk_generation
from rke2certd.ops.check import check
from rke2certd.ops.node import Node
from rke2certd.ops.renew import RenewResult, renew
from rke2certd.ops.staging import StagingOutcome, prepare, process_set
from rke2certd.plan.rollout import Member, Rollout, phase_of
from rke2certd.plan.staging import next_deadline, ready_sets
from rke2certd.rollout.create import after_renew, after_rotation
from rke2certd.rollout.runner import ApplyOutcome, RolloutRunner
from rke2certd.store.atomic import read_optional
from rke2certd.store.lock import node_lock

if TYPE_CHECKING:
    from rke2certd.supervisor.cluster_api import ClusterAPI
    from rke2certd.supervisor.fleet_limits import Limits
    from rke2certd.supervisor.remote import RemoteDatastore
    from rke2certd.supervisor.server import SupervisorHandle
    from rke2certd.supervisor.watch_hub import WatchHub


AGENT_RETRY = 60.0  # seconds between renew attempts while an agent's servers do not answer
FIRST_START = "waiting for RKE2's first start"
AGENT_FIRST_START = "waiting for rke2-agent's first start"
LIMITS_EVERY = float(os.environ.get("RKE2CERTD_LIMITS_SECONDS", "60"))  # fleet size looks


class Wakeup:
    """A self-pipe: signals (via set_wakeup_fd) and the helper threads write to it."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: already awake
            os.write(self.w, b"w")

    def wait(self, timeout: float) -> None:
        select.select([self.r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 512):
                pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@dataclass
class Flags:
    stop: bool = False
    reload: bool = False
    signals: list[int] = field(default_factory=list)


class Daemon:
    def __init__(
        self,
        load_config: Callable[[], Config],
        *,
        clock: Clock = system_clock,
        notifier: Notifier | None = None,
        quiet: float | None = None,
    ) -> None:
        self._load = load_config
        self.clock = clock
        self.notifier = notifier or Notifier()
        self._quiet = quiet  # None: the config's staging-quiet
        self.flags = Flags()
        self.wake = Wakeup()
        self.cfg: Config = load_config()
        self.node = Node.from_config(self.cfg)
        self.ds: Datastore | None = None
        self.watcher: StagingWatcher | None = None
        self.runner: RolloutRunner | None = None
        self.bootstrap_watch: BootstrapWatch | None = None  # servers: RKE2's CA set
        # servers: the endpoint agents use; agent-only nodes: the coordination keys through it
        self.supervisor: SupervisorHandle | None = None
        self.supervisor_error: str | None = None
        self._endpoint_ds: Datastore | None = None
        self._hub: WatchHub | None = None  # the endpoint's one watch for all agents
        self._api: ClusterAPI | None = None  # the endpoint's cluster route
        self._next_limits = 0.0  # when the endpoint's limits follow the fleet's size again
        self._limits: Limits | None = None
        self.remote: RemoteDatastore | None = None
        self._token: str | None = None  # adopted after a CA rotation, until the next reload
        self.deferred: str | None = None  # why the last renew was put off (agents only)
        self.staging_refused: str | None = None
        self.next_rescan = 0.0
        self.next_ping = 0.0
        self._certs_text: str | None = None  # cached: reading every cert per status is wasteful
        self._sent_status = ""
        self.monitor = Monitor(clock)  # all-OK signal, metrics endpoint, textfile
        # What the daemon waits for while RKE2 has not started (any node) or a server's
        # datastore does not answer (None: started). It stays up: READY, the reason in STATUS=.
        self.waiting: str | None = None
        self._retry_delay = 0.0
        self.next_retry = 0.0

    @property
    def agent_only(self) -> bool:
        return not self.cfg.is_server

    @property
    def quiet(self) -> float:
        return self._quiet if self._quiet is not None else self.cfg.staging_quiet

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only set flags: the work happens on the main loop.
        if signum == signal.SIGHUP:
            self.flags.reload = True
        else:
            self.flags.stop = True

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self.wake.w, warn_on_full_buffer=False)

    # -- work -----------------------------------------------------------------------------

    def _open_datastore(self) -> None:
        self._stop_bootstrap_watch()
        if self.ds is not None:
            if self.runner is not None:
                self.runner.stop_link()  # its threads may share the connection closed here
            self.ds.close()
            self.ds = None
        self.remote = None
        if self.cfg.is_server:
            from rke2certd.ops.bootstrap import open_for

            self.ds = open_for(self.node)
        else:
            from rke2certd.ops.agent_rollout import remote_store

            self.remote = remote_store(self.node, self._agent_token)

    def _start_bootstrap_watch(self) -> None:
        """Follow RKE2's bootstrap key: a rotation saved anywhere (upstream's `rke2 certificate
        rotate-ca` included) is taken and rolled out as one staged here (see the module)."""
        self._stop_bootstrap_watch()
        ds = self.ds
        if ds is None:
            return
        shared = isinstance(ds, SQLiteDatastore)  # see _own_connection

        def connection() -> Datastore:
            return ds if shared else self._own_connection()

        watch = BootstrapWatch(connection, self.wake.poke, owns_connection=not shared)
        self.bootstrap_watch = watch
        watch.start()

    def _stop_bootstrap_watch(self) -> None:
        if self.bootstrap_watch is not None:
            self.bootstrap_watch.stop()
            self.bootstrap_watch = None

    def _bootstrap_changed(self) -> None:
        if self.bootstrap_watch is not None and self.bootstrap_watch.take_changed():
            self._renew("RKE2's bootstrap data changed")

    def _remote(self) -> RemoteDatastore:
        assert self.remote is not None, "agent-only nodes have a remote store"
        return self.remote

    def _agent_token(self) -> str:
        from rke2certd.ops.agent import agent_token

        return self._token or agent_token(self.node)

    def _renew(self, why: str) -> RenewResult:
        before = disk_generation(self.node.layout)
        with node_lock(self.cfg.data_dir, self.cfg.lock_timeout):
            if self.agent_only:
                from rke2certd.ops.agent_rollout import rejoin_renew

                result, adopted = rejoin_renew(self.node, self.clock(), token=self._token)
                self._token = adopted or self._token
            else:
                result = renew(self.node, self.clock(), datastore=self.ds)
                from rke2certd.ops.node_files import refresh_admin_kubeconfig

                refresh_admin_kubeconfig(self.node)  # kubectl needs no RKE2 restart for it
        self._certs_text = None
        after = disk_generation(self.node.layout)
        if result.changes or result.extracted:
            log.info(
                "restart_needed",
                reason=why,
                units=",".join(result.restart_units),
                files=len(result.changes),
            )
        if self.ds is not None:  # agents start no rollouts: their restart waits for one
            try:
                phase = phase_of(r.value for r in self.cfg.roles)
                after_renew(self.ds, self.cfg.node, phase, result, before, after, why, self.clock())
            except Rke2certdError as exc:  # the files are renewed; the rollout waits for a rescan
                log.error("rollout_start_failed", reason=str(exc))
        if self.runner is not None:
            self.runner.renewed()
        return result

    def _start_renew(self) -> None:
        """The start's renew. An agent-only node whose servers do not answer (they may be
        rebooting too) starts on the certificates it has, if none is expired, and tries again
        every AGENT_RETRY seconds; without usable certificates it fails as before."""
        from rke2certd.supervisor.client import UnreachableError

        try:
            self._renew("start")
            self.monitor.rescanned()
        except UnreachableError as exc:
            if not self.agent_only or not self._certs_usable():
                raise
            self.deferred = str(exc)
            log.warning(
                "renew_deferred", reason=f"{exc}; using the certificates on disk",
                retry_in=AGENT_RETRY,
            )  # fmt: skip

    def _rescan_interval(self) -> float:
        """Soon while an agent waits for its servers (to renew, or to join rollouts)."""
        waiting = self.deferred or (self.remote is not None and self.runner is None)
        return min(AGENT_RETRY, self.cfg.rescan_interval) if waiting else self.cfg.rescan_interval

    def _certs_usable(self) -> bool:
        from rke2certd.ops.node_files import WATCHED
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
        if self.runner is None and self.remote is not None:
            self._start_rollouts()

    def _rescan_or_wait(self) -> None:
        """A rescan; a datastore gone meanwhile (RKE2 stopped) is waited for as at start, unless
        this node's rollout restart is running: RKE2's etcd is down during it, and the runner
        reports the restart once the datastore is back (closing it would kill the restart)."""
        try:
            self._rescan()
        except Rke2certdError as exc:
            restarting = self.runner is not None and self.runner.running is not None
            if self.ds is None or restarting or not self._datastore_down(exc):
                raise
            self._wait_for_datastore(self._waiting_text(exc))
            self.next_rescan = time.monotonic() + self._rescan_interval()

    def _apply_rollout(self, rollout: Rollout) -> ApplyOutcome:
        """A rollout's apply step: the same renew (extract, re-issue, tokens) under the lock."""
        if self.agent_only:
            return self._apply_agent_rollout(rollout)
        self._renew(f"rollout {rollout.id}")
        server_ca = read_optional(self.node.layout.ca_cert("server-ca"))
        if server_ca:  # a full token in the config must pin the CA RKE2 restarts with
            from rke2certd.ops.tokens import rewrite_config_tokens
            from rke2certd.pki.token import ca_hash

            with node_lock(self.cfg.data_dir, self.cfg.lock_timeout):
                rewrite_config_tokens(self.node, ca_hash(server_ca))
        return ApplyOutcome(disk_generation(self.node.layout))

    def _apply_agent_rollout(self, rollout: Rollout) -> ApplyOutcome:
        """Adopt the servers' rotated CA (new token hash in the config), then renew through
        them; the generation is the server's once this disk holds the bundles it serves."""
        from rke2certd.datastore.base import DatastoreUnavailable
        from rke2certd.ops.agent_rollout import adopt_rotated_ca
        from rke2certd.supervisor.client import UnreachableError

        try:
            with node_lock(self.cfg.data_dir, self.cfg.lock_timeout):
                self._token = adopt_rotated_ca(self.node, self._agent_token()) or self._token
            self._renew(f"rollout {rollout.id}")
        except UnreachableError as exc:  # servers busy or down: try again later, never fail
            raise DatastoreUnavailable(str(exc)) from exc
        return ApplyOutcome(self._generation())

    def _generation(self) -> str | None:
        """The CA generation on disk; an agent's is the server's, if it holds what it serves."""
        if self.agent_only:
            from rke2certd.ops.agent_rollout import agent_generation

            return agent_generation(self.node, self._remote())
        return disk_generation(self.node.layout)

    def _start_rollouts(self) -> None:
        """Join the cluster's rollouts: servers through the datastore, agent-only nodes through
        a server's endpoint (and a server does their housekeeping)."""
        agent = self.remote is not None
        store = self.remote if agent else self.ds
        if store is None:
            return
        self.runner = RolloutRunner(
            self.node, store, open_ds=self._remote if agent else self._own_connection,
            apply=self._apply_rollout, generation=self._generation, clock=self.clock,
            wake=self.wake.poke, housekeep=(lambda: self._remote().housekeep()) if agent else None,
        )  # fmt: skip
        try:
            self.runner.start()
        except Rke2certdError as exc:
            if not agent:
                raise
            self.runner = None  # no server answers: join at the next attempt
            log.warning("rollout_join_deferred", reason=str(exc), retry_in=AGENT_RETRY)

    def _start_supervisor(self) -> None:
        """Servers serve agents (CSRs, CAs, the coordination keys). A port in use is logged
        and retried at the next rescan: renewing this node's certificates goes on."""
        if not self.cfg.is_server or self.supervisor is not None:
            return
        from rke2certd.supervisor import server
        from rke2certd.supervisor.cluster_api import ClusterAPI, ServedCA

        api = None
        if self.ds is not None:
            if self._endpoint_ds is None:
                self._endpoint_ds = self._own_connection()
            from rke2certd.supervisor.watch_hub import WatchHub

            if self._hub is None:  # kept while the port is retried at each rescan
                self._hub = WatchHub(self._endpoint_ds).start()
            limits = self._fleet_limits()
            self._next_limits = time.monotonic() + LIMITS_EVERY
            api = self._api = ClusterAPI(
                self._endpoint_ds, self.clock, lambda: ServedCA.on_disk(self.node.layout),
                availability=self.cfg.availability, hub=self._hub,
                max_watches=limits.watches, max_connections=limits.connections,
                home=limits.home,
            )  # fmt: skip
        try:
            self.supervisor = server.start(
                self.node, host=self.cfg.supervisor_bind_address, cluster=api, clock=self.clock
            )
            self.supervisor_error = None
        except Rke2certdError as exc:
            self.supervisor_error = str(exc)
            log.error("supervisor_failed", port=self.cfg.supervisor_port, reason=str(exc))

    def _fleet_limits(self) -> Limits:
        """The endpoint's limits for the fleet the datastore knows now (a grown fleet's at
        the next reload or restart)."""
        import resource

        from rke2certd.plan.rollout import Phase
        from rke2certd.rollout import records as rec
        from rke2certd.supervisor.fleet_limits import fleet_limits

        assert self.ds is not None
        try:
            members = [
                m for kv in self.ds.snapshot(rec.MEMBERS).kvs if (m := _member(kv)) is not None
            ]
        except Rke2certdError as exc:
            log.warning("fleet_unknown", reason=str(exc))
            members = []
        agents = sum(1 for m in members if m.phase is Phase.AGENT)
        servers = max(1, len(members) - agents)
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limits = fleet_limits(agents, servers, open_files if open_files > 0 else 1024)
        old = self._limits
        if old is None or (old.connections, old.watches) != (limits.connections, limits.watches):
            log.info(
                "supervisor_limits", connections=limits.connections, watches=limits.watches,
                reason=limits.reason,
            )  # fmt: skip
        self._limits = limits
        return limits

    def _stop_supervisor(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self._hub is not None:
            self._hub.stop()
            self._hub = None
        self._api = None
        if self._endpoint_ds is not None:
            if self._endpoint_ds is not self.ds:
                self._endpoint_ds.close()
            self._endpoint_ds = None

    def _own_connection(self) -> Datastore:
        """SQLite: share the main connection (it is thread-safe). Opening the same file a second
        time in this process would drop the first connection's POSIX locks (the open/close in
        SQLiteDatastore._open), and another process could then delete the WAL under us. etcd: a
        connection of its own, as a watch holds it for seconds."""
        assert self.ds is not None
        if isinstance(self.ds, SQLiteDatastore):
            return self.ds
        from rke2certd.ops.bootstrap import open_for

        return open_for(self.node)

    def _start_staging(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self.staging_refused = None
        if not self.cfg.is_server:
            return
        staging = self.cfg.staging
        try:
            prepare(staging)
        except Rke2certdError as exc:
            self.staging_refused = str(exc)
            log.error("staging_refused", cert_path=str(staging), reason=str(exc))
            return
        self.watcher = StagingWatcher(staging, self.wake.poke)
        self.watcher.start()
        log.info("staging_watched", cert_path=str(staging))

    def _process_staging(self) -> None:
        """Each finished set, one at a time (ops/staging.py: no set stops the daemon, a saved
        set is rolled out before it is filed)."""
        if self.watcher is None or self.ds is None:
            return
        for name in ready_sets(self.watcher.states(), time.monotonic(), self.quiet):
            self._ping_if_due()
            try:
                process_set(
                    self.node, self.cfg.staging, name, self.clock(), self.ds,
                    roll_out=self._roll_out,
                )  # fmt: skip
            finally:
                self.watcher.forget(name)
            self._status()

    def _roll_out(self, outcome: StagingOutcome) -> None:
        """A staged set was saved: start its CA rollout, then take the new CAs here."""
        assert self.ds is not None and outcome.result is not None
        why = f"staged set {outcome.shown} applied on {self.cfg.node}"
        try:
            after_rotation(self.ds, self.cfg.node, outcome.result, why, self.clock())
        except Rke2certdError as exc:  # the renew below starts it, or a rescan
            log.error("rollout_start_failed", staged_set=outcome.shown, reason=str(exc))
        self._renew(f"staged set {outcome.shown} applied")

    def _tick_rollouts(self) -> None:
        if self.runner is not None:
            self.runner.tick()
        if self._api is not None and time.monotonic() >= self._next_limits:
            self._next_limits = time.monotonic() + LIMITS_EVERY
            limits = self._fleet_limits()
            self._api.resize(limits.connections, limits.watches, limits.home)

    def _certs_summary(self) -> str:
        if self._certs_text is None:
            result = check(self.node, [], self.clock())
            self.monitor.certs(self.node, result)
            rows = [r for r in result.rows if r.index == 0]
            self._certs_text = ""
            if rows:
                first = min(rows, key=lambda r: r.not_after)
                self._certs_text = (
                    f"{len(rows)} certificates; next expiry {first.path.name} on "
                    f"{first.not_after.strftime('%Y-%m-%d %H:%M')} UTC"
                )
        return self._certs_text

    def _status_text(self) -> str:
        parts = []
        first_start = self.waiting in (FIRST_START, AGENT_FIRST_START)
        if self.waiting is not None:
            parts.append(self.waiting)
            if not first_start:
                parts.append("renewing from the certificates on disk; NOT serving agents")
        if self.watcher is not None:
            parts.append(f"watching {self.watcher.staging}")
        elif self.staging_refused:
            parts.append("REFUSING the staging dir (see the journal)")
        if self.deferred:
            parts.append("servers unreachable, on the certificates on disk, retrying")
        if self.supervisor is not None:
            parts.append(f"serving agents on port {self.supervisor.port}")
        elif self.supervisor_error:
            parts.append("NOT serving agents (see the journal)")
        if self._certs_summary():
            parts.append(self._certs_summary())
        if self.monitor.status_text() and not first_start:  # no certificates yet, by design
            parts.append(self.monitor.status_text())
        if self.runner is not None:
            parts.append(self.runner.status_text())
        return "; ".join(parts) or "running"

    def _status(self) -> None:
        text = self._status_text()
        if text != self._sent_status:
            self._sent_status = text
            self.notifier.status(text)

    def _ping_if_due(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is not None and time.monotonic() >= self.next_ping:
            self.notifier.watchdog()
            self.next_ping = time.monotonic() + interval

    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading", reason="SIGHUP")
        if self.waiting is not None:  # SIGHUP while waiting: the new config, and a retry now
            try:
                self.cfg = self._load()
                self.node = Node.from_config(self.cfg)
                self._token = None
            except Rke2certdError as exc:
                log.error("reload_failed", reason=str(exc))
            self._retry_delay = 0.0
            self._try_connect("SIGHUP")
            self.next_rescan = time.monotonic() + self._rescan_interval()
            self._sent_status = self._status_text()
            self.notifier.ready(self._sent_status)
            return
        try:
            self.cfg = self._load()
            self.node = Node.from_config(self.cfg)
            self._token = None  # the config now holds the adopted token, if any
            self._stop_supervisor()
            self._open_datastore()
            self._start_bootstrap_watch()
            self._reload_runner()
        except Rke2certdError as exc:
            if self._datastore_down(exc):  # wait for it, as at start
                self._wait_for_datastore(self._waiting_text(exc))
                self._sent_status = self._status_text()
                self.notifier.ready(self._sent_status)
                return
            log.error("reload_failed", reason=str(exc))
            if self.ds is None and self.runner is not None:  # no datastore: out until the next
                self.runner.close()
                self.runner = None
        self.monitor.configure(self.cfg)
        self._safe(lambda: self._renew("reload"))
        self._start_supervisor()
        self._start_staging()
        self._safe(self._process_staging)
        self.next_rescan = time.monotonic() + self._rescan_interval()
        self._sent_status = self._status_text()
        self.notifier.ready(self._sent_status)

    def _reload_runner(self) -> None:
        store = self.ds if self.ds is not None else self.remote
        if self.runner is not None and store is not None and self.runner.me == self.cfg.node:
            self.runner.reconfigure(self.node, store)
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
        if self.watcher is not None:
            d = next_deadline(self.watcher.states(), self.quiet)
            if d is not None:
                deadlines.append(d)
        if self.runner is not None:
            deadlines.append(self.runner.deadline())
        if self.waiting is not None:
            deadlines.append(self.next_retry)
        return max(0.0, min(deadlines) - now)

    # -- main -----------------------------------------------------------------------------

    def _start(self) -> None:
        """The start's work: the datastore, the start's renew, the endpoint, rollouts, the
        staging dir. Raises what stops it; a datastore that does not answer is one of those
        (`_try_connect` turns it into waiting)."""
        self._open_datastore()
        self._start_bootstrap_watch()
        self._start_renew()
        self._start_supervisor()
        self._start_rollouts()
        self._start_staging()
        self._safe(self._process_staging)  # no staged set keeps the daemon from READY

    def _not_started(self) -> str | None:
        """What to wait for on an RKE2 node RKE2 never started on (None: it has, or the node is
        standalone). RKE2 creates or fetches the CA set and every certificate at its first
        start (rke2-agent: the CAs and its certificates from `server`); until then there is
        nothing here to use, and nothing rke2certd may create."""
        from rke2certd.ops.renew import rke2_agent_has_run, rke2_has_run

        if self.cfg.rke2_config is None:
            return None
        if self.cfg.is_server:
            return None if rke2_has_run(self.node.layout) else FIRST_START
        return None if rke2_agent_has_run(self.node.layout) else AGENT_FIRST_START

    def _datastore_down(self, exc: Rke2certdError) -> bool:
        """An error that waiting cures: a server's datastore not answering (RKE2 not up: its
        etcd, or the etcd client files it writes at its start). Configuration errors are not."""
        from rke2certd.errors import DatastoreError, DatastoreFilesMissing

        if not self.cfg.is_server:
            return False
        if isinstance(exc, DatastoreFilesMissing):
            return self.cfg.rke2_config is not None
        return isinstance(exc, DatastoreError)

    def _waiting_text(self, exc: Rke2certdError) -> str:
        from rke2certd.ops.rke2_datastore import DB_INFO_PATH, plan_datastore

        try:
            plan = plan_datastore(self.cfg, self.node.layout)
        except Rke2certdError:
            return f"waiting for the datastore: {_first_line(exc)}"
        whose = "RKE2's datastore" if plan.shared_with_rke2 else "the datastore"
        where = plan.endpoint or f"{self.cfg.server}{DB_INFO_PATH}"
        return f"waiting for {whose} at {where}: {_first_line(exc)}"

    def _try_connect(self, trigger: str) -> bool:
        """Do the start's work, or wait (again) for what it needs. True: connected. Raises
        what waiting does not cure."""
        first_start = self._not_started()
        if first_start is not None:
            self._wait_for_datastore(first_start)
            return False
        try:
            self._start()
        except Rke2certdError as exc:
            if not self._datastore_down(exc):
                raise
            self._wait_for_datastore(self._waiting_text(exc))
            return False
        if self.waiting is not None:
            log.info("datastore_answered", reason=f"no longer {self.waiting}", trigger=trigger)
            self.waiting = None
            self._retry_delay = 0.0
        return True

    def _wait_for_datastore(self, why: str) -> None:
        """Stay up without the datastore: one event when the wait starts (or its reason
        changes), a retry after a pause doubling from datastore-retry-min up to -max, and meanwhile
        renewing from a complete CA set on disk (as `renew --offline-ok`)."""
        self._close()
        first_wait = self.waiting is None
        first, cap = self.cfg.datastore_retry_min, self.cfg.datastore_retry_max
        self._retry_delay = min(cap, self._retry_delay * 2 or first)
        self.next_retry = time.monotonic() + self._retry_delay
        if first_wait or why != self.waiting:
            log.warning("datastore_waiting", reason=why, retry_in=self._retry_delay)
        else:
            log.debug("datastore_retry_failed", reason=why, retry_in=self._retry_delay)
        self.waiting = why
        if first_wait and why not in (FIRST_START, AGENT_FIRST_START):
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
        self.notifier.status(f"failed to start: {_first_line(exc)}")
        self._close()
        self.monitor.close()
        signal.set_wakeup_fd(-1)
        return exc.exit_code if isinstance(exc, ConfigError) else 1

    def _waiting_tick(self) -> None:
        """The loop's work while waiting: a retry when due, else a rescan from disk."""
        now = time.monotonic()
        if now >= self.next_retry:
            self._ping_if_due()
            self._try_connect("retry")
        elif now >= self.next_rescan and self.waiting not in (FIRST_START, AGENT_FIRST_START):
            self._renew_from_disk()
        if now >= self.next_rescan:
            self.next_rescan = now + self._rescan_interval()

    def run(self) -> int:
        self._install_signals()
        try:
            self.monitor.configure(self.cfg)
            self._try_connect("start")
        except Rke2certdError as exc:
            return self._fail(exc)
        self.next_rescan = time.monotonic() + self._rescan_interval()
        self._sent_status = self._status_text()
        self.notifier.ready(self._sent_status)
        if self.waiting is None:
            log.info("ready", reason="certificates are valid", staging=str(self.cfg.staging))
        else:
            log.info("ready", reason=self.waiting, staging=str(self.cfg.staging))
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
            if self.waiting is not None:
                try:
                    self._waiting_tick()
                except Rke2certdError as exc:
                    return self._fail(exc)
                self._status()
                self.monitor.tick(self)
                continue
            self._safe(self._process_staging)
            self._safe(self._bootstrap_changed)
            if time.monotonic() >= self.next_rescan:
                self._safe(self._rescan_or_wait)
                if self.waiting is not None:
                    self._status()
                    continue
                self._start_supervisor()
                self.monitor.retry()
                self.next_rescan = time.monotonic() + self._rescan_interval()
            self._safe(self._tick_rollouts)
            self._status()
            self.monitor.tick(self)
        return self._shutdown()

    def _shutdown(self) -> int:
        self.notifier.stopping("stopping")
        log.info("stopping", reason="SIGTERM")
        self._close()
        self.monitor.close()
        signal.set_wakeup_fd(-1)
        self.wake.close()
        return 0

    def _close(self) -> None:
        self._stop_bootstrap_watch()
        self._stop_supervisor()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if self.ds is not None:
            self.ds.close()
            self.ds = None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _member(kv: KV) -> Member | None:
    from rke2certd.rollout import records as rec

    try:
        return rec.decode_member(kv)
    except (ValueError, KeyError, TypeError):
        return None
