"""One RKE2 node of the stand-in: its config, its start as upstream orders it, its stop, and the
package's `ExecStartPre=` run before every start as systemd runs it.

A server's start (K3s's order, which RKE2 embeds):
1. bootstrap: an etcd member with data reads its bootstrap key from a temporary copy of its
   etcd and reconciles disk against it; a node joining (`server:` set, no etcd data yet) or a
   node without etcd (`disable-etcd`) reconciles against `GET /v1-rke2/server-bootstrap` of
   the server it joins; a first server with nothing has nothing to reconcile and saves its
   files into the bootstrap key once its etcd runs;
2. users (`cred/passwd`, `cred/ipsec.psk`), CAs where missing, leaves as certs.py says;
3. etcd: the node's member (new cluster, existing data, or a member added through the etcd
   client URLs `/db/info` of the joined server gives), with the node's etcd certificates;
4. the bootstrap key (first server), `server/token`, `node-token` and `agent-token`;
5. the supervisor and the apiserver's TLS listener.

Each node has its own loopback address (127.x.y.z) as its node IP and RKE2's fixed ports on it
(supervisor 9345, apiserver 6443, etcd 2379/2380), so nodes of one test share no port.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.harness.rke2 import bootstrap as bs
from tests.harness.rke2.certs import (
    Identity,
    ec_pem,
    gen_server_certs,
    load_certs,
    new_ec_key,
    write_file,
)
from tests.harness.rke2.etcd import EtcdClient, EtcdMember, read_key_from_local_copy
from tests.harness.rke2.supervisor import AGENT_LEAVES, Supervisor

CHECKOUT = Path(__file__).resolve().parents[3]
SUPERVISOR_PORT, APISERVER_PORT = 9345, 6443
_PORTS = (2379, 2380, SUPERVISOR_PORT, APISERVER_PORT, 9346)


class HookFailed(RuntimeError):
    """The unit's ExecStartPre= failed: systemd does not start RKE2."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"ExecStartPre {result.args} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        self.result = result


def free_loopback_host() -> str:
    """A 127.x.y.z address whose RKE2 ports are all free (the whole 127/8 is loopback)."""
    rng = random.SystemRandom()
    for _ in range(200):
        host = f"127.{rng.randint(64, 250)}.{rng.randint(1, 250)}.{rng.randint(2, 250)}"
        socks = []
        try:
            for port in _PORTS:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
            return host
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free loopback address for a stand-in node")


def exec_start_pre(unit: str) -> list[tuple[bool, list[str]]]:
    """The package's ExecStartPre= lines for `unit`, in order: (failure ignored, argv)."""
    out = []
    dropin = CHECKOUT / "systemd" / f"{unit}.service.d"
    for conf in sorted(dropin.glob("*.conf")):
        for line in conf.read_text().splitlines():
            key, _, value = line.strip().partition("=")
            if key.strip() != "ExecStartPre" or not value.strip():
                continue
            value = value.strip()
            ignore = False
            while value and value[0] in "-@+!:":
                ignore = ignore or value[0] == "-"
                value = value[1:]
            out.append((ignore, shlex.split(value)))
    return out


def ca_hash(bundle: bytes) -> str:
    """The token's CA hash of a server-ca.crt, as upstream's clientaccess computes it: one cert,
    the file's bytes; more, the DER of the root ending the first chain Go's x509 Verify finds
    from the first cert, where the roots are the later certs without an AKI or with AKI = SKI
    and the rest are intermediates. Go tries root parents before intermediate ones, so a
    cross-signed bundle (new intermediate, new root cross-signed by the old CA, new root, old
    root) hashes to the new self-signed root, not to the old one through the cross-signed
    cert; bytes of the file when no chain verifies."""
    certs = x509.load_pem_x509_certificates(bundle)
    if len(certs) > 1:
        roots = [c for c in certs[1:] if _is_root_for_hash(c)]
        inters = [c for c in certs[1:] if not _is_root_for_hash(c)]
        root = _first_root(certs[0], roots, inters, [certs[0]])
        if root is not None:
            return hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    return hashlib.sha256(bundle).hexdigest()


def _ski_aki(cert: x509.Certificate) -> tuple[bytes | None, bytes | None]:
    try:
        ski: bytes | None = cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except x509.ExtensionNotFound:
        ski = None
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        return ski, aki.key_identifier
    except x509.ExtensionNotFound:
        return ski, None


