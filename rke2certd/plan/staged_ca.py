"""PURE: the checks on a staged CA slot (bundle, chain, trust, cert/key match) and on a staged
`service.key`; the key types allowed. What they check and why: staged_set.py's module doc.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from rke2certd.errors import PKIError
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
from rke2certd.pki.keys import PrivateKey, describe, load_keys, public_der
from rke2certd.plan.staged_files import (
    SERVICE_KEY,
    Check,
    Work,
    ca_cert_file,
    ca_key_file,
    parse_certs,
    parse_keys,
)

# A rotation adds three certificates (CA, cross-signed root, root) and keeps the current ones:
# dozens of rotations fit. Each certificate becomes a trust anchor on every node.
MAX_BUNDLE_CERTS = 64
MIN_CA_DAYS_LEFT = 365
EC_CURVES = {"secp256r1", "secp384r1"}
MIN_RSA_BITS = 2048


# -- CA slots --------------------------------------------------------------------------------


def check_ca(w: Work, ca: str) -> None:
    crt, key = ca_cert_file(ca), ca_key_file(ca)
    if not ({crt, key} & w.changed):
        _warn_if_short_lived(w, crt)
        return
    certs = parse_certs(w, crt) if crt not in w.unusable else None
    keys = parse_keys(w, key) if key not in w.unusable else None
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


def _check_bundle(w: Work, rel: str, certs: list[x509.Certificate]) -> None:
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


def _warn_if_short_lived(w: Work, rel: str) -> None:
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


def _current_certs(w: Work, rel: str) -> list[x509.Certificate]:
    try:
        return load_bundle(w.current[rel], f"{rel} (current data)")
    except (KeyError, PKIError):
        return []


def _check_chain(w: Work, rel: str, certs: list[x509.Certificate]) -> None:
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


def _check_trust(w: Work, rel: str, certs: list[x509.Certificate]) -> None:
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
    w: Work,
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
    w: Work, crt: str, key: str, certs: list[x509.Certificate], keys: list[PrivateKey]
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


def check_service_key(w: Work) -> None:
    rel = SERVICE_KEY
    if rel in w.unusable or rel not in w.changed:
        return
    new = parse_keys(w, rel)
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
