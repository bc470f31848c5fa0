from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from rke2certd.ops.generate import stage_rotation
from rke2certd.pki.layout import Layout

from .support import make_upstream_node


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Path]:
    """An upstream-like node and a cross-signed set staged from it (shared: read-only use)."""
    root = tmp_path_factory.mktemp("rotated")
    layout = make_upstream_node(root / "data")
    out = root / "data" / "server" / "rotate-ca"
    stage_rotation(layout.data_dir, out, datetime.now(UTC), "secretpw")
    return layout, out / "tls"
