"""Helpers of the bootstrap tests: nodes on one datastore, CLI processes started at one moment,
snapshots of disk and store, and checks made with tools independent of rke2certd (the openssl
CLI, Node's crypto, a Go-format JSON encoder written here)."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rke2certd.commands.node_datastore import open_for
from rke2certd.commands.renew import RenewResult, renew
from rke2certd.config import load_config
from rke2certd.datastore import Datastore, SQLiteDatastore, open_datastore
from rke2certd.files.lock import LOCK_NAME, node_lock
from rke2certd.node.node import Node
from rke2certd.pki.layout import Layout
from rke2certd.pki.profiles import leaves_for
from tests.conftest import clean_env, write_node_config
from tests.harness.etcd import EtcdCluster, TLSFiles

# The bootstrap data's files under <data>/server (docs/RKE2-COMPATIBILITY.md §6), written here by
# hand rather than taken from rke2certd's own table.
CA_FILES = (
    "tls/server-ca.crt",
    "tls/server-ca.key",
    "tls/client-ca.crt",
    "tls/client-ca.key",
    "tls/request-header-ca.crt",
    "tls/request-header-ca.key",
    "tls/etcd/server-ca.crt",
    "tls/etcd/server-ca.key",
    "tls/etcd/peer-ca.crt",
    "tls/etcd/peer-ca.key",
    "tls/service.key",
)
CA_FIELDS = {
    "ServerCA": "tls/server-ca.crt",
    "ServerCAKey": "tls/server-ca.key",
    "ClientCA": "tls/client-ca.crt",
    "ClientCAKey": "tls/client-ca.key",
    "RequestHeaderCA": "tls/request-header-ca.crt",
    "RequestHeaderCAKey": "tls/request-header-ca.key",
    "ETCDServerCA": "tls/etcd/server-ca.crt",
    "ETCDServerCAKey": "tls/etcd/server-ca.key",
    "ETCDPeerCA": "tls/etcd/peer-ca.crt",
    "ETCDPeerCAKey": "tls/etcd/peer-ca.key",
    "ServiceKey": "tls/service.key",
}
PREFIX = "/bootstrap/"
DB_DIR = "server/db/"  # rke2certd's embedded store and its own runtime state
LOCK_FILE = LOCK_NAME  # rewritten by every writing command


def bootstrap_key(password: str) -> str:
    return PREFIX + hashlib.sha256(password.encode()).hexdigest()[:12]


# -- datastores -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdTLS:
    """etcd's serving files and the client files a node uses, all issued by rke2certd."""

    server: TLSFiles
    client: TLSFiles


@dataclass
class Backend:
    """One datastore as the nodes of a test see it.

    kind: `sqlite` (the default: each node's own file under <data>/server/db, or, with
    `shared`, one file for several nodes), `etcd` (one TLS member) or `etcd3` (three members).
    """

    kind: str
    root: Path
    cluster: EtcdCluster | None = None
    tls: EtcdTLS | None = None
    shared: bool = False
    endpoint_order: Sequence[int] | None = None  # etcd members in the nodes' endpoint list

    @property
    def is_etcd(self) -> bool:
        return self.cluster is not None

    @property
    def shared_sqlite(self) -> Path:
        return self.root / "shared" / "rke2certd.sqlite"

    def settings(self) -> dict[str, Any]:
        if self.cluster is None:
            return {"datastore_endpoint": f"sqlite://{self.shared_sqlite}"} if self.shared else {}
        assert self.tls is not None
        order = self.endpoint_order or range(len(self.cluster.members))
        return {
            "datastore_endpoint": ",".join(self.cluster.client_url(i) for i in order),
            "datastore_cafile": self.tls.client.ca,
            "datastore_certfile": self.tls.client.cert,
            "datastore_keyfile": self.tls.client.key,
        }

    def node(self, name: str, **config: Any) -> tuple[Path, Path]:
        """A node config of its own dir `<root>/<name>`: (config path, data dir)."""
        return write_node_config(
            self.root / name, **({"node_name": name} | self.settings() | config)
        )

    def open(self, data_dir: Path | None = None) -> Datastore:
        """A client of the store; for the per-node SQLite default, that of `data_dir`."""
        if self.cluster is None:
            if self.shared:
                return SQLiteDatastore(self.shared_sqlite)
            assert data_dir is not None, "the SQLite default belongs to a node: give its data dir"
            return SQLiteDatastore(data_dir / "server" / "db" / "rke2certd.sqlite")
        assert self.tls is not None
        return open_datastore(
            self.cluster.endpoint,
            data_dir=self.root,
            cafile=self.tls.client.ca,
            certfile=self.tls.client.cert,
            keyfile=self.tls.client.key,
            timeout=30.0,
        )

    def dump(self, data_dir: Path | None = None) -> dict[str, tuple[bytes, int]]:
        """Every key of the store: {key: (value, mod_revision)}."""
        with self.open(data_dir) as ds:
            return {kv.key: (kv.value, kv.mod_revision) for kv in ds.get_prefix("/")}

    def bootstrap_values(self, data_dir: Path | None = None) -> dict[str, bytes]:
        with self.open(data_dir) as ds:
            return {kv.key: kv.value for kv in ds.get_prefix(PREFIX)}

    def put(self, key: str, value: bytes, data_dir: Path | None = None) -> None:
        """Write `key` whatever is there (a test planting data)."""
        with self.open(data_dir) as ds:
            kv = ds.get(key)
            assert ds.compare_and_swap(key, value, kv.mod_revision if kv else 0)

    def wipe(self) -> None:
        """Empty a shared etcd (a SQLite store is new in every test's own dir)."""
        if self.is_etcd:
            with self.open() as ds:
                for kv in ds.get_prefix("/"):
                    ds.delete(kv.key)

    # -- faults (etcd) ---------------------------------------------------------------------

    def down(self) -> None:
        """Every etcd member killed (SIGKILL, as a crash)."""
        assert self.cluster is not None
        for i in range(len(self.cluster.members)):
            self.cluster.kill(i)

    def up(self) -> None:
        """Restart the dead members together (one alone has no quorum) and wait for health."""
        assert self.cluster is not None
        cluster = self.cluster
        dead = [i for i, m in enumerate(cluster.members) if not m.running]
        with concurrent.futures.ThreadPoolExecutor(max(1, len(dead))) as pool:
            list(pool.map(cluster.restart, dead))


