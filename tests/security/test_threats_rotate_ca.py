"""Threats against `certificate rotate-ca`: hostile CA bundles, each made with the openssl CLI.

The threat list (docs/SECURITY.md); every bundle here was accepted before, and each set is
read from disk the way rotate-ca reads it:

  T7a  a new root cross-signed by the current CA with pathlen:0, signing the new intermediate:
       every leaf of the new CA fails `openssl verify` against the old CA (error 25);
  T7b  a pathlen:0 intermediate signing a sub-CA that becomes the new CA: no path verifies;
  T8a  a bundle with no self-signed root (new CA + the current intermediate): the chain to the
       current root passes, but `openssl verify -CAfile server-ca.crt` fails after the rotation;
  T8b  a good bundle padded with unrelated self-signed roots (one; then 1,500): each would
       become a trust anchor on every node;
  T9   bytes outside the PEM blocks (NUL, 0xFF, text) or inside one, in a certificate file, a
       CA key and service.key: they were stored verbatim in the datastore and live files.

Then the accepted cases, judged by `openssl verify` without -partial_chain: a leaf of the new
CA verifies against the new bundle alone and against only the old CA (cross-signed chain);
upstream-made files with trailing blank lines pass; `ca stage-rotation` on a node that took a
T7a set before the fix still builds a set that verifies, and on a T7b node refuses clearly;
`certificate check` flags a leaf whose chain no longer verifies.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.errors import PKIError
from rke2certd.ops.generate import stage_rotation
from rke2certd.ops.staged_read import current_files, read_staged_dir
from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem, load_bundle
from rke2certd.pki.keys import key_to_pem, load_keys, new_ec_key
from rke2certd.pki.layout import Layout
from rke2certd.plan.staged_set import StagedSetResult, validate_staged_set
from tests.conftest import run_cli, write_node_config
from tests.rotation.support import (
    install,
    issue_leaf,
    make_upstream_node,
    openssl,
    openssl_verify,
)

CRT, KEY = "tls/server-ca.crt", "tls/server-ca.key"

_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature, keyEncipherment, keyCertSign
[ca_pathlen0]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, digitalSignature, keyEncipherment, keyCertSign
"""


@dataclass(frozen=True)
class Made:
    """A CA certificate and its key, as files."""

    crt: Path
    key: Path

    @property
    def pem(self) -> bytes:
        return self.crt.read_bytes()


