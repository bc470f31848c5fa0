"""The .deb (packaging/build-deb.sh) installed with dpkg in a container booted with real systemd:
its layout, the unit and drop-ins as systemd sees them, the CLI, the hardened unit running the
daemon's building blocks (sandbox_probe.py) with READY/WATCHDOG/RELOADING/STOPPING and journald
fields, removal and purge. The RPM is built from the spec and installed with rpm too."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon.support import CapturedLogs
from tests.harness.journald import decode_entry
from tests.harness.nspawn import Container, booted

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.systemd

PROBE_DROPIN = """\
[Service]
ExecStart=
ExecStart=/opt/rke2certd/bin/python /srv/harness/sandbox_probe.py
WatchdogSec=3s
RestartSec=1s
"""
NODE_FILES = (
    "/var/lib/rancher/rke2/server/tls/server-ca.crt",
    "/var/lib/rancher/rke2/server/tls/serving-kube-apiserver.crt",
    "/var/lib/rancher/rke2/server/tls/etcd/server-client.crt",
    "/var/lib/rancher/rke2/agent/client-kubelet.crt",
    "/var/lib/rancher/rke2/agent/client-kubelet.key",
)
# A stand-in whose ExecStart records which of the node's files exist when it starts.
RECORDING_STANDIN = f"""\
[Unit]
Description=stand-in for {{name}} (test): records the certificates it starts with

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for f in {" ".join(NODE_FILES)}; do \\
  if test -s "$f"; then echo "present $f"; else echo "MISSING $f"; fi; done > /run/{{name}}.seen; \\
  echo "{{name}} started"'
