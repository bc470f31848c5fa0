"""`ca generate-custom`: a root and intermediate per CA (new, or the operator's own reused),
the leaves' CAs signed by them, written as one set (all or nothing) for RKE2 to take at its first
start or to stage for a rotation (docs/RKE2-COMPATIBILITY.md §9)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from rke2certd.commands.generate import (
    CERT_MODE,
    KEY_MODE,
    KEY_TYPES,
    GenerateResult,
    Issuer,
    Signer,
    cn_name,
    key_words,
    maybe_locked,
    new_key,
    read_service_key,
    write_set,
)
from rke2certd.constants import DEFAULT_DATA_DIR
from rke2certd.errors import PKIError, UsageError
from rke2certd.files.atomic import FileWrite, read_optional
from rke2certd.log import log
from rke2certd.pki import build
from rke2certd.pki.certs import bundle_pem, is_ca, load_bundle
from rke2certd.pki.chain import (
    describe_cert,
    verify_chain,
)
from rke2certd.pki.join_token import ca_hash
from rke2certd.pki.keys import (
    key_to_pem,
    load_key,
    new_ec_key,
    public_der,
)
from rke2certd.pki.layout import Layout
from rke2certd.plan.staged_set import (
    ROTATABLE,
)

ROOT_DAYS = 7300


INTERMEDIATE_DAYS = 3700


CUSTOM_CA_DAYS = 3700


# generate-custom's CA types, in upstream's order: file stem under tls/ (`etcd/peer` -> etcd/).
CUSTOM_TYPES = ("client", "server", "request-header", "etcd/peer", "etcd/server")


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
    with maybe_locked(data_dir, live):  # the live dir is the node's: writers take its lock
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
            cn_name(cn), key.public_key(), intermediate.cert, intermediate.key, now, days
        )
        bundle = bundle_pem([cert, intermediate.cert, root.cert])
        writes += [
            FileWrite(out / f"{kind}-ca.pem", bundle_pem([cert]), CERT_MODE),
            FileWrite(out / f"{kind}-ca.key", key_to_pem(key), KEY_MODE),
            FileWrite(out / f"{kind}-ca.crt", bundle, CERT_MODE),
        ]
        if kind == "server":
            server_bundle = bundle
    writes.append(FileWrite(out / "service.key", read_service_key(out / "service.key"), KEY_MODE))
    written = write_set(out, writes)
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
) -> tuple[Issuer, Signer, list[FileWrite]]:
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
        messages.append(f"Generated a root CA ({key_words(key_type)}, {ROOT_DAYS} days)")
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


def _new_root(cn: str, key_type: str, now: datetime, writes: list[FileWrite], out: Path) -> Issuer:
    key = new_key(key_type)
    cert = build.self_signed_ca(cn, key, now, days=ROOT_DAYS)
    writes += [
        FileWrite(out / "root-ca.pem", bundle_pem([cert]), CERT_MODE),
        FileWrite(out / "root-ca.key", key_to_pem(key), KEY_MODE),
    ]
    return Issuer(cert, key)


def _reuse_root(out: Path, pem: bytes, key_pem: bytes | None, now: datetime) -> Issuer:
    cert = load_bundle(pem, out / "root-ca.pem")[0]
    if not is_ca(cert):
        raise PKIError(f"{out / 'root-ca.pem'}: {describe_cert(cert)} is not a CA certificate")
    _require_valid(cert, now, out / "root-ca.pem")
    key = load_key(key_pem, out / "root-ca.key") if key_pem is not None else None
    if key is not None and public_der(key) != public_der(cert.public_key()):
        raise PKIError(f"{out / 'root-ca.key'} does not match {out / 'root-ca.pem'}")
    return Issuer(cert, key)


def _new_intermediate(
    root: Issuer,
    out: Path,
    now: datetime,
    key_type: str,
    product: str,
    writes: list[FileWrite],
    messages: list[str],
) -> Signer:
    if root.key is None:
        raise UsageError(
            f"cannot make an intermediate CA without the root key: put root-ca.key in {out}, "
            "or provide intermediate-ca.pem and intermediate-ca.key"
        )
    cn = f"{product}-intermediate-ca@{int(now.timestamp())}"
    days = _days_within(root.cert, now, INTERMEDIATE_DAYS, cn, messages)
    key = new_key(key_type)
    cert = build.signed_ca(cn_name(cn), key.public_key(), root.cert, root.key, now, days)
    writes += [
        FileWrite(out / "intermediate-ca.pem", bundle_pem([cert]), CERT_MODE),
        FileWrite(out / "intermediate-ca.key", key_to_pem(key), KEY_MODE),
    ]
    messages.append(f"Generated an intermediate CA ({key_words(key_type)}, {days} days)")
    return Signer(cert, key)


def _reuse_intermediate(
    out: Path, pem: bytes, key_pem: bytes | None, root: Issuer, now: datetime
) -> Signer:
    where = out / "intermediate-ca.pem"
    if key_pem is None:
        raise UsageError(f"{where} needs its key: put intermediate-ca.key in {out}")
    cert = load_bundle(pem, where)[0]
    key = load_key(key_pem, out / "intermediate-ca.key")
    if public_der(key) != public_der(cert.public_key()):
        raise PKIError(f"{out / 'intermediate-ca.key'} does not match {where}")
    _require_valid(cert, now, where)
    verify_chain(cert, [root.cert], [], now)  # ChainError names what is wrong
    return Signer(cert, key)


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
