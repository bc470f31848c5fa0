"""What the daemon's main loop calls to take part in rollouts.

`tick()` reads the coordination keys (one range read), does the housekeeping any node may do
(record who went down, close finished rollouts), then asks plan/rollout.py for this node's next
step and does it, until the answer is to wait, to restart, or nothing. A restart runs as a
`RestartJob` in a thread; the loop finishes it (reports done or failed, frees the slot) when
the job wakes it. Nothing here blocks for long: the datastore calls have their own timeouts,
the apply step is the daemon's `renew` under the node lock (bounded by lock-timeout).

What differs between a server and an agent-only node (how it reaches the cluster, applies,
housekeeps, wakes others) is the `RolloutRole` passed in (rollout/role.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rke2certd.clock import Clock
from rke2certd.datastore.base import Datastore
from rke2certd.errors import DatastoreError, LockTimeout, Rke2certdError
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.plan.rollout import (
    Apply,
    ClusterView,
    Idle,
    Member,
    NodeState,
    NodeStatus,
    Phase,
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
)
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.rollout.link import ClusterLink
from rke2certd.rollout.look import Look, look_for
from rke2certd.rollout.presence import Presence
from rke2certd.rollout.restart import PRIVATE_ENV, Running, durations, new_job
from rke2certd.rollout.role import ApplyOutcome, RolloutRole

__all__ = ["PRIVATE_ENV", "ApplyOutcome", "RolloutRunner"]

# Read again even without a watch event: a lost wake-up must not stall a rollout. The cluster
# tests set it far beyond their timeouts (`recheck`), so that a lost wake-up fails them.
RECHECK = 30.0
RETRY = 3.0  # after a datastore error
STEPS_PER_TICK = 12


@dataclass
class FollowUp:
    """What this node's own writes leave to do at the next read."""

    freed: bool = False  # it freed a slot or reported: the next read says whom to wake
    woken: set[str] = field(default_factory=set)  # whom it woke already, before that read
    reported: bool = False  # it wrote a final status: the housekeeping may end the rollout
    # what the periodic look reads instead of everything (None: a full read), look.py
    look: Look | None = None
    grace: bool = False  # a member down in its turn is within its grace: full reads


