"""PURE: the staged files of a CA set: what was read, which bytes are taken (staged or current),
the problems of a file as a file (link, mode, size, stray bytes, parse errors).

The vocabulary of the checks (`Check`, `Problem`) and the work in progress (`Work`) live here,
below the CA and key checks (staged_ca.py) and the whole validation (staged_set.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from cryptography import x509

from rke2certd.errors import PKIError
from rke2certd.pki.certs import load_bundle
from rke2certd.pki.chain import der
from rke2certd.pki.keys import PrivateKey, key_to_pem, load_keys, split_pem, stray_bytes
from rke2certd.pki.layout import CA_NAMES

SIZE_LIMIT = 1 << 20  # 1 MiB: a CA bundle is a few KiB; anything bigger is not one
SERVICE_KEY = "tls/service.key"


def ca_cert_file(ca: str) -> str:
    return f"tls/{ca}.crt"


def ca_key_file(ca: str) -> str:
    return f"tls/{ca}.key"


# The 11 rotatable files, relative to the staged dir (server layout), in report order.
ROTATABLE: tuple[str, ...] = (
    *(f for ca in CA_NAMES for f in (ca_cert_file(ca), ca_key_file(ca))),
    SERVICE_KEY,
)


class Check(StrEnum):
    FILE = "file"
    MISSING = "missing"
    PARSE = "parse"
    SINGLE_CERT = "single-cert"
    CHAIN = "chain"
    KEY_MATCH = "key-match"
    NOT_CA = "not-ca"
    VALIDITY = "validity"
    KEY_TYPE = "key-type"
    SERVICE_KEY_KEPT = "service-key-kept"
    PEM = "pem"
    ROOT = "root"
    PATH = "path"
    UNRELATED = "unrelated"
    BUNDLE_SIZE = "bundle-size"


FORCEABLE = frozenset({Check.SINGLE_CERT, Check.CHAIN, Check.SERVICE_KEY_KEPT})


@dataclass(frozen=True)
class StagedFile:
    """One staged file as read without following symlinks. `data` is None when it is missing,
    empty, a symlink, not a regular file or over the size limit (then it was not read)."""

    path: str  # relative to the staged dir, e.g. "tls/server-ca.crt"
    data: bytes | None
    exists: bool = True
    is_symlink: bool = False
    is_regular: bool = True
    mode: int = 0o600  # permission bits
    size: int = 0

    @classmethod
    def missing(cls, path: str) -> StagedFile:
        return cls(path, None, exists=False, is_regular=False)


@dataclass(frozen=True)
class StagedSet:
    files: Mapping[str, StagedFile]
    root: str = ""  # the staged dir, only to name files in messages


@dataclass(frozen=True)
class Problem:
    file: str  # relative path
    check: Check
    message: str  # names the file and says what to do

    @property
    def forceable(self) -> bool:
        return self.check in FORCEABLE


@dataclass
class Work:
    """One validation in progress: the files taken so far and what was found."""

    staged: StagedSet
    current: Mapping[str, bytes]
    now: datetime
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    from_current: set[str] = field(default_factory=set)
    unusable: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)

    def name(self, rel: str) -> str:
        if rel in self.from_current:
            return f"{rel} (current data)"
        return f"{self.staged.root.rstrip('/')}/{rel}" if self.staged.root else rel

    def problem(self, check: Check, rel: str, message: str) -> None:
        self.problems.append(Problem(rel, check, message))


# -- files -----------------------------------------------------------------------------------


def take(w: Work, rel: str) -> None:
    """Pick the staged bytes, or fall back to current data; record file-level problems."""
    sf = w.staged.files.get(rel) or StagedFile.missing(rel)
    current = w.current.get(rel)
    if _file_problems(w, sf) or _stray_bytes_problem(w, sf):
        w.unusable.add(rel)
        if current is not None:
            w.files[rel] = current
        return
    if sf.data is None:
        if current is None:
            w.problem(Check.MISSING, rel, f"{w.name(rel)} is not staged and has no current data")
            w.unusable.add(rel)
            return
        w.warnings.append(f"using current data for {rel} (not staged, or empty)")
        w.files[rel] = current
        w.from_current.add(rel)
        return
    if current is not None and sf.data != current and _same_content(rel, sf.data, current):
        w.warnings.append(
            f"{w.name(rel)} holds the same {_what(rel)} as the current file in other bytes; "
            "keeping the current bytes"
        )
        w.files[rel] = current
        w.from_current.add(rel)
        return
    w.files[rel] = sf.data
    if sf.data != current:
        w.changed.add(rel)


def _what(rel: str) -> str:
    return "certificates" if rel.endswith(".crt") else "keys"


def _file_problems(w: Work, sf: StagedFile) -> bool:
    name, found = w.name(sf.path), False
    if sf.is_symlink:
        w.problem(
            Check.FILE,
            sf.path,
            f"{name} is a symbolic link (or lies under one); copy the real file into the "
            "staged dir (links are refused so a staged set cannot pull in other files)",
        )
        return True
    if sf.exists and not sf.is_regular:
        w.problem(Check.FILE, sf.path, f"{name} is not a regular file; stage a plain file")
        return True
    if sf.size > SIZE_LIMIT or (sf.data is not None and len(sf.data) > SIZE_LIMIT):
        w.problem(
            Check.FILE,
            sf.path,
            f"{name} is {sf.size} bytes, over the {SIZE_LIMIT // 1024} KiB limit; "
            "a CA or key file is a few KiB: stage the right file",
        )
        found = True
    if sf.exists and sf.mode & 0o022:
        w.problem(
            Check.FILE,
            sf.path,
            f"{name} is writable by group or others (mode {sf.mode & 0o777:04o}); "
            "run chmod go-w on it and stage again",
        )
        found = True
    if sf.exists and not found and sf.path.endswith(".key") and sf.mode & 0o044:
        w.warnings.append(f"{name} is readable by group or others; chmod 600 it")
    return found


def _stray_bytes_problem(w: Work, sf: StagedFile) -> bool:
    if sf.data is None:
        return False
    found = stray_bytes(sf.data)
    if found is None:
        return False
    offset, what = found
    place = "" if what.endswith("inside a PEM block") else " outside the PEM blocks"
    w.problem(
        Check.PEM,
        sf.path,
        f"{w.name(sf.path)} holds {what} at byte offset {offset}{place}; a certificate or key "
        "file holds only -----BEGIN/END----- blocks and blank lines, and rotate-ca stores the "
        "file as it is: remove everything else (e.g. `openssl x509 -in F -out F` for one "
        "certificate) and stage it again",
    )
    return True


def _same_content(rel: str, staged: bytes, current: bytes) -> bool:
    try:
        if len(split_pem(staged)) != len(split_pem(current)):
            return False  # the usual case, decided without parsing keys (RSA loads are slow)
        if rel.endswith(".crt"):
            new_certs, old_certs = load_bundle(staged, rel), load_bundle(current, rel)
            return [der(c) for c in new_certs] == [der(c) for c in old_certs]
        new_keys, old_keys = load_keys(staged, rel), load_keys(current, rel)
        return [key_to_pem(k) for k in new_keys] == [key_to_pem(k) for k in old_keys]
    except PKIError:
        return False


def parse_certs(w: Work, rel: str) -> list[x509.Certificate] | None:
    try:
        return load_bundle(w.files[rel], w.name(rel))
    except PKIError as exc:
        w.problem(Check.PARSE, rel, f"{exc}; stage a complete PEM file")
        return None


def parse_keys(w: Work, rel: str) -> list[PrivateKey] | None:
    try:
        return load_keys(w.files[rel], w.name(rel))
    except PKIError as exc:
        w.problem(Check.PARSE, rel, f"{exc}; stage a complete, unencrypted PEM key file")
        return None
