"""A load generator: many simulated agents in one process, each speaking the agent protocol
with the product's own code.

A simulated agent has its own name, node password, source address (127.1.x.y: the endpoint's
per-address limits are for one host), CSR and CA trust; its datastore is the real
RemoteDatastore over the endpoint (its own server choice, lease, long-poll watch), its rollout
the real RolloutRunner with the agent's role (registration, statuses, slots; its restart is
the configured command). Only its apply step is lighter (adopt the rotated CA by the chain it
holds, one CSR), and it holds no files.

What makes a thousand of them fit on a small machine: a real agent has a thread for its main
loop, one for its lease and one for its long poll; here the main loops' ticks and the lease
refreshes of every agent run from one heap of deadlines (`Timers`) and a small pool, and only
the long polls (each blocked in a server for up to 25 s) keep a thread each. And they share
the decoding of the records they read (`share_decoding`).
"""

from __future__ import annotations

import gc
import heapq
import http.client
import itertools
import math
import queue
import random
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from rke2certd.clock import system_clock
from rke2certd.commands.agent import supervisor_urls
from rke2certd.config import Config
from rke2certd.datastore.base import KV, DatastoreUnavailable, LeaseNotFound
from rke2certd.log import log
from rke2certd.node.node import Node
from rke2certd.pki import keys
from rke2certd.plan.next_step import waiting_line  # who is next in line (which pool)
from rke2certd.plan.rollout import Phase, Restart, Rollout, Step, TakeSlot, Wait
from rke2certd.roles.agent import AgentRollout
from rke2certd.rollout import records
from rke2certd.rollout.link import ClusterLink
from rke2certd.rollout.runner import ApplyOutcome, RolloutRunner
from rke2certd.supervisor import NODE_NAME_HEADER, cert_route
from rke2certd.supervisor.client import (
    UnreachableError,
    fetch_cacerts_trusted,
    request_cert,
)
from rke2certd.supervisor.remote import RemoteDatastore

T = TypeVar("T")


def _csr(name: str) -> bytes:
    key = keys.new_ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{name}")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


# Each simulated agent connects from an address of its own (127.1.x.y), as agents on their own
# machines do: the endpoint's per-address limits (16 connections still in their handshake from
# one address) are for one host, not a fleet behind one address.
_ADDRESSES: dict[str, str] = {}
_request = http.client.HTTPSConnection.request


def _from_own_address(
    self: http.client.HTTPSConnection,
    method: str,
    url: str,
    body: Any = None,
    headers: Any = None,
    **kw: Any,
) -> None:
    name = (headers or {}).get(NODE_NAME_HEADER)
    if name in _ADDRESSES and self.sock is None:
        self.source_address = (_ADDRESSES[name], 0)  # type: ignore[attr-defined]  # not in stubs
    _request(self, method, url, body, headers or {}, **kw)


def own_addresses() -> None:
    """From now on, each simulated agent's requests come from its address (`address`)."""
    http.client.HTTPSConnection.request = _from_own_address  # type: ignore[method-assign,assignment]


def address(name: str, i: int) -> None:
    """Agent `name` (the i-th) connects from 127.1.x.y."""
    _ADDRESSES[name] = f"127.1.{i // 250}.{i % 250 + 1}"


def again(call: Callable[[], T]) -> T:
    pause = 0.5
    while True:
        try:
            return call()
        except (DatastoreUnavailable, UnreachableError, LeaseNotFound):
            # back-pressure: retry later (a join slower than its lease's TTL takes a new one)
            time.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(10.0, pause * 2)


# A record's decoding depends on its key-value alone, so simulated agents reading the same
# key-value share one decoding. Measured at 1000 agents: every agent catches up on the whole
# fleet's keys once or twice in a rollout (the members and statuses written since its last
# full read), 2.4 million key-values decoded at about 20 us each, all in this one process,
# where a real fleet decodes them on a thousand machines. Bounded: cleared when full.
_DECODED: dict[tuple[str, bytes, int, int], records.Record | None] = {}
_DECODED_MAX = 100_000
_MISSING = object()
_decode = records.decode  # the product's


def _shared_decode(kv: KV) -> records.Record | None:
    key = (kv.key, kv.value, kv.mod_revision, kv.create_revision)
    record = _DECODED.get(key, _MISSING)
    if record is _MISSING:
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        record = _DECODED[key] = _decode(kv)
    return record  # type: ignore[return-value]  # not _MISSING here


