"""The server endpoint under load: CSR signing latency and throughput, and a full agent renew.

    python benchmarks/bench_supervisor.py [--requests N] [--threads T]

Each request is a new TLS connection (as agents make them): handshake + CSR check + signing.
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

from rke2certd.datastore.sqlite import SQLiteDatastore  # noqa: E402
from rke2certd.ops.agent import agent_renew  # noqa: E402
from rke2certd.supervisor.client import fetch_cacerts, request_cert  # noqa: E402
from rke2certd.supervisor.server import start  # noqa: E402
from tests.agent.helpers import make_agent_node, make_csr, make_server_node  # noqa: E402

NAMES = 16  # agents asking in turn; each proved its node password once before the timing


def _timed_request(url: str, token: str, bundle: bytes, csr: bytes, i: int) -> float:
    name = f"node-{i % NAMES}"
    t0 = time.perf_counter()
    request_cert(
        url, token, bundle, "client-kubelet", csr, name, ["10.0.0.1"], node_password=f"pw-{name}"
    )
    return time.perf_counter() - t0


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
                    lat = list(pool.map(
                        lambda i: _timed_request(handle.url, token, bundle, csrs[i], i),
                        range(args.requests),
                    ))  # fmt: skip
                wall = time.perf_counter() - t0
                q = statistics.quantiles(lat, n=20)
                print(f"{threads:>2} thread(s): {args.requests / wall:7.1f} certs/s, "
                      f"median {statistics.median(lat) * 1000:6.1f} ms, "
                      f"p95 {q[18] * 1000:6.1f} ms")  # fmt: skip
            runs = []
            for i in range(10):
                node = make_agent_node(
                    Path(tmp) / f"agent-{i}", token, f"agent-{i}", supervisor_port=handle.port
                )
                t0 = time.perf_counter()
                agent_renew(node, datetime.now(UTC))
                runs.append(time.perf_counter() - t0)
            print(f"agent renew (pin + client CA + 4 CSRs): median "
                  f"{statistics.median(runs) * 1000:.1f} ms")  # fmt: skip
            print(f"signed in total: {handle.signed_count}")


if __name__ == "__main__":
    main()
