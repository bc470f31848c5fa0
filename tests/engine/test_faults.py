"""Crash safety: `kill -9` at random points of `renew` and `certificate rotate`, and two `renew`s
started at once on one fresh data dir.

After every kill: each cert on disk pairs with its key and chains to its CA (old or new, never a
mix); once the journal of an interrupted multi-file write has been replayed (which every command
does first, under the node lock), that holds for every cert. Then a new `renew` completes the
node and leaves no temp or journal file anywhere. The random seed is the run's (`--seed N|random`,
tests/harness/seed.py); RKE2CERTD_FAULT_RUNS sets the number of runs, to extend one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from rke2certd.files.atomic import JOURNAL_NAME, TEMP_MARK
from rke2certd.files.lock import LOCK_NAME
from rke2certd.pki import build, certs, keys
from tests.conftest import FrozenClock, clean_env, run_cli, write_node_config
from tests.harness.seed import run_seed
from tests.harness.wait import SAFETY

from .conftest import LiveNode, build_live_node
from .helpers import (
    assert_node_complete,
    ca_files,
    journal_overlay,
    leaf_problems,
    load_cert,
    load_node,
    renew_at,
    snapshot,
    spec_named,
    specs_of,
    strays,
)

RUNS = int(os.environ.get("RKE2CERTD_FAULT_RUNS", "30"))
SEED = run_seed()

# Many SANs and every service: a bigger node gives the kills more room inside the work.
BIG_NODE = {
    "tls_san": [f"san-{i}.rke2.example.test" for i in range(60)]
    + [f"198.51.100.{i}" for i in range(1, 60)],
    "node_ip": ["192.0.2.10", "192.0.2.11", "2001:db8::10"],
}


ROTATABLE = [
    "admin",
    "api-server",
    "controller-manager",
    "scheduler",
    "rke2-controller",
    "cloud-controller",
    "etcd",
    "auth-proxy",
    "kubelet",
    "kube-proxy",
    "supervisor",
]


def start(cfg: Path, *command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rke2certd", "-c", str(cfg), *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd="/",
    )


def wait_for_lock(data: Path, proc: subprocess.Popen[bytes], timeout: float = SAFETY) -> bool:
    """Until `proc` holds the node lock (it writes its pid there): its work starts then."""
    lock = data / LOCK_NAME
    want = str(proc.pid).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if lock.read_bytes().strip() == want:
                return True
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    raise AssertionError(f"{proc.args!r} never took the node lock")


def work_time(live: LiveNode, *command: str, before: Callable[[], None] = lambda: None) -> float:
    """How long `command` works once it holds the lock: the shortest of two calibration runs
    (not killed), so that random kills land inside the work even on a noisy machine."""
    times = []
    for _ in range(2):
        before()
        proc = start(live.cfg, *command)
        assert wait_for_lock(live.data, proc)
        t = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        times.append(time.monotonic() - t)
    return min(times)


def age_every_leaf(live: LiveNode, clock: FrozenClock) -> None:
    """New keys and certs issued 300 days ago: the next `renew` renews every leaf."""
    node = live.node
    renew_at(node, clock.at(days=-300), force=frozenset(s.name for s in specs_of(node)))


def consistent_now(live: LiveNode) -> list[str]:
    return [str(p) for p in leaf_problems(live.node)]


@pytest.mark.slow
def test_kill_9_at_random_points_of_renew_and_rotate_never_breaks_a_pair(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    clock = FrozenClock()
    # On the disk, not the tests' tmpfs: with fsync, the writes take long enough for kills to
    # land inside them (temps written, journal present, renames half done) often.
    live = build_live_node(tmp_path, clock, **BIG_NODE)
    res = run_cli("-c", live.cfg, "renew")
    assert res.returncode == 0, res.stderr
    cas = {p: p.read_bytes() for p in ca_files(live.node.layout)}
    windows = {
        "rotate": work_time(live, "certificate", "rotate"),
        "renew": work_time(live, "renew", before=lambda: age_every_leaf(live, clock)),
    }

    stats: Counter[str] = Counter()
    for run in range(RUNS):
        what = "renew" if run % 3 == 2 else "rotate"
        if what == "renew":
            age_every_leaf(live, clock)
        command = ["renew"] if what == "renew" else ["certificate", "rotate"]
        delay = rng.uniform(0, windows[what])
        proc = start(live.cfg, *command)
        locked_at = time.monotonic()
        if wait_for_lock(live.data, proc):
            locked_at = time.monotonic()
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        killed = proc.returncode == -signal.SIGKILL
        if not killed:  # it was quicker than the window: aim shorter from now on
            windows[what] = min(windows[what], time.monotonic() - locked_at)
        stats[f"{what}-{'killed' if killed else 'finished'}"] += 1
        where = f"run {run} ({what}, kill after {delay:.3f}s, seed {SEED})"
        if not killed:
            assert proc.returncode == 0, f"{where}: {err.decode()}"

        # 1. Right after the kill, read as the journal replay will leave it (with no journal:
        #    as it is): every cert on disk pairs with its key and chains to its CA.
        overlay = journal_overlay(live.data)
        stats["journal-left"] += bool(overlay)
        stats["temps-left"] += bool(strays(live.data))
        assert leaf_problems(live.node, overlay=overlay) == [], where
        assert {p: p.read_bytes() for p in cas} == cas, f"{where}: the CA set changed"

        # 2. Now and then (always after a torn multi-file write) a rotate runs straight on the
        #    crashed state: it must finish the interrupted write before it backs up anything.
        if overlay or rng.random() < 0.1:
            stats["rotate-after-kill"] += 1
            services = rng.sample(ROTATABLE, 2)
            res = run_cli("-c", live.cfg, "certificate", "rotate", "-s", ",".join(services))
            assert res.returncode == 0, f"{where}: {res.stderr}"
            assert leaf_problems(live.node) == [], f"{where}, then rotate {services}"

        # 3. The next `renew` completes the node and leaves nothing behind. Mostly in-process
        #    (the same `renew`, under the same lock: it saves a process start per run); every
        #    fifth run and the last through the CLI, datastore included.
        if run % 5 == 4 or run == RUNS - 1:
            res = run_cli("-c", live.cfg, "renew")
            assert res.returncode == 0, f"{where}: {res.stderr}"
        else:
            renew_at(live.node, FrozenClock()())
        live.reload()
        assert_node_complete(live.node, clock())
        assert strays(live.data) == [], f"{where}: {strays(live.data)}"

    print(f"\nkill -9 fault test, seed {SEED}: {dict(stats)}; work windows {windows}")
    killed = stats["rotate-killed"] + stats["renew-killed"]
    assert killed >= RUNS // 3, f"too few kills landed inside the work: {dict(stats)}"


@pytest.mark.parametrize("attempt", range(int(os.environ.get("RKE2CERTD_RACE_RUNS", "3"))))
def test_two_renews_started_at_once_on_a_fresh_node_make_one_ca_set(
    work_dir: Path, attempt: int
) -> None:
    cfg, _ = write_node_config(work_dir)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rke2certd", "-c", str(cfg), "renew", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
            cwd="/",
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    docs = [json.loads(out) for out, _ in outs]
    # One of them made the CAs and every leaf; the other found them and had nothing to do.
    assert sorted(len(d["changes"]) for d in docs) == [0, 19]
    node = load_node(cfg)
    assert_node_complete(node)
    ca_certs = {p.read_bytes() for p in node.layout.tls.rglob("*-ca.crt")}
    assert len(ca_certs) == 5


def test_rotate_after_a_torn_write_finishes_that_write_before_its_backup(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    """The crash state a kill between the two renames of a key+cert write leaves behind, made by
    hand in the on-disk journal format: the new key is in place, the new cert still a temp, the
    journal names both. A rotate of other services must replay it, not overwrite the journal."""
    res = run_cli("-c", live_node.cfg, "renew")
    assert res.returncode == 0, res.stderr
    layout = live_node.node.layout
    admin = spec_named("client-admin")
    ca_pem = layout.ca_cert("client-ca").read_bytes()
    ca_key = keys.load_key(layout.ca_key("client-ca").read_bytes(), "client-ca.key")
    new_key = keys.new_ec_key()
    new_cert = build.leaf(
        "system:admin",
        ("system:masters",),
        "client",
        (),
        new_key.public_key(),
        load_cert(layout.ca_cert("client-ca")),
        ca_key,
        clock(),
    )
    cert_path, key_path = admin.cert_path(layout), admin.key_path(layout)
    key_temp = key_path.parent / f"{TEMP_MARK}{key_path.name}.0000aaaa"  # already renamed
    cert_temp = cert_path.parent / f"{TEMP_MARK}{cert_path.name}.0000bbbb"
    cert_temp.write_bytes(certs.bundle_pem([new_cert]) + ca_pem)
    cert_temp.chmod(0o644)
    key_path.write_bytes(keys.key_to_pem(new_key))
    journal = [
        {"temp": str(key_temp), "target": str(key_path)},
        {"temp": str(cert_temp), "target": str(cert_path)},
    ]
    (live_node.data / JOURNAL_NAME).write_text(json.dumps(journal))
    assert [str(p) for p in leaf_problems(live_node.node)] == [
        "server/tls/client-admin.crt: does not match its key"
    ]
    assert leaf_problems(live_node.node, overlay=journal_overlay(live_node.data)) == []

    res = run_cli("-c", live_node.cfg, "certificate", "rotate", "-s", "etcd")

    assert res.returncode == 0, res.stderr
    assert leaf_problems(live_node.node) == []
    assert load_cert(cert_path) == new_cert, "the interrupted write was completed, not lost"
    [backup] = [p for p in layout.server.iterdir() if p.name.startswith("tls-")]
    copy = snapshot(backup)
    assert copy["client-admin.crt"][0] == cert_path.read_bytes()
    assert copy["client-admin.key"][0] == key_path.read_bytes()
    assert strays(live_node.data) == []
