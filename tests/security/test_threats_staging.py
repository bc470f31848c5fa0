"""Threats through the watched staging dir, each tried against the real daemon (`rke2certd run`,
real inotify, the embedded SQLite datastore) or, where the attack needs a precise moment, through
the staging path the daemon runs (commands/apply_staged.process_set) on the same real node:

1.  a set owned by another user, changed through a handle kept from before it was renamed in
    (their own CA and a FORCE marker, after the operator's check): refused for its owner;
2.  content changed after the daemon's own checks: what was checked is what is applied;
3.  entries a set must not hold: a file of another owner, a directory writable by group or
    others, a FIFO, a symlink anywhere: refused, the node unchanged;
4.  a set name the file system cannot file as `<name>-<ts>` (239+ bytes), a name that is not
    UTF-8, a name with control characters: applied and filed, the daemon goes on, and a restart
    with such a set waiting reaches READY;
5.  a set renamed away while it is read: handled on the copy, or ignored with a logged reason;
6.  a valid set holding a directory named result.json: saved *and* rolled out, then filed;
7.  the CA files at the set's top level (no tls/): refused as a wrong layout, not "nothing to do";
8.  a huge file, and more refused sets than are worth keeping: `.rejected/` stays bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands import apply_staged as staging
from rke2certd.commands.node_datastore import open_for
from rke2certd.config import load_config
from rke2certd.datastore.base import Datastore
from rke2certd.node.node import Node
from tests.conftest import run_cli
from tests.daemon.support import DaemonNode, DaemonProcess, age_tree
from tests.harness.wait import SAFETY

NOBODY = 65534
TLS_CA = ("server-ca.crt", "server-ca.key")


# --- helpers ----------------------------------------------------------------------------------


def started(node: DaemonNode) -> None:
    node.cli("renew")


def server_ca(node: DaemonNode) -> bytes:
    return (node.data / "server/tls/server-ca.crt").read_bytes()


def shown(name: str) -> str:
    """How result.json and the logs name a set: its bytes, not-UTF-8 ones as \\xNN, control
    characters as \\uNNNN."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def filed(node: DaemonNode) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every filed set's result, by the name it records."""
    out = {}
    for bucket in (".applied", ".rejected"):
        for res in sorted((node.incoming / bucket).glob("*/result.json")):
            doc = json.loads(res.read_text())
            out[doc["name"]] = (res.parent, doc)
    return out


FILED_EVENTS = ("staged_set_applied", "staged_set_unchanged", "staged_set_rejected")


def wait_filed(
    d: DaemonProcess, node: DaemonNode, name: str, timeout: float = SAFETY
) -> tuple[Path, dict[str, Any]]:
    """(filed dir, result.json) once the daemon logged the set as filed."""
    deadline = time.monotonic() + timeout
    while not any(
        e.get("event") in FILED_EVENTS and e.get("staged_set") == shown(name) for e in d.events()
    ):
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited {d.proc.returncode}:\n{d.tail()}")
        assert time.monotonic() < deadline, f"{shown(name)} not filed:\n{d.tail()}"
        time.sleep(0.02)
    return filed(node)[shown(name)]


def chown_tree(path: Path, uid: int) -> None:
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chown(os.path.join(root, n), uid, uid, follow_symlinks=False)
    os.chown(path, uid, uid)


