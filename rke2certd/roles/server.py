"""A server node (etcd or control-plane role): it holds the datastore."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rke2certd.clock import Clock
from rke2certd.commands.renew import RenewResult
from rke2certd.commands.rotate import RotateResult
from rke2certd.datastore.base import Datastore
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.errors import Rke2certdError
from rke2certd.files.atomic import read_optional
from rke2certd.files.lock import node_lock
from rke2certd.log import log
from rke2certd.node.ca_material import disk_generation
from rke2certd.node.node import Node
from rke2certd.pki.profiles import SERVER_UNIT
from rke2certd.plan.rollout import (
    ClusterView,
    Idle,
    Phase,
    Rollout,
    RolloutState,
    Step,
    phase_of,
    to_wake,
)
from rke2certd.roles.base import RenewHook
from rke2certd.roles.shared import before_rke2, node_files, warm_check_cache
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.create import after_renew, ca_rollout, start
from rke2certd.rollout.housekeeping import housekeep
from rke2certd.rollout.link import ClusterLink, direct_link, server_interest
from rke2certd.rollout.look import Look
from rke2certd.rollout.role import ApplyOutcome

FIRST_START = "waiting for RKE2's first start"


class ServerNode:
    unit = SERVER_UNIT
    serves_agents = True
    joins_late = False

    def __init__(self, node: Node, clock: Clock, renewed: RenewHook | None = None) -> None:
        """`renewed`: the daemon's renew, which a rollout's apply step runs (None: the plain
        `renew`, for commands)."""
        self.node = node
        self.clock = clock
        self._renewed = renewed
        self.datastore: Datastore | None = None

    @property
    def store(self) -> Datastore | None:
        return self.datastore

    @property
    def staging(self) -> Path | None:
        return self.node.cfg.staging

    @property
    def served_routes(self) -> frozenset[str]:
        from rke2certd.supervisor.server import ROUTES

        return frozenset(ROUTES)

    def ca_files(self) -> list[Path]:
        from rke2certd.pki.layout import CA_NAMES

        layout = self.node.layout
        return [layout.ca_cert(ca) for ca in CA_NAMES] + [
            layout.agent_server_ca,
            layout.agent_client_ca,
        ]

    def disk_generation(self) -> str | None:
        from rke2certd.node.ca_material import disk_generation

        return disk_generation(self.node.layout)

    # -- the daemon --------------------------------------------------------------------------

    def open(self) -> None:
        from rke2certd.commands.node_datastore import open_for

        self.close()
        self.datastore = open_for(self.node)

    def close(self) -> None:
        if self.datastore is not None:
            self.datastore.close()
            self.datastore = None

    def own_connection(self) -> Datastore:
        """SQLite: share the main connection (it is thread-safe). Opening the same file a second
        time in this process would drop the first connection's POSIX locks (the open/close in
        SQLiteDatastore._open), and another process could then delete the WAL under us. etcd: a
        connection of its own, as a watch holds it for seconds."""
        assert self.datastore is not None
        if isinstance(self.datastore, SQLiteDatastore):
            return self.datastore
        from rke2certd.commands.node_datastore import open_for

        return open_for(self.node)

    def first_start(self) -> str | None:
        from rke2certd.commands.renew import rke2_has_run

        if self.node.cfg.rke2_config is None or rke2_has_run(self.node.layout):
            return None
        return FIRST_START

    def waits_for(self, exc: Rke2certdError) -> bool:
        """A datastore not answering (RKE2 not up: its etcd, or the etcd client files it writes
        at its start). Configuration errors are not cured by waiting."""
        from rke2certd.errors import DatastoreError, DatastoreFilesMissing

        if isinstance(exc, DatastoreFilesMissing):
            return self.node.cfg.rke2_config is not None
        return isinstance(exc, DatastoreError)

    def renew(self, now: datetime) -> RenewResult:
        from rke2certd.commands.renew import renew
        from rke2certd.node.node_files import refresh_admin_kubeconfig

        cfg = self.node.cfg
        with node_lock(cfg.data_dir, cfg.lock_timeout):
            result = renew(self.node, now, datastore=self.datastore)
            refresh_admin_kubeconfig(self.node)  # kubectl needs no RKE2 restart for it
        return result

    def after_renew(
        self, result: RenewResult, before: str | None, after: str | None, why: str, now: datetime
    ) -> None:
        if self.datastore is None:  # renewed from disk: the rollout waits for the datastore
            return
        cfg = self.node.cfg
        try:
            phase = phase_of(r.value for r in cfg.roles)
            facts = result.rollout_facts()
            after_renew(self.datastore, cfg.node, phase, facts, before, after, why, now)
        except Rke2certdError as exc:  # the files are renewed; the rollout waits for a rescan
            log.error("rollout_start_failed", reason=str(exc))

    def apply(self, rollout: Rollout) -> ApplyOutcome:
        """A rollout's apply step: the same renew (extract, re-issue, tokens) under the lock."""
        why = f"rollout {rollout.id}"
        if self._renewed is not None:
            self._renewed(why)
        else:
            self.renew(self.clock())
        server_ca = read_optional(self.node.layout.ca_cert("server-ca"))
        if server_ca:  # a full token in the config must pin the CA RKE2 restarts with
            from rke2certd.commands.tokens import rewrite_config_tokens
            from rke2certd.pki.join_token import ca_hash

            cfg = self.node.cfg
            with node_lock(cfg.data_dir, cfg.lock_timeout):
                rewrite_config_tokens(self.node, ca_hash(server_ca))
        return ApplyOutcome(disk_generation(self.node.layout))

    def generation(self) -> str | None:
        return disk_generation(self.node.layout)

    def rollout_role(self) -> ServerRollout:
        assert self.datastore is not None, "a server joins rollouts through its datastore"
        return ServerRollout(
            self.node, self.own_connection, self.apply, self.generation, self.clock
        )

    # -- the command line --------------------------------------------------------------------

    def renew_hook(self, *, dry_run: bool, offline_ok: bool) -> RenewResult:
        """Raises UnsupportedDatastoreError (the CLI decides what the hook does about it)."""
        cfg = self.node.cfg
        with hook_datastore(self.node, offline_ok=offline_ok) as ds:
            if dry_run:
                return renew_on(self.node, self.clock(), ds, dry_run=True)
            with node_lock(cfg.data_dir, cfg.lock_timeout):
                result = renew_on(self.node, self.clock(), ds)
                node_files(self.node)
            warm_check_cache(self.node)
        return result

    def rotate(self, services: Sequence[str], now: datetime) -> RotateResult:
        from rke2certd.commands.rotate import rotate

        cfg = self.node.cfg
        with hook_datastore(self.node) as ds, node_lock(cfg.data_dir, cfg.lock_timeout):
            return rotate(self.node, services, now, datastore=ds)

    @contextmanager
    def cluster_datastore(self, needs: str) -> Iterator[Datastore]:
        from rke2certd.commands.node_datastore import open_for
        from rke2certd.commands.renew import rke2_has_run

        node = self.node
        if node.cfg.rke2_config is not None and not rke2_has_run(node.layout):
            raise before_rke2()
        with open_for(node) as ds:
            yield ds

    def status(self, output: str, now: datetime) -> str:
        from rke2certd.commands.status import render_status
        from rke2certd.node.rke2_datastore import plan_datastore

        cfg = self.node.cfg
        where = plan_datastore(cfg, self.node.layout).description
        with self.cluster_datastore("") as ds:
            return render_status(ds, output, now, cfg.availability, where)


