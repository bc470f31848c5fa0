"""rke2certd's daemons (`rke2certd run`, one per node) beside the RKE2 stand-in nodes.

The stand-in nodes run in the test process; a daemon's `restart-command` and `health-command`
are tests/rke2/restart_request.py, which asks this process over a unix socket. `NodeService`
answers: a restart is the stand-in's own restart (the package's ExecStartPre=, then RKE2's
start with its reconcile, exactly as a `systemctl restart rke2-server` would run it), a health
check says whether the node is up and serves what is on its disk. Every restart is logged,
with who asked (a daemon, or the test "by hand"), the daemon's rollout and phase, and what
RKE2's reconcile did.

    service = NodeService()
    d1 = Daemons(service, captured)             # stopped at the end of the test
    s1 = cluster.server("s1", token=..., rke2certd=d1.config_for("s1"))
    s1.start()
    d1.start(s1)                                # `rke2certd run` with s1's env, READY waited for
    ...
    service.restarts()                          # every restart so far, in order
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from tests.daemon.support import NotifySocket, free_port, read_events
from tests.harness.rke2 import bootstrap as bs
from tests.harness.rke2.etcd import EtcdClient
from tests.harness.rke2.node import NodeBase, RKE2Agent, RKE2Server, leaf_of
from tests.harness.wait import SAFETY

SCRIPT = Path(__file__).resolve().parent / "restart_request.py"
FAILURE_EVENTS = frozenset(
    {
        "startup_failed",
        "rollout_failed",
        "rollout_stopped",
        "rollout_start_failed",
        "rollout_internal_error",
        "staging_refused",
        "supervisor_failed",
        "reload_failed",
    }
)


@dataclass
class Restart:
    """One restart of a stand-in node."""

    seq: int  # when it began, in the order of every restart of the test
    node: str
    by: str  # "daemon" (its restart-command) or "hand" (the test, out of any turn)
    rollout: str | None
    phase: str | None
    ok: bool = False
    error: str = ""
    end: int = 0  # the `seq` counter when it ended
    written: list[str] = field(default_factory=list)  # CA files RKE2's reconcile wrote
    certs: dict[str, str] = field(default_factory=dict)  # leaves RKE2 re-made, and why


class NodeService:
    """The test process's side of the restart and health commands."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeBase] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="rke2-svc-"))  # a short AF_UNIX path
        self.path = self._dir / "sock"
        self._locks: dict[str, threading.Lock] = {}
        self._log: list[Restart] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._holds: dict[str, threading.Event] = {}
        self.pending: dict[str, int] = {}  # node -> restart requests waiting on a hold
        self.health_failures: list[tuple[str, str]] = []
        service = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    req = json.loads(self.rfile.read() or b"{}")
                    ok, message = service._answer(req)
                except Exception as exc:  # a bug in the test's side: say it to the daemon
                    ok, message = False, f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(BrokenPipeError):  # the daemon gave up (stopped)
                    self.wfile.write(json.dumps({"ok": ok, "message": message}).encode())

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self._server = Server(str(self.path), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, node: NodeBase) -> None:
        self.nodes[node.name] = node
        self._locks[node.name] = threading.Lock()

    def commands(self, name: str) -> dict[str, list[str]]:
        """The restart-command and health-command of node `name` (rke2certd config keys)."""
        base = [sys.executable, str(SCRIPT), str(self.path), name]
        return {"restart-command": [*base, "restart"], "health-command": [*base, "health"]}

    def close(self) -> None:
        for ev in self._holds.values():
            ev.set()
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- holding a daemon's restart ----------------------------------------------------------

    def hold(self, name: str) -> None:
        """The next restart requests of `name`'s daemon wait until `release(name)`."""
        self._holds[name] = threading.Event()

    def release(self, name: str) -> None:
        self._holds.pop(name).set()

    def wait_pending(self, name: str, timeout: float) -> None:
        self.wait_for(lambda: self.pending.get(name, 0) > 0, timeout, f"a restart of {name}")

    # -- restarts --------------------------------------------------------------------------

    def restart(self, name: str, by: str = "hand", env: dict[str, str] | None = None) -> Restart:
        """Restart a stand-in node as systemd would: stop, ExecStartPre=, start. A failure is
        recorded (and returned), never raised: the test decides."""
        env = env or {}
        node = self.nodes[name]
        with self._locks[name]:
            with self._cond:
                self._seq += 1
                entry = Restart(
                    self._seq, name, by, env.get("RKE2CERTD_ROLLOUT"), env.get("RKE2CERTD_PHASE")
                )
                self._log.append(entry)
            try:
                node.stop()
                node.start()
                entry.ok = True
                if isinstance(node, RKE2Server):
                    entry.written = list(node.last_written)
                    entry.certs = dict(node.last_certs)
            except Exception as exc:  # HookFailed, BootstrapFatal (the 3 s rule), ...
                entry.error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._seq += 1
                entry.end = self._seq
                self._cond.notify_all()
        return entry

    def restarts(self, by: str | None = None) -> list[Restart]:
        with self._cond:
            return [r for r in self._log if by is None or r.by == by]

    def _answer(self, req: dict[str, Any]) -> tuple[bool, str]:
        name, action, env = req["node"], req["action"], req.get("env") or {}
        if action == "health":
            problem = self.health(name)
            if problem:
                self.health_failures.append((name, problem))
            return problem is None, problem or "up"
        hold = self._holds.get(name)
        if hold is not None:
            with self._cond:
                self.pending[name] = self.pending.get(name, 0) + 1
            hold.wait()
            with self._cond:
                self.pending[name] -= 1
        entry = self.restart(name, "daemon", env)
        return entry.ok, entry.error or "restarted"

    # -- health ----------------------------------------------------------------------------

    def health(self, name: str) -> str | None:
        """None when the node is up and serves the certificates on its disk."""
        node = self.nodes[name]
        if isinstance(node, RKE2Agent):
            return None if node.running else "rke2-agent is not running"
        assert isinstance(node, RKE2Server)
        if not node.running:
            return "rke2-server is not running"
        try:
            if node.etcd_enabled:
                assert node.etcd is not None
                EtcdClient([node.etcd.client_url], node.etcd.client_tls()).get(
                    "/standin/ping", serializable=True
                )
            if node.apiserver_enabled:
                served = served_cert(node.host, node.apiserver_port)
                on_disk = leaf_of(node.tls / "serving-kube-apiserver.crt")
                if on_disk.public_bytes(serialization.Encoding.DER) != served:
                    return "the apiserver does not serve its certificate on disk"
        except (ConnectionError, OSError, RuntimeError) as exc:
            return str(exc)
        return None

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)


