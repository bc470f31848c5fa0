"""The facts `certificate check` shows about each certificate, cached by file content.

Parsing X.509 needs cryptography (~50 ms to import); the facts of a file depend on its bytes
only, so they are kept under the SHA-256 of those bytes and cannot go stale: a changed file has
another digest and is parsed again. The cache is one file per data dir in the cache dir
(files/private_cache.py, root-only, 0600, written through files.atomic), `certs-<hash>.json`.
`check` writes it after a miss, and `renew` runs `check` once it is done, so a check on an
unchanged node imports neither cryptography nor pydantic. A file that does not parse is not
cached: its error names the file and is reported each time.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rke2certd.files.private_cache import cache_dir, read_private, write_private
from rke2certd.plan.inventory import CertFacts

if TYPE_CHECKING:
    from cryptography import x509

FORMAT = 1
MAX_ENTRIES = 256  # ~25 files per node, a few renewals' worth of old digests


def facts_of(cert: x509.Certificate) -> CertFacts:
    from rke2certd.pki import certs

    return CertFacts(
        subject=certs.common_name(cert.subject),
        issuer=certs.common_name(cert.issuer),
        usages=tuple(certs.usages(cert)),
        not_before=certs.not_before(cert),
        not_after=certs.not_after(cert),
        serial=certs.serial_hex(cert),
    )


def parse(data: bytes, source: Path) -> list[CertFacts]:
    """The facts of every certificate of a PEM file, in order; PKIError when it does not parse."""
    from rke2certd.pki import certs

    return [facts_of(c) for c in certs.load_bundle(data, source)]


def chain_problem(leaf_file: bytes, ca_file: bytes, source: Path) -> str:
    """Why the first certificate of `leaf_file` does not verify against `ca_file`, or "".

    As OpenSSL judges it (`openssl verify -CAfile`): a path to a self-signed root of the CA
    file, the rest of both files as intermediates, and no step on the way whose signature holds
    but whose constraints (CA, keyCertSign, path length) forbid it, since OpenSSL may follow
    that step and fail. Times are not checked here: each row shows its own validity.
    """
    from rke2certd.pki import certs
    from rke2certd.pki.chain import find_paths, is_self_issued_root

    leaf, *sent = certs.load_bundle(leaf_file, source)
    trusted = certs.load_bundle(ca_file, f"the CA file of {source}")
    roots = [c for c in trusted if is_self_issued_root(c)]
    others = [c for c in [*trusted, *sent] if not is_self_issued_root(c)]
    paths = find_paths(leaf, roots, others)
    if not paths.chains:
        return "; ".join(paths.error(leaf).reasons[:3])
    if paths.broken:
        return "a path to the root breaks a constraint: " + "; ".join(paths.broken[:3])
    return ""


def _encode(facts: list[CertFacts]) -> list[list[Any]]:
    return [
        [
            f.subject,
            f.issuer,
            list(f.usages),
            f.not_before.isoformat(),
            f.not_after.isoformat(),
            f.serial,
        ]
        for f in facts
    ]


def _decode(doc: Any) -> list[CertFacts]:
    """Raises ValueError/TypeError on anything but what _encode wrote."""
    out = []
    for subject, issuer, usages, not_before, not_after, serial in doc:
        f = CertFacts(
            subject,
            issuer,
            tuple(usages),
            datetime.fromisoformat(not_before),
            datetime.fromisoformat(not_after),
            serial,
        )
        if not all(isinstance(v, str) for v in (f.subject, f.issuer, f.serial, *f.usages)):
            raise TypeError("not a string")
        if f.not_before.utcoffset() is None or f.not_after.utcoffset() is None:
            raise ValueError("a naive time")
        out.append(f)
    return out


class FactsCache:
    """Facts by content digest for one data dir; a miss parses (and is saved by `save`)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}  # digest -> encoded facts, as in the file
        self.used: dict[str, Any] = {}
        # digest of (leaf file, CA file) -> chain_problem's verdict
        self.chains: dict[str, Any] = {}
        self.used_chains: dict[str, str] = {}
        self.added = False
        data = read_private(path) if path is not None else None
        if data is not None:
            try:
                doc = json.loads(data)
                if doc.get("format") == FORMAT and isinstance(doc.get("facts"), dict):
                    self.entries = doc["facts"]
                    if isinstance(doc.get("chains"), dict):
                        self.chains = doc["chains"]
            except (ValueError, AttributeError):
                pass  # damaged: start empty, the next save rewrites it

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> FactsCache:
        base = cache_dir()
        if base is None:
            return cls(None)
        name = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:32]
        return cls(base / f"certs-{name}.json")

    def facts(self, data: bytes, source: Path) -> list[CertFacts]:
        key = hashlib.sha256(data).hexdigest()
        encoded = self.entries.get(key)
        if encoded is not None:
            try:
                facts = _decode(encoded)
            except (ValueError, TypeError):
                pass  # a damaged entry: parse again and replace it
            else:
                self.used[key] = encoded
                return facts
        facts = parse(data, source)
        self.used[key] = _encode(facts)
        self.added = True
        return facts

    def chain(self, data: bytes, ca_data: bytes, source: Path) -> str:
        """chain_problem, kept under the digests of both files (it depends on nothing else)."""
        both = hashlib.sha256(data).digest() + hashlib.sha256(ca_data).digest()
        key = hashlib.sha256(both).hexdigest()
        cached = self.chains.get(key)
        if isinstance(cached, str):
            self.used_chains[key] = cached
            return cached
        problem = chain_problem(data, ca_data, source)
        self.used_chains[key] = problem
        self.added = True
        return problem

    def save(self) -> None:
        """Write the cache when this run parsed something: the entries it used first, then older
        ones (another `-s` selection's, a recent renewal's) up to MAX_ENTRIES."""
        if not self.added or self.path is None:
            return
        merged = dict(self.used)
        for key, encoded in self.entries.items():
            if len(merged) >= MAX_ENTRIES:
                break
            merged.setdefault(key, encoded)
        chains = dict(self.used_chains)
        for key, verdict in self.chains.items():
            if len(chains) >= MAX_ENTRIES:
                break
            chains.setdefault(key, verdict)
        doc = {"format": FORMAT, "facts": merged, "chains": chains}
        write_private(self.path, json.dumps(doc, separators=(",", ":")).encode())
