"""The datastore: RKE2's bootstrap codec and an etcd-shaped store (embedded SQLite or etcd).

`open_datastore` picks the backend from RKE2's `datastore-endpoint` setting.
"""

from __future__ import annotations

from pathlib import Path

from rke2certd.datastore.base import (
    KV,
    Datastore,
    DatastoreUnavailable,
    Event,
    EventType,
    LeaseNotFound,
    OutcomeUnknown,
    Snapshot,
    WatchCompacted,
)
from rke2certd.datastore.retry import CLI_ATTEMPTS
from rke2certd.datastore.sqlite import DEFAULT_RELATIVE_PATH, SQLiteDatastore
from rke2certd.errors import ConfigError

__all__ = [
    "KV",
    "Datastore",
    "DatastoreUnavailable",
    "Event",
    "EventType",
    "LeaseNotFound",
    "OutcomeUnknown",
    "SQLiteDatastore",
    "Snapshot",
    "WatchCompacted",
    "open_datastore",
    "sqlite_path",
]

SQLITE_SCHEME = "sqlite://"
SUPPORTED = (
    "rke2certd supports only SQLite (empty, or sqlite://<path>) and etcd "
    "(https://host:2379[,https://host2:2379...])"
)


def sqlite_path(endpoint: str, data_dir: Path) -> Path:
    """`` or `sqlite://` -> the default file; `sqlite:///abs` -> /abs; `sqlite://rel` -> under
    data_dir."""
    rest = endpoint.strip()[len(SQLITE_SCHEME) :] if endpoint.strip() else ""
    if "?" in rest:
        raise ConfigError(
            "datastore-endpoint is not usable",
            [f"'{endpoint}': rke2certd's SQLite endpoint takes a path and no ?parameters"],
        )
    return data_dir / (rest or DEFAULT_RELATIVE_PATH)  # an absolute `rest` replaces data_dir


def open_datastore(
    endpoint: str,
    *,
    data_dir: Path,
    cafile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    timeout: float = 5.0,
    attempts: int = CLI_ATTEMPTS,
) -> Datastore:
    """Open the store named by `datastore-endpoint`; an etcd store is checked to answer now,
    so a dead etcd fails here, fast (`attempts` tries), with a message saying what to check."""
    text = endpoint.strip()
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if not text or scheme == "sqlite":
        return SQLiteDatastore(sqlite_path(text, data_dir))
    if scheme in ("http", "https"):
        # Imported here: requests and etcd3gw cost ~85 ms, which a SQLite renew need not pay.
        from rke2certd.datastore.etcd import EtcdDatastore

        store = EtcdDatastore(
            [text],
            cafile=cafile,
            certfile=certfile,
            keyfile=keyfile,
            timeout=timeout,
            attempts=attempts,
        )
        try:
            store.ping()
        except BaseException:
            store.close()
            raise
        return store
    # show the scheme only: a mysql/postgres DSN carries a password
    shown = f"{scheme}://..." if "://" in text else ("..." if "@" in text else text)
    raise ConfigError("datastore-endpoint is not supported", [f"'{shown}': {SUPPORTED}"])
