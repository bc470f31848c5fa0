"""The startup hook (`renew --offline-ok`, ExecStartPre= of rke2-server) on RKE2 nodes: it uses
RKE2's datastore (a real etcd here), creates nothing before RKE2's first start, and lets RKE2
start whenever its datastore is not up yet; it fails only with a reason worth stopping for."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rke2certd.errors import ConfigError
from rke2certd.pki.join_token import ca_hash, format_token
from tests.bootstrap.support import tree
from tests.conftest import run_cli
from tests.harness.etcd import EtcdCluster, free_ports

from .conftest import etcd_client, make_rke2_node, wipe

pytestmark = pytest.mark.etcd


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


# -- before RKE2's first start: nothing to do, nothing created ---------------------------------


@pytest.mark.parametrize(
    "rke2",
    [
        {},  # a fresh first server: RKE2 will create the CA set
        {"server": "https://127.0.0.1:9"},  # a joining server: RKE2 will fetch it
        {"server": "https://127.0.0.1:9", "disable-etcd": True},  # control-plane only
        # datastore-endpoint pointed at the embedded etcd by hand, with its client files
        {
            "datastore-endpoint": "https://127.0.0.1:9",
            "datastore-cafile": "/nonexistent/ca",
            "datastore-certfile": "/nonexistent/c",
            "datastore-keyfile": "/nonexistent/k",
        },
    ],
    ids=["first-server", "joining-server", "control-plane-only", "endpoint-by-hand"],
)
@pytest.mark.parametrize("args", [("renew", "--offline-ok"), ("renew",), ("renew", "--dry-run")])
def test_before_rke2_first_start_the_hook_passes_and_creates_nothing(
    tmp_path: Path, rke2: dict[str, object], args: tuple[str, ...]
) -> None:
    node = make_rke2_node(tmp_path / "n", seed=None, rke2=rke2)
    res = node.cli(*args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("nothing to renew: RKE2 has not started on this node yet")
    assert "renew_skipped" in res.stderr
    assert not node.data.exists(), f"created: {_files(node.data)}"
    doc = json.loads(node.cli("renew", "-o", "json").stdout)
    assert doc["skipped"].startswith("RKE2 has not started") and doc["changes"] == []


# -- RKE2 has run: its datastore -------------------------------------------------------------


def test_embedded_etcd_with_the_node_client_files(
    tmp_path: Path, seed: Path, etcd_https: EtcdCluster
) -> None:
    wipe(etcd_https, seed)
    node = make_rke2_node(tmp_path / "n", seed=seed, health_etcd_endpoint=etcd_https.client_url(0))
    with etcd_client(etcd_https, node.data) as ds:
        node.started(ds)
        before = {kv.key: kv.value for kv in ds.get_prefix("/bootstrap/")}
    cas = {p: p.read_bytes() for p in (node.layout.tls).glob("*-ca.*")}
    res = node.cli("renew", "--offline-ok")
    assert res.returncode == 0, res.stderr
    assert not (node.layout.server / "db" / "rke2certd.sqlite").exists(), "never its own store"
    assert {p: p.read_bytes() for p in cas} == cas
    with etcd_client(etcd_https, node.data) as ds:
        assert {kv.key: kv.value for kv in ds.get_prefix("/bootstrap/")} == before
    status = node.cli("status")
    assert status.returncode == 0, status.stderr
    expected = f"DATASTORE: RKE2's embedded etcd, this node's member ({etcd_https.client_url(0)})"
    assert status.stdout.splitlines()[0] == expected
    assert json.loads(node.cli("status", "-o", "json").stdout)["datastore"] == expected[11:]


def test_external_etcd_over_http_needs_no_client_files(
    tmp_path: Path, seed: Path, etcd_http: EtcdCluster
) -> None:
    wipe(etcd_http, None)
    node = make_rke2_node(
        tmp_path / "n", seed=seed, rke2={"datastore-endpoint": etcd_http.endpoint}
    )
    etcd = node.layout.tls / "etcd"
    for name in ("client.crt", "client.key", "server-ca.crt"):
        (etcd / name).rename(etcd / f"{name}.away")  # none of them is needed over http
    with etcd_client(etcd_http, None) as ds:
        node.started(ds)
    status = node.cli("status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"DATASTORE: RKE2's external etcd at {etcd_http.endpoint}")
    for name in ("client.crt", "client.key", "server-ca.crt"):
        (etcd / f"{name}.away").rename(etcd / name)
    res = node.cli("renew")
    assert res.returncode == 0, res.stderr
    assert not (node.layout.server / "db").exists()


def test_a_sql_datastore_is_refused_but_the_hook_lets_rke2_start(
    tmp_path: Path, seed: Path
) -> None:
    node = make_rke2_node(
        tmp_path / "n", seed=seed, rke2={"datastore-endpoint": "postgres://rke2:pw1@db/rke2"}
    )
    (node.layout.server / "token").write_text(node.token + "\n")
    before = tree(node.data, include_db=True)
    res = node.cli("renew")
    assert res.returncode == ConfigError.exit_code  # a configuration error (78)
    assert "RKE2's datastore is not one rke2certd can share" in res.stderr
    assert "postgres://..." in res.stderr and "pw1" not in res.stderr
    hook = node.cli("renew", "--offline-ok")
    assert hook.returncode == 0, hook.stderr
    assert "kine" in hook.stderr and "RKE2 starts without rke2certd's renewal" in hook.stderr
    assert tree(node.data, include_db=True) == before


def test_embedded_etcd_down_the_hook_renews_from_disk(tmp_path: Path, seed: Path) -> None:
    """RKE2 is down, so is its etcd: the hook goes on from the CA set on disk."""
    [port] = free_ports(1)
    node = make_rke2_node(
        tmp_path / "n", seed=seed, health_etcd_endpoint=f"https://127.0.0.1:{port}"
    )
    (node.layout.server / "token").write_text(node.token + "\n")
    cas = {p: p.read_bytes() for p in node.layout.tls.rglob("*-ca.*")}
    res = node.cli("renew", "--offline-ok")
    assert res.returncode == 0, res.stderr
    assert "datastore_unreachable" not in res.stderr  # RKE2 down: the normal case, no event
    assert {p: p.read_bytes() for p in cas} == cas
    idle = node.cli("renew", "--offline-ok")
    assert (idle.returncode, idle.stderr) == (0, ""), "an idle start logs nothing"
    assert not (node.layout.server / "db").exists()
    plain = node.cli("renew")
    assert plain.returncode != 0
    assert f"RKE2's embedded etcd at https://127.0.0.1:{port} is not running" in plain.stderr


def test_etcd_down_and_no_ca_set_on_disk_is_left_to_rke2(tmp_path: Path, seed: Path) -> None:
    """The CA files were removed (RKE2 restores them from its datastore at start): the hook
    passes and creates no CA."""
    [port] = free_ports(1)
    node = make_rke2_node(
        tmp_path / "n", seed=seed, health_etcd_endpoint=f"https://127.0.0.1:{port}"
    )
    (node.layout.server / "token").write_text(node.token + "\n")
    for p in node.layout.tls.rglob("*-ca.*"):
        p.unlink()
    res = node.cli("renew", "--offline-ok")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("nothing to renew: the CA set on disk is missing")
    assert not list(node.layout.tls.rglob("*-ca.*")), "no CA created"


def test_etcd_client_files_missing_with_offline_ok(tmp_path: Path, seed: Path) -> None:
    [port] = free_ports(1)
    node = make_rke2_node(
        tmp_path / "n", seed=seed, health_etcd_endpoint=f"https://127.0.0.1:{port}"
    )
    (node.layout.server / "token").write_text(node.token + "\n")
    (node.layout.tls / "etcd" / "client.key").unlink()
    res = node.cli("renew", "--offline-ok")
    assert res.returncode == 0, res.stderr
    assert "etcd client files are not there" in res.stderr


# -- a control-plane-only node learns the members as RKE2 does --------------------------------


class _Supervisor(BaseHTTPRequestHandler):
    """A stand-in for RKE2's supervisor (RKE2 itself cannot run here): /cacerts, and /db/info
    for `server:<password>` only, over TLS with the node's serving certificate."""

    cacerts: bytes = b""
    members: bytes = b""
    auth: str = ""
    asked: list[str] = []  # noqa: RUF012 - per test, reset by the fixture

    def do_GET(self) -> None:
        self.asked.append(self.path)
        if self.path == "/cacerts":
            self._send(200, self.cacerts)
        elif self.path == "/db/info" and self.headers.get("Authorization") == self.auth:
            self._send(200, self.members)
        else:
            self._send(401, b"unauthorized")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def supervisor(seed: Path) -> Iterator[tuple[str, type[_Supervisor]]]:
    tls = seed / "server" / "tls"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / "serving-kube-apiserver.crt", tls / "serving-kube-apiserver.key")
    handler = type("Handler", (_Supervisor,), {"asked": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_control_plane_only_node_uses_the_members_from_db_info(
    tmp_path: Path,
    seed: Path,
    etcd_https: EtcdCluster,
    supervisor: tuple[str, type[_Supervisor]],
) -> None:
    url, handler = supervisor
    wipe(etcd_https, seed)
    server_ca = (seed / "server" / "tls" / "server-ca.crt").read_bytes()
    password = "cppw-3f9a1c"
    token = format_token(ca_hash(server_ca), "server", password)
    handler.cacerts = server_ca
    handler.auth = "Basic " + base64.b64encode(f"server:{password}".encode()).decode()
    member = {
        "ID": 7,
        "name": "etcd-1",
        "peerURLs": ["https://127.0.0.1:1"],
        "clientURLs": [etcd_https.client_url(0)],
    }
    handler.members = json.dumps({"members": [member]}).encode()
    node = make_rke2_node(
        tmp_path / "n",
        seed=seed,
        rke2={"server": url, "disable-etcd": True},
        node_ip=["192.0.2.50"],
    )
    node.token = token
    node.write()
    with etcd_client(etcd_https, node.data) as ds:
        node.started(ds)
    res = node.cli("renew", "--offline-ok")
    assert res.returncode == 0, res.stderr
    assert "datastore_unreachable" not in res.stderr
    assert handler.asked == ["/cacerts", "/db/info"]
    status = node.cli("status")
    assert status.returncode == 0, status.stderr
    assert f"the members listed by {url}/db/info" in status.stdout.splitlines()[0]
    assert not (node.layout.server / "db").exists()
    # the server gone: the hook lets RKE2 start on the disk's CA set
    handler.members = b"not json"
    res = node.cli("renew", "--offline-ok")
    assert res.returncode == 0, res.stderr
    assert "is not an etcd member list" in res.stderr


def test_agent_hook_before_rke2_agent_first_start(tmp_path: Path) -> None:
    """An agent-only node (only rke2-agent installed): before rke2-agent's first start it gets
    its certificates itself; the hook has nothing to do and must not need a server."""
    units = tmp_path / "units"
    units.mkdir()
    (units / "rke2-agent.service").write_text("[Service]\n")
    node = make_rke2_node(tmp_path / "n", seed=None, rke2={"server": "https://127.0.0.1:9"})
    env = {"RKE2CERTD_UNIT_DIRS": str(units)}
    res = run_cli("-c", node.config, "renew", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("nothing to renew: rke2-agent has not started on this node")
    assert not node.data.exists()
    # once it has run, the hook renews through a server: none answers here, and it says so
    (node.layout.agent).mkdir(parents=True)
    (node.layout.agent / "kubelet.kubeconfig").write_text("apiVersion: v1\n")
    res = run_cli("-c", node.config, "renew", env=env)
    assert res.returncode != 0 and "cannot reach the server" in res.stderr


def test_agent_hook_with_no_server_up_starts_on_valid_certificates(
    tmp_path: Path, seed: Path
) -> None:
    """A full restart: the agent comes up before any server answers. With valid certificates
    on disk the hook lets rke2-agent start on them (--offline-ok); without, it says why not."""
    node = make_rke2_node(
        tmp_path / "n", seed=None, rke2={"server": "https://127.0.0.1:9"}, roles=["agent"]
    )
    shutil.copytree(seed / "agent", node.layout.agent)
    before = tree(node.data)
    res = node.cli("renew", "--offline-ok")
    assert res.returncode == 0, res.stderr
    assert "renew_deferred" in res.stderr and "certificates on disk" in res.stdout
    assert tree(node.data) == before
    plain = node.cli("renew")
    assert plain.returncode != 0 and "cannot reach the server" in plain.stderr
    (node.layout.agent / "client-kubelet.crt").write_text("garbage\n")
    broken = node.cli("renew", "--offline-ok")
    assert broken.returncode != 0 and "cannot reach the server" in broken.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("certificate", "rotate"),
        ("certificate", "rotate-ca", "--path", "/nonexistent"),
        ("status",),
    ],
)
def test_other_commands_before_rke2_first_start_say_so(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    node = make_rke2_node(tmp_path / "n", seed=None)
    res = node.cli(*args)
    assert res.returncode == 2
    assert "RKE2 has not started on this node yet" in res.stderr
    assert not node.data.exists()
