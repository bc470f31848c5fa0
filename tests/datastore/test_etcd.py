"""etcd specifics, against real etcd members: TLS trust and client certs, fail-over when a
member dies, a fast clear error when etcd is down, and writes whose answer is lost."""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from rke2certd.datastore import DatastoreUnavailable, OutcomeUnknown
from rke2certd.datastore.etcd import EtcdDatastore
from rke2certd.datastore.retry import CLI_ATTEMPTS
from rke2certd.errors import ConfigError, DatastoreError
from tests.datastore.support import open_etcd
from tests.datastore.tls import EtcdPKI
from tests.harness.etcd import EtcdCluster, EtcdFactory, TLSFiles, free_ports
from tests.harness.wait import SAFETY, wait_for

pytestmark = pytest.mark.etcd


def test_server_verification_ignores_requests_ca_bundle(
    etcd_factory: EtcdFactory, etcd_pki: EtcdPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This etcd serves a cert from an unrelated CA but accepts our client cert.
    foreign = etcd_factory(
        1,
        server_tls=etcd_pki.foreign_server,
        client_tls=TLSFiles(etcd_pki.foreign_ca, etcd_pki.client.cert, etcd_pki.client.key),
    )
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(etcd_pki.foreign_ca))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(etcd_pki.foreign_ca))

    # The trap is real: a default Session lets the environment override `verify`.
    naive = requests.Session()
    naive.verify = str(etcd_pki.client.ca)
    naive.cert = (str(etcd_pki.client.cert), str(etcd_pki.client.key))
    assert naive.post(foreign.endpoint + "/v3/kv/range", json={"key": "AA=="}, timeout=SAFETY).ok

    sleeps = record_backoff(monkeypatch)
    with pytest.raises(DatastoreError, match="server certificate not trusted") as err:
        open_etcd(foreign.endpoint, etcd_pki, tmp_path)
    assert not isinstance(err.value, DatastoreUnavailable)  # not retried: waiting cannot cure it
    assert sleeps == []  # no backoff before failing
    assert "datastore-cafile" in str(err.value)

    with open_etcd(foreign.endpoint, etcd_pki, tmp_path, cafile=etcd_pki.foreign_ca) as ds:
        assert ds.get("/anything") is None  # the same server, trusted through its own CA


def test_client_certificate_is_required(
    etcd_single: EtcdCluster, etcd_pki: EtcdPKI, tmp_path: Path
) -> None:
    with pytest.raises(DatastoreError, match="TLS handshake failed"):
        open_etcd(etcd_single.endpoint, etcd_pki, tmp_path, certfile=None, keyfile=None)


def test_untrusted_client_certificate_is_refused(
    etcd_single: EtcdCluster, etcd_pki: EtcdPKI, tmp_path: Path
) -> None:
    foreign_client = etcd_pki.foreign_server  # a cert from another CA, with client auth
    with pytest.raises(DatastoreError, match="TLS handshake failed"):
        open_etcd(
            etcd_single.endpoint,
            etcd_pki,
            tmp_path,
            certfile=foreign_client.cert,
            keyfile=foreign_client.key,
        )


def test_missing_tls_files_are_named(etcd_pki: EtcdPKI, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"datastore-cafile .*nope\.crt does not exist"):
        open_etcd("https://127.0.0.1:1", etcd_pki, tmp_path, cafile=tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match="given together"):
        open_etcd("https://127.0.0.1:1", etcd_pki, tmp_path, keyfile=None)


