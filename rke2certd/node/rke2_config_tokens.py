"""Rewrite the CA hash of the join tokens in the node's config files after a CA rotation.

A full token (`K10<ca-hash>::<user>:<password>`, docs/RKE2-COMPATIBILITY.md §7) pins the cluster
CA; once the CA has rotated, RKE2 refuses to start with "token CA hash does not match" until the
token in its config carries the new hash. This module edits that hash in place and nothing else:

- YAML files (ours, RKE2's config.yaml, its config.yaml.d drop-ins): the top-level `token` and
  `agent-token` keys. Only the 64 hash characters inside the scalar are replaced, so comments,
  order, quoting, a trailing comment and line endings stay byte for byte. The result is parsed
  again and must equal the old document with only those values changed.
- token files (`token-file`): one token, optionally followed by a newline.

A short token (a bare password, `user:password`, or `K10::user:password`) pins no CA and is left
alone, as is a token already carrying the new hash, so a second run changes nothing. Shapes that
cannot be edited safely (a flow mapping, a block or multi-line scalar, an anchor or alias, a
duplicate key, invalid YAML) are refused with file and line, before any file is written.

The pure part (`rewrite_yaml_text`, `rewrite_token_file_text`) takes text and returns the new
text or the problems; `rewrite_token_hashes` reads, writes through `files.atomic` and logs.
Tokens never reach a log or an error message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rke2certd.errors import ConfigError, StorageError, TokenError
from rke2certd.files.atomic import FileWrite, recover, write_files
from rke2certd.log import log
from rke2certd.pki.join_token import HASH_HEX_LEN, PREFIX, parse_token

TOKEN_KEYS = ("token", "agent-token")
# What `Rewrite.keys` names a token file's only token by.
TOKEN_FILE = "token-file"  # noqa: S105 - a key name, not a secret
_HEX = frozenset("0123456789abcdef")
_INDIRECT = "<<"


@dataclass(frozen=True)
class Rewrite:
    """What one file needs: its new text (None: leave it as it is) or why it cannot be edited."""

    text: str | None = None
    keys: tuple[str, ...] = ()  # what was rewritten: YAML keys, or TOKEN_FILE
    problems: tuple[str, ...] = ()


# --- pure: text in, new text or problems out ------------------------------------------------


def _stale_hash(value: object, new_hash: str) -> tuple[str | None, str | None]:
    """(the hash as written, when `value` is a full token pinned to another CA; a problem).

    The hash is compared as written: RKE2 compares it to its lowercase hex digest, so an
    uppercase copy of the right hash still fails and is rewritten.
    """
    if not isinstance(value, str):
        return None, None
    text = value.strip()
    if not text.startswith(PREFIX):
        return None, None
    try:
        token = parse_token(text)
    except TokenError as exc:  # its message never quotes the token
        return None, f"{exc} (RKE2 cannot use it either); fix it and run again"
    if token.ca_hash is None:
        return None, None
    written = text[len(PREFIX) : len(PREFIX) + HASH_HEX_LEN]
    return (None if written == new_hash else written), None


def _line(event: yaml.Event, end: bool = False) -> int:
    """1-based line of an event's start (or end); the parser always sets both marks."""
    mark = event.end_mark if end else event.start_mark
    return mark.line + 1 if mark is not None else 0


def _skip(events: list[yaml.Event], i: int) -> int:
    """Index of the event after the node starting at `i`."""
    if not isinstance(events[i], yaml.CollectionStartEvent):
        return i + 1
    depth = 0
    while True:
        ev = events[i]
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1
        i += 1
        if depth == 0:
            return i


def _top_level(events: list[yaml.Event]) -> tuple[bool, dict[str, list[tuple[Any, Any]]]]:
    """(is the top-level mapping a flow mapping, token key -> every (key, value) event pair).

    Keys that can bring a token in indirectly (a merge key `<<`, an alias as key) are listed
    under `_INDIRECT`, for the line of the problem.
    """
    i = next(n for n, ev in enumerate(events) if isinstance(ev, yaml.NodeEvent))
    start = events[i]
    found: dict[str, list[tuple[Any, Any]]] = {}
    if not isinstance(start, yaml.MappingStartEvent):
        return False, found
    i += 1
    while not isinstance(events[i], yaml.MappingEndEvent):
        key = events[i]
        j = _skip(events, i)
        if isinstance(key, yaml.ScalarEvent) and key.value in TOKEN_KEYS:
            found.setdefault(key.value, []).append((key, events[j]))
        elif isinstance(key, yaml.AliasEvent) or getattr(key, "value", None) == "<<":
            found.setdefault(_INDIRECT, []).append((key, events[j]))
        i = _skip(events, j)
    return bool(start.flow_style), found


