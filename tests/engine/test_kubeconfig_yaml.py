"""The kubeconfigs rke2certd writes are valid YAML whatever the data dir is called: a path with
`: `, `#`, quotes, spaces or non-ASCII is quoted; RKE2's plain paths are written as before, byte
for byte. kubectl (the real one) reads both."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from rke2certd.commands.renew import kubeconfig_naming

NORMAL = Path("/var/lib/rancher/rke2/server/tls")
ODD_DIRS = [
    "/srv/rke2: data/server/tls",
    "/srv/rke2 #1/server/tls",
    '/srv/it\'s "quoted"/server/tls',
    "/srv/données\\x/server/tls",
    "/srv/- [x], {y}: &z *w !t |>%@`/server/tls",
]

EXPECTED_NORMAL = """apiVersion: v1
clusters:
- cluster:
    server: https://127.0.0.1:6443
    certificate-authority: /var/lib/rancher/rke2/server/tls/server-ca.crt
  name: local
contexts:
- context:
    cluster: local
    namespace: default
    user: user
  name: Default
current-context: Default
kind: Config
preferences: {}
users:
- name: user
  user:
    client-certificate: /var/lib/rancher/rke2/server/tls/client-admin.crt
    client-key: /var/lib/rancher/rke2/server/tls/client-admin.key
"""


def _doc(tls: Path) -> dict[str, object]:
    """The structure kubectl reads, for the files under `tls`."""
    return {
        "apiVersion": "v1",
        "clusters": [
            {
                "cluster": {
                    "server": "https://127.0.0.1:6443",
                    "certificate-authority": str(tls / "server-ca.crt"),
                },
                "name": "local",
            }
        ],
        "contexts": [
            {
                "context": {"cluster": "local", "namespace": "default", "user": "user"},
                "name": "Default",
            }
        ],
        "current-context": "Default",
        "kind": "Config",
        "preferences": {},
        "users": [
            {
                "name": "user",
                "user": {
                    "client-certificate": str(tls / "client-admin.crt"),
                    "client-key": str(tls / "client-admin.key"),
                },
            }
        ],
    }


def _kubeconfig(tls: Path) -> bytes:
    return kubeconfig_naming(
        tls / "server-ca.crt", tls / "client-admin.crt", tls / "client-admin.key"
    )


def test_a_plain_path_is_written_as_rke2_writes_it() -> None:
    out = _kubeconfig(NORMAL)
    assert out.decode() == EXPECTED_NORMAL
    assert yaml.safe_load(out) == _doc(NORMAL)


@pytest.mark.parametrize("tls", ODD_DIRS)
def test_an_odd_data_dir_gives_valid_yaml_with_the_same_structure(tls: str) -> None:
    doc = yaml.safe_load(_kubeconfig(Path(tls)))
    assert doc == _doc(Path(tls))


@pytest.mark.parametrize("tls", [str(NORMAL), *ODD_DIRS])
def test_kubectl_reads_the_paths_back(tmp_path: Path, tls: str) -> None:
    path = tmp_path / "x.kubeconfig"
    path.write_bytes(_kubeconfig(Path(tls)))
    res = subprocess.run(
        ["kubectl", "config", "view", "--kubeconfig", str(path), "--raw", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["clusters"][0]["cluster"]["certificate-authority"] == f"{tls}/server-ca.crt"
    assert doc["users"][0]["user"]["client-certificate"] == f"{tls}/client-admin.crt"
    assert doc["users"][0]["user"]["client-key"] == f"{tls}/client-admin.key"
    assert doc["current-context"] == "Default"
