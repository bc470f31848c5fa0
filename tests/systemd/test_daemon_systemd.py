"""The real daemon (`rke2certd run` from the .deb) under real systemd as PID 1, as an operator
meets it: `systemctl start` returns once READY says the node's certificates are good, the events
are in the journal with filterable fields, staged sets dropped into the watched dir are applied
or refused, `systemctl reload` renews, the watchdog catches a stopped loop, and the drop-in runs
`rke2certd renew` before rke2-server starts.

One container and one package for the module; the tests run in file order on one node (each
states what it needs). Every CLI stderr and the container's journal go to the captured logs,
which tests/test_no_secrets_in_logs.py greps.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon.support import CapturedLogs
from tests.harness.journald import decode_entry
from tests.harness.nspawn import Container, booted
from tests.harness.wait import SAFETY

pytestmark = [pytest.mark.systemd, pytest.mark.slow]  # boots containers

DATA = "/var/lib/rancher/rke2"
TLS = f"{DATA}/server/tls"
INCOMING = f"{DATA}/server/rotate-ca/incoming"
MADE = f"{DATA}/server/rotate-ca/made"  # sets are made here, then renamed in (same filesystem)
CONFIG = "/etc/rke2certd/config.yaml"
KUBELET = f"{DATA}/agent/client-kubelet.crt"
NODE_FILES = (
    f"{TLS}/server-ca.crt",
    f"{TLS}/client-ca.crt",
    f"{TLS}/etcd/server-ca.crt",
    f"{TLS}/serving-kube-apiserver.crt",
    f"{TLS}/serving-kube-apiserver.key",
    f"{TLS}/etcd/server-client.crt",
    f"{TLS}/client-admin.crt",
    KUBELET,
    f"{DATA}/agent/client-kubelet.key",
    f"{DATA}/agent/serving-kubelet.crt",
    f"{DATA}/server/token",
)
WATCHDOG_DROPIN = "/etc/systemd/system/rke2certd.service.d/50-test-watchdog.conf"
STANDIN_SERVER = f"""\
[Unit]
Description=stand-in for rke2-server (test): records which certificates exist when it starts

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for f in {" ".join(NODE_FILES)}; do \\
  if test -s "$f"; then echo "present $f"; else echo "MISSING $f"; fi; done \\
  > /run/rke2-standin.seen; \\
  openssl x509 -noout -serial -in {KUBELET} >> /run/rke2-standin.seen; \\
  echo rke2-standin-started'
