"""Fuzz: staged sets made by mutating a valid one (`ca stage-rotation`) — truncated files,
flipped bytes, swapped and deleted files, modes and owners, symlinks and FIFOs, nested dirs,
huge files, long and non-UTF-8 names — go through the staging path the daemon runs
(commands/apply_staged.process_set, on a real node with its SQLite datastore), and a part of
them through the real daemon. For every case:

  - nothing raises and the daemon never stops;
  - the set ends filed with its result (a refused set with its reasons), or is ignored;
  - the datastore changes if and only if the set was applied; a mutation that must be refused
    (another owner, a writable entry, a link, a FIFO, a huge file, the CA files out of place)
    is refused; the node's files change only after an applied set (the daemon's renew).

The random seed is the run's (tests/harness/seed.py: fixed unless `--seed N|random`, printed);
RKE2CERTD_FUZZ_CASES=N changes how many cases run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands import apply_staged as staging
from rke2certd.commands.node_datastore import open_for
from rke2certd.config import load_config
from rke2certd.datastore.base import Datastore
from rke2certd.datastore.codec import bootstrap_key_name, passphrase_from_token
from rke2certd.node.bootstrap_data import configured_token
from rke2certd.node.node import Node
from rke2certd.node.staged_copy import MAX_DEPTH
from rke2certd.plan.staged_set import ROTATABLE, SIZE_LIMIT
from tests.daemon.support import DaemonNode, DaemonProcess
from tests.harness.seed import run_seed
from tests.harness.wait import SAFETY

CASES = int(os.environ.get("RKE2CERTD_FUZZ_CASES", "80"))
DAEMON_CASES = max(4, CASES // 8)
OTHER_UIDS = (65534, 1000)


# --- mutations ----------------------------------------------------------------------------------


@dataclass
class Case:
    root: Path  # the set, made outside the staging dir
    name: str  # the name it is staged under
    done: list[str] = field(default_factory=list)
    must_refuse: bool = False

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())

    def dirs(self) -> list[Path]:
        return [self.root, *sorted(p for p in self.root.rglob("*") if p.is_dir())]

    def entries(self) -> list[Path]:
        return [self.root, *sorted(self.root.rglob("*"))]


Mutation = Callable[[random.Random, Case], None]


def _truncate(rng: random.Random, c: Case) -> None:
    f = rng.choice(c.files())
    data = f.read_bytes()
    f.write_bytes(data[: rng.randrange(len(data) + 1)])
    c.done.append(f"truncate {f.name}")


def _flip(rng: random.Random, c: Case) -> None:
    f = rng.choice(c.files())
    data = bytearray(f.read_bytes())
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    f.write_bytes(bytes(data))
    c.done.append(f"flip {f.name}")


def _swap(rng: random.Random, c: Case) -> None:
    a, b = rng.sample(c.files(), 2)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    c.done.append(f"swap {a.name} {b.name}")


def _delete(rng: random.Random, c: Case) -> None:
    f = rng.choice(c.files())
    f.unlink()
    c.done.append(f"delete {f.name}")


def _empty(rng: random.Random, c: Case) -> None:
    f = rng.choice(c.files())
    f.write_bytes(b"")
    c.done.append(f"empty {f.name}")


def _mode(rng: random.Random, c: Case) -> None:
    p = rng.choice(c.entries())
    if p.is_symlink():
        return
    writable = rng.random() < 0.5
    mode = rng.choice([0o664, 0o666, 0o777, 0o646, 0o620] if writable else [0o600, 0o640, 0o400])
    if p.is_dir():
        mode |= 0o700  # a dir we can still list
    p.chmod(mode)
    c.done.append(f"chmod {mode:o} {p.name}")


def _owner(rng: random.Random, c: Case) -> None:
    p = rng.choice(c.entries())
    uid = rng.choice(OTHER_UIDS)
    os.chown(p, uid, rng.choice((0, uid)), follow_symlinks=False)
    c.done.append(f"chown {uid} {p.name}")


def _symlink(rng: random.Random, c: Case) -> None:
    target = rng.choice(["/etc/passwd", "tls/server-ca.crt", "../../..", "nowhere", "/dev/zero"])
    if rng.random() < 0.5 and c.files():
        f = rng.choice(c.files())
        f.unlink()
        f.symlink_to(target)
    else:
        f = rng.choice(c.dirs()) / f"link-{rng.randrange(100)}"
        if f.exists() or f.is_symlink():
            return
        f.symlink_to(target)
    c.done.append(f"symlink {f.name} -> {target}")


def _fifo(rng: random.Random, c: Case) -> None:
    if rng.random() < 0.5 and c.files():
        f = rng.choice(c.files())
        f.unlink()
    else:
        f = rng.choice(c.dirs()) / f"fifo-{rng.randrange(100)}"
        if f.exists():
            return
    os.mkfifo(f, 0o600)
    c.done.append(f"fifo {f.name}")


def _nest_tls(rng: random.Random, c: Case) -> None:
    tls = c.root / "tls"
    if not tls.is_dir() or tls.is_symlink():
        return
    depth = rng.randint(1, 4)
    deep = c.root.joinpath(*(f"d{i}" for i in range(depth)))
    deep.mkdir(parents=True, exist_ok=True)
    tls.rename(deep / "tls")
    c.done.append(f"nest tls {depth} deep")


def _deep_dirs(rng: random.Random, c: Case) -> None:
    depth = rng.choice([2, 5, MAX_DEPTH + 1, 40, 300])
    deep = c.root.joinpath(*(["n"] * depth))
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("deep\n")
    c.done.append(f"nest {depth} dirs")


def _flatten(rng: random.Random, c: Case) -> None:
    tls = c.root / "tls"
    if not tls.is_dir() or tls.is_symlink() or not any(tls.iterdir()):
        return
    for p in list(tls.iterdir()):
        if not (c.root / p.name).exists():
            p.rename(c.root / p.name)
    c.done.append("flatten tls")


def _huge(rng: random.Random, c: Case) -> None:
    f = rng.choice(c.dirs()) / "huge.bin"
    with f.open("wb") as out:
        out.truncate(rng.choice([SIZE_LIMIT + 1, 64 << 20, 3 << 30]))  # sparse
    c.done.append("huge file")


def _odd_file_name(rng: random.Random, c: Case) -> None:
    name = rng.choice([b"\xff\xfe.pem", b"x" * 255, b"new\nline", b"-rf", b"..."])
    target = os.path.join(os.fsencode(rng.choice(c.dirs())), name)
    with open(target, "wb") as f:
        f.write(b"notes\n")
    c.done.append(f"file named {name[:20]!r}")


def _set_name(rng: random.Random, c: Case) -> None:
    c.name = rng.choice(
        [
            "s" * rng.randint(200, 255),
            os.fsdecode(b"set-\xff\xfe" + bytes([rng.randrange(0x80, 0x100)])),
            "set\twith\ncontrol\x1b",
            "-set with spaces-",
            "ünïcødé-set",
        ]
    )
    c.done.append(f"set name {c.name[:20]!r}")


def _force(rng: random.Random, c: Case) -> None:
    (c.root / "FORCE").write_text("")
    c.done.append("FORCE")


def _collide(rng: random.Random, c: Case) -> None:
    (c.root / rng.choice(["result.json", "result.txt", ".applied", "set"])).mkdir(exist_ok=True)
    c.done.append("result-named dir")


MUTATIONS: list[tuple[Mutation, int]] = [
    (_truncate, 3),
    (_flip, 3),
    (_swap, 2),
    (_delete, 2),
    (_empty, 1),
    (_mode, 3),
    (_owner, 2),
    (_symlink, 2),
    (_fifo, 2),
    (_nest_tls, 1),
    (_deep_dirs, 1),
    (_flatten, 1),
    (_huge, 1),
    (_odd_file_name, 1),
    (_set_name, 2),
    (_force, 1),
    (_collide, 1),
]


def mutate(rng: random.Random, base: Path, root: Path, n: int) -> Case:
    shutil.copytree(base, root, symlinks=True)
    c = Case(root, f"case-{n:03d}")
    fns, weights = zip(*MUTATIONS, strict=True)
    for fn in rng.choices(fns, weights, k=rng.choice([0, 1, 1, 2, 2, 3])):
        fn(rng, c)
    if rng.random() < 0.04:  # not a set at all: a file, a FIFO or a link in its place
        shutil.rmtree(root)
        kind = rng.choice(["file", "fifo", "link"])
        if kind == "file":
            root.write_text("not a set\n")
        elif kind == "fifo":
            os.mkfifo(root, 0o600)
        else:
            root.symlink_to(base)
        c.done.append(f"set is a {kind}")
    c.must_refuse = must_refuse(root)
    return c


def must_refuse(root: Path) -> bool:
    """The oracle, from the final tree alone: an entry of another owner, writable by group or
    others, a link, a FIFO, a file over the size limit, dirs nested too deep, or a file with a
    rotatable name out of its place: the set must be refused whatever else it holds."""
    names = {rel.rsplit("/", 1)[-1] for rel in ROTATABLE}
    if root.is_symlink() or not root.is_dir():
        return True
    todo = [(root, 0)]
    while todo:
        d, depth = todo.pop()
        st = d.lstat()
        if st.st_uid != 0 or st.st_mode & 0o022 or depth >= MAX_DEPTH:
            return True
        for p in d.iterdir():
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISDIR(st.st_mode):
                todo.append((p, depth + 1))
            elif (
                not stat.S_ISREG(st.st_mode)
                or st.st_uid != 0
                or st.st_mode & 0o022
                or st.st_size > SIZE_LIMIT
                or (p.name in names and rel not in ROTATABLE)
            ):
                return True
    return False


# --- observing the node -------------------------------------------------------------------------


def stored(ds: Datastore, node: Node) -> bytes:
    token = configured_token(node.cfg, node.layout)
    assert token is not None
    kv = ds.get(bootstrap_key_name(passphrase_from_token(token)))
    assert kv is not None
    return bytes(kv.value)


def node_files(data: Path) -> str:
    """A digest of the node's files (not the datastore, the lock or the staging dir)."""
    h = hashlib.sha256()
    for p in sorted(data.rglob("*")):
        rel = p.relative_to(data).as_posix()
        if rel.startswith(("server/db", "server/rotate-ca")) or p.name == "rke2certd.lock":
            continue
        if p.is_file() and not p.is_symlink():
            h.update(rel.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def check_filed(outcome: staging.StagingOutcome, c: Case) -> None:
    assert outcome.status in ("applied", "unchanged", "rejected", "ignored"), outcome
    if c.must_refuse:
        assert outcome.status == "rejected", (c.done, outcome.status, outcome.reasons)
    if outcome.status == "ignored":
        assert outcome.reasons
        return
    assert outcome.filed_as is not None
    assert outcome.filed_as.parent.name in (".applied", ".rejected")
    assert len(outcome.filed_as.name.encode()) <= 255
    doc = json.loads((outcome.filed_as / "result.json").read_text())
    assert doc["status"] == outcome.status
    (outcome.filed_as / "result.txt").read_text()  # written, and text
    if outcome.status == "rejected":
        assert doc["reasons"], doc


@pytest.fixture
def seed() -> int:
    s = run_seed()
    print(f"\nstaging fuzz: seed {s} (--seed {s} replays it)")
    return s


@dataclass
class Fuzzed:
    node: DaemonNode
    base: Path  # a valid set (`ca stage-rotation`) the cases are made from


@pytest.fixture
def fuzzed(node: DaemonNode) -> Iterator[Fuzzed]:
    node.cli("renew")
    node.incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
    yield Fuzzed(node, node.stage_rotation("base"))


# --- the runs ----------------------------------------------------------------------------------


def test_fuzz_staged_sets_through_the_staging_path(fuzzed: Fuzzed, seed: int) -> None:
    rng = random.Random(seed)
    node = fuzzed.node
    n = Node.from_config(load_config(node.config))
    ds = open_for(n)
    counts: dict[str, int] = {}
    try:
        original = stored(ds, n)
        key = bootstrap_key_name(passphrase_from_token(configured_token(n.cfg, n.layout) or ""))
        files_before = node_files(node.data)
        for i in range(CASES):
            c = mutate(rng, fuzzed.base, node.staged_dir(f"fuzz-{i:03d}"), i)
            os.rename(c.root, node.incoming / c.name)
            before = stored(ds, n)
            try:
                outcome = staging.process_set(n, node.incoming, c.name, datetime.now(UTC), ds)
            except Exception as exc:
                raise AssertionError(f"case {i} {c.done} raised {exc!r} (seed {seed})") from exc
            check_filed(outcome, c)
            changed = stored(ds, n) != before
            assert changed == (outcome.status == "applied"), (i, c.done, outcome.status)
            assert not os.path.lexists(node.incoming / c.name), (i, c.done)
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
            if changed:  # back to the CAs the base set cross-signs
                ds.put(key, original)
        assert node_files(node.data) == files_before  # no renew here: the node never changes
        assert list((node.incoming / ".work").iterdir()) == []
    finally:
        ds.close()
    print(f"staging fuzz: {CASES} cases through the staging path, seed {seed}: {counts}")


def test_fuzz_staged_sets_through_the_real_daemon(fuzzed: Fuzzed, seed: int) -> None:
    rng = random.Random(seed + 1)
    node = fuzzed.node
    n = Node.from_config(load_config(node.config))
    counts: dict[str, int] = {}
    with node.daemon() as d:
        d.notify.expect("READY")
        ds = open_for(n)
        try:
            for i in range(DAEMON_CASES):
                c = mutate(rng, fuzzed.base, node.staged_dir(f"daemon-{i:03d}"), i)
                before, files = stored(ds, n), node_files(node.data)
                seen = len(d.events())
                os.rename(c.root, node.incoming / c.name)
                event = wait_outcome(d, seen, i, c)
                status = event["event"].removeprefix("staged_set_")
                if c.must_refuse:
                    assert status == "rejected", (i, c.done, event)
                changed = stored(ds, n) != before
                assert changed == (status == "applied"), (i, c.done, event)
                if status == "applied":
                    why = f"staged set {event['staged_set']} applied"
                    d.wait_event("restart_needed", reason=why)  # renewed: the node changed
                else:
                    assert node_files(node.data) == files, (i, c.done, event)
                counts[status] = counts.get(status, 0) + 1
            assert d.proc.poll() is None and not d.events("task_failed")
            assert d.stop() == 0
        finally:
            ds.close()
    # sets waiting at start, mutated the same way: the daemon still reaches READY
    for i in range(3):
        c = mutate(rng, fuzzed.base, node.staged_dir(f"start-{i}"), 100 + i)
        os.rename(c.root, node.incoming / c.name)
    with node.daemon() as d:
        d.notify.expect("READY")
        assert d.stop() == 0
    print(f"staging fuzz: {DAEMON_CASES} cases through the real daemon, seed {seed}: {counts}")


def wait_outcome(d: DaemonProcess, seen: int, i: int, c: Case) -> dict[str, Any]:
    deadline = time.monotonic() + SAFETY
    while True:
        for e in d.events()[seen:]:
            if str(e.get("event", "")).startswith("staged_set_") and e["event"] not in (
                "staged_set_pruned",
                "staged_set_check_failed",
                "staged_set_not_removed",
            ):
                return e
        assert d.proc.poll() is None, f"case {i} {c.done}: daemon exited:\n{d.tail()}"
        assert time.monotonic() < deadline, f"case {i} {c.done} not filed:\n{d.tail()}"
        time.sleep(0.02)
