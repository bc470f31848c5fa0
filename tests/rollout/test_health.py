"""The default health gate's probes against real TLS servers (the simulated cluster's
stand-in, in-process): etcd /health, apiserver /readyz, and the served-certificate check."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from rke2certd.config import Config
from rke2certd.errors import ConfigError
from rke2certd.node.node import Node
from rke2certd.rollout.health import default_probes, etcd_health, readyz, served_cert
from tests.datastore.tls import EtcdPKI, make_etcd_pki
from tests.harness.etcd import free_ports
from tests.harness.sim_tls_server import TLSServer, start_server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> EtcdPKI:
    return make_etcd_pki(tmp_path_factory.mktemp("health-pki"))


@pytest.fixture
def server(pki: EtcdPKI) -> Iterator[tuple[str, TLSServer]]:
    port = free_ports(1)[0]
    s = pki.server
    srv = start_server(port, str(s.cert), str(s.key), str(s.ca))
    yield f"https://127.0.0.1:{port}", srv
    srv.shutdown()
    srv.server_close()


def test_healthy_service_serving_the_file_on_disk(
    pki: EtcdPKI, server: tuple[str, TLSServer]
) -> None:
    url, _ = server
    c = pki.client
    assert etcd_health(url, c.ca, c.cert, c.key, 5) is None
    assert readyz(url, c.ca, c.cert, c.key, 5) is None
    assert served_cert(url, c.ca, pki.server.cert, c.cert, c.key, 5) is None


def test_old_certificate_served(
    pki: EtcdPKI, server: tuple[str, TLSServer], tmp_path: Path
) -> None:
    """The file on disk was replaced but the service still serves the old one."""
    url, _ = server
    on_disk = tmp_path / "server-client.crt"
    shutil.copyfile(pki.client.cert, on_disk)  # any other certificate stands for "the new one"
    problem = served_cert(url, pki.client.ca, on_disk, pki.client.cert, pki.client.key, 5)
    assert problem is not None
    assert "not server-client.crt" in problem and "has not loaded the new certificate" in problem


def test_untrusted_server(pki: EtcdPKI, server: tuple[str, TLSServer]) -> None:
    url, _ = server
    c = pki.client
    problem = etcd_health(url, pki.foreign_ca, c.cert, c.key, 5)
    assert problem is not None and problem.startswith("certificate not trusted")


def test_nothing_listening(pki: EtcdPKI) -> None:
    url = f"https://127.0.0.1:{free_ports(1)[0]}"
    c = pki.client
    assert readyz(url, c.ca, c.cert, c.key, 2) == "connection refused"
    assert served_cert(url, c.ca, pki.server.cert, c.cert, c.key, 2) == "connection refused"


def test_unreadable_expected_file(
    pki: EtcdPKI, server: tuple[str, TLSServer], tmp_path: Path
) -> None:
    url, _ = server
    problem = served_cert(url, pki.client.ca, tmp_path / "missing.crt", None, None, 2)
    assert problem is not None and problem.startswith("cannot read")


@pytest.mark.parametrize(
    ("roles", "names"),
    [
        (
            ["etcd", "control-plane", "agent"],
            [
                "etcd /health",
                "etcd serves the new server-client.crt",
                "apiserver /readyz",
                "apiserver serves the new serving-kube-apiserver.crt",
            ],
        ),
        (
            ["control-plane"],
            ["apiserver /readyz", "apiserver serves the new serving-kube-apiserver.crt"],
        ),
        (["etcd"], ["etcd /health", "etcd serves the new server-client.crt"]),
        (["agent"], ["kubelet serves the new serving-kubelet.crt"]),
    ],
)
def test_default_probes_follow_the_roles_in_phase_order(
    roles: list[str], names: list[str], tmp_path: Path
) -> None:
    cfg = Config.from_mapping(
        {"data-dir": str(tmp_path), "node-name": "n1", "node-ip": ["192.0.2.1"], "roles": roles}
    )
    assert [p.name for p in default_probes(Node.from_config(cfg))] == names


def test_health_endpoints_must_be_https(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an https://host:port URL"):
        Config.from_mapping({"health-etcd-endpoint": "http://127.0.0.1:2379"})
    with pytest.raises(ConfigError, match="argv list"):
        Config.from_mapping({"restart-command": []})
