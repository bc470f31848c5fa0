"""A real, private systemd-journald for tests (root), without booting systemd.

    with Journald(tmp_path) as jd:            # starts it, waits for its socket, always stops it
        output.configure("journald", "info", journal_socket=str(jd.socket))
        ...
        entries = jd.entries("CERT_SERVICE=kubelet", expect=1)   # journalctl -D ... -o json

How: `systemd-journald` runs in a private mount namespace (`unshare -m`) where /run and /var/log
are fresh tmpfs (so it never touches the machine's journal, and Storage=auto picks volatile
storage), with two host dirs bound in: `<dir>/sock` on /run/systemd/journal (its sockets, so the
test process reaches them at `<dir>/sock/socket`) and `<dir>/journal` on /run/log/journal (the
journal files, which `journalctl -D` reads). Without socket activation journald binds its
sockets itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

JOURNALD = next(
    (
        p
        for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
        if os.path.exists(p)
    ),
    None,
)


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if JOURNALD is None:
        return "systemd-journald not found"
    for tool in ("unshare", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


class Journald:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.sock_dir = self.dir / "sock"
        self.journal_dir = self.dir / "journal"
        self.socket = self.sock_dir / "socket"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Journald:
        reason = missing_requirements()
        if reason:
            raise RuntimeError(f"cannot run journald: {reason}")
        self.sock_dir.mkdir(parents=True)
        self.journal_dir.mkdir(parents=True)
        script = (
            "set -e; mount -t tmpfs -o mode=0755 tmpfs /run; "
            "mkdir -p /run/systemd/journal /run/log/journal; "
            'mount --bind "$1" /run/systemd/journal; mount --bind "$2" /run/log/journal; '
            "mount -t tmpfs -o mode=0755 tmpfs /var/log; "
            'exec "$3"'
        )
        log = (self.dir / "journald.log").open("wb")
        with log:
            self._proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    "-",
                    str(self.sock_dir),
                    str(self.journal_dir),
                    str(JOURNALD),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "journald did not start: "
                    + (self.dir / "journald.log").read_text(errors="replace")
                )
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> Journald:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def journalctl(self, *args: str) -> str:
        r = subprocess.run(
            ["journalctl", "--no-pager", "-D", str(self.journal_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return r.stdout

    def entries(
        self, *matches: str, expect: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Entries from rke2certd matching `matches` (journalctl FIELD=value), every field in full
        (see decode_entry); waits until at least `expect` are there (journald reads its
        socket asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.journalctl("-o", "json", "--all", "SYSLOG_IDENTIFIER=rke2certd", *matches)
            found = [decode_entry(json.loads(line)) for line in out.splitlines() if line.strip()]
            if len(found) >= expect or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def export(self) -> bytes:
        """Everything journald stored (journal export format), e.g. to grep for secrets."""
        with contextlib.suppress(subprocess.CalledProcessError):
            return subprocess.run(
                ["journalctl", "--no-pager", "-D", str(self.journal_dir), "-o", "export"],
                capture_output=True,
                timeout=30,
                check=True,
            ).stdout
        return b""


def _text(value: Any) -> str:
    # journalctl -o json spells a value with control characters (a newline...) as byte numbers
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def decode_entry(raw: dict[str, Any]) -> dict[str, Any]:
    """A `journalctl -o json` entry with byte-array values decoded; a field that occurs several
    times stays a list of strings."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, list) and value and not all(isinstance(b, int) for b in value):
            out[key] = [_text(v) for v in value]
        else:
            out[key] = _text(value)
    return out
