"""Helpers of the daemon tests: captured logs, the CLI and `rke2certd run` as real processes, a
NOTIFY_SOCKET made by the test, and the staged sets an operator would make.

    logs = CapturedLogs.for_session(tmp_path_factory)    # or the `captured_logs_dir` fixture
    node = DaemonNode.create(tmp_path / "node", logs, "my-test", staging_quiet=0.3)
    node.cli("renew")                                    # stderr kept in the captured logs
    with node.daemon(watchdog_usec=200_000) as d:        # killed if a test leaves it running
        d.notify.expect("READY")
        os.rename(node.stage_rotation("set-a"), node.incoming / "set-a")
        path, result = node.wait_result("set-a")         # .applied/set-a-<ts>/result.json
        d.wait_event("staged_set_applied", staged_set="set-a")

Every process's stderr is written under the session's captured-logs dir, and every password the
tests give rke2certd is recorded next to it: tests/test_no_secrets_in_logs.py greps the lot.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import clean_env
from tests.harness.wait import SAFETY

CAPTURED_LOGS = "captured-logs"  # under the session's basetemp
SECRETS_FILE = "captured-secrets.txt"  # next to it (not inside: it is not a log)
# What a daemon or CLI process sees (tests/conftest.py's clean_env: this checkout's code, the
# test run's cache dir).
ENV_BASE = clean_env()


# --- captured logs -------------------------------------------------------------------------------


class CapturedLogs:
    """A session-wide dir of log files, and the passwords that must never show up in them."""

    def __init__(self, basetemp: Path) -> None:
        self.dir = basetemp / CAPTURED_LOGS
        self.secrets_file = basetemp / SECRETS_FILE
        self.dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()

    @classmethod
    def for_session(cls, factory: pytest.TempPathFactory) -> CapturedLogs:
        return cls(factory.getbasetemp())

    def new_file(self, label: str, suffix: str = ".stderr") -> Path:
        """A fresh file for one process's log (the label says which test and what)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:120]
        with self._lock:
            n = 0
            while True:
                path = self.dir / f"{safe}-{n}{suffix}"
                try:
                    path.touch(exist_ok=False)
                    return path
                except FileExistsError:
                    n += 1

    def add_secret(self, value: str) -> str:
        with self._lock, self.secrets_file.open("a") as f:
            f.write(value + "\n")
        return value

    def new_password(self, prefix: str = "pw") -> str:
        """A token password unique to this session, recorded for the log grep."""
        return self.add_secret(f"{prefix}-{secrets.token_hex(12)}")

    def passwords(self) -> list[str]:
        try:
            return [p for p in self.secrets_file.read_text().splitlines() if p]
        except FileNotFoundError:
            return []


def label_of(request: pytest.FixtureRequest) -> str:
    """A file-name-friendly name of the running test."""
    nodeid: str = request.node.nodeid
    return nodeid.rsplit("/", 1)[-1].replace("::", "-")


# --- NOTIFY_SOCKET -------------------------------------------------------------------------------


@dataclass
class Notification:
    fields: dict[str, str]
    wall: float  # time.time() when it arrived (comparable with file mtimes)
    mono: float


