"""A fleet of agents on 3 servers: spread, idle cost, CSR latency, the agent phase of a rollout.

    python benchmarks/bench_fleet.py [--sizes 100,300,1000] [--real-agents 3] [--idle 30]
                                     [--csr-rate 5] [--csr-seconds 20] [--datastore etcd]

Each size is a fresh simulated cluster (tests/harness/cluster.py) on one shared SQLite file
(or, with `--datastore etcd`, one real etcd member, as an RKE2 cluster keeps them in its etcd):
three real server daemons (`rke2certd run`: e1 etcd, c1 and c2 control-plane), each with its
endpoint on its own loopback address and one port, as servers on their own hosts; a handful of
real agent daemons; and N simulated agents from this one process (loadgen.py). A simulated
agent speaks the agent protocol as a real one does, with the same code: the remote datastore
over the endpoint (its own server choice, lease refreshes, long-poll watch) and the rollout
runner (registration, statuses, slots, its restart as an instant command); only its apply step
is lighter (adopt the rotated CA by the chain it holds, one CSR) and it holds no files; their
timers share one thread, and they share the decoding of the records they read. Restarts and
health gates are instant (`true`): what is measured is rke2certd's own work. This process's
own CPU per agent is printed beside the servers', so that a reader sees the generator is not
the bottleneck.

Per size, in order:
- join: the N agents start (20 at a time) with one CSR each; their latency is reported apart
  (a fleet starting at once is a burst, not the steady state); a server that pushes back is
  asked again after a pause, as a daemon does;
- spread: agents per server once it has settled (no agent moved for two preferred-server-retry
  periods, and none is on a server that told it lately that it is crowded: it is about to
  move; at most 3 minutes): from each agent's current server (real agents: their last move,
  else their preferred); the hash's own spread is printed beside it;
- idle: the servers' CPU over `--idle` seconds with nothing to do, per agent (CPU seconds per
  agent per minute) after the endpoints' limits followed the fleet;
- CSR: `--csr-rate` CSRs per second from random agents for `--csr-seconds`: p50/p99 latency;
- rollout: one simulated agent was killed before the idle window (its lease left to expire),
  a cross-signed CA set is staged on e1; the rollout must finish (the dead agent skipped
  after agent-unavailable-grace). Servers' CPU during it, per agent; the agent phase (the
  last server done to the last agent done) per agent, and its overhead beyond the restart and
  gate times; the median hand-off (one agent done to the next one's restart);
- exponents: log-log slopes over N (1.00: linear, a constant cost per agent).

So that a reader can tell the generator's own stalls from the servers', it prints its longest
garbage-collector pause and the longest wait of a simulated agent's tick for a worker in each of
its pools during the rollout (loadgen.py: a real agent ticks at once, on its own machine).

The targets are printed beside the figures. On this machine every process shares the same few
cores (a real fleet runs each agent on its own machine), so absolute times are pessimistic; the
exponents say how the cost grows.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from loadgen import (  # noqa: E402
    POOLS,
    GcPauses,
    SimAgent,
    Timers,
    address,
    again,
    own_addresses,
    share_decoding,
)

from rke2certd.commands.agent import supervisor_urls  # noqa: E402
from rke2certd.config import Config  # noqa: E402
from rke2certd.plan.rollout import NodeState, Phase, Rollout  # noqa: E402
from rke2certd.rollout.cluster_store import ClusterStore  # noqa: E402
from rke2certd.supervisor.fleet_limits import MIN_HOME, fleet_limits  # noqa: E402
from tests.datastore.tls import make_etcd_pki  # noqa: E402
from tests.harness.cluster import NodeSpec, SimCluster  # noqa: E402
from tests.harness.etcd import EtcdCluster  # noqa: E402

TTL = 30  # registry-ttl: the product's default (a lease refresh every 10 s)
RETRY_HOME = 10  # preferred-server-retry (30 s by default): the spread settles sooner
GRACE = 5  # agent-unavailable-grace: the dead agent is skipped soon after its turn
SERVERS = ("e1", "c1", "c2")
TARGETS = {
    "spread": "within +-20% of N/3 on each of the 3 servers",
    "idle": "server idle CPU per agent flat: exponent of the total <= 1.1",
    "csr": "p99 CSR latency <= 1 s at 1000 agents",
    "phase": "agent phase overhead per agent <= 0.2 s beyond restart + gate",
    "dead": "a rollout with one agent dead finishes for the rest",
}
SERVER_ENV = {"RKE2CERTD_LIMITS_SECONDS": "3"}


def proc_cpu(pid: int) -> float:
    """utime + stime of a process and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def servers_cpu(cluster: SimCluster) -> float:
    total = 0.0
    for name in SERVERS:
        proc = cluster.nodes[name].proc
        assert proc is not None
        total += proc_cpu(proc.pid)
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def slope(xs: list[float], ys: list[float]) -> float:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else float("nan")


