"""The simulated cluster's `restart-command`: "restarts RKE2" on one node by restarting its
stand-in TLS servers with the node's certificates as they are on disk now, and records when
it began and ended (with what the daemon put in its environment). Standard library only.

    python sim_restart.py NODE_DIR

NODE_DIR holds `serve.json` (the ports and the files they serve), `server.pid` (the running
stand-in) and `records.jsonl` (appended to). Environment knobs, set per node by the harness:
SIM_RESTART_DELAY (seconds the restart takes), SIM_STALE=1 (serve the certificates saved at the
node's first start: a restart that did not load the new files, which the health gate catches),
SIM_FAIL=1 (exit 1 at once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def record(node_dir: Path, event: str, **extra: object) -> None:
    doc = {
        "event": event,
        "t": time.time(),
        "node": os.environ.get("RKE2CERTD_NODE", node_dir.name),
        "phase": os.environ.get("RKE2CERTD_PHASE"),
        "rollout": os.environ.get("RKE2CERTD_ROLLOUT"),
        "rollout_kind": os.environ.get("RKE2CERTD_ROLLOUT_KIND"),
        "ca_generation": os.environ.get("RKE2CERTD_CA_GENERATION"),
        "notify_socket": os.environ.get("NOTIFY_SOCKET"),
        **extra,
    }
    with open(node_dir / "records.jsonl", "a") as f:
        f.write(json.dumps(doc) + "\n")


def stop_old(node_dir: Path) -> None:
    try:
        pid = int((node_dir / "server.pid").read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has closed its ports already)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_new(node_dir: Path, stale: bool) -> int:
    specs = json.loads((node_dir / "serve.json").read_text())
    args = []
    for s in specs:
        cert, key = s["cert"], s["key"]
        if stale:
            cert, key = s["initial_cert"], s["initial_key"]
        args += ["--serve", f"{s['port']}:{cert}:{key}:{s['ca']}"]
    with open(node_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "sim_tls_server.py"), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this script, as rke2-server outlives systemctl
        )
    (node_dir / "server.pid").write_text(str(proc.pid))
    return proc.pid


def main(argv: list[str]) -> int:
    node_dir = Path(argv[0])
    record(node_dir, "restart_begin")
    if os.environ.get("SIM_FAIL") == "1":
        record(node_dir, "restart_failed")
        print("simulated restart failure", file=sys.stderr)
        return 1
    stop_old(node_dir)
    time.sleep(float(os.environ.get("SIM_RESTART_DELAY", "0")))
    pid = start_new(node_dir, os.environ.get("SIM_STALE") == "1")
    record(node_dir, "restart_end", pid=pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
