"""The read side of the bootstrap key: the configured server token, the bootstrap files on disk,
the datastore value decrypted with the token (and encrypted back), and the reconcile plan of
disk against a value. Nothing here writes; `commands/bootstrap_write.py` does."""

from __future__ import annotations

from pathlib import Path

from rke2certd.config import Config
from rke2certd.datastore.codec import (
    BOOTSTRAP_FIELDS,
    BootstrapFile,
    decode_bootstrap,
    decrypt,
    encode_bootstrap,
    encrypt,
)
from rke2certd.errors import ConfigError
from rke2certd.files.atomic import read_optional
from rke2certd.files.exposure import exposed_mode, mentions_token, warn_if_exposed
from rke2certd.pki.layout import Layout
from rke2certd.plan.reconcile import DiskFile, ReconcilePlan, Stored, reconcile


def configured_token(cfg: Config, layout: Layout) -> str | None:
    """The server token: `token`, then `token-file`, then `<data>/server/token`. A file that
    holds it and that others may read is warned about (files/exposure.py)."""
    if cfg.token:
        _warn_exposed_configs(cfg)
        return cfg.token.strip()
    if cfg.token_file:
        warn_if_exposed(cfg.token_file, "the token file (token-file)")
        try:
            return cfg.token_file.read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                "cannot read the token file", [f"token-file {cfg.token_file}: {exc.strerror}"]
            ) from exc
    saved = read_optional(layout.server / "token")
    if saved:
        warn_if_exposed(layout.server / "token", "the server token file")
    return saved.decode().strip() if saved else None


def _warn_exposed_configs(cfg: Config) -> None:
    for path in cfg.sources:
        if exposed_mode(path) is None:
            continue
        try:
            if mentions_token(path.read_bytes()):
                warn_if_exposed(path, "a config file that holds the join token")
        except OSError:
            continue


def read_disk(layout: Layout) -> dict[str, DiskFile | None]:
    out: dict[str, DiskFile | None] = {}
    for name, rel in BOOTSTRAP_FIELDS.items():
        path = layout.server / rel
        try:
            st = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:
            out[name] = None
            continue
        out[name] = DiskFile(data, st.st_mtime_ns) if data else None
    return out


def disk_bootstrap(layout: Layout) -> dict[str, BootstrapFile]:
    """The bootstrap fields present on disk, stamped with their mtimes (as upstream does)."""
    out: dict[str, BootstrapFile] = {}
    for name, rel in BOOTSTRAP_FIELDS.items():
        path = layout.server / rel
        try:
            data = path.read_bytes()
            mtime_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        if data:
            out[name] = BootstrapFile.from_unix_ns(mtime_ns, data)
    return out


def _tls_empty(layout: Layout) -> bool:
    def empty(d: Path) -> bool:
        return not d.is_dir() or not any(d.iterdir())

    return empty(layout.tls) or empty(layout.tls / "etcd")


def plan_extract(layout: Layout, files: dict[str, BootstrapFile]) -> ReconcilePlan:
    # Only the fields that are files here: a field a later RKE2 added has no path to compare
    # (it is kept in the datastore, never written, never a change of this node).
    stored = {
        name: Stored(f.content, f.unix_ns) for name, f in files.items() if name in BOOTSTRAP_FIELDS
    }
    paths = {name: str(layout.server / rel) for name, rel in BOOTSTRAP_FIELDS.items()}
    return reconcile(stored, read_disk(layout), paths, _tls_empty(layout))


def save_value(password: str, files: dict[str, BootstrapFile]) -> bytes:
    return encrypt(password, encode_bootstrap(files))


def load_value(password: str, value: bytes) -> dict[str, BootstrapFile]:
    return decode_bootstrap(decrypt(password, value))
