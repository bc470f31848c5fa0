"""An agent-only node: no datastore credentials; certificates and the coordination keys come
through a server's endpoint."""

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
from rke2certd.errors import Rke2certdError
from rke2certd.files.lock import node_lock
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.pki.profiles import AGENT_UNIT
from rke2certd.plan.rollout import ClusterView, Phase, Rollout, Step, finished_rollouts
from rke2certd.roles.base import RenewHook
from rke2certd.roles.shared import certs_usable, warm_check_cache
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.link import ClusterLink, interest, relayed_link, server_filter
from rke2certd.rollout.look import Look
from rke2certd.rollout.role import ApplyOutcome
from rke2certd.supervisor.remote import RemoteDatastore

FIRST_START = "waiting for rke2-agent's first start"


class AgentNode:
    unit = AGENT_UNIT
    serves_agents = False
    joins_late = True
    staging: Path | None = None
    datastore: Datastore | None = None

    def __init__(self, node: Node, clock: Clock, renewed: RenewHook | None = None) -> None:
        """`renewed`: the daemon's renew, which a rollout's apply step runs (None: the plain
        `renew`, for commands)."""
        self.node = node
        self.clock = clock
        self._renewed = renewed
        self.remote: RemoteDatastore | None = None
        self._token: str | None = None  # adopted after a CA rotation, until the next reload

    served_routes: frozenset[str] = frozenset()

    @property
    def store(self) -> Datastore | None:
        return self.remote

    def ca_files(self) -> list[Path]:
        return [self.node.layout.agent_server_ca, self.node.layout.agent_client_ca]

    def disk_generation(self) -> str | None:
        return None  # its CA bundles come from a server; the generation is the server's

    def token(self) -> str:
        from rke2certd.commands.agent import agent_token

        return self._token or agent_token(self.node)

    # -- the daemon --------------------------------------------------------------------------

    def open(self) -> None:
        from rke2certd.commands.agent_rollout import remote_store

        self.remote = remote_store(self.node, self.token)

    def close(self) -> None:
        self.remote = None

    def own_connection(self) -> Datastore:
        """The remote store: each call is a request of its own."""
        assert self.remote is not None, "agent-only nodes have a remote store"
        return self.remote

    def first_start(self) -> str | None:
        from rke2certd.commands.renew import rke2_agent_has_run

        if self.node.cfg.rke2_config is None or rke2_agent_has_run(self.node.layout):
            return None
        return FIRST_START

    def waits_for(self, exc: Rke2certdError) -> bool:
        return False  # unreachable servers are waited for by deferring (UnreachableError)

    def renew(self, now: datetime) -> RenewResult:
        from rke2certd.commands.agent_rollout import rejoin_renew

        cfg = self.node.cfg
        with node_lock(cfg.data_dir, cfg.lock_timeout):
            result, adopted = rejoin_renew(self.node, now, token=self._token)
        self._token = adopted or self._token
        return result

    def after_renew(
        self, result: RenewResult, before: str | None, after: str | None, why: str, now: datetime
    ) -> None:
        """Agents start no rollouts: their restart waits for one."""

    def apply(self, rollout: Rollout) -> ApplyOutcome:
        """Adopt the servers' rotated CA (new token hash in the config), then renew through
        them; the generation is the server's once this disk holds the bundles it serves."""
        from rke2certd.commands.agent_rollout import adopt_rotated_ca
        from rke2certd.datastore.base import DatastoreUnavailable
        from rke2certd.supervisor.client import UnreachableError

        cfg = self.node.cfg
        try:
            with node_lock(cfg.data_dir, cfg.lock_timeout):
                self._token = adopt_rotated_ca(self.node, self.token()) or self._token
            if self._renewed is not None:
                self._renewed(f"rollout {rollout.id}")
            else:
                self.renew(self.clock())
        except UnreachableError as exc:  # servers busy or down: try again later, never fail
            raise DatastoreUnavailable(str(exc)) from exc
        return ApplyOutcome(self.generation())

    def generation(self) -> str | None:
        """The server's CA generation, if this disk holds the bundles it serves."""
        from rke2certd.commands.agent_rollout import agent_generation

        assert self.remote is not None, "agent-only nodes have a remote store"
        return agent_generation(self.node, self.remote)

    def rollout_role(self) -> AgentRollout:
        assert self.remote is not None, "agent-only nodes have a remote store"
        return AgentRollout(self.remote, self.apply, self.generation)

    # -- the command line --------------------------------------------------------------------

    def renew_hook(self, *, dry_run: bool, offline_ok: bool) -> RenewResult:
        """Certificates from a server's endpoint; with `offline_ok`, no server answering and
        valid certificates on disk, the agent starts on those (a full restart: the servers may
        come up after it; the daemon renews once one answers)."""
        from rke2certd.commands.agent_rollout import rejoin_renew
        from rke2certd.supervisor.client import UnreachableError

        cfg = self.node.cfg
        try:
            if dry_run:
                return rejoin_renew(self.node, self.clock(), dry_run=True)[0]
            with node_lock(cfg.data_dir, cfg.lock_timeout):
                result, _ = rejoin_renew(self.node, self.clock())
            warm_check_cache(self.node)
            return result
        except UnreachableError as exc:
            if not offline_ok or not certs_usable(self.node):
                raise
            why = f"{exc}; going on with the certificates on disk (--offline-ok)"
            log.warning("renew_deferred", reason=why)
            return RenewResult(dry_run=dry_run, unit=self.unit, skipped=why)

    def rotate(self, services: Sequence[str], now: datetime) -> RotateResult:
        """New keys; the certificates signed through a server."""
        from rke2certd.commands.agent import agent_rotate

        cfg = self.node.cfg
        with node_lock(cfg.data_dir, cfg.lock_timeout):
            return agent_rotate(self.node, services, now)

    @contextmanager
    def cluster_datastore(self, needs: str) -> Iterator[Datastore]:
        from rke2certd.commands.renew import NeedsServerError

        raise NeedsServerError(needs)
        yield  # a generator, for contextmanager

    def status(self, output: str, now: datetime) -> str:
        """The rollout keys, read through a server's endpoint."""
        from rke2certd.commands.agent import agent_token
        from rke2certd.commands.agent_rollout import remote_store
        from rke2certd.commands.status import render_status

        node = self.node
        remote = remote_store(node, lambda: agent_token(node))
        where = "none on this agent-only node (read through a server's endpoint)"
        return render_status(remote, output, now, node.cfg.availability, where)