# -- nodes ----------------------------------------------------------------------------------


def load_node(cfg: Path) -> Node:
    return Node.from_config(load_config(cfg))


def renew_in_process(cfg: Path, now: datetime | None = None) -> RenewResult:
    """`rke2certd renew` without the process: the node's own datastore, under the node lock."""
    node = load_node(cfg)
    with open_for(node) as ds, node_lock(node.layout.data_dir, 30):
        return renew(node, now or datetime.now(UTC), datastore=ds)


def ca_set(data_dir: Path) -> dict[str, bytes]:
    """The bytes of the bootstrap CA files (a missing one is b"")."""
    out = {}
    for rel in CA_FILES:
        p = data_dir / "server" / rel
        out[rel] = p.read_bytes() if p.exists() else b""
    return out


Tree = dict[str, tuple[bytes, int, int]]


def tree(root: Path, include_db: bool = False) -> Tree:
    """Every file under `root`: (bytes, mtime_ns, mode); the node lock file is left out (every
    writing command rewrites it), and the embedded store too unless `include_db`."""
    out: Tree = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        name = str(p.relative_to(root))
        if p.is_dir() or name == LOCK_FILE or (not include_db and name.startswith(DB_DIR)):
            continue
        st = p.lstat()
        out[name] = (p.read_bytes(), st.st_mtime_ns, st.st_mode & 0o7777)
    return out


def changed(before: Tree, after: Tree) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def openssl_verify_leaves(data_dir: Path) -> None:
    """Every leaf of a server node verifies with the openssl CLI against its CA file."""
    by_signer: dict[str, list[str]] = {}
    for spec in leaves_for(True, True):
        by_signer.setdefault(spec.signer, []).append(str(spec.cert_path(Layout(data_dir))))
    for signer, leaves in by_signer.items():
        ca = data_dir / "server" / "tls" / f"{signer}.crt"
        res = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca), *leaves],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count(": OK") == len(leaves), res.stdout


# -- CLI processes started at one moment ----------------------------------------------------

