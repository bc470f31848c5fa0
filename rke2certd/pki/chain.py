"""Path building with signature checks, the way Go's `x509.Verify` does it.

RKE2 and its clients are Go programs, so a CA set is acceptable when Go would accept it: every
path from the leaf to a root is tried (not only the first issuer candidate), candidates are
found by subject name and ordered by AKI/SKI agreement, roots are tried before intermediates
(so the first chain returned is the one Go returns first, which the token CA hash depends on),
an issuer must be a CA allowed to sign certificates, path lengths are honoured, and a
certificate is never used twice in one chain (same subject and key), which stops loops.
Not modelled: EKU nesting and name constraints (RKE2's CAs carry neither).

`find_paths` also reports the broken steps: an issuer whose signature verifies but whose
constraints (CA, keyCertSign, path length) forbid this path. Go tries every path, but OpenSSL
follows the issuer it finds first and fails there, so a CA file may hold no such step. With
`signs_leaves` the start certificate is a CA that will sign leaves: it counts in the path length
of every issuer above it, as it does in the chain of each leaf it signs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from rke2certd.errors import PKIError
from rke2certd.pki.certs import aki, common_name, ski
from rke2certd.pki.keys import public_der

MAX_DEPTH = 10
# Go's limit too: a hostile bundle full of same-named certs must not make us spin.
MAX_SIGNATURE_CHECKS = 100
_WEAK_HASHES = (hashes.SHA1, hashes.MD5)

Chain = list[x509.Certificate]
_E = TypeVar("_E", bound=x509.ExtensionType)


class ChainError(PKIError):
    """No path from a certificate to a trusted root; `reasons` says what was tried."""

    def __init__(self, message: str, reasons: Sequence[str]) -> None:
        super().__init__(message)
        self.reasons = list(reasons)


def describe_cert(cert: x509.Certificate) -> str:
    """A certificate as an operator recognises it: its CN, else its whole subject."""
    cn = common_name(cert.subject)
    return f"'{cn}'" if cn else f"'{cert.subject.rfc4514_string()}'"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def is_root_like(cert: x509.Certificate) -> bool:
    """Upstream's test for a trust anchor inside a bundle: no AKI, or AKI equal to its SKI.

    K3s uses it for the token CA hash and for rotate-ca's old roots; every self-signed CA that
    RKE2, OpenSSL or `cryptography` makes passes it.
    """
    key_id = aki(cert)
    return key_id is None or key_id == ski(cert)


def is_self_issued_root(cert: x509.Certificate) -> bool:
    """A trust anchor as OpenSSL ends a chain: same subject and issuer, and root-like."""
    return cert.issuer == cert.subject and is_root_like(cert)


@dataclass
class _Search:
    now: datetime | None
    roots: list[x509.Certificate]
    intermediates: list[x509.Certificate]
    signs_leaves: bool = False
    checks: int = 0
    reasons: list[str] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    broken_issuers: list[x509.Certificate] = field(default_factory=list)
    # (subject DER, public key DER) by id(): a search compares each many times
    _ids: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def identity(self, cert: x509.Certificate) -> tuple[bytes, bytes]:
        found = self._ids.get(id(cert))
        if found is None:
            found = (cert.subject.public_bytes(), public_der(cert.public_key()))
            self._ids[id(cert)] = found
        return found

    def note(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


@dataclass(frozen=True)
class Paths:
    """What `find_paths` found: the valid chains (start first, root last), the broken steps
    (signature good, constraint violated; their issuers too), and why attempts failed."""

    chains: list[Chain]
    broken: list[str]
    broken_issuers: list[x509.Certificate]
    reasons: list[str]

    def error(self, start: x509.Certificate) -> ChainError:
        reasons = list(self.reasons)
        if not reasons and start.issuer == start.subject:
            reasons.append("it is self-signed and is not one of the trusted roots")
        elif not reasons:
            reasons.append(f"no certificate named {_issuer_text(start)} is available")
        message = f"{describe_cert(start)} does not chain to a trusted root: " + "; ".join(
            reasons[:6]
        )
        return ChainError(message, reasons)


def find_paths(
    start: x509.Certificate,
    roots: Iterable[x509.Certificate],
    intermediates: Iterable[x509.Certificate] = (),
    now: datetime | None = None,
    *,
    signs_leaves: bool = False,
) -> Paths:
    """Every path from `start` to one of `roots` and every broken step met on the way.

    `start`'s own validity is not checked here (verify_chain does); with `now`, every issuer
    must be valid at that time. `signs_leaves`: see the module doc.
    """
    search = _Search(now, _unique(roots), _unique(intermediates), signs_leaves)
    start_der = der(start)
    if any(der(r) == start_der for r in search.roots):
        search.chains.append([start])
    else:
        _extend(search, [start])
    return Paths(search.chains, search.broken, search.broken_issuers, search.reasons)


def verify_chain(
    leaf: x509.Certificate,
    roots: Iterable[x509.Certificate],
    intermediates: Iterable[x509.Certificate] = (),
    now: datetime | None = None,
    *,
    signs_leaves: bool = False,
) -> list[Chain]:
    """Every chain from `leaf` to one of `roots`, each listed leaf first, root last.

    With `now`, every certificate of a chain must be valid at that time. Raises ChainError,
    carrying the reasons of every failed attempt, when no chain exists.
    """
    problem = _validity_problem(leaf, now)
    if problem:
        raise ChainError(f"{describe_cert(leaf)} cannot be trusted: {problem}", [problem])
    paths = find_paths(leaf, roots, intermediates, now, signs_leaves=signs_leaves)
    if paths.chains:
        return paths.chains
    raise paths.error(leaf)


def _unique(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        key = der(cert)
        if key not in seen:
            seen.add(key)
            out.append(cert)
    return out


def _issuer_text(cert: x509.Certificate) -> str:
    cn = common_name(cert.issuer)
    return f"'{cn}'" if cn else f"'{cert.issuer.rfc4514_string()}'"


def _extend(search: _Search, chain: Chain) -> None:
    child = chain[-1]
    for is_root, candidate in _candidates(search, child):
        if _already_in_chain(search, candidate, chain):
            continue
        if search.checks >= MAX_SIGNATURE_CHECKS:
            search.note("too many candidate issuers (signature-check limit reached)")
            return
        search.checks += 1
        problem = _signature_problem(child, candidate)
        if problem:
            search.note(problem)
            continue
        problem = _constraint_problem(candidate, chain, search.signs_leaves)
        if problem:
            search.note(problem)
            if problem not in search.broken:
                search.broken.append(problem)
                search.broken_issuers.append(candidate)
            continue
        problem = _validity_problem(candidate, search.now)
        if problem:
            search.note(problem)
            continue
        if is_root:
            search.chains.append([*chain, candidate])
        elif len(chain) < MAX_DEPTH:
            _extend(search, [*chain, candidate])
        else:
            search.note(f"the chain through {describe_cert(candidate)} is too long")


def _candidates(search: _Search, child: x509.Certificate) -> list[tuple[bool, x509.Certificate]]:
    """Possible issuers: roots first, then intermediates, each by AKI/SKI agreement (as Go)."""
    issuer = child.issuer.public_bytes()
    child_aki = aki(child)
    out: list[tuple[bool, x509.Certificate]] = []
    for is_root, pool in ((True, search.roots), (False, search.intermediates)):
        named = [c for c in pool if search.identity(c)[0] == issuer]
        named.sort(key=lambda c: _key_id_rank(child_aki, ski(c)))
        out += [(is_root, c) for c in named]
    return out


def _key_id_rank(child_aki: bytes | None, parent_ski: bytes | None) -> int:
    if child_aki == parent_ski:
        return 0
    if child_aki is None or parent_ski is None:
        return 1
    return 2  # a mismatch is still tried: the signature decides


def _already_in_chain(search: _Search, candidate: x509.Certificate, chain: Chain) -> bool:
    """Same subject and same key as a certificate already in the chain (Go's loop rule)."""
    this = search.identity(candidate)
    return any(search.identity(c) == this for c in chain)


def _signature_problem(child: x509.Certificate, issuer: x509.Certificate) -> str | None:
    who = f"{describe_cert(issuer)} -> {describe_cert(child)}"
    algorithm = child.signature_hash_algorithm
    if isinstance(algorithm, _WEAK_HASHES):
        return f"{who}: signed with {algorithm.name.upper()}, which Go and OpenSSL refuse"
    try:
        child.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return f"{who}: the signature does not verify with the issuer's key"
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"{who}: the signature cannot be checked ({exc})"
    return None


def _constraint_problem(issuer: x509.Certificate, chain: Chain, signs_leaves: bool) -> str | None:
    name = describe_cert(issuer)
    bc = extension(issuer, x509.BasicConstraints)
    if issuer.version == x509.Version.v3 and (bc is None or not bc.ca):
        return f"{name} is not a CA (BasicConstraints CA:TRUE missing), so it cannot sign"
    ku = extension(issuer, x509.KeyUsage)
    if ku is not None and not ku.key_cert_sign:
        return f"{name} may not sign certificates (KeyUsage lacks keyCertSign)"
    # Intermediates below the issuer on a leaf's path: the chain minus its start, plus the start
    # itself when it is a CA that signs the leaves.
    below = len(chain) - 1 + (1 if signs_leaves else 0)
    if bc is not None and bc.path_length is not None and below > bc.path_length:
        counted = (
            f" ({describe_cert(chain[0])}, which signs leaves, counts)" if signs_leaves else ""
        )
        return (
            f"{name} allows {bc.path_length} intermediate CA(s) below it (pathlen); a path "
            f"through {describe_cert(chain[-1])} puts {below} there{counted}"
        )
    return None


def _validity_problem(cert: x509.Certificate, now: datetime | None) -> str | None:
    if now is None:
        return None
    if now < cert.not_valid_before_utc:
        return f"{describe_cert(cert)} is not valid before {utc_text(cert.not_valid_before_utc)}"
    if now > cert.not_valid_after_utc:
        return f"{describe_cert(cert)} expired on {utc_text(cert.not_valid_after_utc)}"
    return None


def utc_text(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M} UTC"


def extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    """The value of an extension of `kind`, or None when the certificate lacks it."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
