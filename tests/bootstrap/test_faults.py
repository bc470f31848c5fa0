"""The datastore lost in the middle of a save: while the first server
creates the bootstrap data, and while `save_rotation` replaces it. Each test loops over attempts
with the fault at a random moment: etcd's members are all killed (SIGKILL) — for the SQLite
default, which cannot be lost, the writing process itself is killed. After each attempt the
store holds no key, the creation lock, the old value or the complete new one, never a part;
the disk holds no CA set or a complete one; and the next run completes.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from rke2certd.commands.bootstrap_write import save_rotation
from rke2certd.commands.renew import renew
from rke2certd.datastore import Datastore, OutcomeUnknown, SQLiteDatastore
from rke2certd.errors import DatastoreError
from rke2certd.files.atomic import JOURNAL_NAME
from tests.conftest import clean_env, run_cli
from tests.harness.seed import rng as seeded_rng
from tests.harness.seed import run_seed

from .support import (
    CA_FIELDS,
    CA_FILES,
    Backend,
    LockWatcher,
    bootstrap_key,
    ca_set,
    load_node,
    node_decrypt,
    openssl_verify_leaves,
    renew_in_process,
)

TOKEN = "K10::server:fault-test-token"
PASSWORD = "fault-test-token"
KEY = bootstrap_key(PASSWORD)
# The random delays come from the run's seed (`--seed`, printed by each test), a stream per test.
SEED = run_seed()


def disk_cas_after_replay(data: Path) -> dict[str, bytes]:
    """The CA files as the interrupted write's journal (if any) will leave them."""
    swap: dict[str, Path] = {}
    journal = data / JOURNAL_NAME
    if journal.exists():
        for entry in json.loads(journal.read_bytes()):
            if Path(entry["temp"]).exists():
                swap[entry["target"]] = Path(entry["temp"])
    out = {}
    for rel in CA_FILES:
        path = data / "server" / rel
        src = swap.get(str(path), path)
        out[rel] = src.read_bytes() if src.exists() else b""
    return out


def stored_files(value: bytes) -> dict[str, bytes]:
    """The CA files of a stored value, decrypted by Node's crypto."""
    doc = json.loads(node_decrypt(PASSWORD, value))
    return {CA_FIELDS[f]: base64.b64decode(doc[f]["Content"]) for f in CA_FIELDS}


def test_datastore_lost_while_the_first_server_creates_the_bootstrap_data(
    fault_backend: Backend,
) -> None:
    backend = fault_backend
    rng = seeded_rng(f"creates-{backend.kind}")
    attempts = 3 if backend.kind == "sqlite" else 2
    outcomes = []
    for attempt in range(attempts):
        backend.wipe()
        cfg, data = backend.node(f"attempt-{attempt}", token=TOKEN)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rke2certd", "-c", str(cfg), "renew"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
            cwd="/",
            text=True,
        )
        # from "as soon as the lock shows" to "about when the save is done", with jitter
        delay = 0.12 * (attempt / (attempts - 1)) * rng.uniform(0.7, 1.1)

        def fault(proc: subprocess.Popen[str] = proc, delay: float = delay) -> None:
            time.sleep(delay)
            if backend.is_etcd:
                backend.down()
            else:
                proc.send_signal(signal.SIGKILL)

        opener: Callable[[], Datastore] = partial(backend.open, None if backend.is_etcd else data)
        watcher = LockWatcher(opener, fault, at_most=5).start()
        _, stderr = proc.communicate(timeout=60)
        watcher.join()
        if backend.is_etcd:
            backend.up()
        outcomes.append((round(delay, 3), watcher.saw_lock, proc.returncode))

        # The store: nothing, the creation lock, or the complete value.
        values = backend.bootstrap_values(data)
        assert set(values) <= {KEY}, values
        disk = disk_cas_after_replay(data)
        assert all(disk.values()) or not any(disk.values()), "half a CA set on disk"
        if values.get(KEY):
            assert stored_files(values[KEY]) == disk
        if proc.returncode == 0:
            assert values.get(KEY) and all(disk.values())
        else:
            assert "Traceback" not in stderr, stderr

        # The next run completes and leaves disk and store in agreement.
        renew_in_process(cfg)
        values = backend.bootstrap_values(data)
        assert list(values) == [KEY]
        assert stored_files(values[KEY]) == ca_set(data)
        if disk[CA_FILES[0]]:  # the CA set written by the interrupted run was kept
            assert ca_set(data) == disk
        openssl_verify_leaves(data)
    print(f"{backend.kind}, seed {SEED}: (delay, saw lock, rc) per attempt: {outcomes}")
    assert any(rc != 0 for *_, rc in outcomes), f"no attempt was interrupted: {outcomes}"


# Runs save_rotation in a process of its own (so that the test can kill it): imports
# and opens the store, says "ready", waits for the go, saves, says "saved".
_SAVE = """
import sys, json
from pathlib import Path
from datetime import UTC, datetime
from rke2certd.config import load_config
from rke2certd.node.node import Node
from rke2certd.commands.node_datastore import open_for
from rke2certd.commands.bootstrap_write import save_rotation
node = Node.from_config(load_config(Path(sys.argv[1])))
new = {k: bytes.fromhex(v) for k, v in json.loads(sys.argv[2]).items()}
with open_for(node) as ds:
    ds.get("/")
    print("ready", flush=True)
    sys.stdin.read(1)
    save_rotation(ds, sys.argv[3], new, datetime.now(UTC))
    print("saved", flush=True)
"""