# Imports everything `renew` needs, says it is ready, and waits for the go (a byte on stdin), so
# that processes started one after the other begin their work at the same instant.
_GATED = """
import sys
import rke2certd.cli, rke2certd.commands.renew, rke2certd.commands.bootstrap_write
import rke2certd.commands.render
import rke2certd.datastore
print("ready", flush=True)
sys.stdin.read(1)
sys.exit(rke2certd.cli.main(sys.argv[1:]))
"""


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_together(
    argvs: Sequence[Sequence[object]],
    on_go: Callable[[], object] | None = None,
    timeout: float = 120,
) -> list[Finished]:
    """Start one `rke2certd ARGV` process per entry, release them together, wait for all.

    `on_go` runs right after the release (in this thread), e.g. to start a fault injector.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GATED, *(str(a) for a in argv)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
            cwd="/",
            text=True,
        )
        for argv in argvs
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", (line, p.stderr.read() if p.stderr else "")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("g")
            p.stdin.flush()  # communicate() closes it
        if on_go is not None:
            on_go()
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(Finished(p.returncode, stdout, stderr))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class LockWatcher:
    """Calls `action` once the creation lock (an empty value under /bootstrap/) shows up in the
    store, or after `at_most` seconds: a fault injected while a server creates the CA set."""

    def __init__(
        self, open_store: Callable[[], Datastore], action: Callable[[], None], at_most: float
    ) -> None:
        self.saw_lock = False
        self.fired = threading.Event()
        self._open = open_store
        self._action = action
        self._at_most = at_most
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LockWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self._at_most
        try:
            with self._open() as ds:
                while time.monotonic() < deadline:
                    if any(not kv.value for kv in ds.get_prefix(PREFIX)):
                        self.saw_lock = True
                        break
                    time.sleep(0.005)
        except Exception:  # the store under test may fail: fire anyway
            pass
        finally:
            self._action()
            self.fired.set()

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)
        assert self.fired.is_set(), "the fault injector did not fire"


# -- an independent implementation of the bootstrap format ---------------------------------


def go_time(unix_ns: int) -> str:
    """Go's time.RFC3339Nano of a UTC instant: fraction without trailing zeros, `Z`."""
    seconds, frac = divmod(unix_ns, 1_000_000_000)
    text = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dT%H:%M:%S"
    )
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def go_json(fields: dict[str, tuple[str, bytes | None]]) -> bytes:
    """What Go's json.NewEncoder(w).Encode(map[string]bootstrap.File) writes: keys sorted, no
    spaces, `Timestamp` then `Content` (base64, or null for a nil []byte), then a newline."""
    parts = []
    for name in sorted(fields):
        stamp, content = fields[name]
        body = "null" if content is None else '"' + base64.b64encode(content).decode() + '"'
        parts.append(f'"{name}":{{"Timestamp":"{stamp}","Content":{body}}}')
    return ("{" + ",".join(parts) + "}\n").encode()


# Node's crypto: PBKDF2-HMAC-SHA1 over the ASCII salt, AES-256-GCM (docs/RKE2-COMPATIBILITY.md §6).
_NODE_ENCRYPT = """
const c = require("crypto");
const inp = JSON.parse(require("fs").readFileSync(0, "utf8"));
const salt = c.randomBytes(8).toString("hex");
const nonce = c.randomBytes(12);
const key = c.pbkdf2Sync(inp.password, Buffer.from(salt, "ascii"), 4096, 32, "sha1");
const gcm = c.createCipheriv("aes-256-gcm", key, nonce);
const pt = Buffer.from(inp.plaintext, "base64");
const sealed = Buffer.concat([nonce, gcm.update(pt), gcm.final(), gcm.getAuthTag()]);
process.stdout.write(JSON.stringify({
  key: "/bootstrap/" + c.createHash("sha256").update(inp.password).digest("hex").slice(0, 12),
  value: salt + ":" + sealed.toString("base64"),
}));
"""
_NODE_DECRYPT = """
const c = require("crypto");
const inp = JSON.parse(require("fs").readFileSync(0, "utf8"));
const value = Buffer.from(inp.value, "base64").toString("ascii");
const i = value.indexOf(":");
const salt = value.slice(0, i);
const data = Buffer.from(value.slice(i + 1), "base64");
const key = c.pbkdf2Sync(inp.password, Buffer.from(salt, "ascii"), 4096, 32, "sha1");
const gcm = c.createDecipheriv("aes-256-gcm", key, data.subarray(0, 12));
gcm.setAuthTag(data.subarray(data.length - 16));
const pt = Buffer.concat([gcm.update(data.subarray(12, data.length - 16)), gcm.final()]);
process.stdout.write(pt.toString("base64"));
"""


def _node(script: str, payload: dict[str, str]) -> str:
    res = subprocess.run(
        ["node", "-e", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def node_encrypt(password: str, plaintext: bytes) -> tuple[str, bytes]:
    """(key, value) as RKE2 would store `plaintext`, made by Node's crypto."""
    payload = {"password": password, "plaintext": base64.b64encode(plaintext).decode()}
    out = json.loads(_node(_NODE_ENCRYPT, payload))
    return out["key"], out["value"].encode()


def node_decrypt(password: str, value: bytes) -> bytes:
    payload = {"password": password, "value": base64.b64encode(value).decode()}
    return base64.b64decode(_node(_NODE_DECRYPT, payload))