"""


# --- the container -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> CapturedLogs:
    return CapturedLogs.for_session(tmp_path_factory)


@pytest.fixture(scope="module")
def password(logs: CapturedLogs) -> str:
    return logs.new_password("systemd-test")


@pytest.fixture(scope="module")
def ct(deb_package: Path, logs: CapturedLogs, password: str) -> Iterator[Container]:
    with booted() as c:
        c.install_deb(deb_package)
        write_config(c, password)
        try:
            yield c
        finally:
            # the whole journal (export format keeps every byte) goes to the captured logs
            c.sh("journalctl --no-pager -o export > /srv/harness/journal.export")
            export = c.share / "journal.export"
            if export.exists():
                logs.new_file("systemd-container-journal", ".export").write_bytes(
                    export.read_bytes()
                )


def write_config(ct: Container, password: str, **extra: Any) -> None:
    doc = {
        "node-name": "node-a",
        "node-ip": ["192.0.2.10"],
        "token": password,
        "staging-quiet": 0.5,
        **{k.replace("_", "-"): v for k, v in extra.items()},
    }
    ct.write(CONFIG, yaml.safe_dump(doc, sort_keys=False), mode=0o600)


# --- helpers -------------------------------------------------------------------------------------


def show(ct: Container, unit: str, *props: str, fmt: str | None = None) -> dict[str, str]:
    argv = ["systemctl", "show", unit, *(f"-p{p}" for p in props)]
    if fmt:
        argv.append(f"--timestamp={fmt}")
    out = ct.exec(argv, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(cond: Callable[[], Any], timeout: float = SAFETY, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def journal(ct: Container, *matches: str) -> list[dict[str, Any]]:
    out = ct.journal("-o", "json", *matches)
    return [decode_entry(json.loads(line)) for line in out.splitlines() if line.strip()]


def events(ct: Container, event: str, *matches: str) -> list[dict[str, Any]]:
    return journal(ct, "-u", "rke2certd", f"EVENT={event}", *matches)


def cli(ct: Container, logs: CapturedLogs, *args: str) -> str:
    """`rke2certd ARGS` in the container (the installed config); stderr to the captured logs."""
    r = ct.exec(["rke2certd", *args], timeout=120)
    logs.new_file(f"systemd-cli-{args[0]}").write_text(r.stderr)
    assert r.returncode == 0, f"rke2certd {shlex.join(args)}: {r.stderr}"
    return r.stdout


def serial(ct: Container, path: str) -> str:
    out = ct.exec(["openssl", "x509", "-noout", "-serial", "-in", path], check=True).stdout
    return out.strip().split("=", 1)[1].lower()


def sha256(ct: Container, path: str) -> str:
    return ct.exec(["sha256sum", path], check=True).stdout.split()[0]


def ensure_running(ct: Container) -> None:
    ct.exec(["systemctl", "start", "rke2certd"], check=True, timeout=120)


def stage(ct: Container, name: str, prepare: str = "") -> None:
    """Rename the set made in MADE/name into the staging dir (after `prepare`, a shell snippet
    run in the set's dir)."""
    if prepare:
        ct.sh(f"set -e; cd {MADE}/{name}; {prepare}", check=True)
    ct.exec(["mv", f"{MADE}/{name}", f"{INCOMING}/{name}"], check=True)


def wait_result(ct: Container, name: str, timeout: float = SAFETY) -> tuple[str, dict[str, Any]]:
    """(".applied" or ".rejected", result.json) once the daemon filed the set."""
    script = (
        f"for f in {INCOMING}/.applied/{name}-*/result.json "
        f"{INCOMING}/.rejected/{name}-*/result.json; do "
        '[ -f "$f" ] && { echo "$f"; cat "$f"; exit 0; }; done; exit 1'
    )

    def filed() -> tuple[str, dict[str, Any]] | None:
        r = ct.sh(script)
        if r.returncode != 0:
            return None
        path, _, doc = r.stdout.partition("\n")
        return path.split("/")[-3], json.loads(doc)

    found: tuple[str, dict[str, Any]] = wait_for(filed, timeout, f"{name} to be filed")
    return found


# --- the tests -----------------------------------------------------------------------------------


def test_start_returns_only_after_ready_with_the_certificates_on_disk(ct: Container) -> None:
    assert ct.exec(["test", "-e", TLS]).returncode != 0  # a fresh node
    ct.exec(["systemctl", "start", "rke2certd"], check=True, timeout=120)
    # right after `start` returned (Type=notify: it waits for READY=1)
    present = ct.sh(f"for f in {' '.join(NODE_FILES)}; do test -s $f || echo MISSING $f; done")
    assert present.stdout == "", present.stdout
    props = show(
        ct,
        "rke2certd",
        "ActiveState",
        "SubState",
        "StatusText",
        "ActiveEnterTimestamp",
        fmt="us+utc",
    )
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    status = props["StatusText"]
    assert f"watching {INCOMING}" in status, status
    assert re.search(r"\d+ certificates; next expiry \S+ on \d{4}-\d\d-\d\d \d\d:\d\d UTC", status)
    # every file was written before systemd saw READY (ActiveEnterTimestamp)
    mtimes = ct.exec(["stat", "-c", "%.6Y", *NODE_FILES], check=True).stdout.split()
    active_at = datetime.strptime(props["ActiveEnterTimestamp"], "%a %Y-%m-%d %H:%M:%S.%f UTC")
    active_epoch = (active_at - datetime(1970, 1, 1)).total_seconds()
    assert max(float(m) for m in mtimes) <= active_epoch + 0.001
    # and the certificates are good, checked by the CLI of the package
    check = ct.exec(["rke2certd", "certificate", "check", "-o", "json"])
    assert check.returncode == 0, check.stdout + check.stderr


def test_journal_has_the_startup_events_with_their_fields(ct: Container) -> None:
    ensure_running(ct)
    kubelet = journal(ct, "-u", "rke2certd", "CERT_SERVICE=kubelet")
    assert kubelet, "journalctl -u rke2certd CERT_SERVICE=kubelet found nothing"
    for entry in kubelet:
        assert entry["SYSLOG_IDENTIFIER"] == "rke2certd"
        assert entry["_TRANSPORT"] == "journal"  # the native protocol, not the stderr stream
        assert entry["_SYSTEMD_UNIT"] == "rke2certd.service"
    renewed = [e for e in kubelet if e.get("EVENT") == "cert_renewed"]
    paths = {e["CERT_PATH"] for e in renewed}
    assert {KUBELET, f"{DATA}/agent/serving-kubelet.crt"} <= paths
    first = next(e for e in renewed if e["CERT_PATH"] == KUBELET)
    assert first["PRIORITY"] == "6"
    assert first["REASON"] == "missing; key missing"
    assert re.fullmatch(r"[0-9a-f]+", first["CERT_SERIAL"])
    assert first["CERT_NOT_AFTER"].startswith(str(datetime.now().year + 1))
    assert "cert_renewed" in first["MESSAGE"] and KUBELET in first["MESSAGE"]
    # one event per field value: filter by path, by serial
    by_path = journal(ct, "-u", "rke2certd", f"CERT_PATH={KUBELET}", "EVENT=cert_renewed")
    assert by_path and by_path[0]["CERT_SERIAL"] == first["CERT_SERIAL"]
    for event in ("ca_created", "bootstrap_saved", "staging_watched", "ready"):
        assert events(ct, event), f"no {event} event in the journal"
    assert events(ct, "staging_watched")[0]["CERT_PATH"] == INCOMING
    assert events(ct, "ca_created")[0]["PRIORITY"] == "6"


def test_a_good_set_renamed_in_is_applied(ct: Container, logs: CapturedLogs) -> None:
    ensure_running(ct)
    ca_before = sha256(ct, f"{TLS}/server-ca.crt")
    cli(ct, logs, "ca", "stage-rotation", "--out", f"{MADE}/good")
    stage(ct, "good")
    bucket, result = wait_result(ct, "good")
    assert (bucket, result["status"], result["force"]) == (".applied", "applied", False), result
    assert len(result["changed"]) == 11 and result["tokensChanged"] is True
    applied = wait_for(lambda: events(ct, "staged_set_applied", "STAGED_SET=good"))[0]
    assert applied["PRIORITY"] == "6"
    assert applied["CA_GENERATION"] == result["caGeneration"]["new"]
    assert applied["CERT_PATH"].startswith(f"{INCOMING}/.applied/good-")
    assert events(ct, "ca_rotated", f"CA_GENERATION={result['caGeneration']['new']}")
    # the daemon took the new CAs and says what must restart
    wait_for(lambda: sha256(ct, f"{TLS}/server-ca.crt") != ca_before, SAFETY, "the new CA on disk")
    restart = wait_for(
        lambda: events(ct, "restart_needed", "REASON=staged set good applied"), 10, "restart"
    )
    assert restart[0]["UNITS"] == "rke2-server"


def test_a_bad_set_is_rejected_with_every_reason(ct: Container, logs: CapturedLogs) -> None:
    ensure_running(ct)
    ca_before = sha256(ct, f"{TLS}/server-ca.crt")
    cli(ct, logs, "ca", "stage-rotation", "--out", f"{MADE}/bad")
    # the server CA's key replaced by another CA's: the key does not match its certificate
    stage(ct, "bad", "cp tls/client-ca.key tls/server-ca.key")
    bucket, result = wait_result(ct, "bad")
    assert (bucket, result["status"]) == (".rejected", "rejected"), result
    assert any("server-ca.key" in r for r in result["reasons"]), result["reasons"]
    txt = ct.exec(["sh", "-c", f"cat {INCOMING}/.rejected/bad-*/result.txt"], check=True).stdout
    assert "Refused, nothing changed. Every reason:" in txt
    rejected = wait_for(lambda: events(ct, "staged_set_rejected", "STAGED_SET=bad"))[0]
    assert rejected["PRIORITY"] == "3" and "server-ca.key" in rejected["REASON"]
    assert journal(ct, "-u", "rke2certd", "EVENT=rotate_ca_rejected", "PRIORITY=3")
    assert sha256(ct, f"{TLS}/server-ca.crt") == ca_before  # nothing changed


def test_an_unrelated_root_needs_the_force_marker(ct: Container, logs: CapturedLogs) -> None:
    ensure_running(ct)
    for name in ("custom", "custom-forced"):
        cli(
            ct,
            logs,
            "ca",
            "generate-custom",
            "--out",
            f"{MADE}/{name}/tls",
            "--key-type",
            "ecdsa-p256",
        )
    stage(ct, "custom")
    bucket, refused = wait_result(ct, "custom")
    assert (bucket, refused["status"], refused["force"]) == (".rejected", "rejected", False)
    assert any("--force" in r for r in refused["reasons"]), refused["reasons"]

    stage(ct, "custom-forced", "touch FORCE")
    bucket, forced = wait_result(ct, "custom-forced")
    assert (bucket, forced["status"], forced["force"]) == (".applied", "applied", True), forced
    assert forced["forcedPast"], "the checks it was forced past are listed"
    applied = wait_for(lambda: events(ct, "staged_set_applied", "STAGED_SET=custom-forced"))[0]
    assert applied["FORCE"] == "true"
    assert journal(ct, "-u", "rke2certd", "EVENT=rotate_ca_forced", "PRIORITY=4")


def test_reload_renews_a_cert_that_entered_the_window(
    ct: Container, logs: CapturedLogs, password: str
) -> None:
    ensure_running(ct)
    # the kubelet's client cert re-signed by its CA for 200 days (openssl): outside the 90-day
    # window, inside a 250-day one
    ct.sh(
        "set -e; cd /run; "
        f"openssl x509 -x509toreq -in {KUBELET} -signkey {DATA}/agent/client-kubelet.key "
        "-copy_extensions copyall -out k.csr 2>/dev/null; "
        f"openssl x509 -req -in k.csr -CA {TLS}/client-ca.crt -CAkey {TLS}/client-ca.key "
        "-days 200 -copy_extensions copyall -out k.crt 2>/dev/null; "
        f"sed -n '/END CERTIFICATE/,$p' {KUBELET} | tail -n +2 >> k.crt; "
        f"chmod 644 k.crt; mv k.crt {KUBELET}; rm k.csr",
        check=True,
    )
    short = serial(ct, KUBELET)
    before = len(events(ct, "cert_renewed", f"CERT_PATH={KUBELET}"))
    write_config(ct, password, renew_before_days=250)
    try:
        ct.exec(["systemctl", "reload", "rke2certd"], check=True)
        renewed = wait_for(
            lambda: events(ct, "cert_renewed", f"CERT_PATH={KUBELET}")[before:], 30, "renewal"
        )
        assert renewed[0]["REASON"] == "expires within 250 days"
        assert renewed[0]["CERT_SERVICE"] == "kubelet"
        assert serial(ct, KUBELET) != short
        assert events(ct, "reloading", "REASON=SIGHUP")
        wait_for(lambda: events(ct, "restart_needed", "REASON=reload"), SAFETY, "restart_needed")
        # the reload is over (READY=1 again): still active, same process
        props = show(ct, "rke2certd", "ActiveState", "StatusText", "NRestarts")
        assert props["ActiveState"] == "active" and "next expiry" in props["StatusText"]
    finally:
        write_config(ct, password)
        ct.exec(["systemctl", "reload", "rke2certd"])


def test_the_watchdog_kills_a_stopped_loop_and_systemd_restarts_it(ct: Container) -> None:
    # 4 s: a ping (every 2 s) must be 2 s late before systemd kills a loop that runs
    ct.write(WATCHDOG_DROPIN, "[Service]\nWatchdogSec=4s\nRestartSec=500ms\n")
    ct.exec(["systemctl", "daemon-reload"], check=True)
    try:
        ct.exec(["systemctl", "restart", "rke2certd"], check=True, timeout=120)
        props = show(ct, "rke2certd", "MainPID", "NRestarts", "WatchdogUSec")
        assert props["WatchdogUSec"] == "4s"
        old_pid, restarts = props["MainPID"], int(props["NRestarts"])
        # systemd stamps every ping it takes: three of them, and the loop's pings kept it alive
        stamps: set[str] = set()

        def pinged() -> bool:
            stamps.add(show(ct, "rke2certd", "WatchdogTimestampMonotonic").popitem()[1])
            return len(stamps) >= 4  # the start's stamp and three pings

        wait_for(pinged, SAFETY, "systemd to take three watchdog pings")
        assert show(ct, "rke2certd", "MainPID", "ActiveState") == {
            "MainPID": old_pid,
            "ActiveState": "active",
        }
        ct.exec(["kill", "-STOP", old_pid], check=True)

        def restarted() -> bool:
            now = show(ct, "rke2certd", "MainPID", "ActiveState", "NRestarts")
            return (
                now["ActiveState"] == "active"
                and now["MainPID"] not in ("0", old_pid)
                and int(now["NRestarts"]) > restarts
            )

        wait_for(restarted, SAFETY, "a watchdog restart")
        messages = ct.journal("-u", "rke2certd", "-o", "cat")
        assert "Watchdog timeout" in messages
        assert len(events(ct, "ready")) >= 2  # the new process said READY again
    finally:
        ct.exec(["rm", "-f", WATCHDOG_DROPIN])
        ct.exec(["systemctl", "daemon-reload"])
        ct.exec(["systemctl", "restart", "rke2certd"], timeout=120)


def test_the_dropin_runs_renew_before_a_standin_rke2_server(ct: Container) -> None:
    # the daemon is not needed for this (and may not even be running on a real node)
    ct.exec(["systemctl", "stop", "rke2certd"], check=True)
    ct.exec(
        [
            "rm",
            "-f",
            KUBELET,
            f"{DATA}/agent/client-kubelet.key",
            f"{TLS}/serving-kube-apiserver.crt",
        ],
        check=True,
    )
    ct.write("/etc/systemd/system/rke2-server.service", STANDIN_SERVER)
    ct.exec(["systemctl", "daemon-reload"], check=True)
    pre = show(ct, "rke2-server", "ExecStartPre")["ExecStartPre"]
    assert "/opt/rke2certd/bin/rke2certd renew --offline-ok" in pre.replace(" ; ", " ")
    ct.exec(["systemctl", "start", "rke2-server"], check=True, timeout=120)
    props = show(ct, "rke2-server", "ActiveState", "Result")
    assert props == {"ActiveState": "active", "Result": "success"}
    seen = ct.exec(["cat", "/run/rke2-standin.seen"], check=True).stdout
    assert "MISSING" not in seen and seen.count("present ") == len(NODE_FILES), seen
    assert f"serial={serial(ct, KUBELET).upper()}" in seen  # the renewed one
    # renew's events are in rke2-server's journal, before the stand-in's own output
    unit = journal(ct, "-u", "rke2-server")
    renewed = [i for i, e in enumerate(unit) if e.get("EVENT") == "cert_renewed"]
    started = [i for i, e in enumerate(unit) if e.get("MESSAGE") == "rke2-standin-started"]
    assert renewed and started and max(renewed) < started[0]
    paths = {unit[i]["CERT_PATH"] for i in renewed}
    assert {KUBELET, f"{TLS}/serving-kube-apiserver.crt"} <= paths
    assert all(unit[i]["SYSLOG_IDENTIFIER"] == "rke2certd" for i in renewed)
    assert journal(ct, "-u", "rke2-server", "-t", "rke2certd", "EVENT=cert_renewed")


def test_a_config_error_ends_in_a_failed_unit_that_says_why(ct: Container, password: str) -> None:
    """A bad key in the config: `rke2certd run` exits 78 (EX_CONFIG), which the unit's
    RestartPreventExitStatus= names, so the unit is "failed" at once with the reason in the
    journal, not "activating (auto-restart)" every RestartSec for ever."""
    ensure_running(ct)
    before = int(show(ct, "rke2certd", "NRestarts")["NRestarts"])
    write_config(ct, password, no_such_key=1)
    try:
        r = ct.exec(["systemctl", "restart", "rke2certd"], timeout=120)
        assert r.returncode != 0  # the start job failed

        def failed() -> dict[str, str] | None:
            props = show(
                ct, "rke2certd", "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts"
            )
            return props if props["ActiveState"] == "failed" else None

        props = wait_for(failed, SAFETY, "the unit to be failed")
        assert (props["Result"], props["ExecMainStatus"]) == ("exit-code", "78"), props
        assert int(props["NRestarts"]) == before, props  # not restarted
        said = ct.journal("-u", "rke2certd", "-o", "cat")
        assert "invalid configuration" in said and "no-such-key" in said, said[-2000:]
    finally:
        write_config(ct, password)
        ct.exec(["systemctl", "reset-failed", "rke2certd"])
        ensure_running(ct)
    assert show(ct, "rke2certd", "ActiveState")["ActiveState"] == "active"


def test_on_an_rke2_node_the_daemon_waits_for_rke2_active(ct: Container, password: str) -> None:
    """With RKE2's config and no RKE2 datastore (RKE2 never started, or its etcd down: nothing
    listens on 127.0.0.1:2379 here) the unit is active and says what it waits for in its status;
    systemd never restarts it ("activating (auto-restart)" looks like a failure)."""
    rke2_config = "/etc/rancher/rke2/config.yaml"
    ct.exec(["mkdir", "-p", "-m", "0700", "/etc/rancher/rke2"], check=True)
    ct.write(rke2_config, yaml.safe_dump({"token": password}), mode=0o600)
    write_config(ct, password, log_level="debug")  # the retries are debug events
    try:
        ct.exec(["systemctl", "restart", "rke2certd"], check=True, timeout=120)  # READY
        props = show(ct, "rke2certd", "MainPID", "NRestarts")
        pid, restarts = props["MainPID"], props["NRestarts"]
        wait_for(
            lambda: len(events(ct, "datastore_retry_failed", f"_PID={pid}")) >= 2,
            90,
            "two retries",
        )
        now = show(ct, "rke2certd", "MainPID", "NRestarts", "ActiveState", "SubState", "StatusText")
        assert now["StatusText"].startswith("waiting for RKE2's"), now
        assert {k: now[k] for k in ("MainPID", "NRestarts", "ActiveState", "SubState")} == {
            "MainPID": pid,
            "NRestarts": restarts,
            "ActiveState": "active",
            "SubState": "running",
        }
        assert len(events(ct, "datastore_waiting", f"_PID={pid}")) == 1
        if now["StatusText"] == "waiting for RKE2's first start":  # this test alone: fresh node
            assert ct.exec(["test", "-e", TLS]).returncode != 0
    finally:
        ct.exec(["rm", "-f", rke2_config])
        write_config(ct, password)
        ct.exec(["systemctl", "restart", "rke2certd"], timeout=120)