@dataclass
class AgentRollout:
    """An agent-only node in rollouts: everything through a server, which it asks for the
    housekeeping; it wakes nobody and starts no rollouts (it may write only its own keys)."""

    remote: RemoteDatastore
    apply: Callable[[Rollout], ApplyOutcome]
    generation: Callable[[], str | None]
    restart_unit: str = AGENT_UNIT
    # False: the link's lease is kept by the caller's timer (ClusterLink.keep_alive)
    lease_thread: bool = True

    def link(self, node: Node, wake: Callable[[], None]) -> ClusterLink:
        return relayed_link(node, lambda: self.remote, wake, lease_thread=self.lease_thread)

    def follow(self, link: ClusterLink, step: Step, phase: Phase, revision: int) -> None:
        """Keep the long poll to what `step` waits for (here, and on the server's side)."""
        link.set_interest(interest(step, phase), revision, server_filter(step, phase))

    def unchanged(self, store: ClusterStore, look: Look) -> bool:
        """The few keys of the look (whatever the fleet's size) against those its last full
        read saw; the full read only if they moved. The cost of an idle or waiting agent on
        its server stays the same however many agents there are."""
        return look.read(store.ds) == look.marks

    def housekeep(self, store: ClusterStore, parsed: rec.Parsed) -> bool:
        return False  # it may not write other nodes' records

    def after_report(self, store: ClusterStore, parsed: rec.Parsed) -> bool:
        """A final status is what may end a rollout, and servers do not watch statuses: ask
        after a report that may have ended one (each ask costs its server a full read), on
        `parsed`, read after the report. Of several nodes reporting at once, the last to read
        sees every report: it asks."""
        if finished_rollouts(parsed.view):
            return self.remote.housekeep()
        return False

    def supersede(self, store: ClusterStore, rollout: Rollout, generation: str) -> bool:
        return False  # agents start no rollouts

    def to_wake(self, view: ClusterView, me: str, max_unavailable: int) -> list[str]:
        return []  # no server waits for an agent

    def stop_failed(self, store: ClusterStore, rollout: Rollout, reason: str) -> bool:
        self.remote.housekeep()  # a server stops the rollout (it sees the failed status)
        return False
