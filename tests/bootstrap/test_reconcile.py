"""Disk vs datastore at `renew` (docs/RKE2-COMPATIBILITY.md §6): a missing file is written back,
an equal one is left alone, a different one takes the datastore's copy unless it is at
least 3 s newer than the stored Timestamp, which stops with an error and writes nothing; an
empty tls/ or tls/etcd/ gets everything back.

Every test starts from a copy of one node made earlier in the module (mtimes kept) and its
bootstrap value; the stored Timestamps are read with Node's crypto, not rke2certd's codec.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rke2certd.node.bootstrap_data import read_disk
from rke2certd.pki.layout import Layout
from rke2certd.plan.reconcile import DiskFile, Stored, reconcile
from tests.conftest import run_cli

from .support import (
    CA_FIELDS,
    CA_FILES,
    Backend,
    bootstrap_key,
    ca_set,
    changed,
    node_decrypt,
    openssl_verify_leaves,
    renew_in_process,
    tree,
)

SLACK_NS = 3_000_000_000
_GO_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


def go_time_ns(text: str) -> int:
    m = _GO_TIME.fullmatch(text)
    assert m, text
    seconds = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1_000_000_000 + int((m.group(2) or "").ljust(9, "0"))


@dataclass(frozen=True)
class Template:
    data: Path
    password: str
    value: bytes
    stamps: dict[str, int]  # file under server/ -> stored Timestamp (Unix ns)


@pytest.fixture(scope="module")
def templates() -> dict[str, Template]:
    return {}


@dataclass
class Seeded:
    backend: Backend
    cfg: Path
    data: Path
    template: Template

    def path(self, rel: str) -> Path:
        return self.data / "server" / rel

    def snapshot(self) -> tuple[dict[str, tuple[bytes, int, int]], dict[str, tuple[bytes, int]]]:
        return tree(self.data), self.backend.dump(self.data)


@pytest.fixture
def seeded(backend: Backend, templates: dict[str, Template]) -> Seeded:
    """A complete server node on `backend`, a copy of the module's template node."""
    if backend.kind not in templates:
        cfg, data = backend.node("template", node_name="node")
        renew_in_process(cfg)
        password = (data / "server" / "token").read_text().strip().rsplit(":", 1)[1]
        value = backend.bootstrap_values(data)[bootstrap_key(password)]
        doc = json.loads(node_decrypt(password, value))
        stamps = {CA_FIELDS[f]: go_time_ns(doc[f]["Timestamp"]) for f in CA_FIELDS}
        templates[backend.kind] = Template(data, password, value, stamps)
    template = templates[backend.kind]
    cfg, data = backend.node("node")
    shutil.copytree(template.data, data)  # copy2: mtimes kept to the nanosecond
    if backend.is_etcd:
        backend.put(bootstrap_key(template.password), template.value)
    settle = renew_in_process(cfg)  # only the kubeconfigs, which name the data dir, change
    assert not settle.changes and not settle.extracted
    return Seeded(backend, cfg, data, template)


def original(node: Seeded, rel: str) -> bytes:
    return (node.template.data / "server" / rel).read_bytes()


def test_missing_ca_file_is_written_back_from_the_datastore(seeded: Seeded) -> None:
    seeded.path("tls/client-ca.key").unlink()
    before = tree(seeded.data)
    result = renew_in_process(seeded.cfg)
    assert result.extracted == ["ClientCAKey"]
    assert seeded.path("tls/client-ca.key").read_bytes() == original(seeded, "tls/client-ca.key")
    assert seeded.path("tls/client-ca.key").stat().st_mode & 0o7777 == 0o600
    # nothing else changed: the key is the one the leaves were signed with
    assert changed(before, tree(seeded.data)) == {"server/tls/client-ca.key"}


def test_equal_files_are_left_untouched_with_their_mtimes(seeded: Seeded) -> None:
    disk, store = seeded.snapshot()
    result = renew_in_process(seeded.cfg)
    assert result.extracted == [] and result.changes == [] and result.token_files == []
    assert seeded.snapshot() == (disk, store)


@pytest.mark.parametrize("newer", ["older", "newer-by-<3s"])
def test_different_file_not_3s_newer_takes_the_datastore_copy(seeded: Seeded, newer: str) -> None:
    """Not 3 s newer as RKE2 counts (whole Unix seconds): the last nanosecond of the second
    two seconds after the stored one."""
    rel = "tls/request-header-ca.crt"
    path = seeded.path(rel)
    path.write_bytes(original(seeded, "tls/server-ca.crt"))  # a CA file, but the wrong one
    stored = seeded.template.stamps[rel]
    second = 10**9
    stamp = stored - 60 * second if newer == "older" else stored // second * second + SLACK_NS - 1
    os.utime(path, ns=(stamp, stamp))
    result = renew_in_process(seeded.cfg)
    assert result.extracted == ["RequestHeaderCA"]
    assert path.read_bytes() == original(seeded, rel)
    assert ca_set(seeded.data) == ca_set(seeded.template.data)


