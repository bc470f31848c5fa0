"""`rke2certd run` on an RKE2 server waits in place for what RKE2 provides, instead of exiting
and being restarted by systemd every few seconds: before RKE2's first start (nothing on disk,
nothing created), and while RKE2's embedded etcd is down (at the daemon's start and while it
runs). It is READY with the reason in STATUS=, keeps the watchdog pinged, renews leaves from a
complete CA set on disk meanwhile, and does its normal start once the datastore answers.
The datastore is a real etcd serving with the node's etcd certificates, as RKE2's embedded one.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from rke2certd.daemon.loop import AGENT_FIRST_START, FIRST_START
from rke2certd.errors import ConfigError
from tests.daemon.support import (
    CapturedLogs,
    DaemonNode,
    DaemonProcess,
    cert_serial,
    free_port,
    label_of,
    reissue_shorter,
)
from tests.harness.etcd import EtcdCluster
from tests.harness.wait import wait_for

from .conftest import Rke2Node, etcd_client, wipe

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


@pytest.fixture(scope="session")
def captured_logs_dir(tmp_path_factory: pytest.TempPathFactory) -> CapturedLogs:
    return CapturedLogs.for_session(tmp_path_factory)


def _node(
    tmp_path: Path, etcd: EtcdCluster, logs: CapturedLogs, label: str, **settings: Any
) -> DaemonNode:
    """An RKE2 server (every role) whose datastore is RKE2's embedded etcd, here `etcd`."""
    rke2_config = tmp_path / "etc-rke2" / "config.yaml"
    dn = DaemonNode.create(
        tmp_path / "n",
        logs,
        label,
        rke2_config=str(rke2_config),
        node_ip=["127.0.0.1"],
        health_etcd_endpoint=etcd.client_url(0),
        restart_command=["true"],
        health_command=["true"],
        registry_ttl=5,
        log_level="debug",
        **settings,
    )
    rke2_config.parent.mkdir(mode=0o700)
    rke2_config.write_text(yaml.safe_dump({"token": dn.settings["token"]}))
    return dn


def _rke2_started(dn: DaemonNode, seed: Path, etcd: EtcdCluster, into: Path) -> None:
    """What RKE2's first start leaves at `into`: the CA set and every certificate
    (the `seed` node's, made for this etcd), its bootstrap key in its etcd, server/token."""
    shutil.copytree(seed, into, symlinks=True)
    rke2 = Rke2Node(dn.root, {}, {"data-dir": str(into)}, dn.settings["token"])
    with etcd_client(etcd, into) as ds:
        rke2.started(ds)


def _wait_count(d: DaemonProcess, name: str, count: int) -> None:
    """Until the daemon logged `name` `count` times (it must stay up meanwhile)."""

    def logged() -> bool:
        assert d.proc.poll() is None, f"daemon exited {d.proc.returncode}"
        return len(d.events(name)) >= count

    try:
        wait_for(logged, f"{count} {name} events")
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{d.tail()}") from None


def test_before_rke2s_first_start_it_waits_then_starts(
    tmp_path: Path,
    seed: Path,
    etcd_https: EtcdCluster,
    captured_logs_dir: CapturedLogs,
    request: pytest.FixtureRequest,
) -> None:
    wipe(etcd_https, seed)
    dn = _node(
        tmp_path,
        etcd_https,
        captured_logs_dir,
        label_of(request),
        datastore_retry_min=0.1,
        datastore_retry_max=0.3,
    )
    assert not dn.data.exists()
    with dn.daemon(watchdog_usec=400_000) as d:
        ready = d.notify.expect("READY")
        assert ready.fields["STATUS"] == FIRST_START
        assert d.wait_event("datastore_waiting")["reason"] == FIRST_START
        _wait_count(d, "datastore_retry_failed", 3)  # retried in place, never exited
        pauses = [e["retry_in"] for e in d.events() if e["event"].startswith("datastore_")]
        assert pauses[:4] == [0.1, 0.2, 0.3, 0.3]  # doubling from -min, bounded by -max
        d.notify.expect("WATCHDOG")
        assert len(d.events("datastore_waiting")) == 1  # one event when the wait starts
        assert not dn.data.exists(), "nothing is created before RKE2's first start"
        assert d.events("startup_failed") == []

        # RKE2 starts: its data dir appears whole (made aside, renamed in), its etcd has the key
        _rke2_started(dn, seed, etcd_https, tmp_path / "rke2-made")
        (tmp_path / "rke2-made").rename(dn.data)
        answered = d.wait_event("datastore_answered")
        assert answered["trigger"] == "retry"
        d.wait_event("staging_watched")
        status = d.notify.expect("STATUS", None)
        assert "waiting" not in status.fields["STATUS"], status.fields
        assert dn.incoming.is_dir()
        assert dn.cli("certificate", "check").returncode == 0
        assert d.proc.poll() is None
        assert d.stop() == 0
    assert d.events("task_failed") == [], d.tail()
    assert not d.stray_lines()


