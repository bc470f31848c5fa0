"""Helpers of the engine tests: build nodes in-process at chosen times, snapshot a data dir, and
check what RKE2 relies on (every cert pairs with its key, chains to its CA, nothing half-written).

Checks use `cryptography` and the openssl CLI, never rke2certd's own verification code.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rke2certd.commands.renew import RenewResult, renew
from rke2certd.config import load_config
from rke2certd.files.atomic import JOURNAL_NAME, TEMP_MARK
from rke2certd.files.lock import LOCK_NAME, node_lock
from rke2certd.node.node import Node
from rke2certd.pki.layout import CA_NAMES, Layout
from rke2certd.pki.profiles import LeafSpec, leaves_for

# rke2certd's own runtime state, not files RKE2 reads: the node lock (rewritten with the
# holder's pid by every writing command) and the embedded datastore's database.
RUNTIME_STATE = (LOCK_NAME, "server/db/")


def load_node(cfg: Path, **overrides: Any) -> Node:
    return Node.from_config(
        load_config(cfg, {k.replace("_", "-"): v for k, v in overrides.items()})
    )


def renew_at(node: Node, now: datetime, **kwargs: Any) -> RenewResult:
    """`renew` in-process at an injected time, under the node lock as the CLI runs it."""
    with node_lock(node.layout.data_dir, 30):
        return renew(node, now, **kwargs)


def specs_of(node: Node) -> tuple[LeafSpec, ...]:
    return leaves_for(node.cfg.is_server, node.cfg.has_agent)


def spec_named(name: str, agent: bool = False) -> LeafSpec:
    return next(s for s in leaves_for(True, True) if s.name == name and s.agent == agent)


def rel(node: Node, path: Path) -> str:
    return str(path.relative_to(node.layout.data_dir))


def leaf_rel(node: Node, spec: LeafSpec) -> str:
    return rel(node, spec.cert_path(node.layout))


def key_rel(node: Node, spec: LeafSpec) -> str:
    return rel(node, spec.key_path(node.layout))


# -- snapshots --------------------------------------------------------------------------------

Snapshot = dict[str, tuple[bytes, int, int]]  # relative path -> (bytes, mtime_ns, mode)


def snapshot(root: Path, include_runtime: bool = False) -> Snapshot:
    """Every file under `root` with its bytes, mtime (ns) and mode."""
    out: Snapshot = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        name = str(p.relative_to(root))
        if not include_runtime and any(
            name == r or (r.endswith("/") and name.startswith(r)) for r in RUNTIME_STATE
        ):
            continue
        st = p.lstat()
        out[name] = (p.read_bytes(), st.st_mtime_ns, st.st_mode & 0o7777)
    return out


def changed(before: Snapshot, after: Snapshot) -> set[str]:
    """Files added, removed, or whose bytes, mtime or mode differ."""
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def strays(root: Path) -> list[Path]:
    """Temp files and journals an interrupted write could leave anywhere under `root`."""
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_MARK) or p.name == JOURNAL_NAME]


# -- certificates and keys --------------------------------------------------------------------


def load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def load_cert(path: Path) -> x509.Certificate:
    return load_certs(path)[0]


def public_der_of_cert(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_der_of_key(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pairs(cert_path: Path, key_path: Path) -> bool:
    return public_der_of_cert(load_cert(cert_path)) == public_der_of_key(key_path)


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        return False
    return True


def openssl_verify(ca_file: Path, leaf_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The openssl CLI's verdict on the first certificate of `leaf_file` against `ca_file`."""
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), *extra, str(leaf_file)],
        capture_output=True,
        text=True,
        check=False,
    )


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def journal_overlay(data_dir: Path) -> dict[Path, Path]:
    """What an interrupted multi-file write will still rename: {target: temp} from its journal
    (empty when there is none). Reading through it shows the node as the replay will leave it."""
    journal = data_dir / JOURNAL_NAME
    if not journal.exists():
        return {}
    entries = json.loads(journal.read_bytes())
    return {Path(e["target"]): Path(e["temp"]) for e in entries if Path(e["temp"]).exists()}


def leaf_problems(
    node: Node, specs: Iterable[LeafSpec] | None = None, overlay: Mapping[Path, Path] | None = None
) -> list[Problem]:
    """Every existing leaf must pair with its key and chain to its CA (leaf + CA file bytes).

    A missing cert is not a problem here (see `missing_leaves`); a cert without its key is.
    With `overlay` ({path: file to read instead}), files are read as a journal replay leaves them.
    """
    layout = node.layout
    swap = overlay or {}

    def read(p: Path) -> bytes | None:
        p = swap.get(p, p)
        return p.read_bytes() if p.exists() else None

    problems: list[Problem] = []
    for spec in specs if specs is not None else specs_of(node):
        cert_path, key_path = spec.cert_path(layout), spec.key_path(layout)
        cert_pem, key_pem = read(cert_path), read(key_path)
        if cert_pem is None:
            continue
        name = rel(node, cert_path)
        if key_pem is None:
            problems.append(Problem(name, "its key file is missing"))
            continue
        leaf = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if public_der_of_cert(leaf) != key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            problems.append(Problem(name, "does not match its key"))
        ca_bytes = read(layout.ca_cert(spec.signer)) or b""
        if not signed_by(leaf, x509.load_pem_x509_certificate(ca_bytes)):
            problems.append(Problem(name, f"is not signed by {spec.signer}"))
        if cert_pem != leaf.public_bytes(serialization.Encoding.PEM) + ca_bytes:
            problems.append(Problem(name, "is not the leaf followed by its CA file"))
    return problems


def missing_leaves(node: Node) -> list[str]:
    return [leaf_rel(node, s) for s in specs_of(node) if not s.cert_path(node.layout).exists()]


def ca_files(layout: Layout) -> list[Path]:
    return [*layout.ca_files(), layout.service_key]


def assert_node_complete(node: Node, now: datetime | None = None) -> None:
    """Every leaf present, paired, chained and valid at `now`; derived files current; no strays."""
    assert not missing_leaves(node), missing_leaves(node)
    problems = leaf_problems(node)
    assert not problems, "\n".join(map(str, problems))
    if now is not None:
        for spec in specs_of(node):
            cert = load_cert(spec.cert_path(node.layout))
            assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc, spec.name
    layout = node.layout
    for name in ("server-ca", "client-ca"):
        first = load_cert(layout.ca_cert(name)).public_bytes(serialization.Encoding.PEM)
        assert layout.nochain(name).read_bytes() == first
    assert not strays(layout.data_dir), strays(layout.data_dir)


def serials(node: Node) -> Mapping[str, int]:
    return {
        leaf_rel(node, s): load_cert(s.cert_path(node.layout)).serial_number for s in specs_of(node)
    }


def ca_bundle_names() -> tuple[str, ...]:
    return CA_NAMES
