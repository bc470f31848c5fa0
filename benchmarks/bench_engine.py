"""The PKI engine's three costs an operator feels, each against a baseline measured in the same run
(machines are noisy: only the ratios mean something).

    python benchmarks/bench_engine.py [--runs N]

1. `rke2certd renew` with nothing to do, as a whole process (it runs before every RKE2 start),
   against the floor `python -c "import cryptography.x509"`. Target: within 2x of the floor,
   warm (the validated config cached in the cache dir); cold (no cache) is shown too.
   The import profile (`python -X importtime`) shows where the rest goes.
2. The first `renew` on an empty data dir (five CAs, every leaf, the RSA service key): its time,
   and the share of RSA 2048 key generation in it.
3. `certificate check` on a full node against a shell loop of `openssl x509 -enddate -noout`
   over the same files. Target: at least 5x faster, warm (config and certificate facts cached,
   as after a renew); cold (both caches emptied before each run) is shown too.

Process measurements alternate the two sides run by run and compare medians. The processes run
this checkout (PYTHONPATH), with a cache dir of their own, and with bytecode caching on (into
a private PYTHONPYCACHEPREFIX) even if the caller's shell turns it off: an installed package
has its .pyc files, and compiling every module at each start is not what an operator pays.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rke2certd.commands.check import check, render_json  # noqa: E402
from rke2certd.commands.renew import renew  # noqa: E402
from rke2certd.config import load_config  # noqa: E402
from rke2certd.node.node import Node  # noqa: E402
from rke2certd.pki import keys  # noqa: E402
from rke2certd.pki.profiles import leaves_for  # noqa: E402

PY = sys.executable
ENV: dict[str, str] = {}  # the processes' environment, set by main()
CONFIG = """\
data-dir: {data}
node-name: bench-node
node-ip: [192.0.2.10]
tls-san: [rke2.example.test, 203.0.113.7]
"""


@dataclass
class Row:
    what: str
    ours: float
    baseline_name: str
    baseline: float | None
    target: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.baseline is None else self.ours / self.baseline


def node_config(base: Path, name: str) -> Path:
    d = base / name
    d.mkdir()
    cfg = d / "rke2certd.yaml"
    cfg.write_text(CONFIG.format(data=d / "data"))
    return cfg


def cli(cfg: Path, *args: str) -> list[str]:
    return [PY, "-m", "rke2certd", "-c", str(cfg), *args]


def bench_env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONPYCACHEPREFIX=str(base / "pycache"),
        RKE2CERTD_CACHE_DIR=str(base / "run"),
    )
    return env


def clear_caches() -> None:
    """Empty the cache dir: the next process is a cold one (no config, no facts cached)."""
    for p in Path(ENV["RKE2CERTD_CACHE_DIR"]).glob("*.json"):
        p.unlink()


def run(cmd: Sequence[str], shell: bool = False, cold: bool = False) -> float:
    if cold:
        clear_caches()
    t = time.perf_counter()
    res = subprocess.run(
        cmd if not shell else cmd[0],
        shell=shell,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        env=ENV,
    )
    elapsed = time.perf_counter() - t
    if res.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.decode()[-500:]}")
    return elapsed


def alternate(a: Callable[[], float], b: Callable[[], float], runs: int) -> tuple[float, float]:
    """Medians of `a` and `b`, run in turns (one warm-up of each first)."""
    a(), b()
    ta, tb = [], []
    for _ in range(runs):
        ta.append(a())
        tb.append(b())
    return statistics.median(ta), statistics.median(tb)


# Modules whose cumulative import time a warm idle renew or check pays (each counted where
# first imported); pydantic and yaml only on a cold run.
PROFILED = (
    "rke2certd.cli",
    "rke2certd.config",
    "rke2certd.config.validate",
    "pydantic",
    "yaml",
    "rke2certd.log.output",
    "structlog",
    "rke2certd.datastore",
    "requests",
    "etcd3gw",
    "sqlite3",
    "rke2certd.commands.renew",
    "cryptography.x509",
    "rke2certd.commands.check",
    "rke2certd.node.cert_facts",
)


def import_profile(cfg: Path, *args: str) -> list[tuple[str, float]]:
    """Cumulative import time (s) of the PROFILED modules in one warm `rke2certd ARGS`."""
    run(cli(cfg, *args))  # warm the caches
    res = subprocess.run(
        [PY, "-X", "importtime", "-m", "rke2certd", "-c", str(cfg), *args],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    )
    found: dict[str, float] = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line)
        if m and m.group(2) in PROFILED:
            found[m.group(2)] = int(m.group(1)) / 1e6
    return [(name, found[name]) for name in PROFILED if name in found]


def profile_notes(title: str, cfg: Path, *args: str) -> list[str]:
    notes = [f"import profile of a warm {title} (-X importtime, cumulative, one run):"]
    profile = import_profile(cfg, *args)
    notes += [f"  {name:24s} {secs * 1000:6.1f} ms" for name, secs in profile]
    return notes


def package_import(module: str, runs: int) -> float:
    return statistics.median(run([PY, "-c", f"import {module}"]) for _ in range(runs))


def bench_idle(base: Path, runs: int) -> tuple[list[Row], list[str]]:
    cfg = node_config(base, "idle")
    run(cli(cfg, "renew"))
    floor_name = 'python -c "import cryptography.x509"'
    ours, floor = alternate(
        lambda: run(cli(cfg, "renew")),
        lambda: run([PY, "-c", "import cryptography.x509"]),
        runs,
    )
    cold, floor2 = alternate(
        lambda: run(cli(cfg, "renew"), cold=True),
        lambda: run([PY, "-c", "import cryptography.x509"]),
        runs,
    )
    rows = [
        Row("idle renew (process, warm)", ours, floor_name, floor, "<= 2x"),
        Row("idle renew (process, cold: no cache)", cold, floor_name, floor2),
    ]
    notes = profile_notes("idle renew", cfg, "renew")
    bare = package_import("sys", max(3, runs // 2))
    notes.append(f"  python startup alone: {bare * 1000:.1f} ms")
    for module in ("pydantic", "structlog", "yaml", "cryptography.x509"):
        t = package_import(module, max(3, runs // 2))
        notes.append(f"  import {module:18s} alone: {t * 1000:6.1f} ms ({(t - bare) * 1000:+.1f})")
    node = Node.from_config(load_config(cfg))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        renew(node, datetime.now(UTC))
        times.append(time.perf_counter() - t)
    notes.append(
        f"  the idle renew's own work, in-process: {statistics.median(times) * 1000:.1f} ms"
    )
    return rows, notes


def bench_first(base: Path, runs: int) -> tuple[list[Row], list[str]]:
    counter = iter(range(10**6))

    def fresh_process() -> float:
        return run(cli(node_config(base, f"first-{next(counter)}"), "renew"))

    def fresh_in_process() -> float:
        node = Node.from_config(load_config(node_config(base, f"first-{next(counter)}")))
        t = time.perf_counter()
        renew(node, datetime.now(UTC))
        return time.perf_counter() - t

    def rsa() -> float:
        t = time.perf_counter()
        keys.new_rsa_key(2048)
        return time.perf_counter() - t

    process, in_process = alternate(fresh_process, fresh_in_process, runs)
    rsa_times = [rsa() for _ in range(max(runs, 15))]
    rsa_median = statistics.median(rsa_times)
    rows = [
        Row("first renew on an empty dir (process)", process, "", None),
        Row("first renew, in-process (no datastore)", in_process, "", None),
        Row("  of which RSA 2048 keygen (median)", rsa_median, "", None),
    ]
    notes = [
        f"RSA 2048 generation: median {rsa_median * 1000:.0f} ms, "
        f"min {min(rsa_times) * 1000:.0f} ms, max {max(rsa_times) * 1000:.0f} ms "
        "(random prime search: it varies a lot)",
        f"  share of the in-process first renew: {rsa_median / in_process:.0%}; "
        f"of the whole process: {rsa_median / process:.0%}",
    ]
    return rows, notes


def bench_check(base: Path, runs: int) -> tuple[list[Row], list[str]]:
    cfg = node_config(base, "check")
    run(cli(cfg, "renew"))
    node = Node.from_config(load_config(cfg))
    files = [
        str(s.cert_path(node.layout))
        for s in leaves_for(True, True)
        if s.cert_path(node.layout).exists()
    ]
    loop = "for f in " + " ".join(files) + '; do openssl x509 -enddate -noout -in "$f"; done'
    check_cmd = cli(cfg, "certificate", "check", "-o", "json")
    ours, openssl = alternate(lambda: run(check_cmd), lambda: run([loop], shell=True), runs)
    cold, openssl2 = alternate(
        lambda: run(check_cmd, cold=True), lambda: run([loop], shell=True), runs
    )

    def in_process() -> float:
        t = time.perf_counter()
        render_json(check(node, [], datetime.now(UTC)))
        return time.perf_counter() - t

    inproc = statistics.median(in_process() for _ in range(runs))
    loop_name = f"openssl x509 loop, {len(files)} files"
    rows = [
        Row("check (process, warm)", ours, loop_name, openssl, ">= 5x faster"),
        Row("check (process, cold: no cache)", cold, loop_name, openssl2),
        Row("check, in-process (check + JSON)", inproc, "same openssl loop", openssl),
    ]
    return rows, profile_notes("check", cfg, "certificate", "check", "-o", "json")


def verdict(row: Row) -> str:
    r = row.ratio
    if r is None or not row.target:
        return ""
    if row.target.startswith("<="):
        limit = float(row.target.split()[1].rstrip("x"))
        return "met" if r <= limit else "MISSED"
    limit = float(row.target.split()[1].rstrip("x"))
    return "met" if r <= 1 / limit else "MISSED"


def print_table(rows: list[Row]) -> None:
    header = ("measurement", "median", "baseline", "median", "ratio", "target", "")
    table = [header]
    for r in rows:
        ratio = ""
        if r.ratio is not None:
            ratio = f"{r.ratio:.2f}x" if r.ratio >= 1 else f"1/{1 / r.ratio:.1f}"
        table.append(
            (
                r.what,
                f"{r.ours * 1000:.1f} ms",
                r.baseline_name,
                "" if r.baseline is None else f"{r.baseline * 1000:.1f} ms",
                ratio,
                r.target,
                verdict(r),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="runs per side (medians)")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    base = Path(tempfile.mkdtemp(prefix="rke2certd-bench-engine-"))
    ENV.update(bench_env(base))
    # In-process loads (and the checks) use the same cache dir, never the machine's.
    os.environ["RKE2CERTD_CACHE_DIR"] = ENV["RKE2CERTD_CACHE_DIR"]
    rows: list[Row] = []
    notes: list[str] = []
    try:
        for bench in (bench_idle, bench_first, bench_check):
            r, n = bench(base, args.runs)
            rows += r
            notes += n
    finally:
        shutil.rmtree(base, ignore_errors=True)
    version = sys.version.split()[0]
    print(f"rke2certd engine benchmark: {args.runs} runs per side, medians, python {version}")
    print_table(rows)
    print()
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
