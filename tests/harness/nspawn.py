"""Real systemd as PID 1 in a throw-away container over this machine's own root.

    with Container(binds={str(tmp_path): "/srv/test"}) as ct:   # boots, waits, always tears down
        ct.install_deb(deb)
        ct.exec(["systemctl", "start", "rke2certd"], check=True)
        print(ct.exec(["journalctl", "-u", "rke2certd", "-o", "json"]).stdout)

In pytest use the session-scoped `nspawn_container` fixture (import it in a conftest), or make
your own `Container` when a test needs a fresh machine.

How (and why not the obvious `systemd-nspawn -D / --volatile=yes`):
- `--volatile=yes` mounts only the host's /usr, read-only, on an empty tmpfs: no /var/lib/dpkg,
  no writable /usr, so `dpkg -i` cannot work; `--volatile=overlay` is refused for `-D /`.
  So the harness makes its own root: in a private mount namespace (`unshare -m`), an overlayfs
  with the host's / as the read-only lower layer and a tmpfs as the upper one. The container sees
  this machine exactly, may write anywhere, and everything it writes vanishes with the namespace.
  The host's submounts (/tmp, /proc, ...) are not in the lower layer; nspawn mounts its own.
- The container boots `rke2certd-harness.target` (sysinit + sockets only), not the host's default
  target: the host's enabled units (a PostgreSQL here, timers) would slow the boot and fight over
  ports. It gets its own machine-id (journals stay apart) and, by default, a private network.
- nspawn writes lock/propagation dirs under /run/systemd/nspawn; /run is not a tmpfs on this
  machine, so nspawn refuses to clean them ("can't allow that"): a tmpfs over that dir in the
  private namespace keeps the host clean.
- Commands run through `nsenter -a -t <container PID 1>` with a clean environment (the host's
  PATH, pyenv shims and NOTIFY_SOCKET must not leak in). The container's /tmp is its own tmpfs:
  share files through `binds` or the harness's exchange dir at /srv/harness.
- Teardown: SIGTERM to nspawn makes the container halt cleanly; then SIGKILL if it hangs.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

HARNESS_TARGET = "rke2certd-harness.target"
SHARE = "/srv/harness"  # exchange dir inside the container (bound from the host)
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
_TARGET_UNIT = """\
[Unit]
Description=rke2certd test harness (sysinit and sockets only)
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
"""
_counter = itertools.count()
_running: set[Container] = set()


@atexit.register
def _stop_leftovers() -> None:
    # a session that dies between start and teardown must not leave containers behind
    for ct in list(_running):
        ct.stop()


class ContainerError(RuntimeError):
    pass


def missing_requirements() -> str | None:
    """Why a container cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not found (run scripts/ci-system-deps.sh)"
    return None


