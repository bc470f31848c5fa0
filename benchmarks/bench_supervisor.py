"""The server endpoint under load: CSR signing latency and throughput, a full agent renew, and
`/cacerts` while slow clients hold all they may.

    python benchmarks/bench_supervisor.py [--requests N] [--threads T]

Each request is a new TLS connection (as agents make them): handshake + CSR check + signing.
Slowloris: one address (127.0.0.2) opens 128 TLS connections that trickle a request a byte at a
time, then eight addresses hold 16 each; `/cacerts` from 127.0.0.1 is timed against the same
run's idle endpoint (the ratio) and must answer within 5 s.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rke2certd.commands.agent import agent_renew  # noqa: E402
from rke2certd.datastore.sqlite import SQLiteDatastore  # noqa: E402
from rke2certd.supervisor.client import fetch_cacerts, request_cert  # noqa: E402
from rke2certd.supervisor.server import start  # noqa: E402
from tests.agent.helpers import make_agent_node, make_csr, make_server_node  # noqa: E402
from tests.security.slowloris import Attacker  # noqa: E402

NAMES = 16  # agents asking in turn; each proved its node password once before the timing


def _timed_request(url: str, token: str, bundle: bytes, csr: bytes, i: int) -> float:
    name = f"node-{i % NAMES}"
    t0 = time.perf_counter()
    request_cert(
        url, token, bundle, "client-kubelet", csr, name, ["10.0.0.1"], node_password=f"pw-{name}"
    )
    return time.perf_counter() - t0


def _cacerts_latency(url: str, token: str, n: int = 20) -> float:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fetch_cacerts(url, token)
        lat.append(time.perf_counter() - t0)
    return statistics.median(lat)


def _slowloris(url: str, port: int, token: str) -> None:
    idle = _cacerts_latency(url, token)
    print(f"/cacerts idle: median {idle * 1000:.1f} ms")
    spread = [f"127.0.0.{i}" for i in range(2, 10)]
    for label, sources in (("1 address x 128", ["127.0.0.2"]), ("8 addresses x 16", spread)):
        attackers = [Attacker("127.0.0.1", port, src) for src in sources]
        try:
            for a in attackers:
                a.open(128 // len(sources))
                a.trickle(1.0)
            held = sum(a.still_open() for a in attackers)
            busy = _cacerts_latency(url, token)
            verdict = "ok" if busy < 5.0 else "TOO SLOW (> 5 s)"
            print(
                f"/cacerts while {label} trickle ({held} held): median {busy * 1000:.1f} ms, "
                f"x{busy / idle:.2f} of idle, {verdict}"
            )
        finally:
            for a in attackers:
                a.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory() as tmp:
        server = make_server_node(Path(tmp) / "server")
        passwords = SQLiteDatastore(Path(tmp) / "node-passwords.sqlite")
        with passwords, start(server.node, host="127.0.0.1", port=0, passwords=passwords) as handle:
            token = server.agent_token
            bundle = fetch_cacerts(handle.url, token)
            csrs = [make_csr() for _ in range(args.requests)]
            for i in range(NAMES):  # first use: each name's password is hashed and recorded
                _timed_request(handle.url, token, bundle, csrs[0], i)
            for threads in (1, args.threads):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    lat = list(
                        pool.map(
                            lambda i: _timed_request(handle.url, token, bundle, csrs[i], i),
                            range(args.requests),
                        )
                    )
                wall = time.perf_counter() - t0
                q = statistics.quantiles(lat, n=20)
                print(
                    f"{threads:>2} thread(s): {args.requests / wall:7.1f} certs/s, "
                    f"median {statistics.median(lat) * 1000:6.1f} ms, "
                    f"p95 {q[18] * 1000:6.1f} ms"
                )
            runs = []
            for i in range(10):
                node = make_agent_node(
                    Path(tmp) / f"agent-{i}", token, f"agent-{i}", supervisor_port=handle.port
                )
                t0 = time.perf_counter()
                agent_renew(node, datetime.now(UTC))
                runs.append(time.perf_counter() - t0)
            print(
                f"agent renew (pin + client CA + 4 CSRs): median "
                f"{statistics.median(runs) * 1000:.1f} ms"
            )
            print(f"signed in total: {handle.signed_count}")
            _slowloris(handle.url, handle.port, token)


if __name__ == "__main__":
    main()