def _is_root_for_hash(cert: x509.Certificate) -> bool:
    ski, aki = _ski_aki(cert)
    return not aki or aki == ski


def _first_root(
    cert: x509.Certificate,
    roots: list[x509.Certificate],
    inters: list[x509.Certificate],
    chain: list[x509.Certificate],
) -> x509.Certificate | None:
    """Depth first as Go's buildChains: root parents, then intermediate ones (each list with
    the parents whose SKI matches the cert's AKI first)."""
    if len(chain) > 10:
        return None
    _, aki = _ski_aki(cert)

    def ordered(pool: list[x509.Certificate]) -> list[x509.Certificate]:
        return sorted(pool, key=lambda p: 0 if aki and _ski_aki(p)[0] == aki else 1)

    for root in ordered(roots):
        if _signed_by(cert, root):
            return root
    for parent in ordered(inters):
        if parent not in chain and _signed_by(cert, parent):
            found = _first_root(parent, roots, inters, [*chain, parent])
            if found is not None:
                return found
    return None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, Exception):
        return False


def _basic(user: str, pw: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def _fetch(
    url: str,
    ctx: ssl.SSLContext,
    auth: str | None = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> bytes:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if auth:
        req.add_header("Authorization", auth)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
        body: bytes = resp.read()
        return body


def pinned_context(server: str, token: str) -> ssl.SSLContext:
    """Fetch /cacerts without verification, check its hash against the token's (K10 tokens),
    and trust exactly those CAs (as a joining node does)."""
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    cacerts = _fetch(server.rstrip("/") + "/cacerts", insecure)
    if token.startswith("K10"):
        want = token[3:].split("::", 1)[0]
        got = ca_hash(cacerts)
        if want and want != got:
            raise RuntimeError(f"token CA hash does not match the server's /cacerts ({got})")
    ctx = ssl.create_default_context(cadata=cacerts.decode())
    ctx.check_hostname = False
    return ctx


@dataclass
class NodeBase:
    """What every stand-in node has: a root dir standing for its filesystem."""

    root: Path
    name: str
    config: dict[str, Any]
    rke2certd_config: dict[str, Any] = field(default_factory=dict)
    run_hook: bool = True
    host: str = ""
    hook_runs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    unit = "rke2-server"

    def __post_init__(self) -> None:
        self.host = self.host or free_loopback_host()
        self.config.setdefault("node-name", self.name)
        self.config.setdefault("node-ip", self.host)
        self.config.setdefault("data-dir", str(self.root / "var/lib/rancher/rke2"))
        self.write_config()
        unit_dir = self.root / "etc/systemd/system"
        unit_dir.mkdir(parents=True, exist_ok=True)
        (unit_dir / f"{self.unit}.service").write_text(
            f"[Unit]\nDescription=Rancher Kubernetes Engine v2 ({self.unit})\n"
            f"[Service]\nExecStart=/usr/local/bin/rke2 {self.unit.split('-')[1]}\n"
        )
        cfg = self.rke2certd_config_path
        cfg.parent.mkdir(parents=True, exist_ok=True)
        if self.rke2certd_config:
            cfg.write_text(yaml.safe_dump(self.rke2certd_config, sort_keys=False))
        else:
            cfg.write_text("# rke2certd: every default\n")

    # -- paths ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "etc/rancher/rke2/config.yaml"

    @property
    def rke2certd_config_path(self) -> Path:
        return self.root / "etc/rke2certd/config.yaml"

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data-dir"])

    @property
    def server_dir(self) -> Path:
        return self.data_dir / "server"

    @property
    def tls(self) -> Path:
        return self.server_dir / "tls"

    @property
    def agent_dir(self) -> Path:
        return self.data_dir / "agent"

    @property
    def node_name(self) -> str:
        return str(self.config["node-name"])

    def write_config(self) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def read_config(self) -> None:
        """RKE2 reads its config file when its process starts (after ExecStartPre=, which may
        have changed it, e.g. the CA hash of `token` after a CA rotation)."""
        doc = yaml.safe_load(self.config_path.read_text()) or {}
        if not isinstance(doc, dict):
            raise RuntimeError(f"{self.config_path}: not a mapping")
        self.config = doc

    def log(self, line: str) -> None:
        self.events.append(line)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    # -- the hook ------------------------------------------------------------------------------

    def hook_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": "/",
            "RKE2CERTD_CACHE_DIR": os.environ.get("RKE2CERTD_CACHE_DIR", str(self.root / "cache")),
            "PYTHONPATH": str(CHECKOUT),
            "RKE2CERTD_RKE2_CONFIG": str(self.config_path),
            "RKE2CERTD_UNIT_DIRS": str(self.root / "etc/systemd/system"),
        }

    def hook_argv(self, argv: list[str]) -> list[str]:
        if Path(argv[0]).name != "rke2certd":
            raise RuntimeError(f"unexpected ExecStartPre program {argv[0]}")
        return [sys.executable, "-m", "rke2certd", "-c", str(self.rke2certd_config_path), *argv[1:]]

    def run_exec_start_pre(self) -> None:
        """Every ExecStartPre= of the unit, as systemd runs them; HookFailed stops the start."""
        for ignore, argv in exec_start_pre(self.unit):
            res = subprocess.run(
                self.hook_argv(argv),
                capture_output=True,
                text=True,
                env=self.hook_env(),
                cwd="/",
                timeout=120,
                check=False,
            )
            self.hook_runs.append(res)
            if res.returncode != 0 and not ignore:
                raise HookFailed(res)


@dataclass
class RKE2Server(NodeBase):
    """An RKE2 server (all roles unless the config disables some)."""

    etcd: EtcdMember | None = None
    supervisor: Supervisor | None = None
    last_certs: dict[str, str] = field(default_factory=dict)  # leaf -> why made, last start
    last_written: list[str] = field(default_factory=list)  # bootstrap files written, last start
    supervisor_port: int = SUPERVISOR_PORT
    apiserver_port: int = APISERVER_PORT

    def __post_init__(self) -> None:
        super().__post_init__()
        self.etcd = EtcdMember(
            self.node_name,
            self.host,
            self.server_dir / "db/etcd",
            self.tls / "etcd",
            self.root / "etcd.log",
        )

    # -- config --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.supervisor_port}"

    @property
    def etcd_enabled(self) -> bool:
        return not self.config.get("disable-etcd")

    @property
    def apiserver_enabled(self) -> bool:
        return not self.config.get("disable-apiserver")

    @property
    def running(self) -> bool:
        return self.supervisor is not None

    def identity(self) -> Identity:
        ips = self.config.get("node-ip") or []
        sans = self.config.get("tls-san") or []
        return Identity(
            node_name=self.node_name,
            node_ips=tuple([ips] if isinstance(ips, str) else ips),
            advertise_address=self.config.get("advertise-address"),
            tls_sans=tuple([sans] if isinstance(sans, str) else sans),
            cluster_domain=self.config.get("cluster-domain", "cluster.local"),
            service_cidr=str(self.config.get("service-cidr", "10.43.0.0/16")).split(",")[0],
        )

    def token(self) -> str | None:
        """The configured token, else the one in server/token (as upstream reads it)."""
        tok = self.config.get("token")
        if tok:
            return str(tok)
        path = self.server_dir / "token"
        return path.read_text().strip() if path.exists() else None

    def passwords(self) -> dict[str, str]:
        out = {}
        path = self.server_dir / "cred/passwd"
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.strip().split(",")
                if len(parts) >= 2:
                    out[parts[1]] = parts[0]
        return out

    def check_password(self, user: str, pw: str) -> bool:
        return bool(pw) and self.passwords().get(user) == pw

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """ExecStartPre= (unless disabled), then RKE2's start. On a failure nothing runs."""
        if self.running:
            raise RuntimeError(f"{self.name} already running")
        if self.run_hook:
            self.run_exec_start_pre()
        self.read_config()
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.etcd is not None:
            self.etcd.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def boot(self) -> None:
        self.log("start")
        token = self.token()
        joining = bool(self.config.get("server"))
        save = False
        self.last_written = []
        assert self.etcd is not None
        if self.etcd_enabled and self.etcd.initialized():
            if not token:
                raise bs.BootstrapFatal("no token to read the bootstrap key with")
            raw = read_key_from_local_copy(
                self.etcd.data_dir, bs.bootstrap_key(token), self.root / "etcd-temporary.log"
            )
            if not raw:
                save = True
            else:
                stored = bs.decode_files(bs.decrypt(token, raw))
                self.last_written = bs.reconcile(self.server_dir, stored).written
        elif joining:
            if not token:
                raise bs.BootstrapFatal("a token is required to join a cluster")
            ctx = pinned_context(self.config["server"], token)
            raw = _fetch(
                self.config["server"].rstrip("/") + "/v1-rke2/server-bootstrap",
                ctx,
                _basic("server", bs.passphrase(token)),
            )
            self.last_written = bs.reconcile(self.server_dir, bs.decode_files(raw)).written
        else:
            save = True
        self.gen_users(token)
        self.last_certs = gen_server_certs(self.tls, self.identity(), not self.etcd_enabled)
        if self.etcd_enabled:
            self.start_etcd(joining)
        if save:
            self.save_bootstrap()
        self.write_tokens()
        self.supervisor = Supervisor(self)
        self.supervisor.start(serve_apiserver=self.apiserver_enabled)
        self.log("ready")

    # -- steps ---------------------------------------------------------------------------------

    def gen_users(self, token: str | None) -> None:
        pw = self.passwords()
        server_pw = bs.passphrase(token) if token else pw.get("server") or os.urandom(16).hex()
        agent = self.config.get("agent-token")
        node_pw = bs.passphrase(str(agent)) if agent else server_pw
        want = {"node": (node_pw, "rke2:agent"), "server": (server_pw, "rke2:server")}
        if all(pw.get(u) == p for u, (p, _) in want.items()):
            pass
        else:
            lines = [f"{p},{u},{u},{g}" for u, (p, g) in want.items()]
            write_file(self.server_dir / "cred/passwd", ("\n".join(lines) + "\n").encode(), 0o600)
        psk = self.server_dir / "cred/ipsec.psk"
        if not psk.exists() or psk.stat().st_size == 0:
            write_file(psk, (os.urandom(24).hex() + "\n").encode(), 0o600)

    def start_etcd(self, joining: bool) -> None:
        assert self.etcd is not None
        member = self.etcd
        if member.initialized():
            member.start()
            member.wait_listening()
            return
        elif joining:
            token = self.token() or ""
            ctx = pinned_context(self.config["server"], token)
            info = json.loads(
                _fetch(
                    self.config["server"].rstrip("/") + "/db/info",
                    ctx,
                    _basic("server", bs.passphrase(token)),
                )
            )
            urls = [u for m in info["members"] for u in m.get("clientURLs", [])]
            client = EtcdClient(urls, member.client_tls())
            member_id = client.member_add(member.peer_url)
            peers = [f"{m['name']}={m['peerURLs'][0]}" for m in client.members() if m.get("name")]
            peers.append(f"{member.name}={member.peer_url}")
            member.start(",".join(peers), existing=True)
            member.wait_serving()
            client.promote(member_id)
            return
        else:
            member.start()
        member.wait_serving()

    def etcd_client(self) -> EtcdClient:
        """A client for the cluster's etcd with this node's etcd client cert."""
        if self.etcd_enabled:
            assert self.etcd is not None
            return EtcdClient([self.etcd.client_url], self.etcd.client_tls())
        token = self.token() or ""
        ctx = pinned_context(self.config["server"], token)
        info = json.loads(
            _fetch(
                self.config["server"].rstrip("/") + "/db/info",
                ctx,
                _basic("server", bs.passphrase(token)),
            )
        )
        urls = [u for m in info["members"] for u in m.get("clientURLs", [])]
        t = self.tls / "etcd"
        from tests.harness.rke2.etcd import ClientTLS

        return EtcdClient(urls, ClientTLS(t / "server-ca.crt", t / "client.crt", t / "client.key"))

    def etcd_members(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.etcd_client().members():
            if not m.get("name"):
                continue  # added, not started yet
            out.append({k: m[k] for k in ("ID", "name", "peerURLs", "clientURLs") if k in m})
        return out

    def save_bootstrap(self, timeout: float = 30) -> None:
        """Create the bootstrap key from the files on disk (kept when it exists already)."""
        token = self.token() or self.passwords()["server"]
        value = bs.encrypt(token, bs.encode_files(bs.read_from_disk(self.server_dir)))
        client = self.etcd_client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create(bs.bootstrap_key(token), value)
                return
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stored_bootstrap(self) -> dict[str, tuple[int, bytes]]:
        """The bootstrap key's content now (through the running etcd)."""
        token = self.token()
        assert token
        raw = self.etcd_client().get(bs.bootstrap_key(token))
        assert raw, "no bootstrap key"
        return bs.decode_files(bs.decrypt(token, raw))

    def bootstrap_json_from_disk(self) -> bytes:
        return bs.encode_files(bs.read_from_disk(self.server_dir))

    def write_tokens(self) -> None:
        pw = self.passwords()
        bundle = (self.tls / "server-ca.crt").read_bytes()
        h = ca_hash(bundle)
        token_file = self.server_dir / "token"
        _write_text_if_changed(token_file, f"K10{h}::server:{pw['server']}\n")
        _symlink(self.server_dir / "node-token", token_file)
        agent_file = self.server_dir / "agent-token"
        if self.config.get("agent-token"):
            if agent_file.is_symlink():
                agent_file.unlink()
            _write_text_if_changed(agent_file, f"K10{h}::node:{pw['node']}\n")
        else:
            _symlink(agent_file, token_file)

    def replace_cacerts(self, body: bytes, force: bool) -> None:
        """The server side of `certificate rotate-ca`: check the new set, save it to the key."""
        from tests.harness.rke2.rotate import validate

        new = bs.decode_files(body)
        current = bs.read_from_disk(self.server_dir)
        problems = validate(current, new)
        if problems and not force:
            raise ValueError("; ".join(problems))
        merged = dict(self.stored_bootstrap())
        merged.update(new)
        token = self.token()
        assert token
        self.etcd_client().put(bs.bootstrap_key(token), bs.encrypt(token, bs.encode_files(merged)))
        self.log("cacerts replaced")

    def rotate_ca(self, path: Path, force: bool = False) -> None:
        """`rke2 certificate rotate-ca --path PATH [--force]` against this running server:
        the files under PATH/tls (missing ones: the current data) go to the supervisor."""
        files: dict[str, tuple[int, bytes]] = {}
        for name in bs.CA_FIELDS:
            p = path / bs.FIELDS[name]
            if p.exists() and p.stat().st_size > 0:
                files[name] = (p.stat().st_mtime_ns, p.read_bytes())
        ctx = ssl.create_default_context(cafile=str(self.tls / "server-ca.crt"))
        ctx.check_hostname = False
        url = self.url + "/v1-rke2/cert/cacerts" + ("?force=true" if force else "")
        try:
            _fetch(
                url, ctx, _basic("server", self.passwords()["server"]), data=bs.encode_files(files)
            )
        except urllib.error.HTTPError as exc:
            raise ValueError(exc.read().decode().strip()) from exc


@dataclass
class RKE2Agent(NodeBase):
    """An agent-only node: CAs from the server, its leaves signed by the server from CSRs."""

    unit = "rke2-agent"
    running: bool = False

    def start(self) -> None:
        if self.run_hook:
            self.run_exec_start_pre()
        self.read_config()
        token = str(self.config["token"])
        server = str(self.config["server"]).rstrip("/")
        ctx = pinned_context(server, token)
        auth = _basic("node", bs.passphrase(token))
        agent = self.agent_dir
        agent.mkdir(parents=True, exist_ok=True)
        _write_bytes_if_changed(agent / "server-ca.crt", _fetch(server + "/cacerts", ctx))
        _write_bytes_if_changed(
            agent / "client-ca.crt", _fetch(server + "/v1-rke2/client-ca.crt", ctx, auth)
        )
        ips = self.config.get("node-ip") or []
        ips = [ips] if isinstance(ips, str) else ips
        for name in AGENT_LEAVES:
            key_path = agent / f"{name}.key"
            if key_path.exists():
                key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            else:
                key = new_ec_key()
                write_file(key_path, ec_pem(key), 0o600)
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([]))
                .sign(key, hashes.SHA256())  # type: ignore[arg-type]
            )
            crt = _fetch(
                f"{server}/v1-rke2/{name}.crt",
                ctx,
                auth,
                data=csr.public_bytes(serialization.Encoding.PEM),
                headers={"rke2-Node-Name": self.node_name, "rke2-Node-IP": ",".join(ips)},
            )
            write_file(agent / f"{name}.crt", crt, 0o644)
        self.running = True

    def stop(self) -> None:
        self.running = False


def _write_text_if_changed(path: Path, text: str) -> None:
    _write_bytes_if_changed(path, text.encode(), 0o600)


def _write_bytes_if_changed(path: Path, data: bytes, mode: int = 0o644) -> None:
    try:
        if not path.is_symlink() and path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    if path.is_symlink():
        path.unlink()
    write_file(path, data, mode)


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink():
        return
    if link.exists():
        link.unlink()
    link.symlink_to(target)


def leaf_of(path: Path) -> x509.Certificate:
    return load_certs(path)[0]