def _invalid_yaml(source: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    what = " ".join(p for p in parts if p) or "cannot be parsed"
    return (
        f"{where}: not valid YAML ({what}); fix the file (RKE2 cannot read it either) and run again"
    )


def rewrite_yaml_text(text: str, new_hash: str, source: str) -> Rewrite:
    """Put `new_hash` into the full tokens of the top-level `token`/`agent-token` keys.

    `new_hash` is 64 lowercase hex characters; `source` names the file in problems.
    """
    try:
        doc = yaml.safe_load(text)
        events = list(yaml.parse(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        return Rewrite(problems=(_invalid_yaml(source, exc),))
    if not isinstance(doc, dict):
        return Rewrite()  # no top-level keys, so no token to rewrite
    flow, found = _top_level(events)
    problems: list[str] = []
    edits: list[tuple[int, int, str]] = []
    expected = dict(doc)
    keys: list[str] = []
    for key in TOKEN_KEYS:
        pairs = found.get(key, [])
        stale, bad = _stale_hash(doc.get(key), new_hash)
        indirect = found.get(_INDIRECT, [])
        where = pairs[-1][1] if pairs else (indirect[0][0] if indirect else None)
        at = f"{source}:{_line(where)}" if where is not None else source
        if bad:
            problems.append(f"{at}: `{key}`: {bad}")
            continue
        # A duplicate is refused when any copy would need the new hash: which one RKE2 reads
        # is not ours to guess.
        scalar_values = [v.value for _, v in pairs if isinstance(v, yaml.ScalarEvent)]
        if len(pairs) > 1 and (stale or any(_stale_hash(v, new_hash)[0] for v in scalar_values)):
            lines = ", ".join(str(_line(k)) for k, _ in pairs)
            problems.append(
                f"{source}:{_line(pairs[0][0])}: `{key}` is set {len(pairs)} times at the top "
                f"level (lines {lines}); keep one and run again"
            )
            continue
        if stale is None:
            continue
        problem = _unsafe_shape(key, pairs, flow, doc[key])
        if problem:
            problems.append(f"{at}: {problem}")
            continue
        value = pairs[0][1]
        start, end = value.start_mark.index, value.end_mark.index
        old, new = PREFIX + stale, PREFIX + new_hash
        written = text[start:end]
        if written.count(old) != 1:
            problems.append(
                f"{at}: `{key}` is written with escape sequences; write the token as plain "
                "text on one line and run again"
            )
            continue
        edits.append((start, end, written.replace(old, new)))
        expected[key] = doc[key].replace(old, new, 1)
        keys.append(key)
    if problems:
        return Rewrite(problems=tuple(problems))
    if not edits:
        return Rewrite()
    out = text
    for start, end, replacement in sorted(edits, reverse=True):
        out = out[:start] + replacement + out[end:]
    try:
        again = yaml.safe_load(out)
    except yaml.YAMLError:
        again = None
    if again != expected:
        # Should not happen: the edit only swaps hex digits inside one scalar.
        return Rewrite(
            problems=(
                f"{source}: internal check failed: the rewritten file would not read back as "
                "the same settings with only the token's CA hash changed; nothing was changed "
                "(please report this)",
            )
        )
    return Rewrite(text=out, keys=tuple(keys))


def _unsafe_shape(key: str, pairs: list[tuple[Any, Any]], flow: bool, value: str) -> str | None:
    """Why the token under `key` cannot be edited in place (None: it can)."""
    how = f"write it as one plain line (`{key}: K10...`) and run again"
    if not pairs:
        return f"`{key}` comes from a merge key (`<<`) or an alias key; {how}"
    event = pairs[0][1]
    if flow:
        return (
            f"`{key}` is in a top-level flow mapping (`{{...}}`); rewrite the file as block "
            "YAML (one `key: value` per line) and run again"
        )
    if isinstance(event, yaml.AliasEvent):
        return f"`{key}` is an alias (`*{event.anchor}`); {how}"
    if not isinstance(event, yaml.ScalarEvent) or event.value != value:
        return f"`{key}` is not a plain string; {how}"
    if event.anchor is not None:
        return f"`{key}` carries an anchor (`&{event.anchor}`) that other keys may reuse; {how}"
    if event.style in ("|", ">"):
        return f"`{key}` is a block scalar (`{event.style}`); {how}"
    if _line(event) != _line(event, end=True):
        return f"`{key}` spans several lines; {how}"
    return None


def rewrite_token_file_text(text: str, new_hash: str, source: str) -> Rewrite:
    """Put `new_hash` into a token file's full token: one token, an optional newline after it."""
    body = text[:-1] if text.endswith("\n") else text
    body = body[:-1] if body.endswith("\r") else body
    stale, bad = _stale_hash(text, new_hash)
    if bad:
        return Rewrite(problems=(f"{source}: {bad}",))
    if stale is None:
        return Rewrite()
    if any(c.isspace() for c in body):
        return Rewrite(
            problems=(
                f"{source}: the token file must hold the token alone on one line (optionally "
                "followed by a newline); fix the file and run again",
            )
        )
    start = len(PREFIX)
    return Rewrite(text=text[:start] + new_hash + text[start + HASH_HEX_LEN :], keys=(TOKEN_FILE,))


def check_ca_hash(ca_hash: str) -> str:
    """The CA hash as tokens carry it: 64 lowercase hex characters."""
    digest = ca_hash.strip().lower()
    if len(digest) != HASH_HEX_LEN or not set(digest) <= _HEX:
        raise TokenError(
            f"the new CA hash must be {HASH_HEX_LEN} hex characters (a SHA-256), "
            f"got {len(digest)} characters"
        )
    return digest


# --- shell: read, check everything, write, log ----------------------------------------------


@dataclass(frozen=True)
class _Change:
    given: Path  # as the caller named it (reported and logged)
    real: Path  # symlinks resolved: the file itself is replaced, the link kept
    old: bytes
    new: bytes
    mode: int
    uid: int
    gid: int
    keys: tuple[str, ...]


def journal_root(files: Sequence[Path], token_files: Sequence[Path]) -> Path | None:
    """The directory holding the write journal of `rewrite_token_hashes` for these files:
    the deepest one above them all. Pass it to `files.atomic.recover` to finish a crashed run."""
    dirs = {str(p.resolve().parent) for p in [*files, *token_files]}
    return Path(os.path.commonpath(sorted(dirs))) if dirs else None


def rewrite_token_hashes(
    files: Sequence[Path],
    token_files: Sequence[Path],
    ca_hash: str,
    *,
    dry_run: bool = False,
    journal_dir: Path | None = None,
) -> list[Path]:
    """Give every full join token in `files` (YAML) and `token_files` the CA hash `ca_hash`.

    `journal_dir`: where the crash journal of a multi-file change goes (the node's data dir,
    whose start-up recovery finishes it); default the deepest directory above all the files,
    which may not be writable (/etc under the unit's ProtectSystem=strict).

    Missing files are skipped. Every file is read and checked before any is written; a problem
    in any of them raises ConfigError listing them all, and nothing changes. The changed files
    are written as one change (`files.atomic.write_files`, crash-safe), each keeping its mode
    and, as root, its owner. Returns the files changed (with `dry_run`, that would change).
    Call it under the node lock: it first finishes a crashed earlier run (`recover`).
    """
    new_hash = check_ca_hash(ca_hash)
    root = journal_dir or journal_root(files, token_files)
    if root is None or not [*files, *token_files]:
        return []
    inputs = [(p, False) for p in files] + [(p, True) for p in token_files]
    if not dry_run:
        recover(root, {p.resolve().parent for p, _ in inputs})

    changes: list[_Change] = []
    problems: list[str] = []
    seen: dict[Path, bool] = {}
    for given, is_token_file in inputs:
        real = given.resolve()
        if real in seen:
            if seen[real] != is_token_file:
                problems.append(f"{given}: named both as a config file and as a token file")
            continue
        seen[real] = is_token_file
        try:
            st = real.stat()
            old = real.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{given}: cannot read it: {exc.strerror or exc}")
            continue
        try:
            text = old.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{given}: not UTF-8 text (byte {exc.start}); save it as UTF-8")
            continue
        plan = (rewrite_token_file_text if is_token_file else rewrite_yaml_text)(
            text, new_hash, str(given)
        )
        problems.extend(plan.problems)
        if plan.text is not None:
            changes.append(
                _Change(
                    given,
                    real,
                    old,
                    plan.text.encode("utf-8"),
                    st.st_mode & 0o7777,
                    st.st_uid,
                    st.st_gid,
                    plan.keys,
                )
            )
    if problems:
        raise ConfigError(
            "cannot rewrite the CA hash of the join tokens; no file was changed", problems
        )
    if dry_run or not changes:
        return [c.given for c in changes]

    _write(root, changes, anywhere=journal_dir is not None)
    for c in changes:
        log.info(
            "token_rewritten",
            cert_path=str(c.given),
            ca_hash=new_hash,
            reason=f"the CA hash of {', '.join(c.keys)} did not match the rotated cluster CA",
        )
    return [c.given for c in changes]


def _write(root: Path, changes: list[_Change], *, anywhere: bool) -> None:
    # An edit made since we read the file would be lost by the rename: refuse it instead.
    for c in changes:
        try:
            current = c.real.read_bytes()
        except OSError:
            current = None
        if current != c.old:
            raise StorageError(
                f"{c.given} changed while its token was being rewritten; no file was changed, "
                "run again"
            )
    write_files(root, [FileWrite(c.real, c.new, c.mode) for c in changes], anywhere=anywhere)
    if os.geteuid() != 0:
        return  # only root can give a file away; ours are ours already
    for c in changes:
        # files.atomic creates the file as us; give it back to its owner (a crash right here
        # leaves it root-owned with the right mode, which RKE2, running as root, still reads).
        st = c.real.stat()
        if (st.st_uid, st.st_gid) != (c.uid, c.gid):
            try:
                os.chown(c.real, c.uid, c.gid)
                os.chmod(c.real, c.mode)  # chown may drop setuid/setgid bits
            except OSError as exc:
                raise StorageError(
                    f"cannot give {c.given} back to uid {c.uid} gid {c.gid}: {exc.strerror or exc}"
                ) from exc