"""
STANDIN = """\
[Unit]
Description=stand-in for {name} (test)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
"""


@pytest.fixture(scope="module")
def ct(deb_package: Path) -> Iterator[Container]:
    with booted() as c:
        started = time.monotonic()
        c.install_deb(deb_package)
        print(f"dpkg -i took {time.monotonic() - started:.1f}s")
        yield c


def show(ct: Container, unit: str, *props: str) -> dict[str, str]:
    out = ct.exec(["systemctl", "show", unit, *(f"-p{p}" for p in props)], check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_deb_layout(deb_package: Path) -> None:
    info = subprocess.run(
        ["dpkg-deb", "-f", str(deb_package), "Package", "Version", "Architecture", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Package: rke2certd" in info and "Depends: python3." in info
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb_package)], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "./opt/rke2certd/bin/rke2certd",
        "./opt/rke2certd/pyvenv.cfg",
        "./lib/systemd/system/rke2certd.service",
        "./lib/systemd/system/rke2-server.service.d/10-rke2certd.conf",
        "./lib/systemd/system/rke2-agent.service.d/10-rke2certd.conf",
        "./usr/lib/tmpfiles.d/rke2certd.conf",
        "./usr/bin/rke2certd -> /opt/rke2certd/bin/rke2certd",
    ):
        assert path in listing, path
    config = next(line for line in listing.splitlines() if "etc/rke2certd/config.yaml" in line)
    assert config.startswith("-rw------- root/root")
    assert "site-packages/cryptography/" in listing and "site-packages/structlog/" in listing
    assert "/bin/pip" not in listing  # the package manager owns the venv
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(deb_package), "conffiles"], capture_output=True, text=True
    ).stdout
    assert conffiles.split() == ["/etc/rke2certd/config.yaml"]


def test_installed_unit_as_systemd_sees_it(ct: Container) -> None:
    cat = ct.exec(["systemctl", "cat", "rke2certd"], check=True).stdout
    assert re.match(r"# (/usr)?/lib/systemd/system/rke2certd\.service\n", cat)
    assert "ExecStart=/opt/rke2certd/bin/rke2certd run" in cat
    verify = ct.exec(["systemd-analyze", "verify", "rke2certd.service"])
    assert (verify.returncode, verify.stderr) == (0, "")
    # postinst ran tmpfiles (systemd runs here): the sandbox's writable dirs exist
    ct.exec(["test", "-d", "/var/lib/rancher/rke2"], check=True)
    ct.exec(["test", "-d", "/etc/rancher/rke2"], check=True)
    mode = ct.exec(["stat", "-c", "%a %U", "/etc/rke2certd/config.yaml"], check=True).stdout
    assert mode.strip() == "600 root"
    assert show(ct, "rke2certd", "UnitFileState")["UnitFileState"] == "disabled"


def test_python_environment(ct: Container) -> None:
    r = ct.exec(
        [
            "/opt/rke2certd/bin/python",
            "-c",
            "import sys, rke2certd, cryptography, pydantic, structlog, sdnotify, watchdog, etcd3gw;"
            "print(sys.prefix, sys.base_prefix, rke2certd.__file__)",
        ],
        check=True,
    )
    prefix, base, path = r.stdout.split()
    assert prefix == "/opt/rke2certd" and base == "/usr"  # Debian's Python, not a pyenv one
    assert path.startswith("/opt/rke2certd/lib/python3.")


def test_cli_help(ct: Container) -> None:
    probe = ct.exec(["/opt/rke2certd/bin/python", "-c", "import rke2certd.cli"])
    if probe.returncode != 0:
        # TODO(issue 5): the CLI is written by another part of the project; once it imports,
        # this test runs for real.
        pytest.skip(f"rke2certd.cli not importable yet: {probe.stderr.strip().splitlines()[-1]}")
    for cmd in (["/opt/rke2certd/bin/rke2certd", "--help"], ["rke2certd", "--help"]):
        r = ct.exec(cmd)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("usage: rke2certd")


@pytest.mark.parametrize("name", ["rke2-server", "rke2-agent"])
def test_standin_rke2_unit_gets_the_dropin(ct: Container, name: str) -> None:
    ct.write(f"/etc/systemd/system/{name}.service", STANDIN.format(name=name))
    ct.exec(["systemctl", "daemon-reload"], check=True)
    cat = ct.exec(["systemctl", "cat", name], check=True).stdout
    # merged /usr: systemd may name /lib/... or /usr/lib/... (the same dir)
    assert re.search(
        rf"^# (/usr)?/lib/systemd/system/{name}\.service\.d/10-rke2certd\.conf$", cat, re.M
    )
    props = show(ct, name, "ExecStartPre", "After")
    assert "argv[]=/opt/rke2certd/bin/rke2certd renew" in props["ExecStartPre"]
    assert "rke2certd.service" not in props["After"].split()  # see the drop-in


@pytest.mark.parametrize("name", ["rke2-server", "rke2-agent"])
def test_standin_rke2_unit_starts_after_renew_made_its_certificates(
    ct: Container, name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On an empty node (the packaged config: every role, no token), starting the unit runs
    `rke2certd renew` first: the stand-in's ExecStart finds the certificates, and renew's events
    are in the unit's journal before the stand-in's own line."""
    ct.exec(["rm", "-rf", "/var/lib/rancher/rke2/server", "/var/lib/rancher/rke2/agent"])
    ct.write(f"/etc/systemd/system/{name}.service", RECORDING_STANDIN.format(name=name))
    ct.exec(["systemctl", "daemon-reload"], check=True)
    try:
        ct.exec(["systemctl", "start", name], check=True, timeout=120)
        seen = ct.exec(["cat", f"/run/{name}.seen"], check=True).stdout.split("\n")
        assert [line.split()[0] for line in seen if line] == ["present"] * len(NODE_FILES), seen
        entries = [
            decode_entry(json.loads(line))
            for line in ct.journal("-u", name, "-o", "json").splitlines()
        ]
        renewed = [
            i
            for i, e in enumerate(entries)
            if e.get("EVENT") == "cert_renewed" and e.get("SYSLOG_IDENTIFIER") == "rke2certd"
        ]
        started = [i for i, e in enumerate(entries) if e.get("MESSAGE") == f"{name} started"]
        assert renewed and started and max(renewed) < started[0]
        assert ct.journal("-u", name, "-t", "rke2certd", "EVENT=cert_renewed", "-o", "cat")
    finally:
        ct.exec(["systemctl", "stop", name])
        # renew made a token (none was configured): the log grep must look for it too
        logs = CapturedLogs.for_session(tmp_path_factory)
        token = ct.exec(["cat", "/var/lib/rancher/rke2/server/token"]).stdout.strip()
        if "::" in token:
            logs.add_secret(token.rsplit(":", 1)[-1])
        ct.sh(f"journalctl -u {name} -o export > /srv/harness/{name}.export")
        with contextlib.suppress(FileNotFoundError):
            logs.new_file(f"package-{name}-journal", ".export").write_bytes(
                (ct.share / f"{name}.export").read_bytes()
            )


