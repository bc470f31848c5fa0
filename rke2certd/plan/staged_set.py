"""PURE: is a staged CA set safe to load with `rotate-ca`? (docs/RKE2-COMPATIBILITY.md §8)

Input: the staged files as read (bytes plus what lstat said) and the current bytes of the 11
rotatable files; no disk, no clock. Output: every problem, each naming its file and saying what
to do; warnings; and the resulting set after missing or empty files fall back to current data.

Checks on each CA slot whose certificate or key changed:
  - upstream's: a new bundle holds more than one certificate; its first certificate chains to
    the current bundle's roots (through the current intermediates and the new bundle's other
    certificates, every path tried); the first certificate matches the first key;
  - ours: every certificate of the bundle is a CA (BasicConstraints CA, keyCertSign when
    KeyUsage is present, and required on the first); the first is valid now and for at least
    365 more days; every certificate and key is RSA >= 2048 or EC P-256/P-384;
  - what a bundle may be (every node and client trusts every certificate of it): the new CA,
    its path to a self-signed root inside the bundle (ROOT; OpenSSL clients given only this
    file need it), the certificates that link it to the current roots, and certificates of the
    current CAs (same subject and key as a current one); nothing else (UNRELATED), at most
    MAX_BUNDLE_CERTS (BUNDLE_SIZE). The new CA signs leaves, so it counts in every issuer's
    path length, on the chain check too; a step inside the bundle whose signature verifies but
    whose constraints forbid the path is refused (PATH): OpenSSL may pick it and fail.
`service.key`, when changed: only RSA keys >= 2048, and the current first key (today's signer)
is still in it. Every staged file: a regular file (no symlink), not group/world writable, under
SIZE_LIMIT; parse errors name the file.

Decisions:
  - A slot whose cert and key both fall back to current data (or are byte-identical, or hold
    the same certificates/keys in other bytes) is not checked: it is what the cluster runs on
    today. So a service.key-only rotation (RKE2's documented procedure) passes even when a CA
    is old; a warning says when a current CA has less than a year left.
  - "More than one certificate" applies only to a changed bundle (upstream also rejects the
    unchanged single-cert default CA in some versions; that is a bug we do not copy).
  - `--force` may skip only SINGLE_CERT, CHAIN and SERVICE_KEY_KEPT (what a new root or a fresh
    service key needs). A cert/key mismatch, a parse error, a non-CA, a short-lived CA, a weak
    key or an unsafe file is never forceable: saving it would break every node.
  - A staged file with the same certificates (or keys) as the current one in different bytes
    keeps the current bytes, so the single-cert CA hash (raw file bytes) does not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from rke2certd.errors import PKIError, ValidationError
from rke2certd.pki.certs import load_bundle
from rke2certd.pki.chain import (
    ChainError,
    der,
    describe_cert,
    extension,
    find_paths,
    is_root_like,
    is_self_issued_root,
    utc_text,
    verify_chain,
)
from rke2certd.pki.keys import (
    PrivateKey,
    describe,
    key_to_pem,
    load_keys,
    public_der,
    split_pem,
    stray_bytes,
)
from rke2certd.pki.layout import CA_NAMES

SIZE_LIMIT = 1 << 20  # 1 MiB: a CA bundle is a few KiB; anything bigger is not one
# A rotation adds three certificates (CA, cross-signed root, root) and keeps the current ones:
# dozens of rotations fit. Each certificate becomes a trust anchor on every node.
MAX_BUNDLE_CERTS = 64
MIN_CA_DAYS_LEFT = 365
SERVICE_KEY = "tls/service.key"
EC_CURVES = {"secp256r1", "secp384r1"}
MIN_RSA_BITS = 2048


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


@dataclass(frozen=True)
class StagedSetResult:
    problems: tuple[Problem, ...]
    warnings: tuple[str, ...]
    files: Mapping[str, bytes]  # the new set: every rotatable file, staged or current
    changed: tuple[str, ...]  # files whose bytes differ from current

    @property
    def nothing_to_do(self) -> bool:
        return not self.changed and not self.problems

    def blocking(self, force: bool) -> list[Problem]:
        return [p for p in self.problems if not (force and p.forceable)]

    def accepted(self, force: bool) -> bool:
        return not self.blocking(force)

    def error(self, force: bool) -> ValidationError | None:
        """The rejection to raise, or None; says which problems `--force` could skip."""
        blocking = self.blocking(force)
        if not blocking:
            return None
        lines = [p.message + (" [skipped by --force]" if p.forceable else "") for p in blocking]
        only_forceable = all(p.forceable for p in blocking)
        tail = (
            "; only chain-of-trust and service-key checks failed: --force saves it anyway "
            "(disruptive: nodes must get the new token and pods restarted)"
            if only_forceable
            else "; --force cannot skip the problems not marked [skipped by --force]"
        )
        return ValidationError(f"the staged CA set was rejected, nothing changed{tail}", lines)


@dataclass
class _Work:
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


def validate_staged_set(
    staged: StagedSet, current: Mapping[str, bytes], now: datetime
) -> StagedSetResult:
    """Check a staged CA set against the current data at `now` (see the module doc)."""
    w = _Work(staged, current, now)
    for rel in ROTATABLE:
        _take(w, rel)
    for ca in CA_NAMES:
        _check_ca(w, ca)
    _check_service_key(w)
    changed = tuple(rel for rel in ROTATABLE if rel in w.changed)
    return StagedSetResult(tuple(w.problems), tuple(w.warnings), dict(w.files), changed)


# -- files -----------------------------------------------------------------------------------


def _take(w: _Work, rel: str) -> None:
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


def _file_problems(w: _Work, sf: StagedFile) -> bool:
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


def _stray_bytes_problem(w: _Work, sf: StagedFile) -> bool:
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


def _parse_certs(w: _Work, rel: str) -> list[x509.Certificate] | None:
    try:
        return load_bundle(w.files[rel], w.name(rel))
    except PKIError as exc:
        w.problem(Check.PARSE, rel, f"{exc}; stage a complete PEM file")
        return None


def _parse_keys(w: _Work, rel: str) -> list[PrivateKey] | None:
    try:
        return load_keys(w.files[rel], w.name(rel))
    except PKIError as exc:
        w.problem(Check.PARSE, rel, f"{exc}; stage a complete, unencrypted PEM key file")
        return None


# -- CA slots --------------------------------------------------------------------------------


def _check_ca(w: _Work, ca: str) -> None:
    crt, key = ca_cert_file(ca), ca_key_file(ca)
    if not ({crt, key} & w.changed):
        _warn_if_short_lived(w, crt)
        return
    certs = _parse_certs(w, crt) if crt not in w.unusable else None
    keys = _parse_keys(w, key) if key not in w.unusable else None
    if certs is not None and crt in w.changed:
        _check_bundle(w, crt, certs)
        _check_chain(w, crt, certs)
        _check_trust(w, crt, certs)
    if keys is not None and key in w.changed:
        for i, k in enumerate(keys, 1):
            problem = key_type_problem(k.public_key())
            if problem:
                w.problem(Check.KEY_TYPE, key, f"{w.name(key)}: key #{i} is {problem}")
    if certs is not None and keys is not None:
        _check_match(w, crt, key, certs, keys)


def _check_bundle(w: _Work, rel: str, certs: list[x509.Certificate]) -> None:
    name = w.name(rel)
    if len(certs) == 1:
        w.problem(
            Check.SINGLE_CERT,
            rel,
            f"{name} holds a single certificate: a new CA must come with its chain to the "
            "current CA (intermediate + cross-signed or common root); a new unrelated root "
            "needs --force",
        )
    for i, cert in enumerate(certs, 1):
        label = f"{name}: certificate #{i} ({describe_cert(cert)})"
        ca_problem = _ca_problem(cert, first=i == 1)
        if ca_problem:
            w.problem(Check.NOT_CA, rel, f"{label} {ca_problem}")
        key_problem = key_type_problem(cert.public_key())
        if key_problem:
            w.problem(Check.KEY_TYPE, rel, f"{label} has a key that is {key_problem}")
        if i == 1:
            validity = _validity_problem(cert, w.now)
            if validity:
                w.problem(Check.VALIDITY, rel, f"{label} {validity}")
        elif not cert.not_valid_before_utc <= w.now <= cert.not_valid_after_utc:
            w.warnings.append(f"{label} is not valid now; clients ignore it, consider dropping it")


def _ca_problem(cert: x509.Certificate, first: bool) -> str | None:
    bc = extension(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        return (
            "is not a CA (BasicConstraints CA:TRUE missing), e.g. a leaf certificate; "
            "a CA file holds only CA certificates, the signing CA first"
        )
    ku = extension(cert, x509.KeyUsage)
    if (ku is None and first) or (ku is not None and not ku.key_cert_sign):
        return "may not sign certificates (KeyUsage keyCertSign missing); reissue it as a CA"
    return None


def _validity_problem(cert: x509.Certificate, now: datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"is not valid before {utc_text(cert.not_valid_before_utc)}; check the clock"
    if now > cert.not_valid_after_utc:
        return f"expired on {utc_text(cert.not_valid_after_utc)}; stage a CA that is valid"
    left = cert.not_valid_after_utc - now
    if left < timedelta(days=MIN_CA_DAYS_LEFT):
        return (
            f"expires on {utc_text(cert.not_valid_after_utc)}, in {left.days} days; a new CA "
            f"must be valid for at least {MIN_CA_DAYS_LEFT} more days"
        )
    return None


def _warn_if_short_lived(w: _Work, rel: str) -> None:
    try:
        first = load_bundle(w.files[rel], rel)[0]
    except (KeyError, PKIError):
        return
    left = first.not_valid_after_utc - w.now
    if left < timedelta(days=MIN_CA_DAYS_LEFT):
        w.warnings.append(
            f"the current {rel} ({describe_cert(first)}) expires on "
            f"{utc_text(first.not_valid_after_utc)}; plan its rotation"
        )


def _current_certs(w: _Work, rel: str) -> list[x509.Certificate]:
    try:
        return load_bundle(w.current[rel], f"{rel} (current data)")
    except (KeyError, PKIError):
        return []


def _check_chain(w: _Work, rel: str, certs: list[x509.Certificate]) -> None:
    """A leaf the new CA signs must verify with only the current CA file: CHAIN otherwise."""
    name = w.name(rel)
    try:
        old = load_bundle(w.current[rel], f"{rel} (current data)")
    except KeyError:
        w.problem(Check.CHAIN, rel, f"{name}: there is no current CA to chain to")
        return
    except PKIError as exc:
        w.problem(Check.CHAIN, rel, f"{name}: the chain cannot be checked: {exc}")
        return
    roots = [c for c in old if is_root_like(c)]
    intermediates = [c for c in old if not is_root_like(c)] + certs[1:]
    try:
        verify_chain(certs[0], roots, intermediates, w.now, signs_leaves=True)
    except ChainError as exc:
        w.problem(
            Check.CHAIN,
            rel,
            f"{name}: the new CA does not chain to the current CA, so nodes and clients that "
            f"trust the current one would reject it ({exc}); stage a CA signed by the same "
            "root or cross-signed by the current CA (ca stage-rotation), or use --force for a "
            "new root (disruptive: every node needs the new token)",
        )


def _check_trust(w: _Work, rel: str, certs: list[x509.Certificate]) -> None:
    """What the bundle may hold (module doc): ROOT, PATH, UNRELATED, BUNDLE_SIZE."""
    name = w.name(rel)
    if len(certs) > MAX_BUNDLE_CERTS:
        w.problem(
            Check.BUNDLE_SIZE,
            rel,
            f"{name} holds {len(certs)} certificates, over the limit of {MAX_BUNDLE_CERTS}; "
            "every one becomes a trust anchor on every node: keep the new CA, its chain and "
            "the current CA certificates only",
        )
    new = certs[0]
    roots = [c for c in certs if is_self_issued_root(c)]
    others = [c for c in certs[1:] if not is_self_issued_root(c)]
    paths = find_paths(new, roots, others, w.now, signs_leaves=True)
    if not paths.chains:
        why = "; ".join(paths.error(new).reasons[:4])
        w.problem(
            Check.ROOT,
            rel,
            f"{name}: the new CA {describe_cert(new)} does not chain to a self-signed root "
            f"inside this file ({why}); a client given only this file (openssl verify "
            "-CAfile) would reject every certificate the new CA signs: add its root and the "
            "certificates between, in order",
        )
    if paths.broken:
        w.problem(
            Check.PATH,
            rel,
            f"{name}: a path from the new CA {describe_cert(new)} through this file breaks a "
            f"constraint: {'; '.join(paths.broken[:4])}; a client that follows it (OpenSSL "
            "does) rejects every certificate the new CA signs: drop that certificate or "
            "reissue it without the constraint",
        )
    _check_unrelated(w, rel, certs, roots, others)


def _check_unrelated(
    w: _Work,
    rel: str,
    certs: list[x509.Certificate],
    roots: list[x509.Certificate],
    others: list[x509.Certificate],
) -> None:
    """UNRELATED: a certificate on no path from the new CA, to a root of the bundle or to a
    current root, and not a current CA certificate. Paths here ignore time, so the link to an
    expired current CA still counts (a --force rotation away from it must stay possible)."""
    old = _current_certs(w, rel)
    old_roots = [c for c in old if is_root_like(c)]
    old_others = [c for c in old if not is_root_like(c)] + certs[1:]
    chains = [
        *find_paths(certs[0], roots, others, signs_leaves=True).chains,
        *find_paths(certs[0], old_roots, old_others, signs_leaves=True).chains,
    ]
    on_path = {der(c) for chain in chains for c in chain}
    current = {(c.subject.public_bytes(), public_der(c.public_key())) for c in old}
    stray = [
        f"#{i} {describe_cert(c)}"
        for i, c in enumerate(certs, 1)
        if i > 1
        and der(c) not in on_path
        and (c.subject.public_bytes(), public_der(c.public_key())) not in current
    ]
    if not stray:
        return
    shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
    w.problem(
        Check.UNRELATED,
        rel,
        f"{w.name(rel)}: {len(stray)} certificate(s) are on no valid path from the new CA to a "
        f"root and are not current CA certificates: {shown}; every certificate of the file "
        "becomes a trust anchor on every node, so it holds only the new CA, its chain to its "
        "root, the certificates linking it to the current CA and the current CA certificates: "
        "remove the others",
    )


def _check_match(
    w: _Work, crt: str, key: str, certs: list[x509.Certificate], keys: list[PrivateKey]
) -> None:
    cert_key = public_der(certs[0].public_key())
    if public_der(keys[0]) == cert_key:
        return
    position = next((i for i, k in enumerate(keys, 1) if public_der(k) == cert_key), None)
    hint = (
        f"its key #{position} matches: put that key first"
        if position
        else "stage the key that belongs to the certificate"
    )
    w.problem(
        Check.KEY_MATCH,
        key,
        f"{w.name(key)} does not match the first certificate of {w.name(crt)} "
        f"({describe_cert(certs[0])}); {hint}",
    )


# -- service.key -----------------------------------------------------------------------------


def _check_service_key(w: _Work) -> None:
    rel = SERVICE_KEY
    if rel in w.unusable or rel not in w.changed:
        return
    new = _parse_keys(w, rel)
    if new is None:
        return
    name = w.name(rel)
    for i, k in enumerate(new, 1):
        if not isinstance(k, rsa.RSAPrivateKey):
            w.problem(
                Check.KEY_TYPE,
                rel,
                f"{name}: key #{i} is {describe(k)}; service.key holds only RSA keys "
                "(service-account tokens are signed RS256)",
            )
        elif k.key_size < MIN_RSA_BITS:
            w.problem(
                Check.KEY_TYPE, rel, f"{name}: key #{i} is {key_type_problem(k.public_key())}"
            )
    try:
        old_first = load_keys(w.current[rel], f"{rel} (current data)")[0]
    except (KeyError, PKIError) as exc:
        w.problem(
            Check.SERVICE_KEY_KEPT,
            rel,
            f"{name}: the current service.key cannot be read ({exc}), so existing "
            "service-account tokens may stop verifying",
        )
        return
    if public_der(old_first) not in {public_der(k) for k in new}:
        w.problem(
            Check.SERVICE_KEY_KEPT,
            rel,
            f"{name} does not contain the current signing key (the first key of the current "
            "service.key), so every existing service-account token would stop verifying; "
            "append the current service.key to the new one (or --force to accept that)",
        )


# -- keys ------------------------------------------------------------------------------------


def key_type_problem(key: PublicKeyTypes) -> str | None:
    """Why a key is not allowed (RSA >= 2048, EC P-256 or P-384), or None."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"{describe(key)}: RSA keys must have at least {MIN_RSA_BITS} bits"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in EC_CURVES:
            return None
        return f"{describe(key)}: only EC P-256 and P-384 are supported"
    return f"{describe(key)}: only RSA and EC P-256/P-384 keys are supported"