def _save_losing_etcd(
    backend: Backend, new_files: dict[str, bytes], delay: float | None
) -> tuple[bool, float]:
    """save_rotation in this process; every etcd member killed `delay` seconds in (None: no
    fault). Returns (saved, seconds taken)."""
    fields = {f: new_files[rel] for f, rel in CA_FIELDS.items()}
    with backend.open() as ds:
        ds.get("/")  # connected: the timer measures the save alone
        timer = threading.Timer(delay or 0, backend.down)
        t0 = time.monotonic()
        if delay is not None:
            timer.start()
        try:
            save_rotation(ds, PASSWORD, fields, datetime.now(UTC))
            saved = True
        except DatastoreError as exc:
            assert "cannot reach the datastore" in str(exc) or "may or may not" in str(exc)
            saved = False
        elapsed = time.monotonic() - t0
        if delay is not None:
            timer.join()
    backend.up()
    return saved, elapsed


def _save_killed(cfg: Path, new_files: dict[str, bytes], delay: float | None) -> tuple[bool, float]:
    """save_rotation in a process of its own, killed (SIGKILL) `delay` seconds after the go
    (None: no fault). Returns (saved, seconds from the go to the end)."""
    fields = {f: new_files[rel].hex() for f, rel in CA_FIELDS.items()}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE, str(cfg), json.dumps(fields), PASSWORD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd="/",
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    timer = threading.Timer(delay or 0, proc.send_signal, [signal.SIGKILL])
    t0 = time.monotonic()
    proc.stdin.write("g")
    proc.stdin.flush()
    if delay is not None:
        timer.start()
    saved = proc.stdout.readline().strip() == "saved"
    elapsed = time.monotonic() - t0
    proc.communicate(timeout=60)
    if delay is not None:
        timer.join()
    return saved, elapsed


def test_datastore_lost_during_save_rotation_leaves_the_old_or_the_new_value(
    fault_backend: Backend,
) -> None:
    backend = fault_backend
    cfg, data = backend.node("node", token=TOKEN)
    renew_in_process(cfg)
    old = backend.bootstrap_values(data)[KEY]
    old_files = stored_files(old)
    stage = data.parent / "staged"
    res = run_cli("-c", cfg, "ca", "stage-rotation", "--out", stage)
    assert res.returncode == 0, res.stderr
    new_files = {rel: (stage / rel).read_bytes() for rel in CA_FILES}

    def save(delay: float | None) -> tuple[bool, float]:
        backend.put(KEY, old, data)
        if backend.is_etcd:
            return _save_losing_etcd(backend, new_files, delay)
        return _save_killed(cfg, new_files, delay)

    rng = seeded_rng(f"save-rotation-{backend.kind}")
    saved, duration = save(None)  # how long a save takes here, undisturbed
    assert saved
    attempts = 2 if backend.kind == "etcd3" else 3
    outcomes = []
    for attempt in range(attempts):
        # from "at once" to "about when it would have finished", each with some jitter
        delay = duration * (attempt / (attempts - 1)) * rng.uniform(0.7, 1.1)
        saved, _ = save(delay)
        outcomes.append((round(delay, 4), saved))

        value = backend.bootstrap_values(data)[KEY]
        assert value == old or stored_files(value) == new_files, "neither old nor new"
        if saved:
            assert value != old

        # The next run takes whatever is stored, completely.
        result = renew_in_process(cfg)
        assert ca_set(data) == (old_files if value == old else new_files)
        assert bool(result.extracted) == (value != old)
        openssl_verify_leaves(data)
        if value != old:  # back to the old CA set (older than the next save) for the next try
            for rel, content in old_files.items():
                (data / "server" / rel).write_bytes(content)
    print(f"{backend.kind}, seed {SEED}: (delay, saved) per attempt: {outcomes}")
    assert not all(saved for _, saved in outcomes), f"no attempt was interrupted: {outcomes}"


class AnswerLost(SQLiteDatastore):
    """A real store whose first `times` writes are applied but answered with OutcomeUnknown,
    as when the etcd member that took them dies before replying. (No real etcd can be made
    to lose exactly one answer on cue; this wraps the real SQLite store to do so.)"""

    def __init__(self, path: Path, times: int) -> None:
        super().__init__(path)
        self.lost = times

    def compare_and_swap(
        self, key: str, value: bytes, expected_mod_revision: int, lease: int | None = None
    ) -> bool:
        done = super().compare_and_swap(key, value, expected_mod_revision, lease)
        if done and self.lost > 0:
            self.lost -= 1
            raise OutcomeUnknown(f"the write to {key} may or may not have been applied")
        return done


def test_lost_answers_to_the_lock_and_the_save_are_resolved_by_reading_the_key(
    tmp_path: Path,
) -> None:
    cfg, data = Backend("sqlite", tmp_path).node("node", token=TOKEN)
    node = load_node(cfg)
    with AnswerLost(tmp_path / "store.sqlite", times=2) as ds:  # the lock, then the save
        result = renew(node, datetime.now(UTC), datastore=ds)
        assert result.created_cas and ds.lost == 0
        [kv] = ds.get_prefix("/bootstrap/")
        assert kv.key == KEY and kv.lease is None
        assert stored_files(kv.value) == ca_set(data)
    assert not (data / "server" / "db" / "bootstrap-lock.json").exists()
    openssl_verify_leaves(data)
