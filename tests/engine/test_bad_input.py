"""Bad input: broken PEM, a key where a cert belongs, an incomplete custom CA set, unsafe
directory modes, a non-root user, a full disk. Each gives a clear error (or a re-issue, for a
broken leaf) and loses nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rke2certd.pki.layout import Layout
from tests.conftest import FrozenClock, run_cli, write_node_config

from .conftest import LiveNode, build_live_node
from .helpers import (
    assert_node_complete,
    changed,
    leaf_problems,
    load_cert,
    rel,
    renew_at,
    snapshot,
    spec_named,
    specs_of,
    strays,
)

ADMIN = spec_named("client-admin")
GARBAGE = b"this is not a certificate\n\x00\xff garbage \n"


def assert_clean_failure(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("rke2certd: error: ") or "rke2certd: error: " in res.stderr
    for n in needles:
        assert n.lower() in res.stderr.lower(), res.stderr


# -- broken PEM ------------------------------------------------------------------------------
# These run the CLI on a node built in-process, whose embedded datastore is still empty: the
# CA files on disk are then read and checked as a custom CA set (docs/RKE2-COMPATIBILITY.md §6).


def test_garbage_in_a_ca_file_is_a_clear_error_naming_the_file_and_changes_nothing(
    live_node: LiveNode,
) -> None:
    ca_file = live_node.node.layout.ca_cert("request-header-ca")
    ca_file.write_bytes(GARBAGE)
    before = snapshot(live_node.data)
    res = run_cli("-c", live_node.cfg, "renew")
    assert_clean_failure(res, str(ca_file), "not a PEM file")
    assert changed(before, snapshot(live_node.data)) == set()


def test_truncated_ca_file_is_a_clear_error(live_node: LiveNode) -> None:
    ca_file = live_node.node.layout.ca_cert("etcd/peer-ca")
    ca_file.write_bytes(ca_file.read_bytes()[:200])
    before = snapshot(live_node.data)
    res = run_cli("-c", live_node.cfg, "renew")
    assert_clean_failure(res, str(ca_file), "truncated or corrupt")
    assert changed(before, snapshot(live_node.data)) == set()


def test_garbage_leaf_is_reissued_as_unreadable_keeping_its_key(
    live_node: LiveNode, clock: FrozenClock
) -> None:
    layout = live_node.node.layout
    ADMIN.cert_path(layout).write_bytes(GARBAGE)
    key = ADMIN.key_path(layout).read_bytes()
    before = snapshot(live_node.data)
    res = renew_at(live_node.node, clock())
    [change] = res.changes
    assert change.reasons[0].startswith(f"unreadable ({ADMIN.cert_path(layout)}: not a PEM file")
    assert changed(before, snapshot(live_node.data)) == {
        rel(live_node.node, ADMIN.cert_path(layout))
    }
    assert ADMIN.key_path(layout).read_bytes() == key
    assert_node_complete(live_node.node, clock())


def test_garbage_leaf_through_the_cli_is_reissued(live_node: LiveNode) -> None:
    layout = live_node.node.layout
    ADMIN.cert_path(layout).write_bytes(GARBAGE)
    res = run_cli("-c", live_node.cfg, "renew")
    assert res.returncode == 0, res.stderr
    assert f"issue {ADMIN.cert_path(layout)}: unreadable" in res.stdout
    assert_node_complete(live_node.node)


def test_key_where_a_leaf_cert_belongs_is_reissued_without_printing_the_key(
    live_node: LiveNode,
) -> None:
    layout = live_node.node.layout
    key_pem = ADMIN.key_path(layout).read_bytes()
    ADMIN.cert_path(layout).write_bytes(key_pem)
    res = run_cli("-c", live_node.cfg, "renew", "--log-format", "json")
    assert res.returncode == 0, res.stderr
    assert "private key where a certificate belongs" in res.stdout
    body = key_pem.split(b"\n")[1].decode()
    assert body not in res.stdout and body not in res.stderr
    assert_node_complete(live_node.node)


def test_key_where_a_ca_cert_belongs_is_a_clear_error_without_printing_the_key(
    live_node: LiveNode,
) -> None:
    layout = live_node.node.layout
    key_pem = layout.ca_key("server-ca").read_bytes()
    layout.ca_cert("server-ca").write_bytes(key_pem)
    before = snapshot(live_node.data)
    res = run_cli("-c", live_node.cfg, "renew")
    assert_clean_failure(
        res, str(layout.ca_cert("server-ca")), "private key where a certificate belongs"
    )
    assert key_pem.split(b"\n")[1].decode() not in res.stderr + res.stdout
    assert changed(before, snapshot(live_node.data)) == set()


def test_ca_key_that_does_not_match_its_cert_is_a_clear_error(live_node: LiveNode) -> None:
    layout = live_node.node.layout
    shutil.copy(layout.ca_key("client-ca"), layout.ca_key("server-ca"))
    before = snapshot(live_node.data)
    res = run_cli("-c", live_node.cfg, "renew")
    assert_clean_failure(res, f"{layout.ca_key('server-ca')} does not match")
    assert changed(before, snapshot(live_node.data)) == set()


# -- incomplete custom CA set ----------------------------------------------------------------


def test_incomplete_custom_ca_set_lists_every_missing_file_and_writes_nothing(
    live_node: LiveNode, work_dir: Path
) -> None:
    cfg, data = write_node_config(work_dir / "custom")
    src, dst = live_node.node.layout, Layout(data)
    present = ["server-ca", "client-ca"]
    for name in present:
        for p in (src.ca_cert(name), src.ca_key(name)):
            target = dst.tls / p.relative_to(src.tls)
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copy2(p, target)
    dst.ca_key("client-ca").write_bytes(b"")  # an empty file counts as missing
    before = snapshot(data)
    res = run_cli("-c", cfg, "renew")
    missing = [dst.ca_key("client-ca")] + [
        p
        for name in ("request-header-ca", "etcd/server-ca", "etcd/peer-ca")
        for p in (dst.ca_cert(name), dst.ca_key(name))
    ]
    assert_clean_failure(res, "incomplete custom CA set", *(str(p) for p in missing))
    listed = [ln for ln in res.stderr.splitlines() if ln.startswith("  - ")]
    assert sorted(ln[4:] for ln in listed) == sorted(str(p) for p in missing)
    assert changed(before, snapshot(data)) == set()


# -- unsafe directories ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "mode"),
    [("", 0o777), ("", 0o775), ("server/tls", 0o757), ("server/tls/etcd", 0o777), ("agent", 0o722)],
    ids=["data-dir-world", "data-dir-group", "tls-world", "tls-etcd-world", "agent-world"],
)
def test_group_or_world_writable_directories_are_refused(
    live_node: LiveNode, where: str, mode: int
) -> None:
    target = live_node.data / where
    target.chmod(mode)
    # A leaf to renew, so that a run that is not refused would write.
    ADMIN.cert_path(live_node.node.layout).unlink()
    before = snapshot(live_node.data)
    res = run_cli("-c", live_node.cfg, "renew")
    assert_clean_failure(
        res, "refusing to write private keys", f"{target} is writable by group or others"
    )
    assert changed(before, snapshot(live_node.data)) == set()
    target.chmod(0o700)


# -- not root --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unprivileged:
    python: str
    prefix: list[str]
    env: dict[str, str]


@pytest.fixture(scope="module")
def nobody() -> Iterator[Unprivileged]:
    """Run the CLI as uid/gid 65534 with setpriv. This interpreter may live under /root (0700);
    then its prefix is bind-mounted read-only at a path the user can reach, for this module only."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # Every dependency a command may import (most are imported lazily, on first use).
    imports = "import rke2certd.cli, rke2certd.config.validate, cryptography.x509, structlog"
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", imports], capture_output=True, check=False
    )
    if probe.returncode == 0:
        yield Unprivileged(sys.executable, prefix, {})
        return
    real_prefix = Path(sys.executable).resolve().parents[1]
    mount = Path(tempfile.mkdtemp(prefix="rke2certd-py-"))
    mount.chmod(0o755)
    try:
        subprocess.run(["mount", "--bind", str(real_prefix), str(mount)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        mount.rmdir()
        pytest.skip("cannot make the interpreter reachable for an unprivileged user")
    try:
        python = str(mount / "bin" / Path(sys.executable).resolve().name)
        yield Unprivileged(python, prefix, {"LD_LIBRARY_PATH": str(mount / "lib")})
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()


@pytest.fixture
def public_node(clock: FrozenClock) -> Iterator[LiveNode]:
    """A live node whose config the unprivileged user can read; the data dir is root's, 0700."""
    base = Path(tempfile.mkdtemp(prefix="rke2certd-public-"))
    base.chmod(0o755)
    try:
        live = build_live_node(base, clock)
        live.cfg.chmod(0o644)
        live.data.chmod(0o700)
        yield live
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize(
    "command",
    [
        ["renew"],
        ["renew", "--dry-run"],
        ["certificate", "check"],
        ["certificate", "rotate", "-s", "admin"],
    ],
    ids=["renew", "dry-run", "check", "rotate"],
)
def test_non_root_user_gets_a_clear_permission_error(
    nobody: Unprivileged, public_node: LiveNode, command: list[str]
) -> None:
    before = snapshot(public_node.data, include_runtime=True)
    res = run_cli(
        "-c", public_node.cfg, *command, python=nobody.python, prefix=nobody.prefix, env=nobody.env
    )
    assert_clean_failure(res, "permission denied", str(public_node.data))
    assert changed(before, snapshot(public_node.data, include_runtime=True)) == set()


# -- full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at the end whatever happens."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system up to the last byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_is_a_clear_error_loses_nothing_and_the_next_run_completes(
    small_disk: Path, work_dir: Path, clock: FrozenClock
) -> None:
    # The node's files on the small disk; its embedded datastore elsewhere, so that this test
    # is about the certificate writes (the datastore module has its own tests).
    datastore = f"sqlite://{work_dir / 'datastore.sqlite'}"
    live = build_live_node(small_disk / "node", clock, datastore_endpoint=datastore)
    res = run_cli("-c", live.cfg, "renew")
    assert res.returncode == 0, res.stderr
    # Every leaf needs renewing: the run must write, and fails on its first write.
    renew_at(live.node, clock.at(days=-300), force=frozenset(s.name for s in specs_of(live.node)))
    filler = fill(small_disk)
    before = snapshot(live.data)

    res = run_cli("-c", live.cfg, "renew")

    assert_clean_failure(res, "the disk is full", "nothing was changed")
    assert changed(before, snapshot(live.data)) == set()
    assert leaf_problems(live.node) == []
    assert not strays(live.data), strays(live.data)

    filler.unlink()
    res = run_cli("-c", live.cfg, "renew")
    assert res.returncode == 0, res.stderr
    assert_node_complete(live.node)
    assert all(
        load_cert(s.cert_path(live.node.layout)).not_valid_after_utc > clock.at(days=300)
        for s in specs_of(live.node)
    )
