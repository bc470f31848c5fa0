"""A stand-in for `rke2certd run`, run by the real rke2certd.service (its ExecStart= replaced by a
drop-in) inside the nspawn container, to prove that the unit's sandbox lets the daemon's
building blocks work and that they speak to the real systemd and journald:

- output.configure("auto") picks journald; events carry their fields (and the redaction works);
- cryptography (keys, certs, signatures), pydantic and watchdog's inotify under
  MemoryDenyWriteExecute= and the syscall filter;
- writes with chmod/chown under the data dir, and a write outside ReadWritePaths= fails;
- `systemctl restart` of another unit from inside the sandbox (the restart-command);
- Notifier: READY with STATUS, WATCHDOG pings at half of WATCHDOG_USEC, RELOADING on SIGHUP,
  STOPPING on SIGTERM. Signal handlers only set flags, like the real loop must.

It writes what it found to /run/rke2certd/probe.json. Not a test module (no test_ prefix).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import BaseModel
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from rke2certd.daemon.notify import Notifier
from rke2certd.log import output

DATA = Path("/var/lib/rancher/rke2/server/tls/probe")
RESULT = Path("/run/rke2certd/probe.json")
FAKE_TOKEN = "K10" + "ab" * 32 + "::server:probe-password-1234"


class Settings(BaseModel):
    data_dir: str
    renew_before_days: int = 90


def main() -> int:
    output.configure("auto", "debug")
    log = structlog.get_logger("rke2certd")
    notifier = Notifier()
    found: dict[str, object] = {
        "format": output.detect_format(),
        "pid": os.getpid(),
        "notify": notifier.enabled,
        "watchdog_interval": notifier.watchdog_interval(),
    }
    notifier.status("probing the sandbox")
    notifier.extend_timeout(30)

    # cryptography: an EC CA and an RSA leaf, as the PKI code will do
    DATA.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    crt = DATA / "probe.crt"
    key = DATA / "probe.key"
    crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key.write_text(key_pem)
    os.chmod(key, 0o600)
    os.chown(key, 65534, 65534)  # CAP_CHOWN
    os.chown(key, 0, 0)
    found["key_mode"] = oct(key.stat().st_mode & 0o777)
    found["crt_mode"] = oct(crt.stat().st_mode & 0o777)  # UMask=0077
    # a dir RKE2 made for another user (etcd): CAP_DAC_OVERRIDE lets root write there
    other = DATA / "other-owner"
    other.mkdir(mode=0o700, exist_ok=True)
    os.chown(other, 65534, 65534)
    (other / "f").write_text("x")
    found["pydantic"] = Settings(data_dir="/var/lib/rancher/rke2").renew_before_days

    for outside in ("/usr/local/rke2certd-probe", "/etc/rke2certd-probe"):
        try:
            Path(outside).write_text("x")
            found[f"write {outside}"] = "allowed"
        except OSError as exc:
            found[f"write {outside}"] = exc.strerror

    restart = subprocess.run(
        ["systemctl", "restart", "rke2-standin.service"], capture_output=True, text=True
    )
    found["systemctl_restart"] = restart.returncode
    found["systemctl_stderr"] = restart.stderr.strip()

    # watchdog's inotify observer (ctypes) on a staging dir
    staging = DATA / "incoming"
    staging.mkdir(exist_ok=True)
    seen: list[str] = []

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            seen.append(str(event.src_path))

    observer = Observer()
    observer.schedule(Handler(), str(staging))
    observer.start()
    (staging / "marker").write_text("x")
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    observer.stop()
    observer.join()
    found["inotify"] = bool(seen)

    log.info(
        "cert_renewed",
        cert_path=str(crt),
        cert_service="kubelet",
        cert_serial=format(ca.serial_number, "x"),
        cert_not_after=ca.not_valid_after_utc,
        reason="probe",
        ca_generation=1,
        staged_set="set-1",
        token=FAKE_TOKEN,
        note=f"leaked? {key_pem}",
    )
    log.info("restart_needed", cert_service=["kube-apiserver", "kubelet"])
    log.warning("multi_line", detail="first line\nsecond line")
    RESULT.write_text(json.dumps(found, indent=1))

    flags = {"hup": False, "term": False}

    def on_signal(signum: int, _frame: object) -> None:
        flags["hup" if signum == signal.SIGHUP else "term"] = True  # only queue work

    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    notifier.ready(f"probe ready: watching {staging}; next expiry {ca.not_valid_after_utc:%F}")
    log.info("daemon_ready", staging_dir=str(staging))
    interval = notifier.watchdog_interval() or 1.0
    reloads = 0
    while not flags["term"]:
        notifier.watchdog()
        if flags["hup"]:
            flags["hup"] = False
            notifier.reloading()
            reloads += 1
            log.info("daemon_reloaded", reloads=reloads)
            notifier.ready(f"probe reloaded {reloads} time(s)")
        time.sleep(min(interval, 0.5))
    notifier.stopping("probe stopping")
    log.info("daemon_stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
