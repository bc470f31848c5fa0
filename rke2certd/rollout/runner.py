"""What the daemon's main loop calls to take part in rollouts.

`tick()` reads the coordination keys (one range read), does the housekeeping any node may do
(record who went down, close finished rollouts), then asks plan/rollout.py for this node's next
step and does it, until the answer is to wait, to restart, or nothing. A restart runs as a
`RestartJob` in a thread; the loop finishes it (reports done or failed, frees the slot) when
the job wakes it. Nothing here blocks for long: the datastore calls have their own timeouts,
the apply step is the daemon's `renew` under the node lock (bounded by lock-timeout).

The apply step is passed in, so that a node kind that applies differently (agents, which get
their certificates through a server) can reuse the rest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rke2certd import __version__
from rke2certd.clock import Clock
from rke2certd.datastore.base import KV, Datastore
from rke2certd.errors import DatastoreError, LockTimeout, Rke2certdError
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.pki.profiles import AGENT_UNIT, SERVER_UNIT
from rke2certd.plan.rollout import (
    Apply,
    ClusterView,
    Idle,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    ReportStopped,
    Restart,
    Rollout,
    RolloutKind,
    RolloutState,
    Slot,
    Step,
    TakeSlot,
    Wait,
    current_phase,
    next_blocking,
    next_step,
    over_limit,
    phase_of,
    reported,
    to_wake,
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.create import ca_rollout, start
from rke2certd.rollout.health import default_probes
from rke2certd.rollout.housekeeping import housekeep
from rke2certd.rollout.job import Gate, RestartJob
from rke2certd.rollout.link import (
    ClusterLink,
    interest,
    server_filter,
    server_interest,
    server_ranges,
)

# Read again even without a watch event: a lost wake-up must not stall a rollout. The cluster
# tests set it far beyond their timeouts, so that a wake-up the protocol loses fails them.
RECHECK = float(os.environ.get("RKE2CERTD_RECHECK_SECONDS", "30"))
RETRY = 3.0  # after a datastore error
STEPS_PER_TICK = 12
# Never handed to restart/health commands: they would notify or feed the watchdog as us.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass(frozen=True)
class ApplyOutcome:
    generation: str | None  # the CA generation on disk after applying


ApplyFn = Callable[[Rollout], ApplyOutcome]


@dataclass
class _Running:
    job: RestartJob
    rollout: Rollout
    slot: Slot
    status: NodeStatus
    slot_kv: KV | None  # the slot's key as read when the restart began
    seen: rec.Parsed  # the read it began on: its status key has not changed since


class RolloutRunner:
    def __init__(
        self,
        node: Node,
        ds: Datastore,
        *,
        open_ds: Callable[[], Datastore],
        apply: ApplyFn,
        generation: Callable[[], str | None],
        clock: Clock,
        wake: Callable[[], None],
        housekeep: Callable[[], bool] | None = None,
    ) -> None:
        """`housekeep`: None on servers (they do it here); on agent-only nodes, which may write
        only their own records, a call asking a server to do it (True: it wrote something)."""
        self.node = node
        self._housekeep = housekeep
        self.me = node.cfg.node
        self.roles = tuple(r.value for r in node.cfg.roles)
        self.phase: Phase = phase_of(self.roles)
        self.store = ClusterStore(ds)
        self._open = open_ds
        self._apply = apply
        self._generation = generation
        self.clock = clock
        self._wake = wake
        self.link: ClusterLink | None = None
        self.running: _Running | None = None
        self.interrupted = False
        self.registered_lease: int | None = None
        self.registered_at = clock()
        self._written: tuple[str | None, str] | None = None
        self.health = "unknown"
        self.activity = "starting"  # for STATUS=: what, and why not yet
        # for the registration, written along when the generation or health changes (not on
        # its own: every write is an event every node's watch receives)
        self.summary = "starting"
        self.waiting: str | None = None
        self.view: ClusterView | None = None  # the last read, for the daemon's metrics
        self.next_check = 0.0
        self.gen = generation()
        # set when this node freed a slot or reported: the next read says whom to wake; and
        # whom it woke already, from what it knew before that read
        self._freed = False
        self._woken: set[str] = set()
        # an idle agent: the rollout records (key, revision) its last full read saw
        self._idle_seen: frozenset[tuple[str, int]] | None = None
        self._reported = False  # an agent wrote a final status: ask a server's housekeeping

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Register (a lease, the registration on it, the membership), then watch."""
        lease = self.store.ds.grant_lease(self.node.cfg.registry_ttl)
        self._register(lease)
        self.link = self._new_link()
        self.link.start(lease)

    def reconfigure(self, node: Node, ds: Datastore) -> None:
        """After SIGHUP: new config and connection (the link too: it may have shared the old
        one); the lease, and a restart in progress, go on."""
        self.node = node
        self.store = ClusterStore(ds)
        self.next_check = 0.0
        if self.link is not None:
            lease = self.link.lease
            self.link.stop()
            self.link = self._new_link()
            if lease is not None:
                self.link.start(lease)

    def stop_link(self) -> None:
        """Before the daemon closes the connection: `reconfigure` starts a new link."""
        if self.link is not None:
            self.link.stop()

    @property
    def agent(self) -> bool:
        """An agent-only node: it reaches the cluster through a server (housekeep is its call)."""
        return self._housekeep is not None

    def _new_link(self) -> ClusterLink:
        ttl, own = self.node.cfg.registry_ttl, rec.node_key(self.me)
        if self.agent:  # the whole prefix through a server, filtered by each step's interest
            return ClusterLink(self._open, ttl, own, self._wake)
        wake_key = rec.wake_key(self.me)
        streams = []
        if self.node.cfg.datastore_endpoint.strip().lower().startswith(("http://", "https://")):
            # etcd only: requests and etcd3gw cost ~8 MiB of RSS that a SQLite daemon need not hold
            from rke2certd.node.rke2_datastore import stream_for

            streams = [
                s for key, end in server_ranges(wake_key) if (s := stream_for(self.node, key, end))
            ]
        return ClusterLink(self._open, ttl, own, self._wake, streams, server_interest(wake_key))

    def close(self) -> None:
        """Daemon stop. A restart in progress is killed and its slot left to expire with the
        lease (RKE2 may be half-restarted: others must not start theirs before the TTL ends);
        otherwise the lease is revoked so that the others see this node down at once."""
        if self.running is not None:
            self.running.job.cancel()
            self.interrupted = True
            log.warning(
                "rollout_interrupted",
                rollout_id=self.running.rollout.id,
                node=self.me,
                reason="rke2certd is stopping during a restart; the restart is redone when "
                "it starts again",
            )
        if self.link is not None:
            self.link.stop()
        lease = self.link.lease if self.link else self.registered_lease
        if not self.interrupted and lease is not None:
            try:
                self.store.ds.revoke_lease(lease)
            except Exception as exc:  # the connection may be gone: the lease then just expires
                log.warning("lease_revoke_failed", reason=str(exc))

    def _register(self, lease: int) -> None:
        old = self.store.ds.get(rec.node_key(self.me))
        if old is not None and old.lease and old.lease != lease:
            # our previous run's lease: its slots must not outlive it
            self.store.ds.revoke_lease(old.lease)
        self.store.ensure_member(Member(self.me, self.roles, self.phase))
        self.registered_lease = lease
        self._written = None
        self._write_registration(force=True)
        log.info("node_registered", node=self.me, phase=self.phase.value, ca_generation=self.gen)

    def _write_registration(self, force: bool = False) -> None:
        state = (self.gen, self.health)
        if not force and state == self._written:
            return
        lease = self.registered_lease
        assert lease is not None
        reg = Registration(
            self.me, self.roles, self.phase, __version__, self.gen, self.health,
            self.summary, self.registered_at, self.clock(),
        )  # fmt: skip
        if force:
            self.store.register(reg, lease)
        else:
            self.store.report(reg, lease)
        self._written = state

    # -- main loop side ------------------------------------------------------------------------

    def deadline(self) -> float:
        """When tick() wants to run next without being woken (monotonic)."""
        if self.running is not None:
            return time.monotonic() + 5.0  # refresh the status line of a long restart
        return self.next_check

    def renewed(self) -> None:
        """The daemon renewed: the CA generation on disk may have changed."""
        self.gen = self._generation()
        self.next_check = 0.0

    def tick(self) -> None:
        due = self.link.take_changed() if self.link else False
        if self.running is not None and not self.running.job.done:
            return
        if not due and self.running is None and time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + RECHECK
        try:
            if self.running is not None:
                self._finish_job()
            elif not due and self._idle_unchanged():
                return
            self._tick()
        except (DatastoreError, LockTimeout) as exc:
            # transient (etcd electing a leader, the lock busy): the next tick tries again
            self.activity = f"datastore problem, retrying: {str(exc).splitlines()[0]}"
            log.warning("rollout_retry", node=self.me, reason=str(exc))
            self.next_check = time.monotonic() + RETRY
        except Exception as exc:  # a bug: keep renewing certificates, say so, try again later
            self.activity = f"rollout coordination failed: {exc!r}"
            log.exception("rollout_internal_error", node=self.me, reason=repr(exc))
            self.next_check = time.monotonic() + RECHECK

    def _idle_unchanged(self) -> bool:
        """An idle agent's periodic look: the rollout records alone (a few keys, whatever the
        fleet's size) against those its last full read saw; the full read only if they moved.
        The idle cost of an agent on its server stays the same however many agents there are."""
        if not self.agent or self._idle_seen is None:
            return False
        records = self.store.ds.snapshot(rec.ROLLOUTS)
        return _rollout_marks(records.kvs) == self._idle_seen

    def status_text(self) -> str:
        if self.running is not None:
            return f"rollout {self.running.rollout.id}: {self.running.job.describe()}"
        if self.link is not None and self.link.error:
            return f"datastore unreachable, retrying: {self.link.error.splitlines()[0]}"
        return self.activity

    # -- one tick ------------------------------------------------------------------------------

    def _tick(self) -> None:
        lease = self.link.lease if self.link else self.registered_lease
        if lease is not None and lease != self.registered_lease:
            self._register(lease)
        parsed = self.store.read()
        if lease is not None and rec.node_key(self.me) not in parsed.kvs:
            self._register(lease)  # removed by hand (node remove --force): here we are again
            parsed = self.store.read()
        for problem in parsed.problems:
            log.warning("rollout_record_unreadable", reason=problem)
        parsed = self._housekeeping(parsed)
        self.view = parsed.view
        self._wake_others(parsed)
        step: Step = Idle()
        for _ in range(STEPS_PER_TICK):
            step = next_step(parsed.view, self.me, self.node.cfg.max_unavailable)
            if isinstance(step, Apply):
                self._do_apply(step.rollout)
            elif isinstance(step, ReportStopped):
                self._report_stopped(step)
            elif isinstance(step, TakeSlot):
                parsed = self._take_slot(step, parsed)
                continue
            else:
                break
            parsed = self.store.read()
        self._wake_others(parsed)
        self._release_stale_slots(parsed, step)
        if self.link is not None and self.agent:
            only = server_filter(step, self.phase)
            self.link.set_interest(interest(step, self.phase), parsed.revision, only)
        if isinstance(step, Restart):
            self._start_job(step.rollout, step.slot, parsed)
        elif isinstance(step, Wait):
            self._note_wait(step, parsed)
        else:
            self.waiting = None
            self.activity = self._idle_text(parsed)
            self.summary = "idle"
        if self._reported and self.agent:  # reported in this tick: the rollout may be over
            self._housekeeping(parsed)
        idle = isinstance(step, Idle) and not any(r.active for r in parsed.view.rollouts)
        self._idle_seen = _rollout_marks(parsed.kvs.values()) if idle else None
        self._write_registration()

    def _housekeeping(self, parsed: rec.Parsed) -> rec.Parsed:
        mine, wrote = parsed.view.members.get(self.me), False
        if mine is None or mine.down_since is not None or mine.roles != self.roles:
            self.store.ensure_member(Member(self.me, self.roles, self.phase))
            wrote = True
        if self._housekeep is None:
            policy = self.node.cfg.availability
            wrote = housekeep(self.store, parsed, self.clock(), policy) or wrote
        elif self._reported:
            # an agent's final status (done, failed) is what may end a rollout, and servers do
            # not watch statuses: it asks once after reporting, not at every tick (each ask
            # costs its server a read of the whole cluster)
            self._reported = False
            if any(r.active for r in parsed.view.rollouts):
                wrote = self._housekeep() or wrote
        parsed = self.store.read() if wrote else parsed
        self._look_again_at_grace(parsed)
        return parsed

    def _look_again_at_grace(self, parsed: rec.Parsed) -> None:
        """A member down in its turn is blocked when its grace ends, and nothing writes then:
        tick again at that time (an agent asks a server's housekeeping then)."""
        now = self.clock()
        due = next_blocking(parsed.view, now, self.node.cfg.availability)
        if due is not None:
            at = time.monotonic() + (due - now).total_seconds() + 0.5
            self.next_check = min(self.next_check, at)

    def _fields(self, r: Rollout) -> dict[str, str]:
        return {
            "rollout_id": r.id,
            "ca_generation": r.ca_generation,
            "phase": self.phase.value,
            "node": self.me,
        }

    def _do_apply(self, r: Rollout) -> None:
        self.activity = self.summary = f"rollout {r.id}: applying"
        check = self.next_check
        try:
            outcome = self._apply(r)
        except (DatastoreError, LockTimeout):
            raise
        except Rke2certdError as exc:
            message = f"apply failed: {exc}"
            self.store.set_status(r, NodeStatus(self.me, NodeState.FAILED, message, self.gen))
            self._reported = True
            log.error("rollout_failed", **self._fields(r), reason=message)
            return
        self.gen = outcome.generation
        self.next_check = check  # renewed() asked for another tick: this one reads on
        if r.kind is RolloutKind.CA and outcome.generation != r.ca_generation:
            self._other_generation(r, outcome.generation)
            return
        self.store.set_status(  # applied at: its new files are on disk
            r, NodeStatus(self.me, NodeState.APPLIED, "", outcome.generation, self.clock())
        )
        log.info("rollout_applied", **self._fields(r), reason=r.reason)

    def _other_generation(self, r: Rollout, gen: str | None) -> None:
        """The datastore holds another CA set than the rollout's: a newer rotation replaced it.
        Its rollout (started by whoever saved it, or here) supersedes this one."""
        if gen is not None and self._housekeep is None:  # agents start no rollouts
            reason = f"CA generation {gen} found in the datastore while applying {r.id}"
            now = self.clock()
            start(self.store.ds, ca_rollout(gen, None, self.me, reason, now), now)
            current = self.store.read().view.rollout(r.id)
            if current is not None and not current.active:
                return  # superseded: the next step is the newer rollout
        message = (
            f"after applying, the disk holds CA generation {gen or 'none (incomplete)'}, not "
            f"{r.ca_generation}; check `rke2certd certificate check` and the datastore"
        )
        self.store.set_status(r, NodeStatus(self.me, NodeState.FAILED, message, gen))
        self._reported = True
        log.error("rollout_failed", **self._fields(r), reason=message)

    def _report_stopped(self, step: ReportStopped) -> None:
        r = step.rollout
        prev = self.store.read().view.status(r, self.me)
        self.store.set_status(
            r,
            NodeStatus(
                self.me, NodeState.STOPPED, step.reason, self.gen,
                prev.applied_at if prev else None, None, self.clock(),
            ),
        )  # fmt: skip
        self._reported = True
        log.warning("rollout_stopped", **self._fields(r), reason=step.reason)

    def _take_slot(self, step: TakeSlot, parsed: rec.Parsed) -> rec.Parsed:
        """Take the slot; `parsed` with the slots as read afterwards (the next step is decided
        on it: the restart, or, when two nodes raced on stale views, giving it back)."""
        lease = self.registered_lease
        assert lease is not None
        slot = Slot(step.phase, step.index, self.me, step.rollout.id, self.clock())
        taken = self.store.take_slot(slot, lease)
        parsed = self.store.reread_slots(parsed)
        limit = self.node.cfg.max_unavailable
        if taken and over_limit(parsed.view, step.phase, limit, step.rollout):
            self.store.release_slot(slot)  # raced on a stale view: give it back, wait
            log.info("restart_slot_returned", **self._fields(step.rollout), reason="over limit")
            self._freed = True
            parsed = self.store.read()
        return parsed

    def _release_stale_slots(self, parsed: rec.Parsed, step: Step) -> None:
        keep = step.slot if isinstance(step, Restart) else None
        for s in parsed.view.slots:
            if s.node == self.me and s != keep and self.store.release_slot(s):
                self._freed = True
                self.next_check = 0.0  # whom to wake is read after the write: the next tick

    def _wake_others(self, parsed: rec.Parsed) -> None:
        """After this node freed a slot or reported, on a read made after that write: wake the
        servers that may go on now (plan/rollout.py `to_wake`). Agents wake nobody: they may
        not write other nodes' keys, and no server waits for an agent."""
        if self._freed:
            self._freed = False
            self._wake_nodes(parsed.view, early=False)

    def _wake_nodes(self, view: ClusterView, early: bool) -> None:
        """Write the wake keys of `to_wake(view)`; once per node between an early wake-up and
        the one after the next read."""
        if self.agent:
            return
        woken, self._woken = self._woken, set()
        lease = self.registered_lease
        rollout = next((r.id for r in view.rollouts if r.active), "")
        for name in to_wake(view, self.me, self.node.cfg.max_unavailable):  # never agents
            if name in woken:
                continue
            try:
                self.store.wake(name, rec.encode_wake(self.me, rollout, self.clock()), lease)
            except DatastoreError as exc:  # it reads again at RECHECK: slower, not stuck
                log.warning("rollout_wake_failed", node=self.me, reason=f"{name}: {exc}")
                continue
            if early:
                self._woken.add(name)

    def _note_wait(self, step: Wait, parsed: rec.Parsed) -> None:
        r = step.rollout
        self.activity = f"rollout {r.id}: {step.reason}"
        self.summary = f"rollout {r.id}: waiting"
        if step.reason != self.waiting:
            self.waiting = step.reason
            log.info("rollout_waiting", **self._fields(r), reason=step.reason)

    def _idle_text(self, parsed: rec.Parsed) -> str:
        active = [r for r in parsed.view.rollouts if r.active]
        if not active:
            last = parsed.view.rollouts[-1] if parsed.view.rollouts else None
            if last is not None and last.state is RolloutState.STOPPED:
                return (
                    f"rollout {last.id} STOPPED: {last.state_reason}; fix it, then "
                    f"`rke2certd rollout resume {last.id}`"
                )
            return "no rollout in progress"
        r = active[0]
        phase = current_phase(parsed.view, r)
        where = f"phase {phase}" if phase else "finishing"
        return f"rollout {r.id} in {where}; this node is done with it"

    # -- restart -------------------------------------------------------------------------------

    def _env(self, r: Rollout) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env.update(
            RKE2CERTD_NODE=self.me,
            RKE2CERTD_PHASE=self.phase.value,
            RKE2CERTD_ROLES=",".join(self.roles),
            RKE2CERTD_ROLLOUT=r.id,
            RKE2CERTD_ROLLOUT_KIND=r.kind.value,
            RKE2CERTD_CA_GENERATION=self.gen or "",
            RKE2CERTD_DATA_DIR=str(self.node.cfg.data_dir),
        )
        return env

    def _start_job(self, r: Rollout, slot: Slot, parsed: rec.Parsed) -> None:
        cfg = self.node.cfg
        prev = parsed.view.status(r, self.me)
        # No status write: the slot says who restarts since when; the done report says when
        # it began (one event fewer that every node's watch receives).
        status = NodeStatus(
            self.me, NodeState.RESTARTING, "restart command running", self.gen,
            prev.applied_at if prev else None, self.clock(),
        )  # fmt: skip
        unit = SERVER_UNIT if cfg.is_server else AGENT_UNIT
        restart = cfg.restart_command or ["systemctl", "restart", unit]
        gate = (
            Gate(cfg.health_command)
            if cfg.health_command
            else Gate(None, default_probes(self.node))
        )
        job = RestartJob(
            restart, gate, self._env(r),
            restart_timeout=cfg.restart_timeout, health_timeout=cfg.health_timeout,
            wake=self._wake,
        )  # fmt: skip
        slot_kv = parsed.kvs.get(rec.slot_key(slot.phase, slot.index))
        self.running = _Running(job, r, slot, status, slot_kv, parsed)
        self.waiting = None
        self.activity = self.summary = f"rollout {r.id}: restarting"
        log.info("rollout_restarting", **self._fields(r), reason=r.reason, command=restart[0])
        job.start()

    def _finish_job(self) -> None:
        """Report the job's result; kept for the next tick if the datastore fails meanwhile."""
        running = self.running
        assert running is not None and running.job.result is not None
        res, r = running.job.result, running.rollout
        now = self.clock()
        if res.ok:
            state = NodeState.DONE
            message = f"restart {res.restart_seconds:.1f}s, health gate {res.health_seconds:.1f}s"
        else:
            state, message = NodeState.FAILED, f"{res.step} failed: {res.message}"
        status = dataclasses.replace(
            running.status, state=state, message=message, finished=now,
            restart_seconds=res.restart_seconds, health_seconds=res.health_seconds,
        )  # fmt: skip
        durations = {"restart_seconds": res.restart_seconds}  # for the metrics' histograms
        if res.step == "health":  # the gate ran
            durations["health_seconds"] = res.health_seconds
        try:
            written = self.store.set_status(r, status, seen=running.seen)
            self._reported = True
            if res.ok:
                self.health = "ok"
                log.info("rollout_node_done", **self._fields(r), reason=message, **durations)
            else:
                self.health = f"failed: {message}"[:200]
                log.error("rollout_failed", **self._fields(r), reason=message, **durations)
                reason = f"{self.phase} node {self.me} failed: {message}"
                if self._housekeep is not None:
                    self._housekeep()  # a server stops the rollout (it sees the failed status)
                elif self.store.finish(r.id, RolloutState.STOPPED, reason, now):
                    log.error("rollout_stopped", **self._fields(r), reason=reason)
        finally:
            self.store.release_slot(running.slot, running.slot_kv)
        self._freed = True
        self.running = None
        # The next node is known now (the view the restart began on, plus these writes): wake
        # it before reading the store again, off the hand-off's path. The read that follows
        # wakes whoever that view could not know about (`_wake_others`).
        self._wake_nodes(reported(running.seen.view, r, written, running.slot), early=True)


def _rollout_marks(kvs: Iterable[KV]) -> frozenset[tuple[str, int]]:
    return frozenset((kv.key, kv.mod_revision) for kv in kvs if kv.key.startswith(rec.ROLLOUTS))