def served_cert(host: str, port: int) -> bytes:
    """The DER of the leaf a TLS server serves (no verification)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=SAFETY) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@dataclass
class Daemon:
    node: NodeBase
    proc: subprocess.Popen[bytes]
    notify: NotifySocket
    log: Path

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in read_events(self.log)
            if (name is None or e.get("event") == name)
            and all(e.get(k) == v for k, v in fields.items())
        ]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Daemons:
    """One `rke2certd run` per stand-in node, each with the node's environment (RKE2's config,
    its unit), its own NOTIFY_SOCKET and a JSON log in the node's root."""

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.by_name: dict[str, Daemon] = {}
        self.ports: dict[str, int] = {}

    def config_for(self, name: str, agent_of: str | None = None, **extra: Any) -> dict[str, Any]:
        """rke2certd's own config of a node: only what a test environment needs (the restart
        and health commands, a free port for the agents' endpoint, quick timings); the rest
        comes from RKE2's config and unit, as on a real node."""
        port = self.ports[agent_of] if agent_of else self.ports.setdefault(name, free_port())
        return {
            **self.service.commands(name),
            "supervisor-port": port,
            "log-format": "json",
            "staging-quiet": 0.3,
            # bounds on a hang, generous for a loaded machine (none is reached when all is well)
            "registry-ttl": 10,
            "restart-timeout": 120,
            "health-timeout": 60,
            "lock-timeout": 120,
            **extra,
        }

    def start(self, node: NodeBase, timeout: float = 120) -> Daemon:
        self.service.add(node)
        notify = NotifySocket()
        log = node.root / "daemon.log"
        env = {**node.hook_env(), "NOTIFY_SOCKET": str(notify.path)}
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rke2certd", "-c", str(node.rke2certd_config_path), "run"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
            )
        d = Daemon(node, proc, notify, log)
        self.by_name[node.name] = d
        deadline = time.monotonic() + timeout
        while not any(m.fields.get("READY") == "1" for m in list(notify.messages)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{node.name}'s daemon did not become READY:\n{d.tail()}")
            time.sleep(0.05)
        return d

    def stop(self) -> None:
        for d in self.by_name.values():
            if d.proc.poll() is None:
                d.proc.terminate()
        for d in self.by_name.values():
            try:
                d.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(timeout=10)
            d.notify.close()

    def cli(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        node = self.service.nodes[name]
        return subprocess.run(
            [sys.executable, "-m", "rke2certd", "-c", str(node.rke2certd_config_path), *args],
            capture_output=True,
            text=True,
            env=node.hook_env(),
            cwd="/",
            timeout=120,
            check=False,
        )

    def status(self, name: str) -> dict[str, Any]:
        res = self.cli(name, "status", "-o", "json")
        assert res.returncode == 0, res.stderr
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def wait_event(self, name: str, event: str, timeout: float, **fields: Any) -> dict[str, Any]:
        d = self.by_name[name]
        deadline = time.monotonic() + timeout
        while True:
            found = d.events(event, **fields)
            if found:
                return found[0]
            if d.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {event} {fields} within {timeout}s:\n{d.tail()}")
            time.sleep(0.05)

    def failures(self) -> dict[str, list[dict[str, Any]]]:
        """What no daemon may say in a rollout that goes well, and daemons that exited. (A
        datastore call that timed out on a loaded machine and was retried is not one.)"""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, d in self.by_name.items():
            bad = [e for e in d.events() if e.get("event") in FAILURE_EVENTS]
            if d.proc.poll() is not None:
                bad.append({"event": "exited", "code": d.proc.returncode})
            if bad:
                out[name] = bad
        return out


@contextlib.contextmanager
def daemons_beside_standin() -> Iterator[Daemons]:
    service = NodeService()
    daemons = Daemons(service)
    try:
        yield daemons
    finally:
        daemons.stop()
        service.close()


def rke2_keys(server: RKE2Server, prefix: str) -> dict[str, bytes]:
    """Keys under `prefix` in the stand-in's etcd (what rke2certd wrote there, read through
    RKE2's own etcd with the node's etcd client cert)."""
    import base64

    client = server.etcd_client()
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    doc = client._post(
        "/v3/kv/range",
        {
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(),
        },
    )
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in doc.get("kvs") or []
    }


def bootstrap_history(server: RKE2Server, since_revision: int) -> list[tuple[int, bytes]]:
    """Every value the bootstrap key held from `since_revision` on, oldest first:
    (mod revision, the server CA bundle in it)."""
    import base64

    token = server.token()
    assert token
    key = base64.b64encode(bs.bootstrap_key(token).encode()).decode()
    client = server.etcd_client()
    out: list[tuple[int, bytes]] = []
    revision = 0  # 0: the current one
    while True:
        body: dict[str, Any] = {"key": key}
        if revision:
            body["revision"] = revision
        kvs = client._post("/v3/kv/range", body).get("kvs") or []
        if not kvs:
            break
        mod = int(kvs[0]["mod_revision"])
        value = base64.b64decode(kvs[0].get("value", ""))
        files = bs.decode_files(bs.decrypt(token, value))
        out.append((mod, files["ServerCA"][1]))
        if mod <= since_revision:
            break
        revision = mod - 1
    return list(reversed(out))


def etcd_revision(server: RKE2Server) -> int:
    doc = server.etcd_client()._post("/v3/kv/range", {"key": "AA==", "limit": 1})
    return int(doc["header"]["revision"])