def test_hardened_unit_runs_the_daemon_building_blocks(ct: Container) -> None:
    """READY only after start-up, STATUS, journald fields, reload, watchdog kill + restart,
    STOPPING: the real rke2certd.service sandbox, with sandbox_probe.py as its ExecStart."""
    ct.put(Path(__file__).with_name("sandbox_probe.py"))
    ct.write("/etc/systemd/system/rke2certd.service.d/50-probe.conf", PROBE_DROPIN)
    ct.write("/etc/systemd/system/rke2-standin.service", STANDIN.format(name="restart target"))
    ct.exec(["systemctl", "daemon-reload"], check=True)
    try:
        _probe_run(ct)
    finally:
        ct.exec(["systemctl", "stop", "rke2certd"])
        ct.exec(["rm", "-rf", "/etc/systemd/system/rke2certd.service.d"])
        ct.exec(["systemctl", "daemon-reload"])


def _probe_run(ct: Container) -> None:
    # start returns only once READY=1 arrived: by then the probe wrote its results
    ct.exec(["systemctl", "start", "rke2certd"], check=True, timeout=60)
    props = show(ct, "rke2certd", "ActiveState", "StatusText", "MainPID", "WatchdogUSec")
    assert props["ActiveState"] == "active"
    assert props["StatusText"].startswith("probe ready: watching /var/lib/rancher/rke2/")
    assert props["WatchdogUSec"] == "3s"
    found = json.loads(ct.exec(["cat", "/run/rke2certd/probe.json"], check=True).stdout)
    assert found["format"] == "journald" and found["notify"] is True
    assert found["watchdog_interval"] == 1.5
    assert found["key_mode"] == found["crt_mode"] == "0o600"  # UMask=0077
    assert found["pydantic"] == 90 and found["inotify"] is True
    assert found["write /usr/local/rke2certd-probe"] == "Read-only file system"
    assert found["write /etc/rke2certd-probe"] == "Read-only file system"
    assert found["systemctl_restart"] == 0, found["systemctl_stderr"]

    # (c) journald native fields, filtered as an operator would
    entries = [
        json.loads(line)
        for line in ct.journal("-u", "rke2certd", "CERT_SERVICE=kubelet", "-o", "json").splitlines()
    ]
    renewed = next(e for e in entries if e.get("EVENT") == "cert_renewed")
    assert renewed["SYSLOG_IDENTIFIER"] == "rke2certd" and renewed["PRIORITY"] == "6"
    assert renewed["_SYSTEMD_UNIT"] == "rke2certd.service" and renewed["_TRANSPORT"] == "journal"
    assert renewed["CERT_PATH"] == "/var/lib/rancher/rke2/server/tls/probe/probe.crt"
    assert renewed["REASON"] == "probe" and renewed["STAGED_SET"] == "set-1"
    assert renewed["CA_GENERATION"] == "1" and renewed["CERT_NOT_AFTER"].startswith("20")
    assert renewed["TOKEN"] == "[REDACTED]"
    assert any(e.get("EVENT") == "restart_needed" for e in entries)  # a repeated field matches
    export = ct.journal("-u", "rke2certd", "-o", "export")
    assert "probe-password-1234" not in export and "PRIVATE KEY-----" not in export

    # reload: SIGHUP -> RELOADING=1 ... READY=1
    ct.exec(["systemctl", "reload", "rke2certd"], check=True)
    _wait(lambda: "reloaded 1" in show(ct, "rke2certd", "StatusText")["StatusText"])
    assert "daemon_reloaded" in ct.journal("-u", "rke2certd", "EVENT=daemon_reloaded", "-o", "cat")

    # a stuck loop (SIGSTOP) is killed by the watchdog and restarted
    old_pid = props["MainPID"]
    ct.exec(["kill", "-STOP", old_pid], check=True)

    def restarted() -> bool:
        now = show(ct, "rke2certd", "MainPID", "ActiveState")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", old_pid)

    _wait(restarted, timeout=20)  # WatchdogSec=3s, RestartSec=1s
    assert int(show(ct, "rke2certd", "NRestarts")["NRestarts"]) >= 1
    assert "Watchdog timeout" in ct.journal("-u", "rke2certd", "-o", "cat")

    # stop: SIGTERM -> STOPPING=1, clean exit
    ct.exec(["systemctl", "stop", "rke2certd"], check=True)
    props = show(ct, "rke2certd", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert "daemon_stopping" in ct.journal("-u", "rke2certd", "EVENT=daemon_stopping", "-o", "cat")


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_remove_and_purge(ct: Container) -> None:
    ct.exec(["dpkg", "-r", "rke2certd"], check=True)
    assert ct.exec(["systemctl", "cat", "rke2certd"]).returncode != 0
    assert ct.exec(["test", "-e", "/etc/rke2certd/config.yaml"]).returncode == 0  # conffile kept
    ct.exec(["dpkg", "-P", "rke2certd"], check=True)
    assert ct.exec(["test", "-e", "/etc/rke2certd"]).returncode != 0
    assert ct.exec(["test", "-e", "/opt/rke2certd"]).returncode != 0
    # the drop-in left with the package; the stand-in unit is untouched
    cat = ct.exec(["systemctl", "cat", "rke2-server"], check=True).stdout
    assert "10-rke2certd.conf" not in cat


@pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="rpmbuild not installed")
def test_rpm_builds_and_installs(tmp_path: Path) -> None:
    started = time.monotonic()
    r = subprocess.run(
        ["bash", str(REPO / "packaging/build-rpm.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rpm = Path(r.stdout.strip().splitlines()[-1])
    print(f"built {rpm.name} in {time.monotonic() - started:.1f}s")
    with booted() as c:
        inside = c.put(rpm)
        # Debian's rpm installs only when told that dpkg is not its business
        c.exec(["rpm", "-i", "--nodeps", "--force-debian", inside], check=True)
        cat = c.exec(["systemctl", "cat", "rke2certd"], check=True).stdout
        assert re.match(r"# (/usr)?/lib/systemd/system/rke2certd\.service\n", cat)
        owned = c.exec(["rpm", "-qf", "/usr/lib/systemd/system/rke2certd.service"], check=True)
        assert owned.stdout.startswith("rke2certd-")
        verify = c.exec(["systemd-analyze", "verify", "rke2certd.service"])
        assert (verify.returncode, verify.stderr) == (0, "")
        c.exec(["/usr/bin/rke2certd", "--help"])  # runs once the CLI exists (see test_cli_help)
        c.exec(["/opt/rke2certd/bin/python", "-c", "import rke2certd.log.output"], check=True)
        assert c.exec(["stat", "-c", "%a", "/etc/rke2certd/config.yaml"]).stdout.strip() == "600"
        c.exec(["test", "-d", "/var/lib/rancher/rke2"], check=True)  # %post ran tmpfiles