def test_rke2s_etcd_down_at_start_and_while_running(
    tmp_path: Path,
    seed: Path,
    etcd_https: EtcdCluster,
    captured_logs_dir: CapturedLogs,
    request: pytest.FixtureRequest,
) -> None:
    wipe(etcd_https, seed)
    dn = _node(
        tmp_path,
        etcd_https,
        captured_logs_dir,
        label_of(request),
        datastore_retry_min=0.1,
        datastore_retry_max=0.3,
        rescan_interval=0.5,
    )
    _rke2_started(dn, seed, etcd_https, dn.data)
    # a leaf within its renewal window: renewed from disk while the datastore is away
    tls = dn.data / "server" / "tls"
    admin = tls / "client-admin.crt"
    reissue_shorter(
        admin, tls / "client-admin.key", tls / "client-ca.crt", tls / "client-ca.key", 5
    )
    old_serial = cert_serial(admin)
    etcd_https.kill(0)  # RKE2 stopped: its etcd with it
    try:
        with dn.daemon(watchdog_usec=400_000) as d:
            ready = d.notify.expect("READY")
            status = ready.fields["STATUS"]
            assert status.startswith(
                f"waiting for RKE2's datastore at {etcd_https.client_url(0)}: "
            ), status
            assert "not running" in status
            d.wait_event("datastore_waiting")
            renewed = d.wait_event("restart_needed")
            assert "datastore does not answer" in renewed["reason"]
            assert cert_serial(admin) != old_serial
            _wait_count(d, "datastore_retry_failed", 2)
            d.notify.expect("WATCHDOG")

            etcd_https.restart(0)  # RKE2 is back
            d.wait_event("datastore_answered", trigger="retry")
            d.wait_event("staging_watched")
            assert dn.cli("certificate", "check").returncode == 0

            etcd_https.kill(0)  # stopped again, while the daemon runs: the next rescan sees it
            _wait_count(d, "datastore_waiting", 2)
            status = d.notify.expect("STATUS", None).fields["STATUS"]
            while not status.startswith("waiting for RKE2's datastore"):
                status = d.notify.expect("STATUS", None).fields["STATUS"]
            etcd_https.restart(0)
            _wait_count(d, "datastore_answered", 2)
            assert d.proc.poll() is None
            assert d.stop() == 0
        assert d.events("startup_failed") == []
        assert not d.stray_lines()
    finally:
        if not etcd_https.healthy(0):
            etcd_https.restart(0)


def test_sighup_while_waiting_tries_at_once(
    tmp_path: Path,
    seed: Path,
    etcd_https: EtcdCluster,
    captured_logs_dir: CapturedLogs,
    request: pytest.FixtureRequest,
) -> None:
    """With an hour between retries, only the SIGHUP can have made it try again."""
    wipe(etcd_https, seed)
    dn = _node(
        tmp_path,
        etcd_https,
        captured_logs_dir,
        label_of(request),
        datastore_retry_min=3600,
        datastore_retry_max=3600,
    )
    _rke2_started(dn, seed, etcd_https, dn.data)
    etcd_https.kill(0)
    try:
        with dn.daemon() as d:
            d.notify.expect("READY")
            assert d.wait_event("datastore_waiting")["retry_in"] == 3600
            d.signal(signal.SIGHUP)  # still down: one more attempt, and waiting on
            d.wait_event("datastore_retry_failed")
            d.notify.expect("READY")  # a reload ends with READY=1, as always
            etcd_https.restart(0)
            d.signal(signal.SIGHUP)
            d.wait_event("datastore_answered", trigger="SIGHUP")
            d.wait_event("staging_watched")
            assert d.stop() == 0
        assert len(d.events("datastore_waiting")) == 1
        assert not d.stray_lines()
    finally:
        if not etcd_https.healthy(0):
            etcd_https.restart(0)


def test_a_configuration_error_still_exits(
    tmp_path: Path,
    etcd_https: EtcdCluster,
    captured_logs_dir: CapturedLogs,
    request: pytest.FixtureRequest,
) -> None:
    """Waiting cures a datastore that is down, never a configuration RKE2's datastore cannot
    be reached with: a control-plane-only node with no `server` stops at once."""
    dn = _node(
        tmp_path,
        etcd_https,
        captured_logs_dir,
        label_of(request),
        roles=["control-plane", "agent"],
    )
    (dn.data / "server").mkdir(parents=True)
    (dn.data / "server" / "token").write_text(dn.settings["token"] + "\n")  # RKE2 ran here
    with dn.daemon() as d:
        assert d.proc.wait(timeout=60) == ConfigError.exit_code  # EX_CONFIG: no restart
        failed = d.events("startup_failed")
        assert failed and "no `server` to join" in failed[0]["reason"], d.tail()
        assert d.events("datastore_waiting") == []


def test_an_agent_waits_for_rke2_agents_first_start(
    tmp_path: Path, captured_logs_dir: CapturedLogs, request: pytest.FixtureRequest
) -> None:
    """An agent-only RKE2 node rke2-agent never ran on: rke2-agent fetches the CAs and its
    certificates from `server` at its first start; the daemon neither exits nor makes them."""
    rke2_config = tmp_path / "etc-rke2" / "config.yaml"
    dn = DaemonNode.create(
        tmp_path / "n",
        captured_logs_dir,
        label_of(request),
        rke2_config=str(rke2_config),
        node_ip=["127.0.0.1"],
        roles=["agent"],
        datastore_retry_min=0.1,
        datastore_retry_max=0.2,
        log_level="debug",
    )
    rke2_config.parent.mkdir(mode=0o700)
    server = f"https://127.0.0.1:{free_port()}"  # nothing listens: rke2-agent never got in
    rke2_config.write_text(yaml.safe_dump({"token": dn.settings["token"], "server": server}))
    with dn.daemon() as d:
        assert d.notify.expect("READY").fields["STATUS"] == AGENT_FIRST_START
        _wait_count(d, "datastore_retry_failed", 2)
        assert not dn.data.exists()
        assert d.stop() == 0
    assert len(d.events("datastore_waiting")) == 1
    assert d.events("startup_failed") == []
    assert not d.stray_lines()
