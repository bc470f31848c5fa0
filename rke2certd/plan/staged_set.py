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
from dataclasses import dataclass
from datetime import datetime

from rke2certd.errors import ValidationError
from rke2certd.pki.layout import CA_NAMES
from rke2certd.plan.staged_ca import MAX_BUNDLE_CERTS, check_ca, check_service_key
from rke2certd.plan.staged_files import (
    ROTATABLE,
    SERVICE_KEY,
    SIZE_LIMIT,
    Check,
    Problem,
    StagedFile,
    StagedSet,
    Work,
    ca_cert_file,
    ca_key_file,
    take,
)

__all__ = [
    "MAX_BUNDLE_CERTS",
    "ROTATABLE",
    "SERVICE_KEY",
    "SIZE_LIMIT",
    "Check",
    "Problem",
    "StagedFile",
    "StagedSet",
    "StagedSetResult",
    "ca_cert_file",
    "ca_key_file",
    "validate_staged_set",
]


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


def validate_staged_set(
    staged: StagedSet, current: Mapping[str, bytes], now: datetime
) -> StagedSetResult:
    """Check a staged CA set against the current data at `now` (see the module doc)."""
    w = Work(staged, current, now)
    for rel in ROTATABLE:
        take(w, rel)
    for ca in CA_NAMES:
        check_ca(w, ca)
    check_service_key(w)
    changed = tuple(rel for rel in ROTATABLE if rel in w.changed)
    return StagedSetResult(tuple(w.problems), tuple(w.warnings), dict(w.files), changed)