def renew_on(
    node: Node, now: datetime, ds: Datastore | None, *, dry_run: bool = False
) -> RenewResult:
    from rke2certd.commands.renew import renew

    return renew(node, now, dry_run=dry_run, datastore=ds)


@contextmanager
def hook_datastore(node: Node, offline_ok: bool = False) -> Iterator[Datastore | None]:
    """The node's datastore (opened before any change, so an unreachable one fails fast and
    changes nothing); None on an RKE2 node before RKE2's first start is an error (there is
    nothing to renew), and None when `offline_ok` (the startup hook) allows going on without
    it: RKE2's embedded etcd is down until rke2-server starts, so the hook renews from a
    complete CA set on disk, or (RKE2 node) leaves a missing one to RKE2."""
    from rke2certd.commands.node_datastore import open_for
    from rke2certd.commands.renew import rke2_has_run
    from rke2certd.datastore.base import DatastoreUnavailable
    from rke2certd.errors import DatastoreFilesMissing

    rke2 = node.cfg.rke2_config is not None
    if rke2 and not rke2_has_run(node.layout):
        raise before_rke2()
    try:
        ds = open_for(node)
    except (DatastoreUnavailable, DatastoreFilesMissing) as exc:
        if not offline_ok or (not rke2 and disk_generation(node.layout) is None):
            raise
        from rke2certd.node.rke2_datastore import EmbeddedEtcdDown

        if not isinstance(exc, EmbeddedEtcdDown):  # that one is RKE2 being down: as expected
            log.warning(
                "datastore_unreachable",
                reason=f"{exc}; going on with the CA set on disk (--offline-ok)".replace("\n", " "),
            )
        yield None
        return
    try:
        yield ds
    finally:
        ds.close()


@dataclass
class ServerRollout:
    """A server in rollouts: the datastore directly; it does the housekeeping, starts the
    rollout of a newer CA set it finds, and wakes the servers that may go on."""

    node: Node
    connection: Callable[[], Datastore]
    apply: Callable[[Rollout], ApplyOutcome]
    generation: Callable[[], str | None]
    clock: Clock
    restart_unit: str = SERVER_UNIT

    def link(self, node: Node, wake: Callable[[], None]) -> ClusterLink:
        return direct_link(node, self.connection, wake)

    def follow(self, link: ClusterLink, step: Step, phase: Phase, revision: int) -> None:
        """Its watch is fixed (two etcd streams, or the same filter on SQLite's watch); what of
        it wakes the main loop depends on the step: idle, nodes arriving do not (a fleet's
        start would wake every server at each agent), in a rollout they may be what it waits
        for. A rollout record wakes it either way, and its periodic read sees the rest."""
        wake_key = rec.wake_key(self.node.cfg.node)
        link.set_interest(server_interest(wake_key, not isinstance(step, Idle)), revision)

    def unchanged(self, store: ClusterStore, look: Look) -> bool:
        return False  # its periodic read is its housekeeping's too

    def housekeep(self, store: ClusterStore, parsed: rec.Parsed) -> bool:
        return housekeep(store, parsed, self.clock(), self.node.cfg.availability)

    def after_report(self, store: ClusterStore, parsed: rec.Parsed) -> bool:
        return False  # its next tick's housekeeping sees the status

    def supersede(self, store: ClusterStore, rollout: Rollout, generation: str) -> bool:
        reason = f"CA generation {generation} found in the datastore while applying {rollout.id}"
        now = self.clock()
        start(store.ds, ca_rollout(generation, None, self.node.cfg.node, reason, now), now)
        current = store.read().view.rollout(rollout.id)
        return current is not None and not current.active

    def to_wake(self, view: ClusterView, me: str, max_unavailable: int) -> list[str]:
        return list(to_wake(view, me, max_unavailable))  # never agents

    def stop_failed(self, store: ClusterStore, rollout: Rollout, reason: str) -> bool:
        return store.finish(rollout.id, RolloutState.STOPPED, reason, self.clock())
