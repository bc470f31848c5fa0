"""The startup hook (`rke2certd renew --offline-ok`, the package's ExecStartPre= of rke2-server)
on an idle RKE2 server node beside the RKE2 stand-in (tests/harness/rke2), against the
stand-in's own start-time certificate work, measured in the same run on the same node.

    python benchmarks/bench_hook.py [--rounds 7]

hook      = the ExecStartPre= command line as systemd runs it (a new `python -m rke2certd`
            process with the node's empty rke2certd config; RKE2's config and etcd say the rest)
rke2 work = what the stand-in does with certificates at each start on this node: read the
            bootstrap key (decrypt), reconcile disk against it, check every CA and leaf
            (nothing to do here, as on an idle node), in-process
python    = `python -c pass`: the interpreter start every hook process pays
Ratios are of medians; the node's etcd runs with fsync off (the test harness's setting).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.* when run as a script

from tests.harness.rke2 import bootstrap as bs  # noqa: E402
from tests.harness.rke2.certs import gen_server_certs  # noqa: E402
from tests.harness.rke2.node import RKE2Server, exec_start_pre  # noqa: E402


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hook-") as tmp:
        node = RKE2Server(Path(tmp) / "s1", "s1", {"token": "bench-hook-secret"}, run_hook=False)
        node.start()
        try:
            ((_, argv),) = exec_start_pre(node.unit)
            hook_cmd, env = node.hook_argv(argv), node.hook_env()
            token = node.token()
            assert token
            raw = node.etcd_client().get(bs.bootstrap_key(token))
            assert raw

            def hook() -> None:
                res = subprocess.run(
                    hook_cmd, capture_output=True, text=True, env=env, cwd="/", check=False
                )
                if res.returncode != 0:
                    raise SystemExit(f"the hook failed:\n{res.stderr}")

            def rke2_work() -> None:
                stored = bs.decode_files(bs.decrypt(token, raw))
                if bs.reconcile(node.server_dir, stored).written:
                    raise SystemExit("the node is not idle: RKE2 rewrote bootstrap files")
                if gen_server_certs(node.tls, node.identity(), False):
                    raise SystemExit("the node is not idle: RKE2 re-made leaves")

            def python() -> None:
                subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)

            hook()  # warm: caches, the first renew's own work
            samples: dict[str, list[float]] = {"hook": [], "rke2 work": [], "python": []}
            for _ in range(opts.rounds):  # interleaved, so load changes hit all three alike
                samples["hook"].append(timed(hook))
                samples["rke2 work"].append(timed(rke2_work))
                samples["python"].append(timed(python))
        finally:
            node.stop()
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"rounds: {opts.rounds}")
    for name, value in med.items():
        print(f"{name:10s} median {value * 1000:8.1f} ms   max {max(samples[name]) * 1000:8.1f} ms")
    print(f"hook / rke2 work           {med['hook'] / med['rke2 work']:6.1f}x")
    print(f"(hook - python) / rke2 work {(med['hook'] - med['python']) / med['rke2 work']:6.1f}x")
    print(f"hook / python              {med['hook'] / med['python']:6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
