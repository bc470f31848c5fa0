"""Rewriting the CA hash of join tokens in config and token files (rke2certd.ops.token_config).

Real files in tmp dirs, real writes through store.atomic, the real log pipeline (JSON on stderr).
The invariant checked everywhere: a changed file equals the old bytes with only the 64 hash
characters replaced; a refused run changes no byte and no mtime of any file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from rke2certd.errors import ConfigError, TokenError
from rke2certd.log import output
from rke2certd.ops.token_config import (
    journal_root,
    rewrite_token_file_text,
    rewrite_token_hashes,
    rewrite_yaml_text,
)
from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem
from rke2certd.pki.keys import new_ec_key
from rke2certd.pki.token import ca_hash, parse_token
from rke2certd.store.atomic import JOURNAL_NAME, TEMP_MARK
from tests.test_no_secrets_in_logs import leaks

OLD = "ab" * 32
NEW = "cd" * 32
PW = "Sup3r-s3cret-pw-0123456789abcdef"
AGENT_PW = "Ag3nt-s3cret-pw-fedcba9876543210"
TOKEN = f"K10{OLD}::server:{PW}"
AGENT_TOKEN = f"K10{OLD}::node:{AGENT_PW}"


def swapped(data: bytes) -> bytes:
    """`data` with every old hash replaced: what a correct rewrite produces, byte for byte."""
    return data.replace(f"K10{OLD}".encode(), f"K10{NEW}".encode())


def snapshot(*paths: Path) -> dict[Path, tuple[bytes, int, int]]:
    """Bytes, mtime (ns) and mode of each file: equal snapshots mean nothing was touched."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths}


