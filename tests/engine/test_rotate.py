"""`certificate rotate`: back up first, then new keys and certs for exactly the chosen services,
the restart markers RKE2 reads, and refusals that change nothing."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_node_config

from .conftest import LiveNode
from .helpers import (
    Snapshot,
    assert_node_complete,
    changed,
    leaf_problems,
    public_der_of_key,
    snapshot,
)

# docs/RKE2-COMPATIBILITY.md §3/§4: the leaf files (under <data>, no extension) of each service.
SERVICE_FILES = {
    "admin": ["server/tls/client-admin"],
    "supervisor": ["server/tls/client-supervisor"],
    "controller-manager": [
        "server/tls/client-controller",
        "server/tls/kube-controller-manager/kube-controller-manager",
    ],
    "scheduler": ["server/tls/client-scheduler", "server/tls/kube-scheduler/kube-scheduler"],
    "api-server": ["server/tls/client-kube-apiserver", "server/tls/serving-kube-apiserver"],
    "kube-proxy": ["server/tls/client-kube-proxy", "agent/client-kube-proxy"],
    "rke2-controller": ["server/tls/client-rke2-controller", "agent/client-rke2-controller"],
    "cloud-controller": ["server/tls/client-rke2-cloud-controller"],
    "auth-proxy": ["server/tls/client-auth-proxy"],
    "etcd": [
        "server/tls/etcd/client",
        "server/tls/etcd/server-client",
        "server/tls/etcd/peer-server-client",
    ],
    "kubelet": ["agent/client-kubelet", "agent/serving-kubelet"],
    "rke2-server": [],  # the supervisor's dynamic cert: only a marker file
}


@pytest.fixture
def settled(live_node: LiveNode) -> LiveNode:
    """A live node the CLI has run on once (so its first-run files exist before any snapshot)."""
    res = run_cli("-c", live_node.cfg, "renew")
    assert res.returncode == 0, res.stderr
    return live_node


def files_of(services: list[str]) -> set[str]:
    return {f"{f}{ext}" for s in services for f in SERVICE_FILES[s] for ext in (".crt", ".key")}


def backups(data: Path) -> list[Path]:
    return sorted(
        p for p in (data / "server").iterdir() if re.fullmatch(r"tls-\d+(\.\d+)?", p.name)
    )


def rotate(node: LiveNode, *args: str) -> tuple[str, Path]:
    """Run `certificate rotate ARGS`; return its stdout and the one backup dir it made."""
    had = set(backups(node.data))
    started = int(datetime.now(UTC).timestamp())
    res = run_cli("-c", node.cfg, "certificate", "rotate", *args)
    ended = int(datetime.now(UTC).timestamp())
    assert res.returncode == 0, res.stderr
    [backup] = [b for b in backups(node.data) if b not in had]
    assert started <= int(backup.name.split("-")[1].split(".")[0]) <= ended
    return res.stdout, backup


def assert_rotated_exactly(
    node: LiveNode, before: Snapshot, services: list[str], backup: Path
) -> None:
    after = snapshot(node.data)
    rotated = files_of(services)
    backup_rel = str(backup.relative_to(node.data)) + "/"
    markers = {"force-restart"} | (
        {"server/tls/dynamic-cert-regenerate"} if "rke2-server" in services else set()
    )
    outside_backup = {p for p in changed(before, after) if not p.startswith(backup_rel)}
    assert outside_backup == rotated | markers
    for f in {f for s in services for f in SERVICE_FILES[s]}:
        key = f + ".key"
        assert public_der_of_key(node.data / key) != public_der_of_key(
            backup_file(node, backup, key)
        ), f"{key} must be a new key"
    problems = leaf_problems(node.node)
    assert not problems, problems
    assert_node_complete(node.node)


def backup_file(node: LiveNode, backup: Path, rel: str) -> Path:
    """Where the backup keeps `rel`: server/tls/X -> <backup>/X, agent/X -> <backup>/agent/X."""
    if rel.startswith("server/tls/"):
        return backup / rel.removeprefix("server/tls/")
    return backup / "agent" / rel.removeprefix("agent/")


def assert_backup_holds(
    node: LiveNode, before: Snapshot, backup: Path, services: list[str]
) -> None:
    """The backup holds every file server/tls had (same bytes, keys 0600) and the rotated agent
    files under its agent/ subfolder."""
    expected = {rel: data for rel, (data, _, _) in before.items() if rel.startswith("server/tls/")}
    expected |= {rel: before[rel][0] for rel in files_of(services) if rel.startswith("agent/")}
    for rel, data in expected.items():
        copy = backup_file(node, backup, rel)
        assert copy.read_bytes() == data, rel
        mode = copy.stat().st_mode & 0o777
        assert mode == (0o600 if rel.endswith(".key") else before[rel][2]), f"{rel}: {mode:o}"
    in_backup = {str(p.relative_to(backup)) for p in backup.rglob("*") if p.is_file()}
    assert len(in_backup) == len(expected)
    assert backup.stat().st_mode & 0o777 == 0o700


def test_rotating_one_service_renews_its_keys_and_certs_and_nothing_else(settled: LiveNode) -> None:
    before = snapshot(settled.data)
    out, backup = rotate(settled, "-s", "admin")
    assert_rotated_exactly(settled, before, ["admin"], backup)
    assert_backup_holds(settled, before, backup, ["admin"])
    assert not (backup / "agent").exists()
    assert (settled.data / "force-restart").is_file()
    assert not (settled.data / "server/tls/dynamic-cert-regenerate").exists()
    assert f"backed up the certificates to {backup}" in out
    assert "restart rke2-server" in out


@pytest.mark.parametrize(
    "flags",
    [["-s", "etcd,kubelet"], ["-s", "etcd", "-s", "kubelet"]],
    ids=["comma-list", "repeated-flag"],
)
def test_rotating_several_services_renews_exactly_those(
    settled: LiveNode, flags: list[str]
) -> None:
    before = snapshot(settled.data)
    _, backup = rotate(settled, *flags)
    assert_rotated_exactly(settled, before, ["etcd", "kubelet"], backup)
    assert_backup_holds(settled, before, backup, ["etcd", "kubelet"])
    assert sorted(p.name for p in (backup / "agent").iterdir()) == [
        "client-kubelet.crt",
        "client-kubelet.key",
        "serving-kubelet.crt",
        "serving-kubelet.key",
    ]


def test_service_with_server_and_agent_files_rotates_both_and_backs_up_agent_files_apart(
    settled: LiveNode,
) -> None:
    before = snapshot(settled.data)
    _, backup = rotate(settled, "-s", "kube-proxy")
    assert_rotated_exactly(settled, before, ["kube-proxy"], backup)
    # Same file name in server/tls and agent: both kept, the agent's in its own subfolder.
    assert (backup / "client-kube-proxy.crt").read_bytes() == before[
        "server/tls/client-kube-proxy.crt"
    ][0]
    assert (backup / "agent/client-kube-proxy.crt").read_bytes() == before[
        "agent/client-kube-proxy.crt"
    ][0]


def test_rotating_all_services_renews_every_leaf_but_no_ca(settled: LiveNode) -> None:
    before = snapshot(settled.data)
    out, backup = rotate(settled)
    services = list(SERVICE_FILES)
    assert_rotated_exactly(settled, before, services, backup)
    assert_backup_holds(settled, before, backup, services)
    for rel in settled.node.layout.ca_files():
        name = str(rel.relative_to(settled.data))
        assert snapshot(settled.data)[name] == before[name], "CAs are not rotated"
    assert (settled.data / "server/tls/dynamic-cert-regenerate").is_file()
    assert "server/tls/dynamic-cert-regenerate" in out
    assert len(list((backup / "agent").iterdir())) == 8


def test_rke2_server_alone_only_asks_for_a_new_supervisor_cert(settled: LiveNode) -> None:
    before = snapshot(settled.data)
    _, backup = rotate(settled, "-s", "rke2-server")
    assert_rotated_exactly(settled, before, ["rke2-server"], backup)


def test_each_rotation_keeps_its_own_backup(settled: LiveNode) -> None:
    _, first = rotate(settled, "-s", "admin")
    _, second = rotate(settled, "-s", "admin")
    assert first != second and first.is_dir() and second.is_dir()


def test_unknown_service_changes_nothing(settled: LiveNode) -> None:
    before = snapshot(settled.data, include_runtime=True)
    res = run_cli("-c", settled.cfg, "certificate", "rotate", "-s", "admin,kube-nonsense")
    assert res.returncode != 0
    assert "service kube-nonsense is not recognized" in res.stderr
    assert "Traceback" not in res.stderr
    assert changed(before, snapshot(settled.data, include_runtime=True)) == set()


# An agent-only node gets its certificates through a server: without one configured, rotate and
# renew must stop with an error that says so (the wording changed when agent support landed).
NEEDS_A_SERVER = re.compile(r"needs a server|signed by a server|does not know its servers")


def test_rotate_on_an_agent_only_node_needs_a_server_and_changes_nothing(
    live_node: LiveNode, work_dir: Path
) -> None:
    cfg, data = write_node_config(work_dir / "agent-node", roles=["agent"])
    shutil.copytree(live_node.data / "agent", data / "agent")
    before = snapshot(data)
    res = run_cli("-c", cfg, "certificate", "rotate", "-s", "kubelet")
    assert res.returncode != 0
    assert NEEDS_A_SERVER.search(res.stderr), res.stderr
    assert "Traceback" not in res.stderr
    assert changed(before, snapshot(data)) == set(), "nothing changed, not even a backup"


def test_renew_on_an_agent_only_node_needs_a_server(work_dir: Path) -> None:
    cfg, data = write_node_config(work_dir, roles=["agent"])
    res = run_cli("-c", cfg, "renew")
    assert res.returncode != 0
    assert NEEDS_A_SERVER.search(res.stderr), res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(data) == {}