def copy_set(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


@dataclass
class Local:
    """The node's config, Node and datastore in this process: the staging path the daemon runs,
    called at a chosen moment."""

    node: Node
    ds: Datastore
    incoming: Path

    def process(self, name: str) -> staging.StagingOutcome:
        return staging.process_set(self.node, self.incoming, name, datetime.now(UTC), self.ds)

    def server_ca(self) -> bytes:
        from rke2certd.datastore.codec import bootstrap_key_name, passphrase_from_token
        from rke2certd.node.bootstrap_data import configured_token, load_value

        token = configured_token(self.node.cfg, self.node.layout)
        assert token is not None
        password = passphrase_from_token(token)
        kv = self.ds.get(bootstrap_key_name(password))
        assert kv is not None
        return bytes(load_value(password, kv.value)["ServerCA"].content)


@pytest.fixture
def local(node: DaemonNode) -> Iterator[Local]:
    started(node)
    node.incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
    n = Node.from_config(load_config(node.config))
    ds = open_for(n)
    try:
        yield Local(n, ds, node.incoming)
    finally:
        ds.close()


# --- 1. owner, and content changed through a kept handle ---------------------------------------


def test_a_set_of_another_owner_swapped_through_a_kept_handle_is_refused(
    node: DaemonNode,
) -> None:
    """The attack: a user makes (or is handed) the set, keeps directory handles on it, and once
    the operator checked it (`rotate-ca --dry-run`: OK), writes their own CA into it and adds
    FORCE; root renames it into the 0700 staging dir, which the handles do not need to cross."""
    started(node)
    evil = node.custom_root("evil")
    src = node.stage_rotation("hostile")
    chown_tree(src, NOBODY)
    set_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    tls_fd = os.open(src / "tls", os.O_RDONLY | os.O_DIRECTORY)
    try:
        node.cli("certificate", "rotate-ca", "--dry-run", "--path", src)  # the operator's check
        for f in TLS_CA:  # through the handles, after the check
            os.unlink(f, dir_fd=tls_fd)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=tls_fd)
            os.write(fd, (evil / "tls" / f).read_bytes())
            os.fchown(fd, NOBODY, NOBODY)
            os.close(fd)
        fd = os.open("FORCE", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=set_fd)
        os.fchown(fd, NOBODY, NOBODY)
        os.close(fd)
        with node.daemon() as d:
            d.notify.expect("READY")
            before = server_ca(node)
            os.rename(src, node.incoming / "hostile")
            path, result = wait_filed(d, node, "hostile")
            assert path.parent.name == ".rejected" and result["status"] == "rejected", result
            assert any("owned by uid 65534" in r for r in result["reasons"]), result
            assert "chown -R root:root" in (path / "result.txt").read_text()
            assert server_ca(node) == before and not d.events("ca_rotated")
            assert d.stop() == 0
    finally:
        os.close(set_fd)
        os.close(tls_fd)