class RolloutRunner:
    def __init__(
        self,
        node: Node,
        ds: Datastore,
        role: RolloutRole,
        *,
        clock: Clock,
        wake: Callable[[], None],
        recheck: float = RECHECK,
    ) -> None:
        """`ds`: the coordination keys (the datastore, or a server's endpoint); `recheck`:
        seconds between reads without a wake-up."""
        self.node = node
        self.role = role
        self.store = ClusterStore(ds)
        self.clock = clock
        self._wake = wake
        self.recheck = recheck
        self.link: ClusterLink | None = None
        self.running: Running | None = None
        self.interrupted = False
        roles = tuple(r.value for r in node.cfg.roles)
        self.presence = Presence(node.cfg.node, roles, phase_of(roles), clock(), role.generation())
        self.activity = "starting"  # for STATUS=: what, and why not yet
        self.waiting: str | None = None
        # the last read (the one its last step was decided on), for the daemon's metrics
        self.view: ClusterView | None = None
        self.next_check = 0.0
        self.follow_up = FollowUp()

    @property
    def me(self) -> str:
        return self.presence.name

    @property
    def phase(self) -> Phase:
        return self.presence.phase

    @property
    def health(self) -> str:
        """The last restart's: unknown, ok, failed: <why>."""
        return self.presence.health

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Register (a lease, the registration on it, the membership), then watch."""
        lease = self.store.ds.grant_lease(self.node.cfg.registry_ttl)
        self._register(lease)
        self.link = self.role.link(self.node, self._wake)
        self.link.start(lease)

    def reconfigure(self, node: Node, ds: Datastore, role: RolloutRole) -> None:
        """After SIGHUP: new config and connection (the link too: it may have shared the old
        one); the lease, and a restart in progress, go on."""
        self.node = node
        self.role = role
        self.store = ClusterStore(ds)
        self.next_check = 0.0
        if self.link is not None:
            lease = self.link.lease
            self.link.stop()
            self.link = role.link(node, self._wake)
            if lease is not None:
                self.link.start(lease)

    def stop_link(self) -> None:
        """Before the daemon closes the connection: `reconfigure` starts a new link."""
        if self.link is not None:
            self.link.stop()

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
        lease = self.link.lease if self.link else self.presence.lease
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
        # The registration first: a member without one is "down" to every server's
        # housekeeping, which would report a node that is only joining.
        self.presence.lease = lease
        self.presence.write(self.store, self.clock(), force=True)
        self.store.ensure_member(self._member())
        log.info(
            "node_registered", node=self.me, phase=self.phase.value, ca_generation=self.presence.gen
        )

    def _member(self) -> Member:
        return Member(self.me, self.presence.roles, self.phase)

    # -- main loop side ------------------------------------------------------------------------

    def deadline(self) -> float:
        """When tick() wants to run next without being woken (monotonic)."""
        if self.running is not None:
            return time.monotonic() + 5.0  # refresh the status line of a long restart
        return self.next_check

    def renewed(self) -> None:
        """The daemon renewed: the CA generation on disk may have changed."""
        self.presence.gen = self.role.generation()
        self.next_check = 0.0

    def tick(self) -> None:
        due = self.link.take_changed() if self.link else False
        if self.running is not None and not self.running.job.done:
            return
        if not due and self.running is None and time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + self.recheck
        try:
            if self.running is not None:
                self._finish_job()
            elif not due and self._unchanged():
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
            self.next_check = time.monotonic() + self.recheck

    def status_text(self) -> str:
        if self.running is not None:
            return f"rollout {self.running.rollout.id}: {self.running.job.describe()}"
        if self.link is not None and self.link.error:
            return f"datastore unreachable, retrying: {self.link.error.splitlines()[0]}"
        return self.activity

    # -- one tick ------------------------------------------------------------------------------

    def _tick(self) -> None:
        lease = self.link.lease if self.link else self.presence.lease
        if lease is not None and lease != self.presence.lease:
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
        self.view = parsed.view  # the read the step was decided on
        self._wake_others(parsed)
        self._release_stale_slots(parsed, step)
        if self.link is not None:
            self.role.follow(self.link, step, self.phase, parsed.revision)
        if isinstance(step, Restart):
            self._start_job(step.rollout, step.slot, parsed)
        elif isinstance(step, Wait):
            self._note_wait(step)
        else:
            self.waiting = None
            self.activity = self._idle_text(parsed)
            self.presence.summary = "idle"
        if self.follow_up.reported:  # reported in this tick: the rollout may be over
            self._after_report(parsed)
        active = any(r.active for r in parsed.view.rollouts)
        look = look_for(step, self.phase, active, parsed.kvs.values())
        self.follow_up.look = None if self.follow_up.grace else look
        self.presence.write(self.store, self.clock())

    def _unchanged(self) -> bool:
        """The periodic look instead of a full read: True when what the last step depends on
        is as the last full read saw it. A waiting node looks only while its link is healthy
        (a failing watch may have lost what only a full read sees), and reads everything
        every LOOKS_PER_READ looks; an idle one looks at the rollout records alone anyway."""
        look = self.follow_up.look
        if look is None:
            return False
        if look.left is not None and self.link is not None and self.link.error is not None:
            return False
        if not self.role.unchanged(self.store, look):
            return False
        self.follow_up.look = look.next()
        return True

    def _housekeeping(self, parsed: rec.Parsed) -> rec.Parsed:
        mine, wrote = parsed.view.members.get(self.me), False
        if mine is None or mine.down_since is not None or mine.roles != self.presence.roles:
            self.store.ensure_member(self._member())
            wrote = True
        wrote = self.role.housekeep(self.store, parsed) or wrote
        if self.follow_up.reported:
            self.follow_up.reported = False
            wrote = self.role.after_report(self.store, parsed) or wrote
        parsed = self.store.read() if wrote else parsed
        self._look_again_at_grace(parsed)
        return parsed

    def _after_report(self, parsed: rec.Parsed) -> None:
        """A final status written in this tick: the housekeeping (asked for) may end the
        rollout now rather than at the next tick."""
        self.follow_up.reported = False
        if self.role.after_report(self.store, parsed):
            parsed = self.store.read()
        self._look_again_at_grace(parsed)

    def _look_again_at_grace(self, parsed: rec.Parsed) -> None:
        """A member down in its turn is blocked when its grace ends, and nothing writes then:
        tick again at that time (an agent asks a server's housekeeping then)."""
        now = self.clock()
        due = next_blocking(parsed.view, now, self.node.cfg.availability)
        self.follow_up.grace = due is not None
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
        self.activity = self.presence.summary = f"rollout {r.id}: applying"
        check = self.next_check
        try:
            outcome = self.role.apply(r)
        except (DatastoreError, LockTimeout):
            raise
        except Rke2certdError as exc:
            message = f"apply failed: {exc}"
            self._fail(r, message, self.presence.gen)
            return
        self.presence.gen = outcome.generation
        self.next_check = check  # renewed() asked for another tick: this one reads on
        if r.kind is RolloutKind.CA and outcome.generation != r.ca_generation:
            self._other_generation(r, outcome.generation)
            return
        self.store.set_status(  # applied at: its new files are on disk
            r, NodeStatus(self.me, NodeState.APPLIED, "", outcome.generation, self.clock())
        )
        log.info("rollout_applied", **self._fields(r), reason=r.reason)

    def _fail(self, r: Rollout, message: str, gen: str | None) -> None:
        self.store.set_status(r, NodeStatus(self.me, NodeState.FAILED, message, gen))
        self.follow_up.reported = True
        log.error("rollout_failed", **self._fields(r), reason=message)

    def _other_generation(self, r: Rollout, gen: str | None) -> None:
        """The datastore holds another CA set than the rollout's: a newer rotation replaced it.
        Its rollout (started by whoever saved it, or here) supersedes this one."""
        if gen is not None and self.role.supersede(self.store, r, gen):
            return  # superseded: the next step is the newer rollout
        message = (
            f"after applying, the disk holds CA generation {gen or 'none (incomplete)'}, not "
            f"{r.ca_generation}; check `rke2certd certificate check` and the datastore"
        )
        self._fail(r, message, gen)

    def _report_stopped(self, step: ReportStopped) -> None:
        r = step.rollout
        prev = self.store.read().view.status(r, self.me)
        applied_at = prev.applied_at if prev else None
        status = NodeStatus(
            self.me,
            NodeState.STOPPED,
            step.reason,
            self.presence.gen,
            applied_at,
            None,
            self.clock(),
        )
        self.store.set_status(r, status)
        self.follow_up.reported = True
        log.warning("rollout_stopped", **self._fields(r), reason=step.reason)

    def _take_slot(self, step: TakeSlot, parsed: rec.Parsed) -> rec.Parsed:
        """Take the slot; `parsed` with the slots as read afterwards (the next step is decided
        on it: the restart, or, when two nodes raced on stale views, giving it back)."""
        lease = self.presence.lease
        assert lease is not None
        slot = Slot(step.phase, step.index, self.me, step.rollout.id, self.clock())
        taken, parsed = self.store.take_slot_and_reread(slot, lease, parsed)
        limit = self.node.cfg.max_unavailable
        if taken and over_limit(parsed.view, step.phase, limit, step.rollout):
            self.store.release_slot(slot)  # raced on a stale view: give it back, wait
            log.info("restart_slot_returned", **self._fields(step.rollout), reason="over limit")
            self.follow_up.freed = True
            parsed = self.store.read()
        return parsed

    def _release_stale_slots(self, parsed: rec.Parsed, step: Step) -> None:
        keep = step.slot if isinstance(step, Restart) else None
        for s in parsed.view.slots:
            if s.node == self.me and s != keep and self.store.release_slot(s):
                self.follow_up.freed = True
                self.next_check = 0.0  # whom to wake is read after the write: the next tick

    def _wake_others(self, parsed: rec.Parsed) -> None:
        """After this node freed a slot or reported, on a read made after that write: wake the
        servers that may go on now (plan/rollout.py `to_wake`; the role says none for agents:
        they may not write other nodes' keys, and no server waits for an agent)."""
        if self.follow_up.freed:
            self.follow_up.freed = False
            self._wake_nodes(parsed.view, early=False)

    def _wake_nodes(self, view: ClusterView, early: bool) -> None:
        """Write the wake keys of the role's `to_wake(view)`; once per node between an early
        wake-up and the one after the next read."""
        woken, self.follow_up.woken = self.follow_up.woken, set()
        lease = self.presence.lease
        rollout = next((r.id for r in view.rollouts if r.active), "")
        for name in self.role.to_wake(view, self.me, self.node.cfg.max_unavailable):
            if name in woken:
                continue
            try:
                self.store.wake(name, rec.encode_wake(self.me, rollout, self.clock()), lease)
            except DatastoreError as exc:  # it reads again at `recheck`: slower, not stuck
                log.warning("rollout_wake_failed", node=self.me, reason=f"{name}: {exc}")
                continue
            if early:
                self.follow_up.woken.add(name)

    def _note_wait(self, step: Wait) -> None:
        r = step.rollout
        self.activity = f"rollout {r.id}: {step.reason}"
        self.presence.summary = f"rollout {r.id}: waiting"
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

    def _start_job(self, r: Rollout, slot: Slot, parsed: rec.Parsed) -> None:
        # No status write: the slot says who restarts since when; the done report says when
        # it began (one event fewer that every node's watch receives).
        prev = parsed.view.status(r, self.me)
        gen = self.presence.gen
        job, restart = new_job(self.node, self.role.restart_unit, r, self.phase, gen, self._wake)
        slot_kv = parsed.kvs.get(rec.slot_key(slot.phase, slot.index))
        applied_at = prev.applied_at if prev else None
        self.running = Running(job, r, slot, applied_at, self.clock(), gen, slot_kv, parsed)
        self.waiting = None
        self.activity = self.presence.summary = f"rollout {r.id}: restarting"
        log.info("rollout_restarting", **self._fields(r), reason=r.reason, command=restart[0])
        job.start()

    def _finish_job(self) -> None:
        """Report the job's result; kept for the next tick if the datastore fails meanwhile."""
        running = self.running
        assert running is not None and running.job.result is not None
        res, r = running.job.result, running.rollout
        status, message = running.final_status(self.me, self.clock())
        times = durations(res)
        if res.ok:  # the report and the slot freed: one call where it can (the hand-off)
            slot, slot_kv = running.slot, running.slot_kv
            written = self.store.report_and_release(r, status, running.seen, slot, slot_kv)
            self.follow_up.reported = True
            self.presence.health = "ok"
            log.info("rollout_node_done", **self._fields(r), reason=message, **times)
        else:
            try:
                written = self.store.set_status(r, status, seen=running.seen)
                self.follow_up.reported = True
                self.presence.health = f"failed: {message}"[:200]
                log.error("rollout_failed", **self._fields(r), reason=message, **times)
                reason = f"{self.phase} node {self.me} failed: {message}"
                if self.role.stop_failed(self.store, r, reason):  # before the slot is free
                    log.error("rollout_stopped", **self._fields(r), reason=reason)
            finally:
                self.store.release_slot(running.slot, running.slot_kv)
        self.follow_up.freed = True
        self.running = None
        # The next node is known now (the view the restart began on, plus these writes): wake
        # it before reading the store again, off the hand-off's path. The read that follows
        # wakes whoever that view could not know about (`_wake_others`).
        self._wake_nodes(reported(running.seen.view, r, written, running.slot), early=True)