class Container:
    def __init__(
        self,
        name: str | None = None,
        *,
        binds: Mapping[str, str] | None = None,
        private_network: bool = True,
        boot_timeout: float = 90.0,
    ) -> None:
        self.name = name or f"rke2certd-t{os.getpid()}-{next(_counter)}"
        self.binds = dict(binds or {})
        self.private_network = private_network
        self.boot_timeout = boot_timeout
        self.state = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir="/var/tmp"))
        self.share = self.state / "share"  # host side of /srv/harness (outside the tmpfs)
        self.console_log = self.state / "console.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the container's PID 1, as seen from the host
        self.boot_state = ""

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> Container:
        reason = missing_requirements()
        if reason:
            raise ContainerError(f"cannot boot a container: {reason}")
        self.share.mkdir(mode=0o755)
        # The tmpfs (upper layer) is mounted over `fs`; only the namespace sees it.
        fs = self.state / "fs"
        fs.mkdir()
        upper, work, root = fs / "upper", fs / "work", fs / "root"
        etc_unit = upper / "etc/systemd/system"
        nspawn = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            f"--machine={self.name}",
            f"--directory={root}",
            "--boot",
            "--console=read-only",
            "--bind-ro=/dev/null:/etc/systemd/system/systemd-firstboot.service",
            f"--bind={self.share}:{SHARE}",
        ]
        nspawn += [f"--bind={host}:{inside}" for host, inside in self.binds.items()]
        if self.private_network:
            nspawn.append("--private-network")
        nspawn.append(f"systemd.unit={HARNESS_TARGET}")  # argv of the container's systemd
        machine_id = uuid.uuid4().hex
        script = "\n".join(
            [
                "set -e",
                "mkdir -p /run/systemd/nspawn && mount -t tmpfs -o mode=0755 tmpfs "
                "/run/systemd/nspawn",
                f"mount -t tmpfs -o mode=0755 tmpfs {q(fs)}",
                f"mkdir -p {q(upper)} {q(work)} {q(root)} {q(etc_unit)}",
                f"printf '%s\\n' {machine_id} > {q(upper / 'etc/machine-id')}",
                f"printf %s {q(_TARGET_UNIT)} > {q(etc_unit / HARNESS_TARGET)}",
                f"mount -t overlay overlay -o lowerdir=/,upperdir={q(upper)},workdir={q(work)} "
                f"{q(root)}",
                "exec " + shlex.join(nspawn),
            ]
        )
        with self.console_log.open("wb") as out:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=CLEAN_ENV,
                start_new_session=True,  # a Ctrl-C of pytest must not hit the container first
            )
        _running.add(self)
        try:
            self._wait_booted()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_booted(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.boot_timeout
        while self.pid is None:
            self._check_alive()
            self.pid = self._find_init()
            if time.monotonic() > deadline:
                raise ContainerError(f"container PID 1 never appeared\n{self.console_tail()}")
            time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            left = max(1.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                # Fails fast until PID 1 listens on its private socket; then blocks until booted.
                r = self.exec(["systemctl", "is-system-running", "--wait"], timeout=left)
                state = r.stdout.strip()
                if state in ("running", "degraded"):  # degraded: a unit failed; tests may care
                    self.boot_state = state
                    return
            time.sleep(0.1)
        failed = self.exec(["systemctl", "--failed", "--no-pager"]).stdout
        raise ContainerError(f"container did not boot (state {state!r})\n{failed}")

    def _find_init(self) -> int | None:
        assert self._proc is not None
        try:
            kids = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text()
        except OSError:
            return None
        for pid in map(int, kids.split()):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
        return None

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise ContainerError(
                f"systemd-nspawn exited with {self._proc.returncode}\n{self.console_tail()}"
            )

    def console_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.console_log.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        _running.discard(self)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # nspawn asks the container to halt
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if self.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)  # kills the whole PID namespace
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        self.pid = None
        # Left: the share dir and the console log, for post-mortems of a failed run.
        shutil.rmtree(self.state / "fs", ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:
            self.cleanup()

    # --- using it --------------------------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 120.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces, a clean environment)."""
        if self.pid is None:
            raise ContainerError("container is not running")
        full_env = {**CLEAN_ENV, **(env or {})}
        cmd = ["nsenter", "-a", "-t", str(self.pid), "--", "env", "-i"]
        cmd += [f"{k}={v}" for k, v in full_env.items()] + list(argv)
        r = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise ContainerError(
                f"{shlex.join(argv)} exited {r.returncode}\nstdout:\n{r.stdout}\n"
                f"stderr:\n{r.stderr}"
            )
        return r

    def sh(
        self, script: str, *, check: bool = False, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return self.exec(["sh", "-c", script], check=check, timeout=timeout)

    def put(self, src: Path | str) -> str:
        """Copy a host file into the exchange dir; returns its path inside the container."""
        src = Path(src)
        shutil.copy2(src, self.share / src.name)
        return f"{SHARE}/{src.name}"

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        """Write a file at an absolute path inside the container."""
        self.exec(
            [
                "sh",
                "-c",
                'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                "-",
                inside,
                f"{mode:o}",
            ],
            input=text,
            check=True,
        )

    def install_deb(self, path: Path | str) -> subprocess.CompletedProcess[str]:
        inside = self.put(path)
        return self.exec(
            ["dpkg", "-i", inside], check=True, env={"DEBIAN_FRONTEND": "noninteractive"}
        )

    def journal(self, *args: str) -> str:
        """journalctl inside the container (no pager, every field in full)."""
        return self.exec(["journalctl", "--no-pager", "--all", *args], check=True).stdout


def q(value: object) -> str:
    return shlex.quote(str(value))


@contextlib.contextmanager
def booted(**kw: Any) -> Iterator[Container]:
    """A started container for a pytest fixture or test (skips where none can run); always
    stopped and removed."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"systemd-nspawn container: {reason}")
    ct = Container(**kw)
    ct.start()
    try:
        yield ct
    finally:
        ct.stop()
        ct.cleanup()


@pytest.fixture(scope="session")
def nspawn_container() -> Iterator[Container]:
    """One booted container shared by a session's tests (each test must undo what it starts
    when others could trip over it). Skips where a container cannot run."""
    with booted(name=f"rke2certd-session-{os.getpid()}") as ct:
        yield ct