def put(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    # An old mtime, so that a rewrite shows even on a coarse-grained file system clock.
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return path


# --- accepted shapes -----------------------------------------------------------------------------

ACCEPTED = {
    "plain": f"server: https://10.0.0.1:9345\ntoken: {TOKEN}\nnode-ip: 10.0.0.2\n",
    "single-quoted": f"token: '{TOKEN}'\n",
    "single-quoted-escaped-quote": f"token: 'K10{OLD}::server:it''s-{PW}'\n",
    "double-quoted": f'token: "{TOKEN}"\n',
    "trailing-comment": f"# RKE2 config\ntoken: {TOKEN}   # from server/token\n# end\n",
    "quoted-and-comment": f'token: "{TOKEN}" # pinned\n',
    "crlf": f"server: https://10.0.0.1:9345\r\ntoken: {TOKEN}\r\nagent-token: '{AGENT_TOKEN}'\r\n",
    "no-final-newline": f"tls-san: [a, b]\ntoken: {TOKEN}",
    "agent-token-only": f"agent-token: {AGENT_TOKEN}\n",
    "both-keys-and-nesting": (
        f"token: {TOKEN}\nnode-label:\n  - a=b\nkubelet-arg: {{max-pods: 50}}\n"
        f'agent-token: "{AGENT_TOKEN}"\nnested:\n  token: {TOKEN}\n'
    ),
    "explicit-str-tag": f"token: !!str {TOKEN}\n",
    "uppercase-old-hash": f"token: K10{OLD.upper()}::server:{PW}\n",
    "uppercase-new-hash": f"token: K10{NEW.upper()}::server:{PW}\n",
    "bootstrap-token-credentials": f"token: K10{OLD}::abcdef.0123456789abcdef\n",
    "utf8-bom-and-unicode-comment": f"\ufeff# nœud\ntoken: {TOKEN}\n",
    "indented-document-start": f"---\ntoken: {TOKEN}\n...\n",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_shape_changes_only_the_hash(name: str, tmp_path: Path) -> None:
    text = ACCEPTED[name]
    cfg = put(tmp_path / "config.yaml", text)
    assert rewrite_token_hashes([cfg], [], NEW) == [cfg]
    data = cfg.read_bytes()
    nested = f"nested:\n  token: {TOKEN}\n"  # not RKE2's key: left alone
    if "uppercase" in name:  # RKE2 compares the hash to lowercase hex: any other case fails
        assert data == text.replace(text[10:74], NEW).encode()
    elif text.endswith(nested):
        assert data == swapped(text.removesuffix(nested).encode()) + nested.encode()
    else:
        assert data == swapped(text.encode())
    assert f"K10{NEW}".encode() in data


def test_the_rewritten_token_carries_the_hash_of_a_real_ca(tmp_path: Path) -> None:
    """End to end with a real CA: the token now pins the new CA, with the same credentials."""
    now = datetime.now(UTC)
    new_ca = bundle_pem([build.self_signed_ca("rke2-server-ca@2", new_ec_key(), now)])
    digest = ca_hash(new_ca, now)
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n")
    rewrite_token_hashes([cfg], [], digest.upper())  # the hash is normalised to lowercase
    token = parse_token(yaml.safe_load(cfg.read_text())["token"])
    assert (token.ca_hash, token.username, token.password) == (digest, "server", PW)


def test_drop_in_with_the_token(tmp_path: Path) -> None:
    main = put(tmp_path / "config.yaml", "server: https://10.0.0.1:9345\nnode-name: a\n", 0o644)
    other = put(tmp_path / "config.yaml.d/10-labels.yaml", "node-label: [x=y]\n", 0o644)
    drop = put(tmp_path / "config.yaml.d/50-token.yaml", f"token: {TOKEN}\n")
    before = snapshot(main, other)
    assert rewrite_token_hashes([main, other, drop], [], NEW) == [drop]
    assert drop.read_bytes() == swapped(f"token: {TOKEN}\n".encode())
    assert snapshot(main, other) == before


def test_token_in_both_files_changes_both_as_one_write(tmp_path: Path) -> None:
    ours = put(tmp_path / "etc/rke2certd/config.yaml", f"data-dir: /x\ntoken: '{TOKEN}'\n")
    rke2 = put(
        tmp_path / "etc/rancher/rke2/config.yaml", f"token: {TOKEN}\nagent-token: {AGENT_TOKEN}\n"
    )
    old = {p: p.read_bytes() for p in (ours, rke2)}
    assert rewrite_token_hashes([ours, rke2], [], NEW) == [ours, rke2]
    assert {p: p.read_bytes() for p in (ours, rke2)} == {p: swapped(d) for p, d in old.items()}
    # the journal of the two-file write is gone, as are its temps
    root = journal_root([ours, rke2], [])
    assert root == tmp_path / "etc"
    assert not (root / JOURNAL_NAME).exists()
    assert not [p for p in tmp_path.rglob(f"{TEMP_MARK}*")]


@pytest.mark.parametrize(
    "content", [f"{TOKEN}\n", TOKEN, f"{TOKEN}\r\n", f"K10{OLD}::node:{AGENT_PW}\n"]
)
def test_token_file(content: str, tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", "token-file: /x/token\n")
    tok = put(tmp_path / "token", content)
    assert rewrite_token_hashes([cfg], [tok], NEW) == [tok]
    assert tok.read_bytes() == swapped(content.encode())


def test_config_and_token_file_together(tmp_path: Path) -> None:
    cfg = put(tmp_path / "rke2/config.yaml", f"agent-token: {AGENT_TOKEN}\ntoken-file: /t\n")
    tok = put(tmp_path / "secrets/token", f"{TOKEN}\n")
    assert rewrite_token_hashes([cfg], [tok], NEW) == [cfg, tok]
    assert tok.read_text() == f"K10{NEW}::server:{PW}\n"
    assert cfg.read_text() == f"agent-token: K10{NEW}::node:{AGENT_PW}\ntoken-file: /t\n"


SHORT = {
    "bare-password": f"token: {PW}\n",
    "user-password": f"token: server:{PW}\nagent-token: 'node:{AGENT_PW}'\n",
    "k10-without-hash": f"token: K10::server:{PW}\n",
    "number": "token: 123456\n",
    "null": "token:\nagent-token: ~\n",
    "block-scalar-short-token": f"token: |\n  {PW}\n",  # no hash, so no edit: not refused
    "new-hash-already": f"token: K10{NEW}::server:{PW}\n",
    "no-token-at-all": "node-name: a\n",
    "empty-file": "",
    "comments-only": "# nothing here\n",
    "top-level-list": "- token\n",
    "flow-mapping-no-token": "{node-name: a, tls-san: [x]}\n",
    "flow-mapping-new-hash": f"{{token: 'K10{NEW}::server:{PW}'}}\n",
}


@pytest.mark.parametrize("name", sorted(SHORT))
def test_nothing_to_rewrite_leaves_the_file_alone(name: str, tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", SHORT[name])
    tok = put(tmp_path / "token", f"{PW}\n")
    before = snapshot(cfg, tok)
    assert rewrite_token_hashes([cfg], [tok], NEW) == []
    assert snapshot(cfg, tok) == before


def test_missing_files_are_skipped(tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n")
    gone = tmp_path / "config.yaml.d/50-x.yaml"
    assert rewrite_token_hashes([gone, cfg], [tmp_path / "no-token"], NEW) == [cfg]
    assert not gone.exists() and not (tmp_path / "no-token").exists()


def test_symlinked_config_keeps_the_link(tmp_path: Path) -> None:
    real = put(tmp_path / "managed/config.yaml", f"token: {TOKEN}\n")
    link = tmp_path / "config.yaml"
    link.symlink_to(real)
    assert rewrite_token_hashes([link], [], NEW) == [link]
    assert link.is_symlink() and link.resolve() == real
    assert real.read_bytes() == swapped(f"token: {TOKEN}\n".encode())


# --- second run, dry run, modes, owner -----------------------------------------------------------


def test_second_run_changes_no_byte_and_no_mtime(tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", ACCEPTED["crlf"])
    drop = put(tmp_path / "config.yaml.d/t.yaml", ACCEPTED["trailing-comment"])
    tok = put(tmp_path / "token", f"{TOKEN}\n")
    assert rewrite_token_hashes([cfg, drop], [tok], NEW) == [cfg, drop, tok]
    after_first = snapshot(cfg, drop, tok)
    assert rewrite_token_hashes([cfg, drop], [tok], NEW) == []
    assert snapshot(cfg, drop, tok) == after_first


def test_dry_run_reports_and_changes_nothing(tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n")
    other = put(tmp_path / "other.yaml", f"token: K10{NEW}::server:{PW}\n")
    tok = put(tmp_path / "token", TOKEN)
    before = snapshot(cfg, other, tok)
    assert rewrite_token_hashes([cfg, other], [tok], NEW, dry_run=True) == [cfg, tok]
    assert snapshot(cfg, other, tok) == before
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "other.yaml", "token"]


def test_dry_run_still_refuses_bad_shapes(tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: &t {TOKEN}\n")
    with pytest.raises(ConfigError, match="anchor"):
        rewrite_token_hashes([cfg], [], NEW, dry_run=True)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640, 0o400])
def test_mode_is_kept(mode: int, tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n", mode)
    tok = put(tmp_path / "token", TOKEN, mode)
    rewrite_token_hashes([cfg], [tok], NEW)
    assert (cfg.stat().st_mode & 0o7777, tok.stat().st_mode & 0o7777) == (mode, mode)
    assert f"K10{NEW}" in cfg.read_text() and f"K10{NEW}" in tok.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
def test_owner_is_kept_as_root(tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n", 0o640)
    os.chown(cfg, 4321, 4322)
    tok = put(tmp_path / "token", TOKEN, 0o600)  # root-owned: stays root's
    rewrite_token_hashes([cfg], [tok], NEW)
    st, st_tok = cfg.stat(), tok.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 4322, 0o640)
    assert (st_tok.st_uid, st_tok.st_gid) == (0, 0)
    assert f"K10{NEW}" in cfg.read_text()


# --- refused shapes: error names file and line, and nothing changes -------------------------------

REFUSED = {
    "flow-mapping": (f"{{token: {TOKEN}, node-name: a}}\n", 1, "flow mapping"),
    "flow-mapping-multiline": (f"{{\n  node-name: a,\n  token: '{TOKEN}'\n}}\n", 3, "flow"),
    "block-literal": (f"node-name: a\ntoken: |\n  {TOKEN}\n", 2, "block scalar (`|`)"),
    "block-folded": (f"token: >-\n  {TOKEN}\n", 1, "block scalar (`>`)"),
    "multi-line-plain": (f"token: K10{OLD}::server:{PW}\n  more\n", 1, "spans several lines"),
    "multi-line-quoted": (f'token: "K10{OLD}::server:\n  {PW}"\n', 1, "spans several lines"),
    "anchor": (f"token: &tok {TOKEN}\nagent-token: *tok\n", 1, "anchor (`&tok`)"),
    "alias": (f"shared: &tok {TOKEN}\ntoken: *tok\n", 2, "alias (`*tok`)"),
    "merge-key": (f"base: &b {{token: {TOKEN}}}\n<<: *b\n", 2, "merge key"),
    "duplicate-key": (f"token: {TOKEN}\nnode-name: a\ntoken: {TOKEN}\n", 1, "lines 1, 3"),
    "duplicate-key-old-first": (
        f"token: {TOKEN}\ntoken: K10{NEW}::server:{PW}\n",
        1,
        "set 2 times",
    ),
    "escaped-double-quoted": (f'token: "\\x4b10{OLD}::server:{PW}"\n', 1, "escape sequences"),
    "invalid-yaml": (f"token: {TOKEN}\nnode-ip: [10.0.0.1\n", 3, "not valid YAML"),
    "two-documents": (f"token: {TOKEN}\n---\ntoken: {TOKEN}\n", 2, "not valid YAML"),
    "malformed-hash": (f"token: K10{OLD[:-2]}::server:{PW}\n", 1, "62 characters"),
    "tab-indent": (f"token: {TOKEN}\nnode-label:\n\t- a\n", 3, "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_shape_changes_no_file(name: str, tmp_path: Path) -> None:
    text, line, what = REFUSED[name]
    good = put(tmp_path / "config.yaml", f"token: {TOKEN}\n")  # would be rewritten on its own
    bad = put(tmp_path / "config.yaml.d/90-bad.yaml", text)
    tok = put(tmp_path / "token", TOKEN)
    before = snapshot(good, bad, tok)
    with pytest.raises(ConfigError) as err:
        rewrite_token_hashes([good, bad], [tok], NEW)
    message = str(err.value)
    where = f"{bad}:{line}:"
    assert err.value.problems and err.value.problems[0].startswith(where), message
    assert what in message
    assert "no file was changed" in message
    assert err.value.problems[0].endswith("run again")  # says what to do
    assert PW not in message and OLD not in message
    assert snapshot(good, bad, tok) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["config.yaml", "config.yaml.d", "90-bad.yaml", "token"]
    )


def test_every_problem_is_listed(tmp_path: Path) -> None:
    a = put(tmp_path / "a.yaml", f"token: |\n  {TOKEN}\nagent-token: &x {AGENT_TOKEN}\n")
    b = put(tmp_path / "b.yaml", f"{{token: {TOKEN}}}\n")
    tok = put(tmp_path / "token", f"  {TOKEN}\n\n")
    before = snapshot(a, b, tok)
    with pytest.raises(ConfigError) as err:
        rewrite_token_hashes([a, b], [tok], NEW)
    problems = err.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{a}:1", f"{a}:3", f"{b}:1", f"{tok}"]
    assert "block scalar" in problems[0] and "anchor" in problems[1]
    assert "flow mapping" in problems[2] and "alone on one line" in problems[3]
    assert PW not in str(err.value) and AGENT_PW not in str(err.value)
    assert snapshot(a, b, tok) == before


@pytest.mark.parametrize(
    "content",
    [f"{TOKEN}\n{TOKEN}\n", f" {TOKEN}", f"{TOKEN} \n", f"{TOKEN}\n\n", f"K10{OLD[:-1]}::s:p"],
)
def test_refused_token_file(content: str, tmp_path: Path) -> None:
    tok = put(tmp_path / "token", content)
    before = snapshot(tok)
    with pytest.raises(ConfigError) as err:
        rewrite_token_hashes([], [tok], NEW)
    assert err.value.problems[0].startswith(f"{tok}: ")
    assert PW not in str(err.value)
    assert snapshot(tok) == before


def test_not_utf8_and_named_twice_are_refused(tmp_path: Path) -> None:
    latin = put(tmp_path / "latin.yaml", f"# n\xe9ud\ntoken: {TOKEN}\n".encode("latin-1"))
    both = put(tmp_path / "both", f"token: {TOKEN}\n")
    before = snapshot(latin, both)
    with pytest.raises(ConfigError) as err:
        rewrite_token_hashes([latin, both], [both], NEW)
    assert err.value.problems == [
        f"{latin}: not UTF-8 text (byte 3); save it as UTF-8",
        f"{both}: named both as a config file and as a token file",
    ]
    assert snapshot(latin, both) == before


@pytest.mark.parametrize("bad", ["", "abc", "zz" * 32, OLD + "00"])
def test_bad_new_hash_is_refused(bad: str, tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n")
    before = snapshot(cfg)
    with pytest.raises(TokenError, match="64 hex characters"):
        rewrite_token_hashes([cfg], [], bad)
    assert snapshot(cfg) == before


# --- crash recovery ------------------------------------------------------------------------------


def test_a_crashed_two_file_write_is_finished_first(tmp_path: Path) -> None:
    """The state a crash leaves after the journal was written but before the renames: the next
    run completes it (new set wins) and then finds nothing left to do."""
    a = put(tmp_path / "etc/a/config.yaml", f"token: {TOKEN}\n", 0o644)
    b = put(tmp_path / "etc/b/config.yaml", f"agent-token: {AGENT_TOKEN}\n")
    entries = []
    for path in (a, b):
        tmp = path.parent / f"{TEMP_MARK}{path.name}.0000"
        tmp.write_bytes(swapped(path.read_bytes()))
        tmp.chmod(path.stat().st_mode & 0o777)
        entries.append({"temp": str(tmp), "target": str(path)})
    root = journal_root([a, b], [])
    assert root == tmp_path / "etc"
    (root / JOURNAL_NAME).write_text(json.dumps(entries))
    assert rewrite_token_hashes([a, b], [], NEW) == []
    assert a.read_text() == f"token: K10{NEW}::server:{PW}\n"
    assert b.read_text() == f"agent-token: K10{NEW}::node:{AGENT_PW}\n"
    assert not (root / JOURNAL_NAME).exists()
    assert not list(tmp_path.rglob(f"{TEMP_MARK}*"))


def test_stray_temps_of_an_uncommitted_write_are_removed(tmp_path: Path) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n")
    stray = put(tmp_path / f"{TEMP_MARK}config.yaml.beef", "half")
    assert rewrite_token_hashes([cfg], [], NEW) == [cfg]
    assert not stray.exists()
    assert f"K10{NEW}" in cfg.read_text()


# --- logs ----------------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[None]:
    output.configure("json", "debug")
    yield
    output.reset()
    logging.getLogger().setLevel(logging.WARNING)


@pytest.mark.usefixtures("json_logs")
def test_one_event_per_changed_file_and_no_secret(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\nagent-token: '{AGENT_TOKEN}'\n")
    same = put(tmp_path / "same.yaml", f"token: K10{NEW}::server:{PW}\n")
    tok = put(tmp_path / "token", f"{TOKEN}\n")
    rewrite_token_hashes([cfg, same], [tok], NEW)
    rewrite_token_hashes([cfg, same], [tok], NEW)  # nothing to do: nothing logged
    with pytest.raises(ConfigError):  # a refusal is raised, not logged here
        rewrite_token_hashes([put(tmp_path / "bad.yaml", f"x: &x {TOKEN}\ntoken: *x\n")], [], NEW)
    out, err = capfd.readouterr()
    assert out == ""
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in events] == ["token_rewritten", "token_rewritten"]
    assert [e["cert_path"] for e in events] == [str(cfg), str(tok)]
    assert all(e["ca_hash"] == NEW and e["level"] == "info" for e in events)
    assert "token, agent-token" in events[0]["reason"] and "token-file" in events[1]["reason"]
    assert leaks(err.encode(), [PW, AGENT_PW]) == []
    assert OLD not in err


def test_dry_run_logs_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    output.configure("json", "debug")
    try:
        cfg = put(tmp_path / "config.yaml", f"token: {TOKEN}\n")
        assert rewrite_token_hashes([cfg], [], NEW, dry_run=True) == [cfg]
    finally:
        output.reset()
        logging.getLogger().setLevel(logging.WARNING)
    assert capfd.readouterr().err == ""


# --- the pure part on its own --------------------------------------------------------------------


def test_pure_functions_return_text_or_problems() -> None:
    ok = rewrite_yaml_text(f"token: {TOKEN}  # c\n", NEW, "cfg.yaml")
    assert ok.text == f"token: K10{NEW}::server:{PW}  # c\n" and ok.keys == ("token",)
    assert ok.problems == ()
    bad = rewrite_yaml_text(f"token: >\n  {TOKEN}\n", NEW, "cfg.yaml")
    assert bad.text is None and bad.problems[0].startswith("cfg.yaml:1: `token` is a block")
    assert rewrite_yaml_text(f"token: K10{NEW}::server:{PW}\n", NEW, "x").text is None
    assert rewrite_token_file_text(f"{TOKEN}\n", NEW, "t").text == f"K10{NEW}::server:{PW}\n"
    assert rewrite_token_file_text(f"{PW}\n", NEW, "t").text is None