def record_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff sleeps of every EtcdDatastore made from here on, recorded (not slept)."""
    sleeps: list[float] = []
    defaults = EtcdDatastore.__init__.__kwdefaults__
    assert defaults is not None and "sleep" in defaults
    monkeypatch.setitem(defaults, "sleep", sleeps.append)
    return sleeps


def test_down_at_start_fails_fast_and_clearly(
    etcd_pki: EtcdPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p1, p2 = free_ports(2)
    endpoint = f"https://root:hunter2@127.0.0.1:{p1}, https://127.0.0.1:{p2}"
    sleeps = record_backoff(monkeypatch)
    with pytest.raises(DatastoreUnavailable) as err:
        open_etcd(endpoint, etcd_pki, tmp_path)
    # fast: the CLI's few attempts, with little backoff between them (refusals are instant)
    assert len(sleeps) == CLI_ATTEMPTS - 1 and sum(sleeps) < 2
    assert str(err.value) == (
        f"cannot reach the datastore at https://127.0.0.1:{p1},https://127.0.0.1:{p2}: "
        "connection refused; check that etcd is running and the certs in "
        "datastore-cafile/-certfile/-keyfile"
    )
    assert "hunter2" not in str(err.value)


def test_dead_first_endpoint_is_skipped(
    etcd_single: EtcdCluster, etcd_pki: EtcdPKI, tmp_path: Path, ns: str
) -> None:
    (dead,) = free_ports(1)
    with open_etcd(f"https://127.0.0.1:{dead},{etcd_single.endpoint}", etcd_pki, tmp_path) as ds:
        assert ds.create(ns + "k", b"v")
        kv = ds.get(ns + "k")
        assert kv is not None and kv.value == b"v"


def test_operations_continue_when_the_leader_is_killed(
    etcd_trio: EtcdCluster, etcd_pki: EtcdPKI, tmp_path: Path, ns: str
) -> None:
    """A client keeps incrementing a counter by CAS while the raft leader is SIGKILLed."""
    key = ns + "counter"
    leader = etcd_trio.leader()
    # The leader first, so the client is talking to the member that dies.
    endpoints = [etcd_trio.endpoints[leader]] + [
        u for i, u in enumerate(etcd_trio.endpoints) if i != leader
    ]
    ds = EtcdDatastore(
        endpoints,
        cafile=etcd_pki.client.ca,
        certfile=etcd_pki.client.cert,
        keyfile=etcd_pki.client.key,
        timeout=1.0,
        attempts=5,
    )
    assert ds.create(key, b"0")
    done: list[float] = []  # when each increment was acknowledged
    unknown: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def increment() -> None:
        while not stop.is_set():
            try:
                kv = ds.get(key)
                assert kv is not None
                if ds.compare_and_swap(key, str(int(kv.value) + 1).encode(), kv.mod_revision):
                    done.append(time.monotonic())
            except OutcomeUnknown:
                unknown.append(1)  # as a caller would: re-read on the next loop
            except BaseException as exc:
                errors.append(exc)
                return

    worker = threading.Thread(target=increment)
    worker.start()
    try:
        wait_for(lambda: errors or len(done) >= 5, "increments before the kill")
        killed_at = time.monotonic()
        etcd_trio.kill(leader)
        wait_for(
            lambda: errors or sum(t > killed_at for t in done) > 10, "increments after the kill"
        )
        # reads, snapshots, watches and leases work through the surviving members too
        assert ds.snapshot(ns).kvs[0].key == key
        lease = ds.grant_lease(5)
        assert ds.create(ns + "member", b"x", lease=lease)
        assert ds.watch_prefix(ns, ds.snapshot(ns).revision, timeout=2)
    finally:
        stop.set()
        worker.join(timeout=30)
        etcd_trio.restart(leader)
    assert not errors, errors
    after_kill = [t for t in done if t > killed_at]
    assert len(after_kill) > 10, f"only {len(after_kill)} increments after the kill"
    gaps = [b - a for a, b in itertools.pairwise(done)]
    print(
        f"increments: {len(done)} ({len(after_kill)} after the kill), max stall "
        f"{max(gaps):.2f}s, outcome unknown: {len(unknown)}"
    )
    final = ds.get(key)
    assert final is not None
    assert len(done) <= int(final.value) <= len(done) + len(unknown)
    ds.close()
    with open_etcd(etcd_trio.endpoints[leader], etcd_pki, tmp_path) as restarted:
        assert restarted.get(key) == final  # the restarted member serves the latest data


class SwallowingProxy:
    """Forwards each HTTP request to etcd, then hangs up instead of answering: the write is
    applied but the client never hears so, as when a member dies mid-request."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self._forward(conn)

    def _forward(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers.get("Content-Length", 0))
        while len(body) < length:
            body += conn.recv(65536)
        method, path, _ = lines[0].split(" ")
        upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=5)
        upstream.request(method, path, body, {"Content-Type": "application/json"})
        upstream.getresponse().read()
        upstream.close()
        self.forwarded += 1
        # ... and hang up without a response

    def close(self) -> None:
        self.listener.close()


def test_lost_answer_gives_outcome_unknown_never_a_wrong_false(
    etcd_factory: EtcdFactory, ns: str
) -> None:
    plain = etcd_factory(1)  # HTTP, so the proxy can see where a request ends
    proxy = SwallowingProxy(plain.members[0].client_port)

    def via_proxy() -> EtcdDatastore:  # the proxy is tried first, then etcd itself
        return EtcdDatastore([proxy.url, plain.endpoint], timeout=2.0)

    try:
        # a read is simply re-asked elsewhere
        assert via_proxy().get(ns + "k") is None
        # the create went through the proxy and was applied; its retry's compare fails
        with pytest.raises(OutcomeUnknown, match=f"the write to {ns}k may or may not"):
            via_proxy().create(ns + "k", b"first")
        direct = EtcdDatastore([plain.endpoint])
        kv = direct.get(ns + "k")
        assert kv is not None and kv.value == b"first"
        assert kv.mod_revision == kv.create_revision  # applied exactly once
        with pytest.raises(OutcomeUnknown):
            via_proxy().compare_and_swap(ns + "k", b"second", kv.mod_revision)
        kv2 = direct.get(ns + "k")
        assert kv2 is not None and kv2.value == b"second"
        # without a lost answer, a failed compare is a plain False
        assert not direct.create(ns + "k", b"third")
        assert not direct.compare_and_swap(ns + "k", b"third", kv.mod_revision)
        assert proxy.forwarded == 3
        direct.close()
    finally:
        proxy.close()