@dataclass
class Result:
    n: int
    agents: int  # simulated + real
    per_server: dict[str, int]
    join_p50: float
    join_p99: float
    idle_cpu: float  # servers' CPU seconds per second, idle
    bench_cpu: float  # this process's CPU seconds per second, idle (the simulated agents)
    csr_p50: float
    csr_p99: float
    rollout_wall: float
    rollout_cpu: float  # servers' CPU seconds during the rollout
    phase: float  # the last server done -> the last agent done
    phase_agents: int
    restart_gate: float  # mean restart + gate seconds of an agent
    finished: bool
    skipped: list[str]
    handoff: float  # median gap from one agent's done to the next agent's restart

    @property
    def idle_per_agent_min(self) -> float:
        return self.idle_cpu / self.agents * 60

    @property
    def phase_per_agent(self) -> float:
        return self.phase / max(1, self.phase_agents)

    @property
    def overhead_per_agent(self) -> float:
        return self.phase_per_agent - self.restart_gate


def run_size(n: int, real: int, opts: argparse.Namespace) -> Result:
    root = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{n}-"))
    specs = [NodeSpec("e1", ("etcd",)), NodeSpec("c1", ("control-plane",))]
    specs += [NodeSpec("c2", ("control-plane",))]
    for spec in specs:
        spec.env.update(SERVER_ENV)
    specs += [NodeSpec(f"r{i}", ("agent",)) for i in range(1, real + 1)]
    config = {
        "restart-command": ["true"],
        "health-command": ["true"],
        "agent-unavailable-grace": GRACE,
        "preferred-server-retry": RETRY_HOME,
    }
    etcd = None
    kw: dict[str, Any] = {}
    if opts.datastore == "etcd":  # as on RKE2: the servers' etcd holds the coordination keys
        pki = make_etcd_pki(root / "etcd-pki")
        etcd = EtcdCluster(root / "etcd", 1, server_tls=pki.server).start()
        kw = {"etcd": etcd, "etcd_client": pki.client}
    cluster = SimCluster(
        root, specs, registry_ttl=TTL, config=config, stand_ins=False, spread=True, **kw
    )
    sims: list[SimAgent] = []
    # a real agent's lease has a thread of its own: here a refresh may wait on a busy server
    # for seconds (a refresh every ttl/3 per agent), so the pool grows with the fleet
    timers = Timers(lease_workers=max(32, n // 4))
    pauses = GcPauses()
    try:
        cluster.start(timeout=120)
        c1 = cluster.nodes["c1"]
        token = (c1.data / "server" / "agent-token").read_text().strip()
        trust = (c1.layout.tls / "server-ca.crt").read_bytes()
        port = int(cluster.nodes["r1"].config.read_text().split("supervisor-port: ")[1].split()[0])
        servers = ",".join(f"https://{a}:9345" for a in cluster.addresses.values())
        join_ms: list[float] = []
        for i in range(n):
            name = f"sim-{i:04d}"
            cfg = Config.from_mapping(
                {
                    "data-dir": str(root / "sim" / name),
                    "node-name": name,
                    "roles": ["agent"],
                    "node-ip": ["10.9.0.1"],
                    "server": servers,
                    "token": token,
                    "supervisor-port": port,
                    "registry-ttl": TTL,
                    **config,
                }
            )
            address(name, i)
            sims.append(SimAgent(name, cfg, token, trust, join_ms, timers))
        threading.stack_size(512 * 1024)
        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda a: a.join(), sims))
        print(
            f"  N={n}: {n} agents joined in {time.monotonic() - started:.1f} s "
            f"(longest GC pause here {pauses.longest:.2f} s)",
            flush=True,
        )
        pauses.quiet()
        names = {a.name for a in sims} | {f"r{i}" for i in range(1, real + 1)}
        with cluster.open_store() as ds:
            store = ClusterStore(ds)
            cluster.wait_for(
                lambda: names <= set(store.read().view.live), 300, "every agent registered"
            )
        fleet = f"{len(names)} agent(s) over {len(SERVERS)} server(s)"

        def followed() -> bool:  # each server's limits (its share of agents) for the fleet
            return all(
                any(
                    str(e.get("reason", "")).startswith(fleet)
                    for e in cluster.nodes[s].log_events("supervisor_limits")
                )
                for s in SERVERS
            )

        if fleet_limits(len(names), len(SERVERS), 1024).home > MIN_HOME:  # else nothing changes
            cluster.wait_for(followed, 120, "the servers' limits for the fleet")

        server_of = {u: s for s, a in cluster.addresses.items() for u in [f"https://{a}:{port}"]}

        # settled: agents that failed over while the servers were busy with the join are back
        # home (a try every preferred-server-retry), those beyond a crowded server's share on
        # their next one: the counts stay the same for two retry periods, and no agent is on
        # a server that told it it is crowded (it moves at its next request)
        def counts() -> Counter[str]:
            return Counter(server_of[a.remote.choice.current] for a in sims)

        def told_to_move() -> int:
            at = time.monotonic()
            return sum(a.remote.choice.avoids(a.remote.choice.current, at) for a in sims)

        settle, last, since = time.monotonic(), counts(), time.monotonic()
        while (
            time.monotonic() - since < 2 * RETRY_HOME or told_to_move()
        ) and time.monotonic() - settle < 180:
            time.sleep(1.0)  # the agents' own calls move them: only looking here
            now = counts()
            if now != last:
                last, since = now, time.monotonic()
                if opts.verbose:
                    print(f"    {time.monotonic() - settle:5.0f} s: {dict(sorted(now.items()))}")
                    for move in MOVES[:]:
                        MOVES.remove(move)
                        where = server_of.get(str(move.get("server_url")), "?")
                        print(f"      {move.get('node')} -> {where}: {move.get('reason')}")
        away = sum(a.remote.choice.current != a.remote.choice.preferred for a in sims)
        print(
            f"  N={n}: spread settled after {time.monotonic() - settle:.0f} s; "
            f"{away}/{n} agents away from their preferred server",
            flush=True,
        )
        per_server = Counter(server_of[a.remote.choice.current] for a in sims)
        if opts.verbose:  # each server's simulated agents by where it is in their rank
            for url, s in sorted(server_of.items(), key=lambda x: x[1]):
                on = [a.remote.choice for a in sims if a.remote.choice.current == url]
                ranks = Counter(c.rank(url) for c in on)
                avoided = sum(c.avoids(url, time.monotonic()) for c in on)
                print(f"    {s}: by rank {dict(sorted(ranks.items()))}, avoiding it {avoided}")
        home = Counter(server_of[a.remote.choice.preferred] for a in sims)
        print(f"  N={n}: preferred servers (the hash alone): {dict(home)}", flush=True)
        for i in range(1, real + 1):  # a real agent: where its last move took it, else home
            moves = cluster.nodes[f"r{i}"].log_events("server_chosen")
            url = moves[-1]["server_url"] if moves else None
            per_server[server_of[url or supervisor_urls(_real_cfg(cluster, f"r{i}"))[0]]] += 1

        # one agent dies now: down (its lease expired) by the time the rollout comes
        dead = sims[0]
        dead.kill()
        cpu0, own0, t0 = servers_cpu(cluster), proc_cpu(os.getpid()), time.monotonic()
        time.sleep(opts.idle)  # measuring: nothing else to wait for
        idle_cpu = (servers_cpu(cluster) - cpu0) / (time.monotonic() - t0)
        bench_cpu = (proc_cpu(os.getpid()) - own0) / (time.monotonic() - t0)
        print(
            f"  N={n}: idle CPU per agent per minute: servers {idle_cpu / (n + real) * 60:.4f} s, "
            f"this process (the {n} simulated agents) {bench_cpu / n * 60:.4f} s "
            f"({bench_cpu:.2f} of a core, {threading.active_count()} threads)",
            flush=True,
        )

        csr_ms: list[float] = []
        rng = random.Random(16)
        end = time.monotonic() + opts.csr_seconds

        def timed(agent: SimAgent) -> None:  # a retry after back-pressure counts in its time
            started = time.monotonic()
            again(agent.csr)
            csr_ms.append((time.monotonic() - started) * 1000)

        with ThreadPoolExecutor(8) as pool:
            futures = []
            while time.monotonic() < end:
                futures.append(pool.submit(timed, rng.choice(sims[1:])))
                time.sleep(1 / opts.csr_rate)  # the load's pace, not a synchronisation
            for f in futures:
                f.result()
        print(
            f"  N={n}: CSR p50/p99 {percentile(csr_ms, 0.5) / 1000:.3f}/"
            f"{percentile(csr_ms, 0.99) / 1000:.3f} s ({len(csr_ms)} CSRs)",
            flush=True,
        )

        cpu0, t0 = servers_cpu(cluster), time.monotonic()
        timers.late = dict.fromkeys(timers.late, 0.0)  # the rollout's
        cluster.stage_rotation("e1")
        with cluster.open_store() as ds:
            store = ClusterStore(ds)

            def finished() -> Rollout | None:
                rs = store.read().view.rollouts
                return rs[-1] if rs and not rs[-1].active else None

            r = cluster.wait_for(finished, opts.timeout, "the rollout finished", poll=1.0)
            wall = time.monotonic() - t0
            rollout_cpu = servers_cpu(cluster) - cpu0
            view = store.read(everything=True).view
        sts = {node: st for (rid, node), st in view.statuses.items() if rid == r.id}
        phases = {m.name: m.phase for m in view.members.values()}
        server_times = [
            st.finished
            for node, st in sts.items()
            if phases.get(node) is not Phase.AGENT and st.finished is not None
        ]
        servers_done = max(server_times, default=None)
        agent_done = [
            st
            for node, st in sts.items()
            if phases.get(node) is Phase.AGENT and st.state is NodeState.DONE and st.finished
        ]
        end = max((st.finished for st in agent_done if st.finished), default=None)
        phase = (end - servers_done).total_seconds() if end and servers_done else float("nan")
        gates = [(st.restart_seconds or 0) + (st.health_seconds or 0) for st in agent_done]
        spans = sorted(
            (st.restart_started, st.finished)
            for st in agent_done
            if st.restart_started is not None and st.finished is not None
        )
        gaps = [(b[0] - a[1]).total_seconds() for a, b in itertools.pairwise(spans)]
        skipped = sorted(n for n, st in sts.items() if st.state is NodeState.SKIPPED)
        late = ", ".join(f"{k} {timers.late[v]:.2f} s" for k, v in POOLS.items())
        print(
            f"  N={n}: this process: longest GC pause since the join {pauses.longest:.3f} s; "
            f"longest wait of a tick for a worker: {late}",
            flush=True,
        )
        if r.state.value != "done" or len(agent_done) != n - 1 + real:
            print(f"  N={n}: rollout {r.state.value}: {r.state_reason}", flush=True)
        return Result(
            n,
            n + real,
            dict(per_server),
            percentile(join_ms, 0.5) / 1000,
            percentile(join_ms, 0.99) / 1000,
            idle_cpu,
            bench_cpu,
            percentile(csr_ms, 0.5) / 1000,
            percentile(csr_ms, 0.99) / 1000,
            wall,
            rollout_cpu,
            phase,
            len(agent_done),
            statistics.fmean(gates) if gates else float("nan"),
            r.state.value == "done" and len(agent_done) == n - 1 + real,
            skipped,
            statistics.median(gaps) if gaps else float("nan"),
        )
    finally:
        for a in sims:
            a.close()
        timers.close()
        pauses.close()
        cluster.stop()
        if etcd is not None:
            etcd.stop()
        if opts.keep:
            print(f"  N={n}: kept {root} (its daemons' logs)", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _real_cfg(cluster: SimCluster, name: str) -> Config:
    import yaml

    doc = yaml.safe_load(cluster.nodes[name].config.read_text())
    rke2 = yaml.safe_load((cluster.nodes[name].dir / "rke2" / "config.yaml").read_text())
    return Config.from_mapping({**doc, "server": rke2["server"], "token": rke2["token"]})


MOVES: list[dict[str, Any]] = []


def _moves(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    if event.get("event") == "server_chosen":
        MOVES.append(dict(event))
    raise structlog.DropEvent


def report(results: list[Result]) -> None:
    ok: Callable[[bool], str] = lambda good: "ok" if good else "MISSED"  # noqa: E731
    print("\nper size (N simulated agents + the real ones)")
    header = (
        f"{'N':>5} {'agents/server':>18} {'join p50/p99 s':>15} {'idle CPU/agent/min':>19} "
        f"{'CSR p50/p99 s':>14} {'rollout s':>9} {'CPU/agent s':>11} {'phase/agent s':>13} "
        f"{'overhead s':>10} {'hand-off s':>10} {'finished':>8}"
    )
    print(header)
    for x in results:
        spread = "/".join(str(x.per_server.get(s, 0)) for s in SERVERS)
        print(
            f"{x.n:>5} {spread:>18} {x.join_p50:>6.3f}/{x.join_p99:<8.3f} "
            f"{x.idle_per_agent_min:>18.4f}s {x.csr_p50:>6.3f}/{x.csr_p99:<7.3f} "
            f"{x.rollout_wall:>9.1f} {x.rollout_cpu / x.agents:>11.3f} {x.phase_per_agent:>13.3f} "
            f"{x.overhead_per_agent:>10.3f} {x.handoff:>10.3f} {('yes' if x.finished else 'NO'):>8}"
        )
        if x.skipped:
            print(f"      skipped (not running): {', '.join(x.skipped)}")
    ns = [float(x.agents) for x in results]
    print("\nexponents over N (log-log slope; 1.00 = linear, a constant cost per agent)")
    rows = {
        "servers' idle CPU (total)": [x.idle_cpu for x in results],
        "servers' rollout CPU (total)": [x.rollout_cpu for x in results],
        "CSR p99 latency": [x.csr_p99 for x in results],
        "agent phase (total)": [x.phase for x in results],
        "rollout wall time": [x.rollout_wall for x in results],
    }
    slopes = {k: slope(ns, v) for k, v in rows.items()}
    for k, s in slopes.items():
        print(f"  {k:32s} {s:6.2f}")
    print("\ntargets")
    biggest = max(results, key=lambda x: x.n)
    spread_ok = all(
        abs(c - x.agents / 3) <= 0.2 * x.agents / 3
        for x in results
        for c in (x.per_server.get(s, 0) for s in SERVERS)
    )
    idle_exp = slopes["servers' idle CPU (total)"]
    print(f"  {TARGETS['spread']:62s} {ok(spread_ok)}")
    print(f"  {TARGETS['idle']:62s} {idle_exp:.2f} {ok(idle_exp <= 1.1)}")
    at = f"{biggest.csr_p99:.3f} s at {biggest.n}"
    print(f"  {TARGETS['csr']:62s} {at} {ok(biggest.csr_p99 <= 1.0 or biggest.n < 1000)}")
    worst = max(x.overhead_per_agent for x in results)
    print(f"  {TARGETS['phase']:62s} {worst:.3f} s {ok(worst <= 0.2)}")
    print(f"  {TARGETS['dead']:62s} {ok(all(x.finished for x in results))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--real-agents", type=int, default=3)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    parser.add_argument("--csr-rate", type=float, default=5.0, help="CSRs per second")
    parser.add_argument("--csr-seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="for one rollout")
    parser.add_argument(
        "--datastore",
        choices=("sqlite", "etcd"),
        default="sqlite",
        help="the servers' coordination keys: one shared SQLite file, or a real etcd member",
    )
    parser.add_argument("--verbose", action="store_true", help="print the spread as it settles")
    parser.add_argument("--keep", action="store_true", help="keep each size's directory")
    parser.add_argument("--log", help="write the simulated agents' events (INFO+) to this file")
    opts = parser.parse_args()
    # the simulated agents log as daemons do: keep this output to the figures
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if opts.verbose:  # and the agents' moves, to say why the spread changes
        structlog.configure(
            processors=[_moves],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        )
    if opts.log:  # to see what the simulated agents did (one JSON object a line)
        out = open(opts.log, "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        structlog.configure(
            processors=[
                structlog.processors.TimeStamper(fmt="iso"),
                structlog.processors.add_log_level,
                structlog.processors.JSONRenderer(),
            ],
            logger_factory=structlog.PrintLoggerFactory(out),
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        )
    sizes = [int(s) for s in opts.sizes.split(",") if s.strip()]
    own_addresses()
    share_decoding()
    print(
        f"bench_fleet: 3 servers on {opts.datastore}, sizes {sizes} simulated agents "
        f"+ {opts.real_agents} real"
    )
    print("targets: " + "; ".join(TARGETS.values()))
    results = []
    for n in sizes:
        results.append(run_size(n, opts.real_agents, opts))
        x = results[-1]
        print(
            f"  N={n}: spread {x.per_server}, idle {x.idle_per_agent_min:.4f} CPU-s/agent/min, "
            f"CSR p50/p99 {x.csr_p50:.3f}/{x.csr_p99:.3f} s, rollout {x.rollout_wall:.1f} s "
            f"({'finished' if x.finished else 'NOT finished'}), rollout CPU/agent "
            f"{x.rollout_cpu / x.agents:.3f} s, phase/agent {x.phase_per_agent:.3f} s, "
            f"overhead/agent {x.overhead_per_agent:.3f} s, hand-off {x.handoff:.3f} s",
            flush=True,
        )
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
