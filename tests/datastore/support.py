"""Helpers shared by the datastore tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rke2certd.datastore import Datastore, open_datastore
from tests.datastore.tls import EtcdPKI

Opener = Callable[[], Datastore]


def open_etcd(endpoint: str, pki: EtcdPKI, data_dir: Path, **overrides: Any) -> Datastore:
    """`open_datastore` with the test client cert; `overrides` replace any setting."""
    settings: dict[str, Any] = {
        "cafile": pki.client.ca,
        "certfile": pki.client.cert,
        "keyfile": pki.client.key,
        "timeout": 2.0,
    }
    return open_datastore(endpoint, data_dir=data_dir, **(settings | overrides))
