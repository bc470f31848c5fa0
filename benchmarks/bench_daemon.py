"""The running daemon (`rke2certd run`, a real process with a NOTIFY_SOCKET and a systemd-like
WATCHDOG_USEC): how long a staged set takes from its rename into the watched dir to its filed
`result.json`, and what the daemon costs when idle.

    python benchmarks/bench_daemon.py [--runs N] [--idle-seconds S] [--quiet Q]

Latency: N runs, each on a fresh copy of one node (all roles, SQLite datastore) and of one
cross-signed set made from its CAs (`ca stage-rotation`, on the same filesystem, not timed): a
daemon is started, and once READY the set is renamed into the watched dir; timed from just
before the rename to the moment its result.json appears in .applied/ (polled every ms). That
includes the quiet period Q (a renamed set must stay unchanged for Q seconds), reported apart:
latency - Q is our work (inotify, waking the loop, the rotate-ca checks, the datastore save,
result files, filing). Baselines in the same run, alternating with the daemon's runs, on their
own copies of the same node and set: the same rotate-ca through the CLI (`certificate rotate-ca
--path`, a process per call, as an operator runs it) and rotate_ca() called in this process
(the checks and the save alone). Fresh copies, because a set's cost grows with the rotations
before it (service.key keeps every old key, and each is loaded and checked).

Idle: S seconds with nothing to do after the runs. CPU from /proc/<pid>/stat (utime+stime, in
clock ticks) and exactly from /proc/<pid>/task/*/schedstat; RSS from /proc/<pid>/status
(sampled every second: median and max); wake-ups from the voluntary context switches of every
thread (a thread that sleeps and wakes switches out voluntarily; involuntary switches are
preemptions by other load, reported apart), per thread with the system call it sleeps in (which
tells the threads apart: the main loop in pselect6, the staging watcher's inotify reader and
the SQLite watch in poll, the lease keep-alive and watchdog's dispatch threads in futex).
Targets: no measurable CPU (0 ticks), RSS under 60 MiB.

The daemon and CLI processes run this tree's code with the unit's environment (UNIT_ENV, as in
systemd/rke2certd.service's Environment=).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rke2certd.commands.node_datastore import open_for  # noqa: E402
from rke2certd.commands.rotate_ca import rotate_ca  # noqa: E402
from rke2certd.config import load_config  # noqa: E402
from rke2certd.node.node import Node  # noqa: E402
from tests.daemon import support  # noqa: E402
from tests.daemon.support import CapturedLogs, DaemonNode  # noqa: E402

RSS_TARGET_MIB = 60.0
HZ = os.sysconf("SC_CLK_TCK")
# systemd/rke2certd.service's Environment= (tests/systemd checks the unit itself)
UNIT_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
# x86-64 and aarch64 numbers of the calls the daemon's threads sleep in
SYSCALLS = {
    "x86_64": {7: "poll", 23: "select", 202: "futex", 230: "clock_nanosleep", 270: "pselect6"},
    "aarch64": {72: "pselect6", 73: "ppoll", 98: "futex", 115: "clock_nanosleep"},
}.get(os.uname().machine, {})


# --- /proc ---------------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (every thread), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def status_of(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def status(pid: int) -> dict[str, str]:
    return status_of(Path(f"/proc/{pid}/status"))


def kib(value: str) -> int:
    return int(value.split()[0])


@dataclass
class Thread:
    voluntary: int  # each wake-up of a sleeping thread is one
    involuntary: int  # preempted while running (by other load on the machine)
    sleeps_in: str  # the system call it is blocked in now
    cpu_ns: int  # time on a CPU (schedstat: exact, where ticks are 10 ms steps)


def threads(pid: int) -> dict[int, Thread]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = status_of(task / "status")
            nr = (task / "syscall").read_text().split()[0]
            cpu_ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError):
            continue  # ended meanwhile (or /proc/<tid>/syscall is not readable: see below)
        call = SYSCALLS.get(int(nr), f"syscall {nr}") if nr.lstrip("-").isdigit() else nr
        out[int(task.name)] = Thread(
            int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"]), call, cpu_ns
        )
    return out


# --- the runs ------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def wait_filed(incoming: Path, name: str, timeout: float = 60.0) -> float:
    """Poll (1 ms) until .applied/<name>-*/result.json exists; the monotonic time it was seen."""
    applied = incoming / ".applied"
    deadline = time.monotonic() + timeout
    prefix = f"{name}-"
    while time.monotonic() < deadline:
        try:
            for entry in os.listdir(applied):
                if entry.startswith(prefix) and (applied / entry / "result.json").exists():
                    return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    raise SystemExit(f"{name} was not filed in .applied within {timeout}s (see the daemon log)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="staged sets timed (>= 15)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--quiet", type=float, default=0.2, help="staging-quiet of the daemon")
    args = parser.parse_args()
    if args.runs < 15:
        print(f"note: --runs {args.runs} is below the 15 the issue asks for", file=sys.stderr)
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # in-process: quiet
    # the processes run this tree (not whatever rke2certd the interpreter has installed)
    support.ENV_BASE.update(UNIT_ENV, PYTHONPATH=str(ROOT))

    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    try:
        return run(work, args.runs, args.idle_seconds, args.quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def copy_node(template: DaemonNode, root: Path, label: str) -> DaemonNode:
    """A copy of the template node (data dir, datastore, the staged set made from its CAs)."""
    shutil.copytree(template.data, root / "data", symlinks=True)
    node = DaemonNode(root, template.logs, label, dict(template.settings))
    node.write_config(data_dir=str(root / "data"))
    return node


def run(work: Path, runs: int, idle_seconds: float, quiet: float) -> int:
    logs = CapturedLogs(work)  # the daemon's and CLI's stderr, kept for a failed run's post-mortem
    template = DaemonNode.create(
        work / "template",
        logs,
        "bench",
        staging_quiet=quiet,
        # the rollout after a rotation: succeeds at once instead of restarting a real RKE2
        restart_command=["/bin/true"],
        health_command=["/bin/true"],
    )
    template.cli("renew")
    template.stage_rotation("set")  # in <data>/server/rotate-ca/made/set: copied with the node

    latencies: list[float] = []
    cli_times: list[float] = []
    inproc_times: list[float] = []
    for i in range(runs):
        # Each run on fresh copies of the same node and set (a set's cost grows with the
        # rotations before it: service.key keeps every old key), the three sides alternating.
        node = copy_node(template, work / f"daemon-{i}", "bench-daemon")
        with node.daemon() as daemon:
            daemon.notify.expect("READY", timeout=120)
            renamed = time.monotonic()
            os.rename(node.staged_dir("set"), node.incoming / "set")
            latencies.append(wait_filed(node.incoming, "set") - renamed)
            daemon.stop()

        via_cli = copy_node(template, work / f"cli-{i}", "bench-cli")
        started = time.monotonic()
        via_cli.cli("certificate", "rotate-ca", "--path", via_cli.staged_dir("set"))
        cli_times.append(time.monotonic() - started)

        in_proc = copy_node(template, work / f"inproc-{i}", "bench-inproc")
        proc_node = Node.from_config(load_config(in_proc.config))
        ds = open_for(proc_node)
        try:
            started = time.monotonic()
            rotate_ca(
                proc_node,
                in_proc.staged_dir("set"),
                force=False,
                dry_run=False,
                now=datetime.now(UTC),
                datastore=ds,
            )
            inproc_times.append(time.monotonic() - started)
        finally:
            ds.close()
        for n in (node, via_cli, in_proc):
            shutil.rmtree(n.root, ignore_errors=True)

    # --- idle: a daemon that has done its work (a set applied, the renew after it) ---
    node = copy_node(template, work / "idle", "bench-idle")
    with node.daemon(watchdog_usec=60_000_000) as daemon:  # as the unit's WatchdogSec=60s
        notify = daemon.notify
        notify.expect("READY", timeout=120)
        pid = daemon.pid
        rss_ready = kib(status(pid)["VmRSS"]) / 1024
        os.rename(node.staged_dir("set"), node.incoming / "set")
        wait_filed(node.incoming, "set")
        daemon.wait_event("restart_needed", timeout=60, reason="staged set set applied")
        time.sleep(5)  # let the rollout after it settle
        rss: list[float] = []
        ticks0, threads0, t0 = cpu_ticks(pid), threads(pid), time.monotonic()
        notes0 = len(notify.messages)
        while time.monotonic() - t0 < idle_seconds:
            rss.append(kib(status(pid)["VmRSS"]) / 1024)
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        ticks, threads1 = cpu_ticks(pid) - ticks0, threads(pid)
        notes = len(notify.messages) - notes0
        st = status(pid)
        assert daemon.stop() == 0

    med = statistics.median(latencies)
    cli_med, work_med = statistics.median(cli_times), statistics.median(inproc_times)
    print(
        f"rke2certd run: {runs} runs, each a cross-signed rotation renamed into the watched "
        f"dir of a fresh node; staging-quiet {quiet * 1000:.0f} ms"
    )
    print(
        f"  rename -> result.json   median {ms(med)}   min {ms(min(latencies))}   "
        f"max {ms(max(latencies))}"
    )
    print(f"    of which quiet period        {ms(quiet)}")
    print(f"    our work (median - quiet)    {ms(med - quiet)}")
    print("baselines, same runs, alternating, on copies of the same node and set:")
    print(f"  CLI certificate rotate-ca      {ms(cli_med)} (a process per call)")
    print(f"  rotate_ca() in-process         {ms(work_med)} (the checks and the save alone)")
    print(
        f"  daemon: our work - rotate_ca   {ms(med - quiet - work_med)} "
        "(inotify, waking the loop, result files, filing)"
    )
    print(f"  daemon: our work / CLI         {(med - quiet) / cli_med:.2f}x")
    cpu_pct = ticks / HZ / elapsed * 100
    print(f"idle {elapsed:.0f} s after applying a set (WATCHDOG_USEC=60 s: a ping every 30 s):")
    print(f"  CPU      {ticks} ticks of 1/{HZ} s = {cpu_pct:.3f} % of a core")
    print(
        f"  RSS      at READY {rss_ready:.1f} MiB; idle median {statistics.median(rss):.1f}, "
        f"max {max(rss):.1f} MiB (anon {kib(st['RssAnon']) / 1024:.1f}, "
        f"file {kib(st['RssFile']) / 1024:.1f}); peak (VmHWM) {kib(st['VmHWM']) / 1024:.1f} "
        f"MiB; target < {RSS_TARGET_MIB:.0f} MiB"
    )
    wakes = {
        tid: (
            t.voluntary - threads0[tid].voluntary,
            t.involuntary - threads0[tid].involuntary,
            (t.cpu_ns - threads0[tid].cpu_ns) / 1e6,
        )
        for tid, t in threads1.items()
        if tid in threads0
    }
    woke, preempted = sum(w[0] for w in wakes.values()), sum(w[1] for w in wakes.values())
    cpu_ms = sum(w[2] for w in wakes.values())
    print(
        f"           {cpu_ms:.1f} ms on a CPU (schedstat) = {cpu_ms / elapsed * 60:.1f} ms "
        "per minute"
    )
    print(
        f"  wake-ups {woke} ({woke / elapsed:.2f}/s) over {st['Threads']} threads, "
        f"{preempted} preemptions ({preempted / elapsed:.2f}/s), "
        f"{notes} sd_notify messages"
    )
    for tid, (w, p, ms_on_cpu) in sorted(wakes.items()):
        who = "main thread" if tid == pid else f"thread {tid}"
        print(
            f"    {who:14} sleeping in {threads1[tid].sleeps_in:16} "
            f"{w / elapsed:5.2f} wake-ups/s, {p / elapsed:5.2f} preemptions/s, "
            f"{ms_on_cpu:5.1f} ms CPU"
        )
    rss_ok, cpu_ok = max(rss) < RSS_TARGET_MIB, ticks == 0
    print(
        f"targets: RSS {'met' if rss_ok else 'MISSED'} "
        f"({RSS_TARGET_MIB - max(rss):.1f} MiB of headroom), "
        f"no measurable CPU {'met' if cpu_ok else 'MISSED'}"
    )
    return 0 if rss_ok and cpu_ok else 1


if __name__ == "__main__":
    sys.exit(main())
