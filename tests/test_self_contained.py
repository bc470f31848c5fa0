"""The repository stands alone: no file points at documents a clone does not have.

The RKE2 facts rke2certd relies on live in docs/RKE2-COMPATIBILITY.md; code, tests and docs
cite that file, never a spec kept outside the repository. The phrases below are built from
parts so that this file does not match itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = (
    "../" + "shared",  # the directory the specs came from
    "RKE2-" + "PKI.md",  # the old spec of RKE2's facts
    "seed-" + "certificate-management",  # the documentation page it was written from
    "the " + "seed",  # that page, as prose cited it (write "random seed" for an RNG)
)
_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__"}


def tracked_files() -> list[Path]:
    """The files git tracks; in an unpacked tree without git, every file but caches."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not _SKIP_DIRS & set(p.relative_to(ROOT).parts)
        ]
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_file_points_outside_the_repository() -> None:
    files = tracked_files()
    assert any(p.name == "RKE2-COMPATIBILITY.md" for p in files), "file list looks wrong"
    wanted = [w.lower() for w in FORBIDDEN]
    found = []
    for path in files:
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        text = path.read_bytes().decode("utf-8", errors="replace").lower()
        for lineno, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{lineno}: {w!r}" for w in wanted if w in line]
    assert not found, (
        "files cite documents outside this repository; cite docs/RKE2-COMPATIBILITY.md §n "
        "(or add the fact there) instead:\n" + "\n".join(found)
    )