def test_different_files_3s_newer_stop_renew_naming_them_and_write_nothing(
    seeded: Seeded,
) -> None:
    edited = ["tls/client-ca.crt", "tls/etcd/peer-ca.key"]
    for rel in edited:
        path = seeded.path(rel)
        path.write_bytes(path.read_bytes().replace(b"-----\n", b"-----\n\n", 1))
        stamp = seeded.template.stamps[rel] + SLACK_NS  # exactly at the limit: still newer
        os.utime(path, ns=(stamp, stamp))
    disk, store = seeded.snapshot()

    res = run_cli("-c", seeded.cfg, "renew")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "newer than the datastore's copy" in res.stderr
    for rel in edited:
        assert str(seeded.path(rel)) in res.stderr
    assert "rke2certd certificate rotate-ca --path" in res.stderr  # the way out, both of them
    assert "move these files away" in res.stderr
    untouched = [seeded.path(rel) for rel in CA_FILES if rel not in edited]
    assert str(untouched[0]) not in res.stderr
    assert seeded.snapshot() == (disk, store)


def _check_restored(seeded: Seeded) -> None:
    assert ca_set(seeded.data) == ca_set(seeded.template.data)
    for rel in CA_FILES:
        mode = seeded.path(rel).stat().st_mode & 0o7777
        assert mode == (0o644 if rel.endswith(".crt") else 0o600), rel
    openssl_verify_leaves(seeded.data)


def test_empty_tls_dir_gets_every_ca_file_back_and_new_leaves(seeded: Seeded) -> None:
    tls = seeded.data / "server" / "tls"
    shutil.rmtree(tls)
    tls.mkdir(mode=0o700)
    result = renew_in_process(seeded.cfg)
    assert sorted(result.extracted) == sorted(CA_FIELDS)
    _check_restored(seeded)


def test_empty_tls_etcd_dir_restores_everything_and_leaves_other_ca_files_alone(
    seeded: Seeded,
) -> None:
    etcd = seeded.data / "server" / "tls" / "etcd"
    for p in etcd.iterdir():
        p.unlink()
    before = tree(seeded.data)
    result = renew_in_process(seeded.cfg)
    assert set(result.extracted) == set(CA_FIELDS)  # a full restore, as upstream
    _check_restored(seeded)
    after = tree(seeded.data)
    for rel in CA_FILES:
        if not rel.startswith("tls/etcd/"):
            assert after["server/" + rel] == before["server/" + rel], rel  # same bytes, mtime
    reissued = {c.path.name for c in result.changes}
    assert {"client.crt", "server-client.crt", "peer-server-client.crt"} <= reissued


def test_reconcile_compares_whole_seconds_as_rke2_does(tmp_path: Path) -> None:
    """The pure rule at the 3 s limit, as RKE2 judges it: whole Unix seconds of the file's mtime
    and of the stored Timestamp (Go's `Time.Unix()`), so what counts is which seconds the two
    fall in, not the nanoseconds between them; and `read_disk` keeps st_mtime_ns whole."""
    s = 1_000_000_000
    stored = 1_700_000_000 * s + 900_000_000  # x.9 s
    entry = {"ServerCA": Stored(b"new", stored)}
    paths = {"ServerCA": "tls/server-ca.crt"}

    def judged(mtime_ns: int) -> str:
        plan = reconcile(entry, {"ServerCA": DiskFile(b"old", mtime_ns)}, paths, False)
        assert bool(plan.writes) != bool(plan.conflicts)
        return "write" if plan.writes else "stop"

    second = stored // s * s
    assert judged(second + 3 * s - 1) == "write"  # 2.1 s newer, but only 2 whole seconds on
    assert judged(second + 3 * s) == "stop"  # 2.1 s newer and 3 whole seconds on: RKE2 stops
    assert judged(stored + SLACK_NS) == "stop"
    assert judged(second) == "write"  # 0.9 s older
    from_round = 1_700_000_000 * s  # x.0 s
    entry["ServerCA"] = Stored(b"new", from_round)
    assert judged(from_round + 3 * s - 1) == "write"  # 2.999999999 s newer
    assert judged(from_round + 3 * s) == "stop"

    layout = Layout(tmp_path)
    path = layout.server / "tls" / "server-ca.crt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    os.utime(path, ns=(stored, stored))
    disk = read_disk(layout)["ServerCA"]
    assert disk is not None and disk.mtime_ns == stored
