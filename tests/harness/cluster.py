"""A simulated RKE2 cluster on this machine: N `rke2certd run` processes, each with its own data
dir and config, sharing one datastore (a real etcd cluster, or one SQLite file) and one token.

Each node's `restart-command` is tests/harness/sim_restart.py: it restarts the node's stand-in
TLS servers (sim_tls_server.py: etcd's client port, the apiserver's port) with the certificates
on disk and records timestamps; the health gate is rke2certd's default one (etcd /health,
apiserver /readyz, and a handshake checking the served certificate is the one on disk), aimed
at those stand-ins through `health-etcd-endpoint` / `health-apiserver-endpoint`.

    cluster = SimCluster(root, [NodeSpec("e1", ("etcd",)), ...], etcd=etcd, etcd_client=tls)
    with cluster:                                 # starts every node, READY, stand-ins up
        cluster.stage_rotation("e1")              # a cross-signed set renamed into staging
        cluster.wait_for(lambda: cluster.rollout_state() == "done", 90, "rollout done")
        cluster.restarts()                        # the recorded restarts, oldest first

Each daemon gets its own NOTIFY_SOCKET, read here: `cluster.nodes["e1"].statuses` holds every
STATUS= line it sent. Logs are JSON lines in `<node dir>/daemon.log`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from rke2certd.commands.renew import kubeconfig_naming
from rke2certd.commands.stage_rotation import stage_rotation
from rke2certd.datastore import Datastore, SQLiteDatastore, open_datastore
from rke2certd.pki.layout import Layout
from rke2certd.rollout.records import PREFIX
from tests.harness.etcd import EtcdCluster, TLSFiles, free_ports

HERE = Path(__file__).resolve().parent
# The daemons and CLI run this checkout's code (whatever the installed package points at).
CODE_ENV = {"PYTHONPATH": str(HERE.parents[1])}
RESTART_SCRIPT = HERE / "sim_restart.py"


@dataclass
class NodeSpec:
    name: str
    roles: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # e.g. SIM_STALE=1 for the restart
    config: dict[str, Any] = field(default_factory=dict)  # extra or overriding config keys


@dataclass
class SimNode:
    spec: NodeSpec
    dir: Path
    config: Path
    data: Path
    ports: dict[str, int]
    notify_path: Path
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    statuses: list[tuple[float, str]] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def layout(self) -> Layout:
        return Layout(self.data)

    def last_status(self) -> str:
        return self.statuses[-1][1] if self.statuses else ""

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in (self.dir / "daemon.log").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if event is None or doc.get("event") == event:
                        out.append(doc)
        return out


class SimCluster:
    def __init__(
        self,
        root: Path,
        specs: Sequence[NodeSpec],
        *,
        etcd: EtcdCluster | None = None,
        etcd_client: TLSFiles | None = None,
        registry_ttl: int = 3,
        restart_delay: float = 0.2,
        config: dict[str, Any] | None = None,
        stand_ins: bool = True,
        agent_server: str | None = None,
        spread: bool = False,
    ) -> None:
        """`config` overrides every node's config (e.g. restart-command: [true] with
        stand_ins=False: no stand-in servers, instant restarts, as the benchmark runs).
        Agent-only nodes (roles ("agent",)) reach the endpoint of `agent_server` (default: the
        first control-plane node); their token, the server's full agent token, is written into
        their RKE2 config.yaml (`rke2-config`) once the servers are up.
        `spread`: as servers on their own hosts: every server's endpoint listens on one port,
        each on its own loopback address (127.0.0.2, .3, ...), and the agents' `server` lists
        them all (each agent then prefers its own; supervisor/choice.py)."""
        self.root = root
        self.stand_ins = stand_ins
        self.etcd = etcd
        self.etcd_client = etcd_client
        self.token = "sim" + secrets.token_hex(8)
        self.sqlite = root / "shared.sqlite"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.nodes: dict[str, SimNode] = {}
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        base = {
            "registry-ttl": registry_ttl,
            "restart-timeout": 30,
            "health-timeout": 15,
            "staging-quiet": 0.3,
            "lock-timeout": 30,
            "log-format": "json",
            "metrics-address": "",  # not the shared default port (tests/monitoring test it)
            **(config or {}),
        }
        ports = iter(free_ports(4 * len(specs)))
        servers = [s.name for s in specs if set(s.roles) != {"agent"}]
        self.agent_server = agent_server or next(
            (s.name for s in specs if "control-plane" in s.roles), servers[0] if servers else ""
        )
        node_ports = {
            spec.name: {k: next(ports) for k in ("etcd", "apiserver", "supervisor", "kubelet")}
            for spec in specs
        }
        common = node_ports[self.agent_server]["supervisor"] if self.agent_server else 0
        self.addresses = {name: f"127.0.0.{k + 2}" for k, name in enumerate(servers)}
        self.spread = spread
        for spec in specs:
            if set(spec.roles) == {"agent"}:
                base_for = {**base, "supervisor-port": common}
            elif spread:
                base_for = {
                    **base,
                    "supervisor-port": common,
                    "supervisor-bind-address": self.addresses[spec.name],
                }
            else:
                base_for = {**base, "supervisor-port": node_ports[spec.name]["supervisor"]}
            self.nodes[spec.name] = self._make_node(
                spec, node_ports[spec.name], base_for, restart_delay
            )

    # -- set-up ------------------------------------------------------------------------------

    def _datastore_config(self) -> dict[str, Any]:
        if self.etcd is None:
            return {"datastore-endpoint": f"sqlite://{self.sqlite}"}
        assert self.etcd_client is not None
        return {
            "datastore-endpoint": self.etcd.endpoint,
            "datastore-cafile": str(self.etcd_client.ca),
            "datastore-certfile": str(self.etcd_client.cert),
            "datastore-keyfile": str(self.etcd_client.key),
        }

    def _make_node(
        self, spec: NodeSpec, ports: dict[str, int], base: dict[str, Any], delay: float
    ) -> SimNode:
        d = self.root / spec.name
        d.mkdir(mode=0o700, exist_ok=True)
        data = d / "data"
        if set(spec.roles) == {"agent"}:
            return self._make_agent(spec, d, ports, base, delay)
        doc = {
            "data-dir": str(data),
            "node-name": spec.name,
            "node-ip": ["127.0.0.1"],
            "token": self.token,
            "roles": list(spec.roles),
            "rescan-interval": 3600,
            "restart-command": [sys.executable, str(RESTART_SCRIPT), str(d)],
            "health-etcd-endpoint": f"https://127.0.0.1:{ports['etcd']}",
            "health-apiserver-endpoint": f"https://127.0.0.1:{ports['apiserver']}",
            **base,
            **self._datastore_config(),
            **spec.config,
        }
        cfg = d / "rke2certd.yaml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        cfg.chmod(0o600)  # it may hold the token: as an operator keeps it
        spec.env.setdefault("SIM_RESTART_DELAY", str(delay))
        return SimNode(spec, d, cfg, data, ports, d / "notify.sock")

    def _make_agent(
        self, spec: NodeSpec, d: Path, ports: dict[str, int], base: dict[str, Any], delay: float
    ) -> SimNode:
        """An agent-only node: no datastore, no CA; `server` and `token` live in its RKE2
        config.yaml (written by `write_agent_token` when the servers are up)."""
        data = d / "data"
        doc = {
            "data-dir": str(data),
            "node-name": spec.name,
            "node-ip": ["127.0.0.1"],
            "roles": ["agent"],
            "rke2-config": str(d / "rke2" / "config.yaml"),
            "rescan-interval": 3600,
            "restart-command": [sys.executable, str(RESTART_SCRIPT), str(d)],
            "health-kubelet-endpoint": f"https://127.0.0.1:{ports['kubelet']}",
            "node-password-file": str(d / "node-password"),  # RKE2's /etc/rancher/node/password
            **base,
            **spec.config,
        }
        cfg = d / "rke2certd.yaml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        cfg.chmod(0o600)  # it may hold the token: as an operator keeps it
        spec.env.setdefault("SIM_RESTART_DELAY", str(delay))
        return SimNode(spec, d, cfg, data, ports, d / "notify.sock")

    def write_agent_token(self, node: SimNode) -> None:
        """RKE2's config.yaml of an agent, as an operator writes it: the server URL and the
        full agent token of the server (it pins the CA hash), with a comment to keep."""
        server = self.nodes[self.agent_server]
        token = (server.data / "server" / "agent-token").read_text().strip()
        servers = "https://127.0.0.1:9345"
        if self.spread:
            servers = ",".join(f"https://{a}:9345" for a in self.addresses.values())
        rke2 = node.dir / "rke2"
        rke2.mkdir(mode=0o700, exist_ok=True)
        (rke2 / "config.yaml").write_text(
            "# RKE2 agent configuration (written by the test harness)\n"
            f"server: {servers}\n"
            f"token: {token}  # the cluster's agent token\n"
            "node-label:\n  - sim=agent\n"
        )
        (rke2 / "config.yaml").chmod(0o600)
        _rke2_agent_started(node.data)

    def is_agent(self, name: str) -> bool:
        return set(self.nodes[name].spec.roles) == {"agent"}

    def _serve_specs(self, node: SimNode) -> list[dict[str, Any]]:
        tls = node.layout.tls
        out = []
        if self.is_agent(node.name):
            agent = node.layout.agent
            out.append((node.ports["kubelet"], agent / "serving-kubelet", agent / "client-ca.crt"))
        if "etcd" in node.spec.roles:
            out.append((node.ports["etcd"], tls / "etcd/server-client", tls / "etcd/server-ca.crt"))
        if "control-plane" in node.spec.roles:
            out.append(
                (node.ports["apiserver"], tls / "serving-kube-apiserver", tls / "client-ca.crt")
            )
        specs = []
        for port, stem, ca in out:
            initial = node.dir / "initial" / stem.name
            specs.append(
                {
                    "port": port,
                    "cert": f"{stem}.crt",
                    "key": f"{stem}.key",
                    "ca": str(ca),
                    "initial_cert": f"{initial}.crt",
                    "initial_key": f"{initial}.key",
                }
            )
        return specs

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> SimCluster:
        """The first node alone (it creates the CAs), then the others; then every node's
        stand-in servers, as RKE2 would be running before any rollout."""
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        names = [n for n in self.nodes if not self.is_agent(n)]
        agents = [n for n in self.nodes if self.is_agent(n)]
        self.start_node(names[0], timeout=timeout)
        for name in names[1:]:
            self.start_node(name, wait=False)
        for name in names[1:]:
            self.wait_ready(name, timeout)
        for name in agents:  # they join once the servers are up, with the servers' token
            self.write_agent_token(self.nodes[name])
            self.start_node(name, wait=False)
        for name in agents:
            self.wait_ready(name, timeout)
        if self.stand_ins:
            for node in self.nodes.values():
                self.boot_services(node)
        return self

    def start_node(self, name: str, *, wait: bool = True, timeout: float = 60.0) -> SimNode:
        node = self.nodes[name]
        assert not node.running, f"{name} is running"
        node.ready.clear()
        with contextlib.suppress(FileNotFoundError):
            node.notify_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(node.notify_path))
        with self._lock:
            if node.notify is not None:
                self._selector.unregister(node.notify)
                node.notify.close()
            node.notify = sock
            self._selector.register(sock, selectors.EVENT_READ, node)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": "/",
            "NOTIFY_SOCKET": str(node.notify_path),
            # no periodic re-read: every step must be woken by the protocol (a lost wake-up
            # stalls the node past the test's timeout instead of 30 s)
            "RKE2CERTD_RECHECK_SECONDS": "3600",
            **CODE_ENV,
            **node.spec.env,
        }
        with open(node.dir / "daemon.log", "ab") as log:
            node.proc = subprocess.Popen(
                [sys.executable, "-m", "rke2certd", "-c", str(node.config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
            )
        if wait:
            self.wait_ready(name, timeout)
        return node

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while not node.ready.wait(0.1):
            if not node.running or time.monotonic() > deadline:
                tail = (node.dir / "daemon.log").read_text()[-3000:]
                raise RuntimeError(f"node {name} did not become READY:\n{tail}")

    def boot_services(self, node: SimNode) -> None:
        """Start the node's stand-ins (RKE2 running before the rollout) and keep a copy of the
        files they serve (what a restart that did not take the new files would serve)."""
        specs = self._serve_specs(node)
        (node.dir / "serve.json").write_text(json.dumps(specs))
        (node.dir / "initial").mkdir(exist_ok=True)
        for s in specs:
            shutil.copyfile(s["cert"], s["initial_cert"])
            shutil.copyfile(s["key"], s["initial_key"])
        env = {**os.environ, "RKE2CERTD_NODE": node.name, "RKE2CERTD_ROLLOUT": "boot"}
        env.pop("SIM_STALE", None)
        subprocess.run(
            [sys.executable, str(RESTART_SCRIPT), str(node.dir)], env=env, check=True, timeout=30
        )

    def signal_node(self, name: str, sig: int) -> None:
        """Send a signal (SIGHUP: reload, renew now) and leave the daemon running."""
        node = self.nodes[name]
        assert node.proc is not None and node.proc.poll() is None, f"{name} is not running"
        node.proc.send_signal(sig)

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (SIGKILL: a crash; SIGTERM: a clean stop); its stand-ins stay up,
        as RKE2 stays up when rke2certd dies."""
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)
            node.proc.wait(timeout=30)

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.running:
                assert node.proc is not None
                node.proc.terminate()
        for node in self.nodes.values():
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
            self._stop_services(node)
        self._stop.set()
        if self._reader is not None:
            self._reader.join(2)
        with self._lock:
            for node in self.nodes.values():
                if node.notify is not None:
                    node.notify.close()
                    node.notify = None

    def _stop_services(self, node: SimNode) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((node.dir / "server.pid").read_text())
            os.kill(pid, signal.SIGTERM)

    def _read_notify(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ready = self._selector.select(timeout=0) if self._selector.get_map() else []
            for key, _ in ready:
                node: SimNode = key.data
                with contextlib.suppress(OSError):
                    raw = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    fields = dict(
                        line.split("=", 1) for line in raw.decode().split("\n") if "=" in line
                    )
                    if "STATUS" in fields:
                        node.statuses.append((time.time(), fields["STATUS"]))
                    if fields.get("READY") == "1":
                        node.ready.set()
            if not ready:
                time.sleep(0.02)

    # -- actions -----------------------------------------------------------------------------

    def stage_rotation(self, on: str, name: str = "rotation-1") -> Path:
        """A cross-signed CA set made from `on`'s current CAs (rke2certd's stage-rotation),
        renamed into `on`'s watched staging dir, as an operator would."""
        node = self.nodes[on]
        out = node.data / "server" / "rotate-ca" / name
        stage_rotation(node.data, out, datetime.now(UTC), self.token)
        target = node.data / "server" / "rotate-ca" / "incoming" / name
        out.rename(target)
        return target

    def cli(self, via: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        node = self.nodes[via]
        return subprocess.run(
            [sys.executable, "-m", "rke2certd", "-c", str(node.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "HOME": "/", **CODE_ENV},
            cwd="/",
        )

    def status(self, via: str | None = None) -> dict[str, Any]:
        via = via or next(n for n, node in self.nodes.items() if node.running)
        res = self.cli(via, "status", "-o", "json")
        assert res.returncode == 0, res.stderr
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def open_store(self) -> Datastore:
        """A client of the shared datastore for assertions (one per test process: a second
        SQLite connection to the file in one process would upset SQLite's locks)."""
        if self.etcd is None:
            return SQLiteDatastore(self.sqlite)
        assert self.etcd_client is not None
        return open_datastore(
            self.etcd.endpoint,
            data_dir=self.root,
            cafile=self.etcd_client.ca,
            certfile=self.etcd_client.cert,
            keyfile=self.etcd_client.key,
        )

    def dump(self) -> dict[str, bytes]:
        with self.open_store() as ds:
            return {kv.key: kv.value for kv in ds.get_prefix(PREFIX)}

    # -- observations ------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        out = []
        for node in self.nodes.values():
            with contextlib.suppress(FileNotFoundError):
                for line in (node.dir / "records.jsonl").read_text().splitlines():
                    out.append(json.loads(line))
        return sorted(out, key=lambda r: r["t"])

    def restarts(self, rollout: str | None = None) -> list[dict[str, Any]]:
        """restart_begin records of rollouts (the boot start excluded)."""
        return [
            r
            for r in self.records()
            if r["event"] == "restart_begin"
            and r["rollout"] != "boot"
            and (rollout is None or r["rollout"] == rollout)
        ]

    def wait_for(
        self, predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.2
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}\n{self.report()}"
                )
            time.sleep(poll)

    def report(self) -> str:
        """What each node last said, for failure messages."""
        lines = [
            f"{n}: {'running' if node.running else 'stopped'}: {node.last_status()}"
            for n, node in self.nodes.items()
        ]
        with contextlib.suppress(Exception):
            doc = self.status()
            for r in doc["rollouts"]:
                lines.append(f"rollout {r['id']} {r['state']} {r['stateReason']}")
                lines += [f"  {n['name']} {n['state']} {n['message']}" for n in r["nodes"]]
        return "\n".join(lines)


def _rke2_agent_started(data: Path) -> None:
    """What rke2-agent's first start leaves that says it has run: the kubelet's kubeconfig,
    naming the agent's files as RKE2 writes it. Until it is there, rke2certd leaves an agent to
    rke2-agent (which fetches the CA and its certificates at its first start); the simulated
    agents have no rke2-agent, so their daemons fetch the certificates the file names."""
    agent = data / "agent"
    agent.mkdir(mode=0o700, parents=True, exist_ok=True)
    kubeconfig = agent / "kubelet.kubeconfig"
    if kubeconfig.exists():
        return
    kubeconfig.write_bytes(
        kubeconfig_naming(
            agent / "server-ca.crt", agent / "client-kubelet.crt", agent / "client-kubelet.key"
        )
    )
    kubeconfig.chmod(0o600)
