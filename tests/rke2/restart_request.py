"""The `restart-command` / `health-command` the rke2certd daemons beside the RKE2 stand-in run.

The stand-in nodes live in the test process, so "systemctl restart rke2-server" is a request to
that process: this script sends it over a unix socket, waits for the answer and exits 0 when
the restart (the unit's ExecStartPre=, then RKE2's start) or the health check passed, 1 with
the reason on stderr when it did not. Standard library only (run as `python3 FILE`).

    python3 restart_request.py SOCKET NODE restart|health
"""

from __future__ import annotations

import json
import os
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[3] not in ("restart", "health"):
        sys.stderr.write("usage: restart_request.py SOCKET NODE restart|health\n")
        return 2
    path, node, action = argv[1:]
    env = {k: v for k, v in os.environ.items() if k.startswith("RKE2CERTD_")}
    request = json.dumps({"node": node, "action": action, "env": env}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    doc = json.loads(answer or b'{"ok": false, "message": "no answer"}')
    if not doc.get("ok"):
        sys.stderr.write(f"{action} of {node} failed: {doc.get('message')}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
