"""`rke2certd renew` with nothing to do, on the SQLite default and on a local TLS etcd, and the
share of it that PBKDF2 (4096 rounds of HMAC-SHA1) takes.

    python benchmarks/bench_bootstrap.py [--rounds 30] [--cli-rounds 5]

in-process = open the node's datastore (as the CLI does) + `renew()` under the node lock + close,
             with the derived-key cache cleared first, as in a new process: the bootstrap value
             is read and decrypted, and nothing is written
CLI        = the whole `python -m rke2certd renew` process (interpreter start and imports too)
PBKDF2     = one derivation, timed beside every in-process round (same machine load)
The etcd member runs with fsync on and serves with certificates the first renew issued.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.* when run as a script

from rke2certd.commands.node_datastore import open_for  # noqa: E402
from rke2certd.commands.renew import renew  # noqa: E402
from rke2certd.config import load_config  # noqa: E402
from rke2certd.datastore.codec import derive_key  # noqa: E402
from rke2certd.files.lock import node_lock  # noqa: E402
from rke2certd.node.node import Node  # noqa: E402
from tests.conftest import clean_env, write_node_config  # noqa: E402
from tests.harness.etcd import EtcdCluster, TLSFiles  # noqa: E402

TOKEN = "K10::server:" + "bench-token-0123456789abcdef"
SALT = b"0011223344556677"


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else samples[0]


def cli(cfg: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "rke2certd", "-c", str(cfg), "renew"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd="/",
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"renew failed:\n{res.stderr}")
    return elapsed


def in_process(cfg: Path, rounds: int) -> tuple[list[float], list[float], int]:
    """(renew seconds, PBKDF2 seconds, derivations per renew), paired by round."""
    node = Node.from_config(load_config(cfg))
    password = TOKEN.rsplit(":", 1)[1]
    op, kdf = [], []
    derivations = 0
    for _ in range(rounds):
        derive_key.cache_clear()
        t0 = time.perf_counter()
        derive_key.__wrapped__(password, SALT)
        t1 = time.perf_counter()
        with open_for(node) as ds, node_lock(node.layout.data_dir, 30):
            result = renew(node, datetime.now(UTC), datastore=ds)
        t2 = time.perf_counter()
        if result.changes or result.extracted or result.derived or result.token_files:
            raise SystemExit(f"the renew was not idle: {result}")
        derivations = derive_key.cache_info().misses
        kdf.append(t1 - t0)
        op.append(t2 - t1)
    return op, kdf, derivations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cli-rounds", type=int, default=5)
    args = parser.parse_args()

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, data = write_node_config(root / "sqlite", node_name="bench", token=TOKEN)
        cli(cfg)  # creates the CA set and the bootstrap key
        rows.append(("sqlite (default)", cfg))

        etcd_dir = data / "server" / "tls" / "etcd"
        ca = etcd_dir / "server-ca.crt"
        server = TLSFiles(ca, etcd_dir / "server-client.crt", etcd_dir / "server-client.key")
        client = TLSFiles(ca, etcd_dir / "client.crt", etcd_dir / "client.key")
        cluster = EtcdCluster(
            root / "etcd", 1, server_tls=server, client_tls=client, unsafe_no_fsync=False
        )
        with cluster:
            ecfg, _ = write_node_config(
                root / "etcd-node",
                node_name="bench",
                token=TOKEN,
                datastore_endpoint=cluster.endpoint,
                datastore_cafile=client.ca,
                datastore_certfile=client.cert,
                datastore_keyfile=client.key,
            )
            cli(ecfg)
            rows.append(("etcd (TLS, 1 member)", ecfg))
            results = []
            for name, c in rows:
                op, kdf, n = in_process(c, args.rounds)
                walls = [cli(c) for _ in range(args.cli_rounds)]
                results.append((name, op, kdf, n, walls))

    print(
        f"renew with nothing to do: {args.rounds} in-process rounds, {args.cli_rounds} CLI "
        "rounds per backend; PBKDF2-HMAC-SHA1 x4096 timed beside every in-process round"
    )
    print(
        f"{'backend':22} {'in-process median/p90 ms':>24} {'CLI median ms':>13} "
        f"{'PBKDF2 ms':>9} {'per renew':>9}  PBKDF2 share: in-process, CLI"
    )
    for name, op, kdf, n, walls in results:
        med, kdf_med, wall = statistics.median(op), statistics.median(kdf), statistics.median(walls)
        print(
            f"{name:22} {med * 1e3:12.1f} / {p90(op) * 1e3:9.1f} {wall * 1e3:13.1f} "
            f"{kdf_med * 1e3:9.2f} {n:9d}  {n * kdf_med / med:6.1%}, {n * kdf_med / wall:6.1%}"
        )


if __name__ == "__main__":
    main()