def test_content_changed_after_the_daemons_checks_is_never_applied(
    node: DaemonNode, local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root-owned set whose files someone still holds open for writing (opened before they
    were chowned): right after the daemon's checks of the set, the holder writes their own CA
    and adds FORCE. What is checked and saved is the copy taken at the checks."""
    evil = node.custom_root("evil")
    src = node.stage_rotation("checked")
    staged = (src / "tls/server-ca.crt").read_bytes()
    held = {f: os.open(src / "tls" / f, os.O_WRONLY) for f in TLS_CA}
    set_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    real = staging.rotate_ca

    def swap_then_check(*args: Any, **kwargs: Any) -> Any:
        for f, fd in held.items():
            os.ftruncate(fd, 0)
            os.pwrite(fd, (evil / "tls" / f).read_bytes(), 0)
        os.close(os.open("FORCE", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=set_fd))
        return real(*args, **kwargs)

    monkeypatch.setattr(staging, "rotate_ca", swap_then_check)
    os.rename(src, local.incoming / "checked")
    try:
        outcome = local.process("checked")
    finally:
        for fd in (*held.values(), set_fd):
            os.close(fd)
    assert outcome.status == "applied" and outcome.force is False, outcome.reasons
    assert local.server_ca() == staged  # the checked bytes, not the swapped ones
    assert outcome.filed_as is not None
    assert (outcome.filed_as / "set/tls/server-ca.crt").read_bytes() == staged
    assert not (outcome.filed_as / "set/FORCE").exists()


# --- 3. entries a set must not hold ---------------------------------------------------------------


def _other_owner(s: Path) -> None:
    os.chown(s / "tls/service.key", NOBODY, NOBODY)


def _group_writable_dir(s: Path) -> None:
    (s / "tls/etcd").chmod(0o775)


def _world_writable_set(s: Path) -> None:
    s.chmod(0o777)


def _fifo(s: Path) -> None:
    os.mkfifo(s / "notes", 0o600)


def _symlink_aside(s: Path) -> None:
    (s / "README").symlink_to("/etc/hostname")


def _socket_dir_owner(s: Path) -> None:
    os.chown(s / "tls", NOBODY, 0)


ODD_ENTRIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "file-of-another-owner": (_other_owner, "tls/service.key is owned by uid 65534"),
    "dir-of-another-owner": (_socket_dir_owner, "tls is owned by uid 65534"),
    "group-writable-dir": (_group_writable_dir, "tls/etcd is a directory writable by group"),
    "world-writable-set": (_world_writable_set, "is a directory writable by group or others"),
    "fifo-aside": (_fifo, "notes is not a regular file"),
    "symlink-aside": (_symlink_aside, "README is a symbolic link"),
}


def test_entries_a_set_must_not_hold_get_it_refused_and_change_nothing(node: DaemonNode) -> None:
    started(node)
    good = node.stage_rotation("good")
    sets = {}
    for case, (spoil, _) in ODD_ENTRIES.items():
        s = copy_set(good, node.staged_dir(case))
        spoil(s)
        sets[case] = s
    with node.daemon() as d:
        d.notify.expect("READY")
        before = server_ca(node)
        for case, s in sets.items():
            os.rename(s, node.incoming / case)
        for case, (_, says) in ODD_ENTRIES.items():
            _path, result = wait_filed(d, node, case)
            assert result["status"] == "rejected", (case, result)
            assert any(says in r for r in result["reasons"]), (case, result["reasons"])
        assert server_ca(node) == before and not d.events("ca_rotated")
        assert d.stop() == 0


# --- 4. names -------------------------------------------------------------------------------------


NAMES = {
    "239-bytes": "n" * 239,
    "255-bytes": "x" * 255,
    "not-utf8": os.fsdecode(b"set-\xff\xfe-\xc3"),
    "control-chars": "set\nwith\ttabs\x1b[31m",
}


@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
def test_no_set_name_stops_the_daemon_or_keeps_it_from_ready(node: DaemonNode, name: str) -> None:
    started(node)
    src = node.stage_rotation("odd-name")
    with node.daemon() as d:
        d.notify.expect("READY")
        before = server_ca(node)
        os.rename(src, node.incoming / name)
        path, result = wait_filed(d, node, name)
        assert (path.parent.name, result["status"]) == (".applied", "applied"), result
        assert len(path.name.encode()) <= 255 and path.name.isprintable()
        assert shown(name) in (path / "result.txt").read_text()
        assert server_ca(node) != before  # saved and rolled out to this node
        # the daemon goes on: the next set is taken too
        nxt = node.stage_rotation("next")
        os.rename(nxt, node.incoming / "next")
        assert wait_filed(d, node, "next")[1]["status"] == "applied"
        assert d.stop() == 0
    # a set with such a name waiting at start (refused: it stages nothing) does not keep the
    # daemon from READY, nor from taking it
    (node.incoming / name).mkdir()
    (node.incoming / name / "notes.txt").write_text("no CA here\n")
    age_tree(node.incoming / name, 60)  # staged while the daemon was down
    with node.daemon() as d:
        d.notify.expect("READY")
        # taken during the start, before READY
        assert [r["status"] for p, r in filed(node).values() if p.parent.name == ".rejected"] == [
            "rejected"
        ]
        assert d.stop() == 0


def test_an_error_no_one_foresaw_in_a_daemon_task_is_logged_and_the_loop_goes_on() -> None:
    """The loop's guard around each task (staging, rescan, rollout ticks) catches every error,
    not only the project's own: the daemon, and the agents' endpoint with it, stay up."""
    from rke2certd.daemon.loop import Daemon

    def boom() -> None:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    Daemon._safe(Daemon.__new__(Daemon), boom)  # no instance state is involved


# --- 5. renamed away while it is read ------------------------------------------------------------


def test_a_set_renamed_away_while_it_is_read_does_not_stop_the_daemon(
    node: DaemonNode, local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rke2certd.commands.rotate_ca as rotate_ca_mod

    src = node.stage_rotation("moving")
    os.rename(src, local.incoming / "moving")
    away = node.staged_dir("moved-away")
    real = rotate_ca_mod.read_staged_dir

    def rename_then_read(*args: Any, **kwargs: Any) -> Any:
        if (local.incoming / "moving").exists():
            os.rename(local.incoming / "moving", away)
        return real(*args, **kwargs)

    monkeypatch.setattr(rotate_ca_mod, "read_staged_dir", rename_then_read)
    outcome = local.process("moving")  # no exception
    assert outcome.status == "applied", outcome.reasons  # on the copy taken at the checks
    assert outcome.filed_as is not None and (outcome.filed_as / "result.json").is_file()
    assert (away / "tls/server-ca.crt").is_file()  # where it was moved to, untouched

    # gone before the daemon could open it: ignored, with a reason in the log
    gone = local.process("never-there")
    assert gone.status == "ignored" and "removed or renamed away" in gone.reasons[0]
    assert not (local.incoming / ".rejected").exists()
    assert list((local.incoming / ".work").iterdir()) == []  # nothing left behind


# --- 6. a set that holds what the result files are called -------------------------------------


def test_a_valid_set_holding_result_json_is_saved_rolled_out_and_filed(node: DaemonNode) -> None:
    started(node)
    src = node.stage_rotation("collides")
    (src / "result.json").mkdir()
    (src / "result.txt").write_text("the operator's own notes\n")
    with node.daemon() as d:
        d.notify.expect("READY")
        before = server_ca(node)
        os.rename(src, node.incoming / "collides")
        path, result = wait_filed(d, node, "collides")
        assert (path.parent.name, result["status"]) == (".applied", "applied"), result
        d.wait_event("restart_needed", reason="staged set collides applied")
        assert server_ca(node) != before  # rolled out to this node
        assert (path / "set/result.json").is_dir()  # the set's own, beside ours
        assert (path / "set/result.txt").read_text() == "the operator's own notes\n"
        assert not (node.incoming / "collides").exists()
        assert not d.events("task_failed")
        assert d.stop() == 0


# --- 7. wrong layout -----------------------------------------------------------------------------


def _flatten(s: Path) -> None:
    for p in (s / "tls").iterdir():
        p.rename(s / p.name)
    (s / "tls").rmdir()


def _nested(s: Path) -> None:
    (s / "tls").rename(s / "inner")
    (s / "tls").mkdir()
    (s / "inner").rename(s / "tls/tls")


@pytest.mark.parametrize("spoil", [_flatten, _nested], ids=["top-level", "tls-in-tls"])
def test_ca_files_outside_tls_are_refused_as_a_wrong_layout(
    node: DaemonNode, spoil: Callable[[Path], None]
) -> None:
    started(node)
    src = node.stage_rotation("flat")
    spoil(src)
    with node.daemon() as d:
        d.notify.expect("READY")
        before = server_ca(node)
        os.rename(src, node.incoming / "flat")
        _path, result = wait_filed(d, node, "flat")
        assert result["status"] == "rejected", result
        text = " ".join(result["reasons"])
        assert "wrong layout" in text and "server-ca.crt" in text and "<set>/tls/" in text, text
        assert "nothing to do" not in text and "equals" not in text
        assert server_ca(node) == before
        assert d.stop() == 0


def test_rotate_ca_on_a_set_without_tls_says_the_layout_is_wrong(node: DaemonNode) -> None:
    """The same rule where the operator runs the check by hand: `rotate-ca --path`."""
    started(node)
    src = node.stage_rotation("flat-cli")
    _flatten(src)
    r = run_cli("-c", node.config, "certificate", "rotate-ca", "--dry-run", "--path", src)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "wrong layout" in r.stderr and "<set>/tls/" in r.stderr, r.stderr
    assert "nothing to do" not in r.stdout


# --- 8. what .rejected/ keeps ---------------------------------------------------------------------


def test_rejected_keeps_no_huge_file_and_a_bounded_number_of_sets(node: DaemonNode) -> None:
    keep = staging.KEEP_SETS[staging.REJECTED]
    started(node)
    huge = node.staged_dir("huge")
    (huge / "tls").mkdir(parents=True)
    with (huge / "tls/server-ca.crt").open("wb") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: costs no disk
    many = []
    for i in range(keep + 3):
        s = node.staged_dir(f"bad-{i:02d}")
        (s / "tls").mkdir(parents=True)
        (s / "tls/server-ca.crt").write_text("not a certificate\n")
        many.append(s)
    with node.daemon() as d:
        d.notify.expect("READY")
        os.rename(huge, node.incoming / "huge")
        path, result = wait_filed(d, node, "huge")
        assert result["status"] == "rejected"
        assert any("over the 1024 KiB limit" in r for r in result["reasons"]), result
        assert any("content was not kept" in r for r in result["reasons"]), result
        assert sorted(p.name for p in path.iterdir()) == ["result.json", "result.txt"]
        for s in many:
            os.rename(s, node.incoming / s.name)
        wait_filed(d, node, many[-1].name)
        rejected = sorted(p.name for p in (node.incoming / ".rejected").iterdir())
        assert len(rejected) == keep, rejected
        assert any(n.startswith(many[-1].name) for n in rejected)  # the newest are kept
        assert d.events("staged_set_pruned")
        assert d.stop() == 0


def test_applied_keeps_the_newest_sets_within_a_total_size(tmp_path: Path) -> None:
    bucket = tmp_path / ".applied"
    bucket.mkdir()
    for i in range(8):
        d = bucket / f"set-{i}-20260101T00000{i}Z"
        (d / "set").mkdir(parents=True)
        (d / "set/blob").write_bytes(b"x" * 1000)
        os.utime(d, (1_000_000 + i, 1_000_000 + i))
    removed = staging.prune(bucket, keep_sets=5, keep_bytes=10_000)
    left = sorted(p.name.split("-")[1] for p in bucket.iterdir())
    assert left == ["3", "4", "5", "6", "7"] and len(removed) == 3
    staging.prune(bucket, keep_sets=5, keep_bytes=2_500)  # two sets fit in the bytes
    assert sorted(p.name.split("-")[1] for p in bucket.iterdir()) == ["6", "7"]
    staging.prune(bucket, keep_sets=5, keep_bytes=10)  # the newest is always kept
    assert [p.name.split("-")[1] for p in bucket.iterdir()] == ["7"]
    assert stat.S_ISDIR((bucket / os.listdir(bucket)[0]).lstat().st_mode)
