from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rke2certd.commands.stage_rotation import stage_rotation
from rke2certd.pki.layout import Layout

from .support import make_upstream_node


@pytest.fixture
def now() -> datetime:
    """The checks' clock, a minute ahead of the wall clock: openssl 3.0 cannot backdate, so the
    upstream-like CAs a test makes after this fixture ran start a second or two later than the
    wall clock read here, and a check at that time would find them not valid yet."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Path]:
    """An upstream-like node and a cross-signed set staged from it (shared: read-only use)."""
    root = tmp_path_factory.mktemp("rotated")
    layout = make_upstream_node(root / "data")
    out = root / "data" / "server" / "rotate-ca"
    stage_rotation(layout.data_dir, out, datetime.now(UTC), "secretpw")
    return layout, out / "tls"
