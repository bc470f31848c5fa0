"""`ca stage-rotation`: where it writes, with which modes, and the tokens it prints."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from rke2certd.commands.stage_rotation import stage_rotation
from rke2certd.errors import PKIError, UsageError
from rke2certd.node.staged_read import current_files, read_staged_dir
from rke2certd.pki.certs import bundle_pem, load_bundle
from rke2certd.pki.chain import der
from rke2certd.pki.join_token import parse_token
from rke2certd.pki.layout import CA_NAMES, Layout
from rke2certd.plan.staged_set import validate_staged_set

from .support import install, make_upstream_node, openssl


def test_refuses_the_in_use_tls_dir(tmp_path: Path, now: datetime) -> None:
    layout = make_upstream_node(tmp_path / "data")
    before = current_files(layout.tls)
    (tmp_path / "alias").symlink_to(layout.server)
    for out in (layout.server, layout.tls, tmp_path / "alias"):
        with pytest.raises(UsageError, match="refusing to stage into"):
            stage_rotation(layout.data_dir, out, now, "pw")
    assert current_files(layout.tls) == before


def test_modes_tokens_and_hash(rotated: tuple[Layout, Path], tmp_path: Path, now: datetime) -> None:
    layout, _ = rotated
    out = tmp_path / "staged"
    result = stage_rotation(layout.data_dir, out, now, "serverpw", "agentpw")
    tls = out / "tls"
    for path in [tls, tls / "etcd", *tls.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        expected = 0o700 if path.is_dir() else 0o600 if path.suffix == ".key" else 0o644
        assert mode == expected, path
    root_pem = bundle_pem(load_bundle((tls / "server-ca.crt").read_bytes(), "x")[2:3])
    (tmp_path / "root.pem").write_bytes(root_pem)
    root_der = openssl("x509", "-in", tmp_path / "root.pem", "-outform", "DER").stdout
    digest = hashlib.sha256(root_der).hexdigest()
    assert result.ca_hash == digest
    server, agent = parse_token(result.server_token or ""), parse_token(result.agent_token or "")
    assert (server.ca_hash, server.username, server.password) == (digest, "server", "serverpw")
    assert (agent.ca_hash, agent.username, agent.password) == (digest, "node", "agentpw")
    assert "serverpw" not in repr(result) and all("serverpw" not in m for m in result.messages)
    # handed to the daemon by a rename into its staging dir (same file system here)
    assert result.next_command == f"mv {out} {layout.server / 'rotate-ca' / 'incoming' / out.name}"


def test_upstream_ordered_sets_pass_and_rotate_again(tmp_path: Path, now: datetime) -> None:
    """A set in upstream's bundle order (intermediate, self-signed, cross-signed, old) passes
    the chain check (every path is tried); installed, it can be rotated again."""
    layout = make_upstream_node(tmp_path / "data")
    stage_rotation(layout.data_dir, tmp_path / "r1", now, "pw")
    tls = tmp_path / "r1" / "tls"
    for ca in CA_NAMES:
        inter, cross, root, old = load_bundle((tls / f"{ca}.crt").read_bytes(), ca)
        (tls / f"{ca}.crt").write_bytes(bundle_pem([inter, root, cross, old]))
    checks = validate_staged_set(read_staged_dir(tmp_path / "r1"), current_files(layout.tls), now)
    assert checks.problems == ()
    install(tls, layout)
    later = now + timedelta(seconds=1)
    stage_rotation(layout.data_dir, tmp_path / "r2", later, "pw")
    checks = validate_staged_set(read_staged_dir(tmp_path / "r2"), current_files(layout.tls), later)
    assert checks.problems == ()
    # The current root (not the current intermediate) cross-signed the new root.
    new = load_bundle((tmp_path / "r2" / "tls" / "server-ca.crt").read_bytes(), "r2")
    current = load_bundle(layout.ca_cert("server-ca").read_bytes(), "cur")
    assert new[1].issuer == current[1].subject and current[1].issuer == current[1].subject
    assert {der(c) for c in current} <= {der(c) for c in new}


def test_needs_complete_current_data(tmp_path: Path, now: datetime) -> None:
    layout = make_upstream_node(tmp_path / "data")
    layout.ca_key("etcd/peer-ca").unlink()
    with pytest.raises(PKIError, match=r"etcd/peer-ca\.key"):
        stage_rotation(layout.data_dir, tmp_path / "out", now, "pw")
    assert not (tmp_path / "out" / "tls").exists()
