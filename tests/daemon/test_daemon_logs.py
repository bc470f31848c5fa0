"""Where `rke2certd run` logs outside systemd: JSON lines (log-format json) on stderr, from its
first event on, and nothing on stdout, whichever module logs first."""

from __future__ import annotations

import json

from tests.daemon.support import DaemonNode


def test_a_start_with_nothing_to_renew_still_logs_json_to_stderr_only(node: DaemonNode) -> None:
    node.cli("renew")  # nothing left for the daemon's start-up to do: its first event is not one
    with node.daemon() as d:  # of renew's
        d.notify.expect("READY")
        d.wait_event("ready")
        assert d.stop() == 0
    assert d.stdout.read_text() == ""
    lines = [line for line in d.log.read_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is a JSON event
    names = [e["event"] for e in events]
    assert {"staging_watched", "ready", "stopping"} <= set(names), names
    assert all(e["level"] and e["timestamp"] for e in events)
