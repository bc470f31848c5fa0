"""`ca stage-rotation` and `ca stage-service-key`: a set for `rotate-ca` built from the CAs in
use, cross-signed so that clients trusting only the old CA keep working during the rollout
(docs/RKE2-COMPATIBILITY.md §9), or the current set with a new service-account key prepended."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509

from rke2certd.commands.generate import (
    GenerateResult,
    cn_name,
    hand_over,
    maybe_locked,
    prepend_service_key,
    require_current,
    self_check,
    staging_tls,
    write_staged,
)
from rke2certd.errors import PKIError
from rke2certd.files.atomic import read_optional
from rke2certd.log import log
from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem, common_name, is_self_signed, load_bundle
from rke2certd.pki.chain import (
    ChainError,
    der,
    describe_cert,
    find_paths,
    is_root_like,
    is_self_issued_root,
    verify_chain,
)
from rke2certd.pki.join_token import AGENT_USER, SERVER_USER, ca_hash, format_token
from rke2certd.pki.keys import (
    PrivateKey,
    key_to_pem,
    load_keys,
    new_ec_key,
    public_der,
)
from rke2certd.pki.layout import CA_NAMES, Layout
from rke2certd.plan.staged_set import (
    MAX_BUNDLE_CERTS,
    SERVICE_KEY,
    ca_cert_file,
    ca_key_file,
)

ROTATION_DAYS = 7300  # upstream's rotation script: root, cross-signed root and intermediate


def stage_rotation(
    data_dir: Path,
    out_dir: Path,
    now: datetime,
    server_password: str,
    agent_password: str | None = None,
    *,
    product: str = "rke2",
    lock: bool = True,
    staging: Path | None = None,
) -> GenerateResult:
    """Upstream's rotate-default-ca-certs.sh: a cross-signed CA set in `out_dir/tls/`, ready
    to be renamed into the daemon's staging dir (`staging`, default the config's default).

    Per CA: a new P-256 root (self-signed), the same root cross-signed by the current CA, a new
    intermediate signed by the new root. Bundle: intermediate, cross-signed root, self-signed
    root, then the current bundle's still-valid certificates; key file: intermediate key, root
    key. `service.key`: a new RSA 2048 key, then the current keys. The tokens use the passwords
    given (the caller reads server/token and agent-token; agent defaults to the server's).
    `lock=False` only when the caller already holds the node lock.
    """
    layout = Layout(data_dir)
    out_tls = staging_tls(layout, out_dir)
    with maybe_locked(data_dir, lock):
        current = require_current(layout)
        ts = int(now.timestamp())
        files: dict[str, bytes] = {}
        notes: list[str] = []
        for ca in CA_NAMES:
            crt, key = ca_cert_file(ca), ca_key_file(ca)
            files[crt], files[key] = _rotate_ca(
                ca, current[crt], current[key], now, ts, product, notes
            )
        files[SERVICE_KEY] = prepend_service_key(current[SERVICE_KEY], SERVICE_KEY)
        self_check(files, current, now)
        written = write_staged(out_dir, files)
    digest = ca_hash(files[ca_cert_file("server-ca")], now)
    server_token = format_token(digest, SERVER_USER, server_password)
    agent_token = format_token(digest, AGENT_USER, agent_password or server_password)
    next_command = hand_over(out_dir, staging or layout.server / "rotate-ca" / "incoming")
    messages = (
        f"Cross-signed CA certificates and keys are in {out_tls}",
        "Each CA: intermediate, new root cross-signed by the current CA, new self-signed root, "
        "then the current CA certificates",
        *notes,
        f"Token CA hash: {digest} (the server and agent tokens below use it)",
        f"Next: {next_command}  (the daemon checks the set, saves it to the datastore and "
        "restarts RKE2 node by node: etcd, control plane, agents; `rke2certd status` follows "
        "it). Nodes joined with the full token get the new one written by their daemon; give "
        "it to any other place that holds it",
    )
    log.info("ca_rotation_staged", staged_set=str(out_dir), ca_hash=digest)
    return GenerateResult(
        tuple(written), messages, digest, (), (), next_command, server_token, agent_token
    )


def _rotate_ca(
    ca: str, crt: bytes, key: bytes, now: datetime, ts: int, product: str, notes: list[str]
) -> tuple[bytes, bytes]:
    old_certs = load_bundle(crt, f"current {ca_cert_file(ca)}")
    old_keys = load_keys(key, f"current {ca_key_file(ca)}")
    signer_cert, signer_key = _current_signer(ca, old_certs, old_keys)
    kind = ca.removesuffix("-ca").replace("/", "-")
    taken = {common_name(c.subject) for c in old_certs}
    root_key, int_key = new_ec_key(), new_ec_key()
    root = build.self_signed_ca(
        _unique_cn(f"{product}-{kind}-root@{ts}", taken), root_key, now, days=ROTATION_DAYS
    )
    cross = build.signed_ca(
        root.subject, root_key.public_key(), signer_cert, signer_key, now, ROTATION_DAYS
    )
    inter = build.signed_ca(
        cn_name(_unique_cn(f"{product}-{kind}-ca@{ts}", taken)),
        int_key.public_key(),
        root,
        root_key,
        now,
        ROTATION_DAYS,
    )
    _require_room(ca, inter, cross, signer_cert, old_certs, now)
    new = [inter, cross, root]
    seen = {der(c) for c in new}
    kept = [c for c in old_certs if der(c) not in seen and c.not_valid_after_utc > now]
    kept = _without_broken_steps(ca, new, kept, now, notes)
    kept = _within_limit(ca, new, kept, old_certs, notes)
    return bundle_pem(new + kept), key_to_pem(int_key) + key_to_pem(root_key)


def _within_limit(
    ca: str,
    new: list[x509.Certificate],
    kept: list[x509.Certificate],
    old_certs: list[x509.Certificate],
    notes: list[str],
) -> list[x509.Certificate]:
    """Many rotations fill a bundle (each adds three certificates). Over the limit, keep the
    current certificates on the shortest paths from the current CA to a current root, as many
    paths as fit: the nearest generations. An older generation's CA is not needed there: its
    leaves were replaced by the last rollout, and a peer still holding one sends it along."""
    room = MAX_BUNDLE_CERTS - len(new)
    if len(kept) <= room:
        return kept
    roots = [c for c in old_certs if is_root_like(c)]
    others = [c for c in old_certs if not is_root_like(c)]
    chains = sorted(find_paths(old_certs[0], roots, others, signs_leaves=True).chains, key=len)
    kept_ders = {der(c) for c in kept}
    needed: set[bytes] = set()
    for chain in chains:
        wanted = needed | {der(c) for c in chain if der(c) in kept_ders}
        if len(wanted) > room:
            break
        needed = wanted
    if not needed:
        raise PKIError(
            f"the current {ca_cert_file(ca)} has no path from its CA to a root that fits "
            f"rotate-ca's limit of {MAX_BUNDLE_CERTS} certificates with the new ones: rotate "
            "to a new root with `certificate rotate-ca --force`"
        )
    pruned = [c for c in kept if der(c) in needed]
    notes.append(
        f"{ca}: left out {len(kept) - len(pruned)} certificate(s) of older CA generations "
        f"(the bundle would hold more than {MAX_BUNDLE_CERTS})"
    )
    return pruned


def _require_room(
    ca: str,
    inter: x509.Certificate,
    cross: x509.Certificate,
    signer: x509.Certificate,
    old_certs: list[x509.Certificate],
    now: datetime,
) -> None:
    """The new CA must verify against the current CA file alone, path lengths included; a
    current chain with no room below the signer (a pathlen limit) cannot take a new CA."""
    roots = [c for c in old_certs if is_root_like(c)]
    intermediates = [c for c in old_certs if not is_root_like(c)] + [cross]
    try:
        verify_chain(inter, roots, intermediates, None, signs_leaves=True)  # times: self-check
    except ChainError as exc:
        raise PKIError(
            f"cannot cross-sign a new {ca}: a CA below the current {describe_cert(signer)} "
            f"would not verify against the current {ca_cert_file(ca)} "
            f"({'; '.join(exc.reasons[:3])}). The current chain leaves no room for another CA "
            "(check `rke2certd certificate check` for leaves that already fail): make the new "
            "CA with the key of an issuer higher up (`rke2certd ca generate-custom` with "
            "root-ca.pem and its key), or load a new root with `certificate rotate-ca --force`"
        ) from exc


def _without_broken_steps(
    ca: str,
    new: list[x509.Certificate],
    kept: list[x509.Certificate],
    now: datetime,
    notes: list[str],
) -> list[x509.Certificate]:
    """The current certificates to keep, less those that would put a broken step (pathlen, not
    a CA) on a path from the new CA: a set taken before rotate-ca checked path lengths may hold
    one, and a client given the new bundle could follow it and fail."""
    while True:
        bundle = new + kept
        roots = [c for c in bundle if is_self_issued_root(c)]
        others = [c for c in bundle[1:] if not is_self_issued_root(c)]
        paths = find_paths(new[0], roots, others, now, signs_leaves=True)
        bad = {der(c) for c in paths.broken_issuers}
        dropped = [c for c in kept if der(c) in bad]
        if not dropped:
            return kept
        for cert in dropped:
            notes.append(
                f"{ca}: left out the current certificate {describe_cert(cert)}: its constraints "
                "break a path from the new CA"
            )
            log.warning("ca_rotation_cert_left_out", ca=ca, certificate=describe_cert(cert))
        kept = [c for c in kept if der(c) not in bad]


def _current_signer(
    ca: str, certs: list[x509.Certificate], keys: list[PrivateKey]
) -> tuple[x509.Certificate, PrivateKey]:
    """The current CA that cross-signs: its root when we hold that root's key (a CA rotated
    before: intermediate key, root key), else the first certificate (RKE2's self-signed CA, or
    a custom CA whose root key is offline)."""
    by_key = {public_der(k): k for k in keys}
    for cert in certs:
        key = by_key.get(public_der(cert.public_key()))
        if key is not None and is_self_signed(cert):
            return cert, key
    key = by_key.get(public_der(certs[0].public_key()))
    if key is None:
        raise PKIError(
            f"the current {ca_key_file(ca)} does not match the first certificate of "
            f"{ca_cert_file(ca)}; fix the current CA before rotating it"
        )
    return certs[0], key


def _unique_cn(cn: str, taken: set[str]) -> str:
    """A CN the current bundle does not use (two rotations within one second)."""
    out, n = cn, 1
    while out in taken:
        out, n = f"{cn}-{n}", n + 1
    return out


def stage_service_key(
    data_dir: Path, out_dir: Path, *, lock: bool = True, staging: Path | None = None
) -> GenerateResult:
    """A new RSA 2048 service-account key followed by the current keys, in out_dir/tls/."""
    layout = Layout(data_dir)
    out_tls = staging_tls(layout, out_dir)
    with maybe_locked(data_dir, lock):
        current = read_optional(layout.service_key)
        if current is None:
            raise PKIError(f"{layout.service_key} does not exist: is this an RKE2 server?")
        files = {SERVICE_KEY: prepend_service_key(current, str(layout.service_key))}
        written = write_staged(out_dir, files)
    next_command = hand_over(out_dir, staging or layout.server / "rotate-ca" / "incoming")
    messages = (
        f"New service-account key staged in {out_tls / 'service.key'} (current keys kept)",
        f"Next: {next_command}  (the daemon checks the set, saves it to the datastore and "
        "restarts RKE2 on every server in turn; agents and pods need not restart)",
    )
    log.info("service_key_staged", staged_set=str(out_dir))
    return GenerateResult(tuple(written), messages, next_command=next_command)
