"""The metrics' cost: the daemon's RSS with metrics on (endpoint and textfile) against the same
daemon with them off, and how long a scrape takes.

    python benchmarks/bench_metrics.py [--runs N] [--scrapes M]

N rounds on one node (all roles, SQLite datastore, every certificate issued once before): in
each, a daemon with `metrics-address: ""` and no textfile, then one with a loopback endpoint
and a textfile dir, alternating, each started afresh; once READY (and the textfile written),
RSS from /proc/<pid>/status (VmRSS, the median of 5 readings 0.2 s apart). Then M scrapes of
the running daemon's endpoint, each timed from connect to the last byte. Baseline in the same
run: `rke2certd certificate check -o json` (a process per call: what a cron job would run to
learn the same). Target: RSS with metrics at most 5 MiB over the daemon without.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.daemon.support import ENV_BASE, CapturedLogs, DaemonNode, free_port  # noqa: E402

TARGET_MIB = 5.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def steady_rss(pid: int) -> float:
    readings = []
    for _ in range(5):
        readings.append(rss_mib(pid))
        time.sleep(0.2)  # a benchmark's sampling interval, not a synchronisation
    return statistics.median(readings)


def daemon_rss(node: DaemonNode, metrics: bool, scrapes: int) -> tuple[float, list[float], int]:
    """(RSS MiB, scrape seconds, textfile bytes) of one daemon run."""
    port = free_port()
    textfile = node.root / "textfile"
    if metrics:
        node.write_config(metrics_address=f"127.0.0.1:{port}", textfile_dir=str(textfile))
    else:
        node.settings.pop("textfile-dir", None)
        node.write_config(metrics_address="")
    times: list[float] = []
    size = 0
    with node.daemon() as d:
        d.notify.expect("READY", timeout=120)
        if metrics:
            d.wait_event("metrics_started")
            prom = textfile / "rke2certd.prom"
            deadline = time.monotonic() + 30
            while not prom.exists():
                assert time.monotonic() < deadline, "no textfile"
                time.sleep(0.01)
            size = prom.stat().st_size
        rss = steady_rss(d.pid)  # sh execs Python: the same PID
        for _ in range(scrapes if metrics else 0):
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                r.read()
            times.append(time.perf_counter() - started)
        assert d.stop() == 0
    return rss, times, size


def check_seconds(node: DaemonNode, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rke2certd",
                "-c",
                str(node.config),
                "certificate",
                "check",
                "-o",
                "json",
            ],
            env=ENV_BASE,
            capture_output=True,
            check=True,
            cwd="/",
        )
        out.append(time.perf_counter() - started)
    return out


def ms(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
    return f"median {statistics.median(values) * 1000:7.2f} ms   p90 {p90 * 1000:7.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scrapes", type=int, default=50)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        base = Path(tmp)
        logs = CapturedLogs(base)
        node = DaemonNode.create(base / "node", logs, "bench-metrics")
        node.cli("renew")
        off: list[float] = []
        on: list[float] = []
        scrapes: list[float] = []
        size = 0
        for _ in range(opts.runs):
            off.append(daemon_rss(node, False, 0)[0])
            rss, times, size = daemon_rss(node, True, opts.scrapes)
            on.append(rss)
            scrapes += times
        checks = check_seconds(node, min(opts.scrapes, 20))
    delta = statistics.median(on) - statistics.median(off)
    print(f"daemon RSS, metrics off: median {statistics.median(off):6.1f} MiB  ({off})")
    print(f"daemon RSS, metrics on:  median {statistics.median(on):6.1f} MiB  ({on})")
    verdict = "met" if delta <= TARGET_MIB else "NOT met"
    print(f"metrics cost {delta:+.1f} MiB RSS (target <= {TARGET_MIB} MiB: {verdict})")
    print(f"scrape /metrics ({len(scrapes)}):          {ms(scrapes)}")
    print(f"baseline: certificate check -o json: {ms(checks)}")
    ratio = statistics.median(scrapes) / statistics.median(checks)
    print(f"ratio scrape / check (median): {ratio:.3f}")
    print(f"textfile: {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