def share_decoding() -> None:
    """From now on, every simulated agent's reads decode each key-value once (`_DECODED`)."""
    records.decode = _shared_decode


class GcPauses:
    """This process's garbage-collector pauses (each holds the GIL: every simulated agent
    stops). A thousand agents' mirrors of the fleet are millions of long-lived objects; a full
    collection walks them all for tens of seconds, longer than a lease's TTL, and every lease
    here expires at once. A real agent holds one mirror, which its collector walks in
    milliseconds. So `quiet()` leaves the objects alive after the join out of every
    collection (`gc.freeze`) and stops full collections (young ones still free cycles; the
    rest is freed by reference counting, as it is now); the longest pause is printed, so a
    reader sees the generator did not stall."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = 0.0
        self._threshold = gc.get_threshold()
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._started)

    def quiet(self) -> None:
        gc.collect()
        gc.freeze()
        young, middle, _full = self._threshold
        gc.set_threshold(young, middle, 1 << 30)  # a full collection never comes due
        self.longest = 0.0  # from now on

    def close(self) -> None:
        gc.callbacks.remove(self._note)
        gc.unfreeze()
        gc.set_threshold(*self._threshold)


# Which pool runs a tick. A real agent ticks in its own process the moment it is woken; here a
# few pools serve a thousand, so a rollout's start (every agent woken to apply, each apply a few
# requests) would queue the hand-off of the agent at the head of the line behind hundreds of
# applies and re-reads of agents far back in it: waits no real fleet has. So agents that have
# applied have a pool (LINE) served in their order in the line (a slot holder first), those that
# have not yet applied another (APPLY), and ticks on a timer a third (TIMER). The head of the
# line (a slot holder, the next in line and the one after it: places up to HEAD_PLACES) has
# workers of its own (HEAD): an idle agent woken by the rollout goes into LINE behind the whole
# line (its view does not show the rollout yet) and applies in a LINE worker, seconds each
# while the fleet applies; measured at 1000 agents, a hand-off waited for one of those workers
# to free up for about 0.3 s (median) during the wave, against 0.1 s once it had passed.
LINE, APPLY, TIMER, HEAD = 0, 1, 2, 3
HEAD_PLACES = 1  # places -1 (holding or waiting for a slot), 0 and 1 in the line
_WORKERS = {LINE: 12, APPLY: 32, TIMER: 8, HEAD: 3}
POOLS = {"head": HEAD, "line": LINE, "apply": APPLY, "timer": TIMER}
LATE = 5.0  # a tick this late after its wake-up is logged (sim_tick_late)
Priority = tuple[int, int]  # (pool, place in it: lower first)
_Item = tuple[float, int, float, Callable[[], None] | None]  # place, seq, queued at, job


class Timers:
    """Every simulated agent's timers on one thread: its runner's next tick (at the runner's
    deadline, or at once when woken) and its lease refresh (every ttl/3); small pools run
    them. A real agent has a thread for each; a thread per timer for a thousand agents (and
    the GIL handed between them at every wake-up) would make this process the bottleneck.
    The lease refreshes have a pool of their own, as a real agent has a thread for them: a
    rollout wakes every agent at once, and refreshes queued behind a thousand ticks (each a
    few requests to a busy server) would let the leases expire. Ticks have four pools (HEAD,
    LINE, APPLY, TIMER). Every hand-over between threads but HEAD's and LINE's (heaps, in the
    line's order) is a SimpleQueue (no Python lock for a thousand threads to queue on)."""

    def __init__(self, lease_workers: int = 32) -> None:
        self._incoming: queue.SimpleQueue[tuple[float, Callable[[], None], int | None]] = (
            queue.SimpleQueue()
        )
        self._pools: dict[int, queue.PriorityQueue[_Item] | queue.SimpleQueue[_Item]] = {
            HEAD: queue.PriorityQueue(),
            LINE: queue.PriorityQueue(),
            APPLY: queue.SimpleQueue(),
            TIMER: queue.SimpleQueue(),
        }
        self._seq = itertools.count()
        # the longest a tick waited in each pool for a worker (a real agent ticks at once)
        self.late = dict.fromkeys(_WORKERS, 0.0)
        self._leases = ThreadPoolExecutor(lease_workers, thread_name_prefix="sim-lease")
        self._closed = False
        threading.Thread(target=self._run, name="sim-timers", daemon=True).start()
        for p, n in _WORKERS.items():
            for i in range(n):
                name = f"sim-work-{p}-{i}"
                threading.Thread(target=self._work, args=(p,), name=name, daemon=True).start()

    def at(self, when: float, job: Callable[[], None], *, lease: bool = False) -> None:
        """`job` at `when`: a lease refresh (its own pool), else a tick on its timer."""
        self._incoming.put((when, job, None if lease else TIMER))

    def run(self, job: Callable[[], None], priority: Priority = (APPLY, 0)) -> None:
        pool, place = priority
        if pool == LINE and place <= HEAD_PLACES:
            pool = HEAD
        if not self._closed:
            self._pools[pool].put((place, next(self._seq), time.monotonic(), job))

    @staticmethod
    def _guard(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # a bug in the bench: say so, keep the other agents going
            traceback.print_exc()

    def _run(self) -> None:
        heap: list[tuple[float, int, Callable[[], None], int | None]] = []
        seq = itertools.count()
        while not self._closed:
            delay = max(0.0, heap[0][0] - time.monotonic()) if heap else None
            try:
                when, job, pool = self._incoming.get(timeout=delay)
                heapq.heappush(heap, (when, next(seq), job, pool))
            except queue.Empty:
                pass
            while heap and heap[0][0] <= time.monotonic():
                _, _, job, pool = heapq.heappop(heap)
                if self._closed:
                    return
                if pool is None:
                    self._leases.submit(self._guard, job)
                else:
                    self.run(job, (pool, 0))

    def _work(self, priority: int) -> None:
        jobs = self._pools[priority]
        while (job := (item := jobs.get())[3]) is not None:
            self.late[priority] = max(self.late[priority], time.monotonic() - item[2])
            self._guard(job)

    def close(self) -> None:
        self._closed = True
        self._incoming.put((0.0, lambda: None, TIMER))  # wake the timer thread
        for p, n in _WORKERS.items():
            for _ in range(n):
                self._pools[p].put((math.inf, next(self._seq), 0.0, None))
        self._leases.shutdown(wait=False, cancel_futures=True)


class _SimRole(AgentRollout):
    """The agent's role, remembering its last step (which pool its next tick goes to)."""

    step: Step | None = None

    def follow(self, link: ClusterLink, step: Step, phase: Phase, revision: int) -> None:
        self.step = step
        super().follow(link, step, phase, revision)


@dataclass
class SimAgent:
    """One simulated agent: the real remote datastore and rollout runner, a light apply."""

    name: str
    cfg: Config
    token: str
    trust: bytes
    csr_ms: list[float]  # the join's CSR latencies (ms), shared by every agent
    timers: Timers
    stop: threading.Event = field(default_factory=threading.Event)
    gen: str | None = None

    def __post_init__(self) -> None:
        self.urls = supervisor_urls(self.cfg)
        self.password = secrets.token_hex(16)  # its node password (proves its name)
        self.remote = RemoteDatastore(
            self.urls,
            lambda: self.token,
            lambda: self.trust,
            self.name,
            node_password=lambda: self.password,
            prefer_again=self.cfg.preferred_server_retry,
        )
        self.csr_der = _csr(self.name)
        self.role = role = _SimRole(self.remote, self._apply, lambda: self.gen, lease_thread=False)
        self.runner = RolloutRunner(
            Node.from_config(self.cfg), self.remote, role, clock=system_clock, wake=self._wake
        )
        # one tick at a time: queued (in the pool), ticking, woken while ticking (tick again)
        self._lock = threading.Lock()
        self._queued = self._ticking = self._again = False
        self._queued_at: Priority = (TIMER, 0)  # the priority it is queued with
        self._timer_at = math.inf  # the earliest tick timer pending
        self._woken_at = math.inf  # the earliest wake-up not ticked for yet

    def csr(self) -> float:
        started = time.monotonic()
        request_cert(
            self.remote.choice.order(started),
            self.token,
            self.trust,
            cert_route("client-kubelet"),
            self.csr_der,
            self.name,
            ["10.9.0.1"],
            node_password=self.password,
        )
        return time.monotonic() - started

    def join(self) -> None:
        """As a daemon starts: servers that push back (busy, their limits not yet grown with
        the fleet) are asked again after a pause, never given up on."""
        self.gen = again(lambda: self.remote.served_generation()[0])
        self.csr_ms.append(again(self.csr) * 1000)
        again(self.runner.start)
        link = self.runner.link
        assert link is not None
        self.timers.at(time.monotonic() + link.ttl / 3, self._keep_alive, lease=True)
        self._wake()

    def _apply(self, r: Rollout) -> ApplyOutcome:
        # adopt the rotated CA from a server that proves itself with the CA held, then a CSR;
        # servers that do not answer (busy): try again later, as the daemon does
        try:
            urls = self.remote.choice.order(0)
            _url, bundle, _hash = fetch_cacerts_trusted(urls, self.trust)
            self.trust = bundle
            self.csr()
        except UnreachableError as exc:
            raise DatastoreUnavailable(str(exc)) from exc
        self.gen = r.ca_generation
        return ApplyOutcome(self.gen)

    def _wake(self, priority: Priority | None = None) -> None:
        """The runner's wake-up (its link's watch, its restart job): a tick, one at a time."""
        priority = self._priority() if priority is None else priority
        with self._lock:
            if self._ticking:
                self._again = True
                return
            # queued already: again only if this wake-up is more urgent (the tick queued
            # first then finds nothing new: a read, no harm)
            if self.stop.is_set() or (self._queued and self._queued_at <= priority):
                return
            self._queued, self._queued_at = True, priority
            self._woken_at = min(self._woken_at, time.monotonic())
        self.timers.run(self._tick, priority)

    def _priority(self) -> Priority:
        """LINE once this agent holds the generation of every rollout in progress: first a slot
        holder (it restarts, or waits for a slot), then the others in their order in the line;
        else APPLY. As last read: a hint, read without the runner's lock.

        So an idle agent woken by a new rollout (its last view does not show it yet) goes into
        LINE after the whole line, and the apply wave fills the gaps the hand-offs leave: on
        this one machine every tick shares one GIL, and the hand-offs are the rollout's
        critical path (a real fleet applies in parallel, on its own machines). Measured at
        1000 agents, sending those wake-ups to APPLY instead made the wave compete with the
        hand-offs and the agent phase slower (overhead per agent 0.38 s against 0.29-0.36)."""
        step, view = self.role.step, self.runner.view
        if self.runner.running is not None or isinstance(step, TakeSlot | Restart):
            return LINE, -1
        if isinstance(step, Wait) and step.on == "slot":
            return LINE, -1
        if view is None or any(r.active and r.ca_generation != self.gen for r in view.rollouts):
            return APPLY, 0
        if not isinstance(step, Wait):
            return LINE, len(view.members)
        line = waiting_line(view, step.rollout, Phase.AGENT)
        return LINE, line.index(self.name) if self.name in line else len(line)

    def _tick(self) -> None:
        with self._lock:
            if self._ticking:  # a second queued entry (a more urgent wake-up): after this one
                self._again = True
                return
            self._queued, self._ticking = False, True
            waited, self._woken_at = time.monotonic() - self._woken_at, math.inf
        if waited > LATE:
            log.warning(
                "sim_tick_late", node=self.name, waited=round(waited, 2), pool=self._queued_at
            )
        try:
            if not self.stop.is_set():
                self.runner.tick()
        finally:
            with self._lock:
                self._ticking = False
                again, self._again = self._again, False
        if again:
            self._wake()
            return
        now = time.monotonic()
        when = max(now, min(now + 60.0, self.runner.deadline()))
        with self._lock:
            if self._timer_at <= now or when < self._timer_at:
                self._timer_at = when
                self.timers.at(when, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            if self._timer_at <= time.monotonic():
                self._timer_at = math.inf
        self._wake((TIMER, 0))

    def _keep_alive(self) -> None:
        link = self.runner.link
        if link is None or link.stopped or self.stop.is_set():
            return
        self.timers.at(time.monotonic() + link.keep_alive(), self._keep_alive, lease=True)

    def kill(self) -> None:
        """Gone without a word: the lease is left to expire, as when a machine dies."""
        self.stop.set()
        if self.runner.link is not None:
            self.runner.link.stop(wait=0)

    def close(self) -> None:
        self.stop.set()
        self.runner.interrupted = True  # no revoke: quicker, and the cluster goes away anyway
        if self.runner.link is not None:
            self.runner.link.stop(wait=0)
