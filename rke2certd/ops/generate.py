"""`ca generate-custom`, `ca stage-rotation`, `ca stage-service-key`: build CA sets to load.

Facts follow the example scripts RKE2 documents (docs/RKE2-COMPATIBILITY.md §9: K3s's
contrib/util/generate-custom-ca-certs.sh and rotate-default-ca-certs.sh); the code is ours. Two
upstream flaws are not copied: the rotation bundle puts the cross-signed root before the self-signed
one (OpenSSL-based clients that trust only the old CA need that order), and the printed token hash
follows RKE2's CA-hash rule instead of being the new intermediate's fingerprint.

Every set is written with `write_files` (all or nothing); keys 0600, certs 0644, dirs 0700.
Nothing is ever written into the in-use `<data>/server/tls`, except generate-custom on a fresh
node (no CA file there yet), which is how RKE2 takes custom CAs at its first start.
Results carry tokens in fields the CLI prints; they are never logged nor put in `messages`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from rke2certd.constants import DEFAULT_DATA_DIR
from rke2certd.errors import PKIError, UsageError
from rke2certd.log import log
from rke2certd.ops.staged_read import current_files
from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem, common_name, is_ca, is_self_signed, load_bundle
from rke2certd.pki.chain import (
    ChainError,
    der,
    describe_cert,
    find_paths,
    is_root_like,
    is_self_issued_root,
    verify_chain,
)
from rke2certd.pki.keys import (
    PrivateKey,
    key_to_pem,
    load_key,
    load_keys,
    new_ec_key,
    new_rsa_key,
    pem_blocks,
    public_der,
)
from rke2certd.pki.layout import CA_NAMES, Layout
from rke2certd.pki.token import AGENT_USER, SERVER_USER, ca_hash, format_token
from rke2certd.plan.staged_set import (
    MAX_BUNDLE_CERTS,
    ROTATABLE,
    SERVICE_KEY,
    StagedFile,
    StagedSet,
    ca_cert_file,
    ca_key_file,
    validate_staged_set,
)
from rke2certd.store.atomic import FileWrite, ensure_dir, read_optional, recover, write_files
from rke2certd.store.lock import node_lock

KEY_TYPES = ("rsa4096", "ecdsa-p256")
ROOT_DAYS = 7300
INTERMEDIATE_DAYS = 3700
CUSTOM_CA_DAYS = 3700
ROTATION_DAYS = 7300  # upstream's rotation script: root, cross-signed root and intermediate
# generate-custom's CA types, in upstream's order: file stem under tls/ (`etcd/peer` -> etcd/).
CUSTOM_TYPES = ("client", "server", "request-header", "etcd/peer", "etcd/server")
CERT_MODE, KEY_MODE, DIR_MODE = 0o644, 0o600, 0o700


@dataclass(frozen=True)
class GenerateResult:
    """What a command did and what the CLI prints (messages, then the tokens if any)."""

    written: tuple[Path, ...]
    messages: tuple[str, ...]
    ca_hash: str | None = None
    backup: tuple[Path, ...] = ()  # copy these somewhere safe …
    remove: tuple[Path, ...] = ()  # … then delete these from every cluster member
    next_command: str = ""
    server_token: str | None = field(default=None, repr=False)
    agent_token: str | None = field(default=None, repr=False)


# -- generate-custom -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: PrivateKey | None  # None: a reused root whose key stays offline


@dataclass(frozen=True)
class _Signer:
    cert: x509.Certificate
    key: PrivateKey


def generate_custom(
    out_dir: Path,
    now: datetime,
    key_type: str = "rsa4096",
    *,
    data_dir: Path = DEFAULT_DATA_DIR,
    product: str = "rke2",
) -> GenerateResult:
    """Upstream's generate-custom-ca-certs.sh into `out_dir` (a `tls` dir).

    Reuses `root-ca.pem` + `root-ca.key`, or `root-ca.pem` + `intermediate-ca.pem` +
    `intermediate-ca.key`, when present; else makes them (`key_type`: rsa4096 or ecdsa-p256).
    Writes the five P-256 CAs (`<type>-ca.pem`, `.key`, `.crt` = CA + intermediate + root) and
    `service.key` (a new RSA 2048 key first, the keys of an existing `out_dir/service.key` kept).
    `out_dir` may be the live `<data>/server/tls` only on a fresh node.
    """
    if key_type not in KEY_TYPES:
        raise UsageError(f"key type {key_type} is not supported; use one of {', '.join(KEY_TYPES)}")
    out = out_dir.resolve()
    live = out == Layout(data_dir).tls.resolve()
    with _node_lock(data_dir, live):  # the live dir is the node's: writers take its lock
        if live:
            _refuse_live_in_use(out)
        return _generate_custom(out, live, now, key_type, product)


def _generate_custom(
    out: Path, live: bool, now: datetime, key_type: str, product: str
) -> GenerateResult:
    ts = int(now.timestamp())
    messages: list[str] = []
    root, intermediate, writes = _root_and_intermediate(out, now, key_type, product, messages)
    server_bundle = b""
    for kind in CUSTOM_TYPES:
        key = new_ec_key()
        cn = f"{product}-{kind.replace('/', '-')}-ca@{ts}"
        days = _days_within(intermediate.cert, now, CUSTOM_CA_DAYS, cn, messages)
        cert = build.signed_ca(
            _cn_name(cn), key.public_key(), intermediate.cert, intermediate.key, now, days
        )
        bundle = bundle_pem([cert, intermediate.cert, root.cert])
        writes += [
            FileWrite(out / f"{kind}-ca.pem", bundle_pem([cert]), CERT_MODE),
            FileWrite(out / f"{kind}-ca.key", key_to_pem(key), KEY_MODE),
            FileWrite(out / f"{kind}-ca.crt", bundle, CERT_MODE),
        ]
        if kind == "server":
            server_bundle = bundle
    writes.append(FileWrite(out / "service.key", _service_key(out / "service.key"), KEY_MODE))
    written = _write_set(out, writes)
    digest = ca_hash(server_bundle, now)
    return _custom_result(out, live, written, digest, messages)


def _refuse_live_in_use(out: Path) -> None:
    in_use = [
        out / rel.removeprefix("tls/")
        for rel in ROTATABLE
        if (out / rel.removeprefix("tls/")).exists()
    ]
    if in_use:
        raise UsageError(
            f"{out} is the in-use server/tls and already holds {in_use[0].name} (and "
            f"{len(in_use) - 1} more CA files); generating there would replace the running "
            "cluster's CAs. Generate into a staging dir (e.g. --out /opt/rke2/server/tls, with "
            "root-ca.* and intermediate-ca.* copied there) and load it with "
            "`rke2certd certificate rotate-ca --path /opt/rke2/server`"
        )


def _root_and_intermediate(
    out: Path, now: datetime, key_type: str, product: str, messages: list[str]
) -> tuple[_Issuer, _Signer, list[FileWrite]]:
    root_pem, root_key = read_optional(out / "root-ca.pem"), read_optional(out / "root-ca.key")
    int_pem, int_key = (
        read_optional(out / "intermediate-ca.pem"),
        read_optional(out / "intermediate-ca.key"),
    )
    ts = int(now.timestamp())
    writes: list[FileWrite] = []
    if root_pem is None:
        for name, data in (
            ("root-ca.key", root_key),
            ("intermediate-ca.pem", int_pem),
            ("intermediate-ca.key", int_key),
        ):
            if data is not None:
                raise UsageError(
                    f"{out / name} exists but {out / 'root-ca.pem'} does not; provide the root "
                    "certificate too, or remove the file to generate a new root"
                )
        root = _new_root(f"{product}-root-ca@{ts}", key_type, now, writes, out)
        messages.append(f"Generated a root CA ({_key_words(key_type)}, {ROOT_DAYS} days)")
    else:
        root = _reuse_root(out, root_pem, root_key, now)
        messages.append(f"Using the existing root certificate {describe_cert(root.cert)}")
    if int_pem is None:
        if int_key is not None:
            raise UsageError(
                f"{out / 'intermediate-ca.key'} exists without intermediate-ca.pem; provide the "
                "certificate too, or remove the key to generate a new intermediate"
            )
        intermediate = _new_intermediate(root, out, now, key_type, product, writes, messages)
    else:
        intermediate = _reuse_intermediate(out, int_pem, int_key, root, now)
        messages.append(f"Using the existing intermediate {describe_cert(intermediate.cert)}")
    return root, intermediate, writes


def _new_root(cn: str, key_type: str, now: datetime, writes: list[FileWrite], out: Path) -> _Issuer:
    key = _new_key(key_type)
    cert = build.self_signed_ca(cn, key, now, days=ROOT_DAYS)
    writes += [
        FileWrite(out / "root-ca.pem", bundle_pem([cert]), CERT_MODE),
        FileWrite(out / "root-ca.key", key_to_pem(key), KEY_MODE),
    ]
    return _Issuer(cert, key)


def _reuse_root(out: Path, pem: bytes, key_pem: bytes | None, now: datetime) -> _Issuer:
    cert = load_bundle(pem, out / "root-ca.pem")[0]
    if not is_ca(cert):
        raise PKIError(f"{out / 'root-ca.pem'}: {describe_cert(cert)} is not a CA certificate")
    _require_valid(cert, now, out / "root-ca.pem")
    key = load_key(key_pem, out / "root-ca.key") if key_pem is not None else None
    if key is not None and public_der(key) != public_der(cert.public_key()):
        raise PKIError(f"{out / 'root-ca.key'} does not match {out / 'root-ca.pem'}")
    return _Issuer(cert, key)


def _new_intermediate(
    root: _Issuer,
    out: Path,
    now: datetime,
    key_type: str,
    product: str,
    writes: list[FileWrite],
    messages: list[str],
) -> _Signer:
    if root.key is None:
        raise UsageError(
            f"cannot make an intermediate CA without the root key: put root-ca.key in {out}, "
            "or provide intermediate-ca.pem and intermediate-ca.key"
        )
    cn = f"{product}-intermediate-ca@{int(now.timestamp())}"
    days = _days_within(root.cert, now, INTERMEDIATE_DAYS, cn, messages)
    key = _new_key(key_type)
    cert = build.signed_ca(_cn_name(cn), key.public_key(), root.cert, root.key, now, days)
    writes += [
        FileWrite(out / "intermediate-ca.pem", bundle_pem([cert]), CERT_MODE),
        FileWrite(out / "intermediate-ca.key", key_to_pem(key), KEY_MODE),
    ]
    messages.append(f"Generated an intermediate CA ({_key_words(key_type)}, {days} days)")
    return _Signer(cert, key)


def _reuse_intermediate(
    out: Path, pem: bytes, key_pem: bytes | None, root: _Issuer, now: datetime
) -> _Signer:
    where = out / "intermediate-ca.pem"
    if key_pem is None:
        raise UsageError(f"{where} needs its key: put intermediate-ca.key in {out}")
    cert = load_bundle(pem, where)[0]
    key = load_key(key_pem, out / "intermediate-ca.key")
    if public_der(key) != public_der(cert.public_key()):
        raise PKIError(f"{out / 'intermediate-ca.key'} does not match {where}")
    _require_valid(cert, now, where)
    verify_chain(cert, [root.cert], [], now)  # ChainError names what is wrong
    return _Signer(cert, key)


def _require_valid(cert: x509.Certificate, now: datetime, where: Path) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PKIError(
            f"{where}: {describe_cert(cert)} is not valid now "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )


def _days_within(
    issuer: x509.Certificate, now: datetime, wanted: int, cn: str, messages: list[str]
) -> int:
    """`wanted` days, cut so the new CA does not outlive its issuer (clients would drop it)."""
    # A minute of slack: certificate times drop sub-seconds, so a fresh issuer of the same
    # length looks a few microseconds short.
    if issuer.not_valid_after_utc >= now + timedelta(days=wanted) - timedelta(minutes=1):
        return wanted
    left = (issuer.not_valid_after_utc - now).days
    if left < 1:
        raise PKIError(f"{describe_cert(issuer)} expires within a day; renew it first")
    messages.append(
        f"{cn}: valid {left} days only, the remaining life of its issuer {describe_cert(issuer)}"
    )
    return left


def _custom_result(
    out: Path, live: bool, written: list[Path], digest: str, messages: list[str]
) -> GenerateResult:
    backup = tuple(
        out / n
        for n in ("root-ca.pem", "root-ca.key", "intermediate-ca.pem", "intermediate-ca.key")
        if (out / n).exists()
    )
    remove = tuple(p for p in backup if p.suffix == ".key")
    messages.append(f"CA certificate generation complete: the files are in {out}")
    messages.append(
        "Make a secure copy of these files, then remove the keys from every cluster member: "
        + ", ".join(str(p) for p in backup)
    )
    messages.append(f"Token CA hash (SHA-256 of the root certificate): {digest}")
    if live:
        next_command = "systemctl start rke2-server"
        messages.append("Start RKE2 for the first time: it takes these CAs at its first start")
    else:
        next_command = f"rke2certd certificate rotate-ca --path {out.parent}"
        if out.name != "tls":
            messages.append(f"rotate-ca reads DIR/tls/…: move {out} to a dir named tls first")
    messages.append(f"Next: {next_command}")
    log.info("custom_ca_generated", staged_set=str(out), ca_hash=digest)
    return GenerateResult(tuple(written), tuple(messages), digest, backup, remove, next_command)


# -- stage-rotation --------------------------------------------------------------------------


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
    out_tls = _staging_tls(layout, out_dir)
    with _node_lock(data_dir, lock):
        current = _require_current(layout)
        ts = int(now.timestamp())
        files: dict[str, bytes] = {}
        notes: list[str] = []
        for ca in CA_NAMES:
            crt, key = ca_cert_file(ca), ca_key_file(ca)
            files[crt], files[key] = _rotate_ca(
                ca, current[crt], current[key], now, ts, product, notes
            )
        files[SERVICE_KEY] = _prepend_service_key(current[SERVICE_KEY], SERVICE_KEY)
        _self_check(files, current, now)
        written = _write_staged(out_dir, files)
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
        _cn_name(_unique_cn(f"{product}-{kind}-ca@{ts}", taken)),
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


# -- stage-service-key -----------------------------------------------------------------------


def stage_service_key(
    data_dir: Path, out_dir: Path, *, lock: bool = True, staging: Path | None = None
) -> GenerateResult:
    """A new RSA 2048 service-account key followed by the current keys, in out_dir/tls/."""
    layout = Layout(data_dir)
    out_tls = _staging_tls(layout, out_dir)
    with _node_lock(data_dir, lock):
        current = read_optional(layout.service_key)
        if current is None:
            raise PKIError(f"{layout.service_key} does not exist: is this an RKE2 server?")
        files = {SERVICE_KEY: _prepend_service_key(current, str(layout.service_key))}
        written = _write_staged(out_dir, files)
    next_command = hand_over(out_dir, staging or layout.server / "rotate-ca" / "incoming")
    messages = (
        f"New service-account key staged in {out_tls / 'service.key'} (current keys kept)",
        f"Next: {next_command}  (the daemon checks the set, saves it to the datastore and "
        "restarts RKE2 on every server in turn; agents and pods need not restart)",
    )
    log.info("service_key_staged", staged_set=str(out_dir))
    return GenerateResult(tuple(written), messages, next_command=next_command)


# -- shared ----------------------------------------------------------------------------------


def _service_key(path: Path) -> bytes:
    """generate-custom: a new key first, then the keys of an existing service.key."""
    old = read_optional(path)
    return _prepend_service_key(old, str(path)) if old else key_to_pem(new_rsa_key(2048))


def _prepend_service_key(old: bytes, source: str) -> bytes:
    """A new RSA 2048 key, then every key of `old` (checked: RSA only), as PEM blocks."""
    for i, key in enumerate(load_keys(old, source), 1):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PKIError(f"{source}: key #{i} is not RSA; service.key holds only RSA keys")
    blocks = [b for b in pem_blocks(old, source) if b"PRIVATE KEY" in b.split(b"\n", 1)[0]]
    return key_to_pem(new_rsa_key(2048)) + b"".join(blocks)


def _new_key(key_type: str) -> PrivateKey:
    return new_rsa_key(4096) if key_type == "rsa4096" else new_ec_key()


def _key_words(key_type: str) -> str:
    return "RSA 4096" if key_type == "rsa4096" else "EC P-256"


def _cn_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def hand_over(out_dir: Path, staging: Path) -> str:
    """The command that gives a finished set to the daemon: a rename into its staging dir
    (the daemon takes a renamed-in dir as it is). Across file systems `mv` copies file by
    file, which the daemon must not take half-way: copy, then mark it READY last."""
    dest = staging / out_dir.name
    if _same_fs(out_dir, staging):
        return f"mv {out_dir} {dest}"
    return f"cp -a {out_dir} {dest} && touch {dest}/READY"


def _same_fs(a: Path, b: Path) -> bool:
    def dev(p: Path) -> int | None:
        for q in (p, *p.parents):
            try:
                return q.stat().st_dev
            except OSError:
                continue
        return None

    return dev(a) == dev(b)


def _staging_tls(layout: Layout, out_dir: Path) -> Path:
    """out_dir/tls, refused when it is (or out_dir is) the in-use server/tls."""
    live = layout.tls.resolve()
    out_tls = (out_dir / "tls").resolve()
    if live in (out_tls, out_dir.resolve()):
        raise UsageError(
            f"refusing to stage into {live}: it holds the CAs in use, and overwriting them "
            "there would break the cluster. Stage elsewhere, e.g. "
            f"--out {layout.server / 'rotate-ca'}"
        )
    return out_tls


@contextlib.contextmanager
def _node_lock(data_dir: Path, lock: bool) -> Iterator[None]:
    if not lock:
        yield
        return
    with node_lock(data_dir):
        yield


def _require_current(layout: Layout) -> dict[str, bytes]:
    current = current_files(layout.tls)
    missing = [rel for rel in ROTATABLE if not current.get(rel)]
    if missing:
        raise PKIError(
            f"the current CA data in {layout.tls} is incomplete ({', '.join(missing)} missing or "
            "empty); nothing to cross-sign with: run on a server that has started RKE2"
        )
    return current


def _self_check(files: Mapping[str, bytes], current: Mapping[str, bytes], now: datetime) -> None:
    """The staged set must pass rotate-ca's checks without --force; fail before writing."""
    staged = StagedSet({rel: StagedFile(rel, data, size=len(data)) for rel, data in files.items()})
    error = validate_staged_set(staged, current, now).error(force=False)
    if error is not None:
        raise PKIError(f"the set built would be rejected by rotate-ca, nothing written: {error}")


def _write_staged(out_dir: Path, files: Mapping[str, bytes]) -> list[Path]:
    writes = [
        FileWrite(out_dir / rel, data, KEY_MODE if rel.endswith(".key") else CERT_MODE)
        for rel, data in files.items()
    ]
    return _write_set(out_dir, writes)


def _write_set(root: Path, writes: list[FileWrite]) -> list[Path]:
    ensure_dir(root, DIR_MODE)
    recover(root)  # finish or undo a staging run that crashed half-way
    write_files(root, writes)
    return [w.path for w in writes]
