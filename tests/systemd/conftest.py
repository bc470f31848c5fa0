"""Fixtures of the systemd tests: the .deb (built once per session) and booted containers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.nspawn import missing_requirements

REPO = Path(__file__).resolve().parents[2]


def need_container() -> None:
    reason = missing_requirements()
    if reason:
        pytest.skip(f"systemd-nspawn container: {reason}")


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """packaging/build-deb.sh's output; RKE2CERTD_DEB=path reuses a package built before."""
    prebuilt = os.environ.get("RKE2CERTD_DEB")
    if prebuilt:
        return Path(prebuilt)
    need_container()  # root, and the tools this machine needs anyway
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    r = subprocess.run(
        ["bash", str(REPO / "packaging/build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"build-deb.sh failed:\n{r.stdout}\n{r.stderr}"
    deb = Path(r.stdout.strip().splitlines()[-1])
    print(f"built {deb.name} in {time.monotonic() - started:.1f}s")
    return deb