class OpenSSL:
    """Makes CA certificates with the openssl CLI (upstream's tool), in `work`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.cnf = work / "ca.cnf"
        self.cnf.write_text(_CNF)

    def key(self, name: str) -> Path:
        path = self.work / f"{name}.key"
        if not path.exists():
            _ok(openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path))
        return path

    def root(self, name: str, ext: str = "ca") -> Made:
        crt, key = self.work / f"{name}.crt", self.key(name)
        _ok(
            openssl(
                "req", "-x509", "-new", "-key", key, "-config", self.cnf, "-extensions", ext,
                "-subj", f"/CN={name}", "-days", "3650", "-out", crt,
            )
        )  # fmt: skip
        return Made(crt, key)

    def signed(self, name: str, issuer: Made, ext: str = "ca", *, as_file: str = "") -> Made:
        """CN=`name` with the key `name`.key, signed by `issuer`; `as_file` names another file
        (a cross-signed copy of a root has the root's name and key)."""
        key = self.key(name)
        crt, csr = self.work / f"{as_file or name}.crt", self.work / f"{as_file or name}.csr"
        _ok(openssl("req", "-new", "-key", key, "-config", self.cnf, "-subj", f"/CN={name}",
                    "-out", csr))  # fmt: skip
        _ok(
            openssl(
                "x509", "-req", "-in", csr, "-CA", issuer.crt, "-CAkey", issuer.key,
                "-extfile", self.cnf, "-extensions", ext, "-days", "3650",
                "-set_serial", f"0x{secrets.token_hex(8)}", "-out", crt,
            )
        )  # fmt: skip
        return Made(crt, key)


def _ok(proc: object) -> None:
    assert getattr(proc, "returncode", 1) == 0, getattr(proc, "stderr", b"").decode()


def stage(root: Path, bundle: bytes, key: bytes) -> Path:
    """A staged dir with a new server-ca only (the other slots fall back to current data)."""
    (root / "tls").mkdir(parents=True, exist_ok=True)
    (root / CRT).write_bytes(bundle)
    (root / KEY).write_bytes(key)
    (root / KEY).chmod(0o600)
    return root


def check(layout: Layout, staged: Path, now: datetime) -> StagedSetResult:
    return validate_staged_set(read_staged_dir(staged), current_files(layout.tls), now)


def checks(result: StagedSetResult, rel: str = CRT) -> set[str]:
    """The kinds of problem found in one file, as text (so this reads the same on any version)."""
    return {str(p.check) for p in result.problems if p.file == rel}


def verify(trust: bytes, chain: Path, work: Path) -> str:
    anchor = work / f"trust-{secrets.token_hex(4)}.crt"
    anchor.write_bytes(trust)
    return openssl_verify(anchor, chain, work)


@pytest.fixture
def now() -> datetime:
    """A minute ahead of the wall clock: openssl cannot backdate, and the CAs it makes after
    this fixture ran must already be valid at the checks' time."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Path]:
    """An upstream-like node and a set `ca stage-rotation` staged from it (read-only use)."""
    root = tmp_path_factory.mktemp("rotated")
    layout = make_upstream_node(root / "data")
    out = root / "data" / "server" / "rotate-ca"
    stage_rotation(layout.data_dir, out, datetime.now(UTC), "secretpw")
    return layout, out / "tls"


@pytest.fixture
def node(tmp_path: Path) -> Layout:
    return make_upstream_node(tmp_path / "data")


def old_ca(layout: Layout) -> Made:
    return Made(layout.ca_cert("server-ca"), layout.ca_key("server-ca"))


# -- T7: path length -------------------------------------------------------------------------


def pathlen0_cross_set(ssl: OpenSSL, old: Made) -> tuple[Made, Made, Made]:
    """T7a: new root, the same root cross-signed by the old CA with pathlen:0, and the new
    intermediate it signs."""
    root = ssl.root("new-root")
    cross = ssl.signed("new-root", old, "ca_pathlen0", as_file="new-root-cross")
    inter = ssl.signed("new-intermediate", root)
    return root, cross, inter


def test_t7a_pathlen0_cross_signed_root_over_the_new_ca(
    node: Layout, tmp_path: Path, now: datetime
) -> None:
    ssl = OpenSSL(tmp_path / "ssl")
    old = old_ca(node)
    root, cross, inter = pathlen0_cross_set(ssl, old)
    bundle = inter.pem + cross.pem + root.pem + old.pem
    staged = stage(tmp_path / "staged", bundle, inter.key.read_bytes())
    # The threat is real: a leaf of the new CA fails against the old CA.
    chain, _ = issue_leaf(tmp_path / "leaf", bundle, inter.key.read_bytes(), now)
    assert "path length constraint exceeded" in verify(old.pem, chain, tmp_path)

    result = check(node, staged, now)
    assert "path" in checks(result)
    assert not result.accepted(force=True)
    message = " ".join(p.message for p in result.problems)
    assert "'new-root' allows 0 intermediate CA(s) below it" in message
    assert "signs leaves" in message


def test_t7b_pathlen0_intermediate_signing_a_sub_ca(
    node: Layout, tmp_path: Path, now: datetime
) -> None:
    ssl = OpenSSL(tmp_path / "ssl")
    old = old_ca(node)
    inter = ssl.signed("pathlen0-intermediate", old, "ca_pathlen0")
    sub = ssl.signed("sub-ca", inter)
    bundle = sub.pem + inter.pem + old.pem
    staged = stage(tmp_path / "staged", bundle, sub.key.read_bytes())
    chain, _ = issue_leaf(tmp_path / "leaf", bundle, sub.key.read_bytes(), now)
    assert "path length constraint exceeded" in verify(old.pem, chain, tmp_path)

    result = check(node, staged, now)
    assert {"root", "path", "chain"} <= checks(result)
    assert not result.accepted(force=True)


# -- T8: roots -------------------------------------------------------------------------------


def custom_node(layout: Layout, ssl: OpenSSL) -> tuple[Made, Made]:
    """The node's server-ca is a custom CA as upstream's generate-custom script makes it:
    server-ca + intermediate + root, the root key offline. Returns (root, intermediate)."""
    root = ssl.root("custom-root")
    inter = ssl.signed("custom-intermediate", root)
    server = ssl.signed("custom-server-ca", inter)
    layout.ca_cert("server-ca").write_bytes(server.pem + inter.pem + root.pem)
    layout.ca_key("server-ca").write_bytes(server.key.read_bytes())
    return root, inter


def test_t8a_bundle_without_a_root(node: Layout, tmp_path: Path, now: datetime) -> None:
    ssl = OpenSSL(tmp_path / "ssl")
    root, inter = custom_node(node, ssl)
    old_bundle = node.ca_cert("server-ca").read_bytes()
    new = ssl.signed("custom-server-ca-2", inter)
    key = new.key.read_bytes()
    staged = stage(tmp_path / "staged", new.pem + inter.pem, key)
    chain, _ = issue_leaf(tmp_path / "leaf", new.pem + inter.pem, key, now)
    assert ": OK" not in verify(new.pem + inter.pem, chain, tmp_path)  # the threat

    result = check(node, staged, now)
    assert checks(result) == {"root"}
    assert not result.accepted(force=True)
    assert "does not chain to a self-signed root inside this file" in result.problems[0].message

    # The same CA with its root appended is what upstream's script makes: accepted, and a leaf
    # verifies against the new bundle alone and against the old one.
    fixed = new.pem + inter.pem + root.pem
    stage(staged, fixed, key)
    result = check(node, staged, now)
    assert result.problems == ()
    chain, _ = issue_leaf(tmp_path / "leaf2", fixed, key, now)
    assert ": OK" in verify(fixed, chain, tmp_path)
    assert ": OK" in verify(old_bundle, chain, tmp_path)


@pytest.fixture
def good(rotated: tuple[Layout, Path], tmp_path: Path) -> tuple[Layout, Path]:
    """A private copy of a good cross-signed set made by `ca stage-rotation`."""
    shutil.copytree(rotated[1], tmp_path / "staged" / "tls")
    return rotated[0], tmp_path / "staged"


def test_t8b_one_unrelated_root_is_named(
    good: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    layout, staged = good
    stranger = OpenSSL(tmp_path / "ssl").root("stranger-root")
    (staged / CRT).write_bytes((staged / CRT).read_bytes() + stranger.pem)
    result = check(layout, staged, now)
    assert checks(result) == {"unrelated"}
    assert "#5 'stranger-root'" in result.problems[0].message
    assert not result.accepted(force=True)


def test_t8b_bundle_padded_with_1500_roots(
    good: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    layout, staged = good
    # 1,500 distinct roots: made with cryptography, as 1,500 openssl runs would take minutes.
    padding = bundle_pem([build.self_signed_ca(f"pad-{i}", new_ec_key(), now) for i in range(1500)])
    (staged / CRT).write_bytes((staged / CRT).read_bytes() + padding)
    assert (staged / CRT).stat().st_size > 800_000
    result = check(layout, staged, now)
    assert {"bundle-size", "unrelated"} <= checks(result)
    assert "and 1495 more" in " ".join(p.message for p in result.problems)
    assert not result.accepted(force=True)


# -- T9: bytes outside PEM blocks ------------------------------------------------------------

JUNK = {
    "nul": b"\x00",
    "0xff": b"\xff\xfe",
    "text": b"Certificate:\n    Data: see below\n",
}


@pytest.mark.parametrize("rel", [CRT, KEY, "tls/service.key"])
@pytest.mark.parametrize("junk", sorted(JUNK))
@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_t9_bytes_outside_pem_blocks(
    good: tuple[Layout, Path], now: datetime, rel: str, junk: str, where: str
) -> None:
    layout, staged = good
    data = (staged / rel).read_bytes()
    cut = data.index(b"-----END") + data[data.index(b"-----END") :].index(b"\n") + 1
    if where == "before":
        bad, offset = JUNK[junk] + data, 0
    elif where == "between":
        bad, offset = data[:cut] + JUNK[junk] + data[cut:], cut
    else:
        bad, offset = data + JUNK[junk], len(data)
    (staged / rel).write_bytes(bad)
    result = check(layout, staged, now)
    assert checks(result, rel) == {"pem"}, result.problems
    message = next(p.message for p in result.problems if p.file == rel)
    assert f"{staged}/{rel}" in message and f"at byte offset {offset}" in message
    assert not result.accepted(force=True)


def test_t9_bytes_inside_a_pem_block(good: tuple[Layout, Path], now: datetime) -> None:
    layout, staged = good
    data = (staged / CRT).read_bytes()
    at = data.index(b"\n") + 10
    (staged / CRT).write_bytes(data[:at] + b"\x00" + data[at:])
    result = check(layout, staged, now)
    assert checks(result) == {"pem"}
    assert f"a NUL byte inside a PEM block at byte offset {at}" in result.problems[0].message


# -- accepted: upstream-made files -----------------------------------------------------------


def test_upstream_blank_lines_and_crlf_are_fine(
    good: tuple[Layout, Path], tmp_path: Path, now: datetime
) -> None:
    """Upstream's script appends the old service key with `echo` (a blank line when there is
    none), and bundles are `cat`s of files; Windows editors add CR."""
    layout, staged = good
    service = staged / "tls" / "service.key"
    service.write_bytes(service.read_bytes() + b"\n\n")
    bundle = (staged / CRT).read_bytes()
    (staged / CRT).write_bytes(b"\n" + bundle.replace(b"-----\n", b"-----\n\n", 1) + b" \t\n")
    peer = staged / "tls" / "etcd" / "peer-ca.crt"
    peer.write_bytes(peer.read_bytes().replace(b"\n", b"\r\n"))
    result = check(layout, staged, now)
    assert result.problems == (), result.problems
    chain, _ = issue_leaf(tmp_path / "leaf", bundle, (staged / KEY).read_bytes(), now)
    assert ": OK" in verify(bundle, chain, tmp_path)
    assert ": OK" in verify(layout.ca_cert("server-ca").read_bytes(), chain, tmp_path)


# -- stage-rotation after a bad set was taken ------------------------------------------------


def test_stage_rotation_on_a_node_that_took_a_pathlen0_cross_set(
    node: Layout, tmp_path: Path, now: datetime
) -> None:
    """The node runs a T7a set (taken before the fix, root key held): stage-rotation leaves the
    pathlen:0 cross-signed root out and builds a set whose leaves verify."""
    ssl = OpenSSL(tmp_path / "ssl")
    old = old_ca(node)
    root, cross, inter = pathlen0_cross_set(ssl, old)
    node.ca_cert("server-ca").write_bytes(inter.pem + cross.pem + root.pem + old.pem)
    node.ca_key("server-ca").write_bytes(inter.key.read_bytes() + root.key.read_bytes())
    out = tmp_path / "out"
    stage_rotation(node.data_dir, out, now, "pw")
    result = check(node, out, now)
    assert result.problems == (), result.problems
    staged = (out / CRT).read_bytes()
    left_out = load_bundle(cross.pem, cross.crt)[0]
    assert left_out not in load_bundle(staged, "staged")
    chain, _ = issue_leaf(tmp_path / "leaf", staged, (out / KEY).read_bytes(), now)
    assert ": OK" in verify(staged, chain, tmp_path)
    assert ": OK" in verify(root.pem, chain, tmp_path)  # the current root alone


def test_stage_rotation_refuses_clearly_below_a_pathlen0_ca(
    node: Layout, tmp_path: Path, now: datetime
) -> None:
    """The node runs a T7b set (its own CA sits below a pathlen:0 intermediate, root key
    offline): no new CA can be cross-signed; the refusal says why and writes nothing."""
    ssl = OpenSSL(tmp_path / "ssl")
    old = old_ca(node)
    inter = ssl.signed("pathlen0-intermediate", old, "ca_pathlen0")
    sub = ssl.signed("sub-ca", inter)
    node.ca_cert("server-ca").write_bytes(sub.pem + inter.pem + old.pem)
    node.ca_key("server-ca").write_bytes(sub.key.read_bytes())
    out = tmp_path / "out"
    with pytest.raises(PKIError) as caught:
        stage_rotation(node.data_dir, out, now, "pw")
    text = str(caught.value)
    assert "server-ca" in text and "'pathlen0-intermediate' allows 0" in text
    assert not (out / "tls").exists()


# -- certificate check -----------------------------------------------------------------------


def test_check_flags_a_chain_that_no_longer_verifies(
    node: Layout, tmp_path: Path, now: datetime
) -> None:
    """A T7a set on disk (as main took it) and a serving cert of its new CA: `check` says the
    chain is broken and why, and exits non-zero; the same node with a good leaf says OK."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data-dir: {node.data_dir}\n")
    apiserver = node.tls / "serving-kube-apiserver.crt"
    old = old_ca(node)
    good, good_key = issue_leaf(tmp_path / "good", old.pem, old.key.read_bytes(), now)
    shutil.copyfile(good, apiserver)  # leaf + its CA bundle, as RKE2 writes it
    shutil.copyfile(good_key, node.tls / "serving-kube-apiserver.key")
    res = run_cli("-c", cfg, "certificate", "check", "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert {r["Status"] for r in json.loads(res.stdout)["Certificates"]} == {"OK"}

    ssl = OpenSSL(tmp_path / "ssl")
    root, cross, inter = pathlen0_cross_set(ssl, old)
    bundle = inter.pem + cross.pem + root.pem + old.pem
    chain, key = issue_leaf(tmp_path / "leaf", bundle, inter.key.read_bytes(), now)
    assert "path length constraint exceeded" in verify(bundle, chain, tmp_path)  # the judge
    node.ca_cert("server-ca").write_bytes(bundle)
    shutil.copyfile(chain, apiserver)
    shutil.copyfile(key, node.tls / "serving-kube-apiserver.key")
    res = run_cli("-c", cfg, "certificate", "check", "-o", "json")
    assert res.returncode != 0
    rows = json.loads(res.stdout)["Certificates"]
    leaf = next(r for r in rows if r["Filename"] == apiserver.name and r["Index"] == 0)
    assert leaf["Status"] == "CHAIN BROKEN"
    assert "'new-root' allows 0 intermediate CA(s)" in leaf["Chain"]
    table = run_cli("-c", cfg, "certificate", "check", "-o", "table")
    assert "CHAIN BROKEN" in table.stdout and table.returncode != 0
    text = run_cli("-c", cfg, "certificate", "check")
    assert f"CHAIN BROKEN: {apiserver}" in text.stdout and "allows 0" in text.stdout


# -- end to end: `certificate rotate-ca` saves nothing of a hostile set ------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A server rke2certd set up (SQLite datastore) and a good set it staged:
    (config, data dir, staged dir)."""
    root = tmp_path_factory.mktemp("live")
    cfg, data = write_node_config(root, node_name="threats")
    res = run_cli("-c", cfg, "renew")
    assert res.returncode == 0, res.stderr
    res = run_cli("-c", cfg, "ca", "stage-rotation", "--out", root / "good")
    assert res.returncode == 0, res.stderr
    return cfg, data, root / "good"


def _store(data: Path) -> dict[str, bytes]:
    with SQLiteDatastore(data / "server" / "db" / "rke2certd.sqlite") as ds:
        return {kv.key: kv.value for kv in ds.get_prefix("/")}


def _nul_in_bundle(staged: Path, data: Path, work: Path) -> str:
    path = staged / CRT
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    return "a NUL byte at byte offset"


def _padded(staged: Path, data: Path, work: Path) -> str:
    stranger = OpenSSL(work / "ssl").root("stranger-root")
    path = staged / CRT
    path.write_bytes(path.read_bytes() + stranger.pem)
    return "'stranger-root'"


def _pathlen0_cross(staged: Path, data: Path, work: Path) -> str:
    layout = Layout(data)
    old = Made(layout.ca_cert("server-ca"), layout.ca_key("server-ca"))
    root, cross, inter = pathlen0_cross_set(OpenSSL(work / "ssl"), old)
    stage(staged, inter.pem + cross.pem + root.pem + old.pem, inter.key.read_bytes())
    return "allows 0 intermediate CA(s)"


@pytest.mark.parametrize("make", [_nul_in_bundle, _padded, _pathlen0_cross])
def test_rotate_ca_cli_saves_nothing_of_a_hostile_set(
    live: tuple[Path, Path, Path], tmp_path: Path, make: Callable[[Path, Path, Path], str]
) -> None:
    cfg, data, good = live
    staged = tmp_path / "staged"
    shutil.copytree(good, staged)
    expected = make(staged, data, tmp_path)
    before = _store(data)
    for force in ((), ("--force",)):
        res = run_cli("-c", cfg, "certificate", "rotate-ca", "--path", staged, *force)
        assert res.returncode != 0, res.stdout
        assert expected in res.stderr and "nothing changed" in res.stderr, res.stderr
    assert _store(data) == before
    # Control: the set as staged is accepted.
    res = run_cli("-c", cfg, "certificate", "rotate-ca", "--path", good, "--dry-run")
    assert res.returncode == 0, res.stderr


def test_force_still_rotates_away_from_an_expired_ca(node: Layout, tmp_path: Path) -> None:
    """The rules do not trap a cluster whose CA expired: a cross-signed set made then fails the
    chain check (forceable) only; the cross-signed root is still related to the current CA."""
    later = datetime.now(UTC) + timedelta(days=4000)  # the upstream-like CA lasts 3650 days
    old_cert = load_bundle(node.ca_cert("server-ca").read_bytes(), "old")[0]
    old_key = load_keys(node.ca_key("server-ca").read_bytes(), "old key")[0]
    root_key, inter_key = new_ec_key(), new_ec_key()
    root = build.self_signed_ca("after-expiry-root", root_key, later)
    cross = build.signed_ca(root.subject, root_key.public_key(), old_cert, old_key, later, 3650)
    inter = build.signed_ca(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "after-expiry-ca")]),
        inter_key.public_key(), root, root_key, later, 3650,
    )  # fmt: skip
    staged = stage(tmp_path / "staged", bundle_pem([inter, cross, root, old_cert]),
                   key_to_pem(inter_key))  # fmt: skip
    result = check(node, staged, later)
    assert checks(result) == {"chain"}, result.problems
    assert result.accepted(force=True) and not result.accepted(force=False)


def test_stage_rotation_stays_within_the_bundle_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the limit at 10, the fourth rotation would hold 13 certificates: stage-rotation
    leaves out older generations, and the set passes and verifies against the current CA."""
    monkeypatch.setattr("rke2certd.plan.staged_ca.MAX_BUNDLE_CERTS", 10)
    monkeypatch.setattr("rke2certd.ops.generate.MAX_BUNDLE_CERTS", 10)
    layout = make_upstream_node(tmp_path / "data")
    start = datetime.now(UTC) + timedelta(minutes=1)
    for i in range(4):
        at = start + timedelta(seconds=i)
        current = layout.ca_cert("server-ca").read_bytes()
        result = stage_rotation(layout.data_dir, tmp_path / f"r{i}", at, "pw")
        staged = tmp_path / f"r{i}"
        checked = check(layout, staged, at)
        assert checked.problems == (), checked.problems
        bundle = (staged / CRT).read_bytes()
        assert len(load_bundle(bundle, "staged")) <= 10
        chain, _ = issue_leaf(tmp_path / f"leaf{i}", bundle, (staged / KEY).read_bytes(), at)
        assert ": OK" in verify(bundle, chain, tmp_path)
        assert ": OK" in verify(current, chain, tmp_path)
        install(staged / "tls", layout)
    assert any("left out" in m and "older CA generations" in m for m in result.messages)
