"""`rke2certd run` speaks sd_notify to a NOTIFY_SOCKET made by the test, as systemd would see it:
READY=1 only once the node's certificates exist, a STATUS= line, WATCHDOG=1 at half of
WATCHDOG_USEC (only when WATCHDOG_PID names the daemon), and STOPPING=1 then exit 0 on SIGTERM.
Outside systemd (no NOTIFY_SOCKET) it runs in the foreground the same way."""

from __future__ import annotations

import itertools
import re
import signal
import statistics
import time

from tests.daemon.support import DaemonNode
from tests.harness.wait import wait_for

# A few files a server node must have before it says READY (docs/RKE2-COMPATIBILITY.md §3, §4).
NODE_FILES = (
    "server/tls/server-ca.crt",
    "server/tls/client-ca.crt",
    "server/tls/serving-kube-apiserver.crt",
    "server/tls/serving-kube-apiserver.key",
    "server/tls/etcd/server-client.crt",
    "server/tls/etcd/peer-server-client.crt",
    "server/tls/client-admin.crt",
    "agent/client-kubelet.crt",
    "agent/serving-kubelet.crt",
    "agent/client-kubelet.key",
)


def test_ready_is_sent_only_after_the_certificates_exist_with_a_status_line(
    node: DaemonNode,
) -> None:
    assert not node.data.exists()  # the daemon's start-up makes the whole node
    with node.daemon() as d:
        ready = d.notify.expect("READY")
        for rel in NODE_FILES:
            path = node.data / rel
            assert path.is_file(), f"{rel} missing at READY"
            assert path.stat().st_mtime <= ready.wall, f"{rel} written after READY"
        status = ready.fields["STATUS"]
        assert f"watching {node.incoming}" in status
        assert re.search(
            r"\d+ certificates; next expiry \S+\.crt on \d{4}-\d\d-\d\d \d\d:\d\d UTC", status
        ), status
        # The log agrees: every certificate was issued before the `ready` event.
        d.wait_event("ready")  # logged just after READY is sent
        names = [e["event"] for e in d.events()]
        renewed = [i for i, name in enumerate(names) if name == "cert_renewed"]
        assert len(renewed) >= len([f for f in NODE_FILES if f.endswith(".crt")]) - 2
        assert max(renewed) < names.index("ready")
        assert names.index("staging_watched") < names.index("ready")
        # "known good": an independent `certificate check` of the node finds nothing to fix
        check = node.cli("certificate", "check", "-o", "json", check=False)
        assert check.returncode == 0, check.stdout
        assert d.stop() == 0


def test_watchdog_pings_come_at_half_of_watchdog_usec(node: DaemonNode) -> None:
    with node.daemon(watchdog_usec=400_000) as d:  # a ping every 0.2 s
        d.notify.expect("READY")
        start = time.monotonic()

        def pings() -> list[float]:
            return [m.mono for m in d.notify.messages if m.mono >= start and "WATCHDOG" in m.fields]

        got = wait_for(lambda: len(pings()) >= 8 and pings(), "8 watchdog pings")
        gaps = [b - a for a, b in itertools.pairwise(got)]
        # Not more often than every half WATCHDOG_USEC (a lower bound only: a loaded machine
        # makes gaps longer, never shorter). That the interval *is* half of it is a pure fact
        # of Notifier.watchdog_interval (tests/systemd/test_sd_notifier.py), not timed here.
        assert statistics.median(gaps) >= 0.15, gaps
        assert d.stop() == 0


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(node: DaemonNode) -> None:
    # systemd sets WATCHDOG_PID to the main PID; a child that inherited it must not ping
    with node.daemon(watchdog_usec=200_000, watchdog_pid="1") as d:
        ready = d.notify.expect("READY")
        time.sleep(0.6)
        assert not [m for m in d.notify.messages if "WATCHDOG" in m.fields]
        assert ready.fields["READY"] == "1"
        assert d.stop() == 0


def test_sigterm_sends_stopping_and_exits_zero_promptly(node: DaemonNode) -> None:
    with node.daemon() as d:
        d.notify.expect("READY")
        d.signal(signal.SIGTERM)
        # The idle loop's next timed wake is the rescan, an hour away (rescan-interval's
        # default): an exit within the guard shows that the signal woke it, with no bound on
        # how fast a loaded machine is.
        assert d.proc.wait(timeout=120) == 0
        stopping = d.notify.expect("STOPPING")
        assert stopping.fields.get("STATUS") == "stopping"
        assert d.events("stopping")
        assert "Traceback" not in d.log.read_text()


def test_the_stop_names_the_signal_that_asked_for_it(node: DaemonNode) -> None:
    with node.daemon() as d:
        d.notify.expect("READY", timeout=60)
        d.signal(signal.SIGINT)
        assert d.proc.wait(timeout=120) == 0
        assert [e["reason"] for e in d.events("stopping")] == ["SIGINT"]


def test_sighup_sends_reloading_then_ready_again(node: DaemonNode) -> None:
    with node.daemon() as d:
        d.notify.expect("READY")
        d.signal(signal.SIGHUP)
        reloading = d.notify.expect("RELOADING")
        assert int(reloading.fields["MONOTONIC_USEC"]) > 0  # systemd >= 253 orders by it
        again = d.notify.expect("READY")
        assert f"watching {node.incoming}" in again.fields["STATUS"]
        assert d.wait_event("reloading")["reason"] == "SIGHUP"
        assert d.stop() == 0


def test_outside_systemd_it_runs_in_the_foreground_the_same_way(node: DaemonNode) -> None:
    with node.daemon(notify=False) as d:
        ready = d.wait_event("ready")
        assert ready["staging"] == str(node.incoming)
        assert (node.data / "agent/client-kubelet.crt").is_file()
        assert d.proc.poll() is None  # in the foreground: still our child, not forked away
        assert d.stop() == 0
        assert d.events("stopping")
        assert not d.events("sd_notify_failed")