class NotifySocket:
    """The datagram socket systemd would own; a thread records every message with its time."""

    def __init__(self) -> None:
        # a short path of its own: an AF_UNIX path has at most 107 bytes
        self._dir = Path(tempfile.mkdtemp(prefix="rke2certd-notify-"))
        self.path = self._dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[Notification] = []
        self._cursor = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self._cond:
                self.messages.append(Notification(fields, time.time(), time.monotonic()))
                self._cond.notify_all()

    def expect(self, key: str, value: str | None = "1", timeout: float = SAFETY) -> Notification:
        """The next message (after the last one expected) that sets `key` (to `value`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._cursor, len(self.messages)):
                    msg = self.messages[i]
                    if key in msg.fields and (value is None or msg.fields[key] == value):
                        self._cursor = i + 1
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m.fields for m in self.messages]
                    raise AssertionError(f"no {key}={value} within {timeout}s; got {seen}")
                self._cond.wait(left)

    def since(self, mono: float) -> list[dict[str, str]]:
        with self._cond:
            return [m.fields for m in self.messages if m.mono >= mono]

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


# --- processes -----------------------------------------------------------------------------------


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON-lines events of a log file (other lines, e.g. a traceback, are skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


class DaemonProcess:
    """`python -m rke2certd -c CFG run` with stderr in a captured log file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        notify: NotifySocket | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: str = "self",
        python: str = sys.executable,
    ) -> None:
        self.log = log
        self._notify = notify
        env = dict(ENV_BASE)
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify.path)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        # systemd sets WATCHDOG_PID to the main PID: the shell exports its own PID, then execs
        # Python in place (same PID), so the daemon sees its own PID ("self") or another one.
        pid_expr = "$$" if watchdog_pid == "self" else watchdog_pid
        script = f'[ -n "$WATCHDOG_USEC" ] && export WATCHDOG_PID={pid_expr}; exec "$@"'
        argv = [python, "-m", "rke2certd", "-c", str(config), "run"]
        # stdout apart: `run` prints nothing there (logs go to stderr or the journal)
        self.stdout = log.with_suffix(".stdout")
        with log.open("ab") as err, self.stdout.open("ab") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", script, "sh", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd="/",
            )
        self.pid = self.proc.pid

    @property
    def notify(self) -> NotifySocket:
        """The NOTIFY_SOCKET it was given (an error for a daemon started without one)."""
        if self._notify is None:
            raise AssertionError("this daemon runs without a NOTIFY_SOCKET")
        return self._notify

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in read_events(self.log)
            if (name is None or e.get("event") == name)
            and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_event(
        self,
        name: str,
        timeout: float = SAFETY,
        where: Callable[[dict[str, Any]], bool] = lambda _e: True,
        **fields: Any,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name, **fields) if where(e)]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before {name}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} {fields} within {timeout}s:\n{self.tail()}")
            time.sleep(0.02)

    def stray_lines(self) -> list[str]:
        """Lines of its stderr that are not JSON events (a warning, a traceback...)."""
        return [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if line.strip() and not line.startswith("{")
        ]

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- a node on disk ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DaemonNode:
    """A server node (every role, the embedded SQLite datastore) in `root`, its config file, and
    the label its captured logs are filed under."""

    root: Path
    logs: CapturedLogs
    label: str
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, logs: CapturedLogs, label: str, **settings: Any) -> DaemonNode:
        node = cls(root, logs, label)
        node.settings = {
            "data-dir": str(root / "data"),
            "node-name": "node-a",
            "node-ip": ["192.0.2.10"],
            "token": logs.new_password("daemon-test"),
            "log-format": "json",
            "staging-quiet": 0.3,
            "supervisor-port": free_port(),  # the endpoint for agents: not 9346, shared
            "metrics-address": "",  # not 9347, shared too (tests/monitoring turn it on)
            **{k.replace("_", "-"): v for k, v in settings.items()},
        }
        node.write_config()
        return node

    @property
    def config(self) -> Path:
        return self.root / "rke2certd.yaml"

    @property
    def data(self) -> Path:
        return Path(self.settings["data-dir"])

    @property
    def incoming(self) -> Path:
        return self.data / "server" / "rotate-ca" / "incoming"

    @property
    def quiet(self) -> float:
        return float(self.settings["staging-quiet"])

    def write_config(self, **changes: Any) -> None:
        self.settings.update({k.replace("_", "-"): v for k, v in changes.items()})
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(self.settings, sort_keys=False))
        self.config.chmod(0o600)

    def cli(self, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`rke2certd -c CFG ARGS` in a subprocess; its stderr goes to the captured logs."""
        log = self.logs.new_file(f"{self.label}-cli-{args[0] if args else ''}")
        with log.open("ab") as err:
            r = subprocess.run(
                [sys.executable, "-m", "rke2certd", "-c", str(self.config), *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=err,
                env=ENV_BASE,
                cwd="/",
                text=True,
                timeout=120,
                check=False,
            )
        if check and r.returncode != 0:
            raise AssertionError(
                f"rke2certd {args} exited {r.returncode}:\n{log.read_text(errors='replace')}"
            )
        return r

    @contextlib.contextmanager
    def daemon(
        self,
        *,
        notify: bool = True,
        watchdog_usec: int | None = None,
        watchdog_pid: str = "self",
    ) -> Iterator[DaemonProcess]:
        sock = NotifySocket() if notify else None
        proc = DaemonProcess(
            self.config,
            self.logs.new_file(f"{self.label}-daemon"),
            sock,
            watchdog_usec=watchdog_usec,
            watchdog_pid=watchdog_pid,
        )
        try:
            yield proc
        finally:
            proc.kill()
            if sock is not None:
                sock.close()

    # -- staged sets ----------------------------------------------------------------------------

    def staged_dir(self, name: str) -> Path:
        """Where sets are made before being renamed in: the same filesystem as the staging dir
        (so that a rename is a rename), outside the watched dir."""
        d = self.data / "server" / "rotate-ca" / "made" / name
        d.parent.mkdir(parents=True, exist_ok=True)
        return d

    def stage_rotation(self, name: str) -> Path:
        """`ca stage-rotation` (the current CAs cross-sign new ones): a set that is applied."""
        out = self.staged_dir(name)
        self.cli("ca", "stage-rotation", "--out", out)
        return out

    def custom_root(self, name: str) -> Path:
        """`ca generate-custom`: an unrelated new root, refused without a FORCE marker."""
        out = self.staged_dir(name)
        self.cli("ca", "generate-custom", "--out", out / "tls", "--key-type", "ecdsa-p256")
        return out

    def results(self, name: str) -> list[Path]:
        return sorted(self.incoming.glob(f".applied/{name}-*/result.json")) + sorted(
            self.incoming.glob(f".rejected/{name}-*/result.json")
        )

    def wait_result(self, name: str, timeout: float = SAFETY) -> tuple[Path, dict[str, Any]]:
        """The filed set's result.json (path, document), once the daemon filed it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.results(name)
            if found:
                return found[0], json.loads(found[0].read_text())
            assert time.monotonic() < deadline, f"{name} not filed within {timeout}s"
            time.sleep(0.01)


def age_tree(path: Path, seconds: float) -> None:
    """Set every mtime under `path` (itself included) `seconds` into the past."""
    when = time.time() - seconds
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when))


