"""`ca stage-rotation` / `stage-service-key` without --out make a set the daemon takes as it is:
the printed "Next:" is a rename into the watched dir, and running it is all there is to do."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.daemon.support import DaemonNode

NEXT = re.compile(r"^Next: (?P<cmd>mv \S+ \S+)  \(", re.MULTILINE)


@pytest.mark.parametrize(("action", "changed"), [("stage-rotation", 11), ("stage-service-key", 1)])
def test_the_printed_rename_hands_the_set_to_the_daemon(
    node: DaemonNode, action: str, changed: int
) -> None:
    node.cli("renew")
    out = node.cli("ca", action).stdout
    assert "rotate-ca --path" not in out and "restart RKE2 on every" not in out, out
    match = NEXT.search(out)
    assert match is not None, out
    argv = shlex.split(match["cmd"])
    src, dest = argv[1], argv[2]
    assert src.startswith(str(node.data / "server" / "rotate-ca") + "/")
    assert dest.startswith(str(node.incoming) + "/"), "into the watched dir"
    with node.daemon() as d:
        d.notify.expect("READY")
        subprocess.run(argv, check=True)  # exactly what the operator is told to run
        path, result = node.wait_result(dest.rsplit("/", 1)[1], timeout=30)
        assert path.parent.parent.name == ".applied", result
        assert result["status"] == "applied" and len(result["changed"]) == changed