def cert_serial(path: Path) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-serial"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split("=", 1)[1].lower()


def reissue_shorter(cert: Path, key: Path, ca_cert: Path, ca_key: Path, days: int) -> None:
    """Re-sign `cert` (same key, subject and extensions, same CA) with `days` of validity, with
    the openssl CLI: the leaf then enters a renewal window of more than `days` days."""
    work = Path(tempfile.mkdtemp(prefix="reissue-"))
    req, new = work / "leaf.csr", work / "leaf.crt"
    for argv in (
        [
            "x509",
            "-x509toreq",
            "-in",
            cert,
            "-signkey",
            key,
            "-copy_extensions",
            "copyall",
            "-out",
            req,
        ],
        [
            "x509",
            "-req",
            "-in",
            req,
            "-CA",
            ca_cert,
            "-CAkey",
            ca_key,
            "-days",
            str(days),
            "-copy_extensions",
            "copyall",
            "-out",
            new,
        ],
    ):
        subprocess.run(["openssl", *map(str, argv)], capture_output=True, check=True)
    text = cert.read_text()
    rest = text[text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----") :]
    # in one rename: a running daemon never reads a half-written file
    staged = cert.with_name(f".{cert.name}.reissued")
    staged.write_text(new.read_text() + rest.lstrip("\n"))
    staged.chmod(cert.stat().st_mode & 0o777)
    os.replace(staged, cert)
    for path in (req, new):
        path.unlink()
    work.rmdir()
