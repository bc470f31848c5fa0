"""A warning, once per file, when a file holding a secret can be read by others than its owner.

rke2certd reads the join token from its config, RKE2's config and drop-ins, and `token-file`,
and an agent's node password from its file. Any of them readable by group or others hands the
cluster's token (or the node's identity) to every local user. rke2certd does not change a file
it does not own the content of; it says so, once per file and mode, in an event an operator sees.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

_warned: set[tuple[str, int, int]] = set()
_lock = threading.Lock()


def exposed_mode(path: Path) -> int | None:
    """The file's permission bits when group or others may read or write it, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    bits = stat.S_IMODE(st.st_mode)
    return bits if bits & 0o066 else None


def warn_if_exposed(path: Path, what: str) -> bool:
    """Log `secret_file_exposed` for `path` when its mode lets others read it (once per file,
    inode and mode in this process). True when the file is exposed."""
    bits = exposed_mode(path)
    if bits is None:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (os.path.abspath(path), st.st_ino, bits)
    with _lock:
        if key in _warned:
            return True
        _warned.add(key)
    from rke2certd.log import log

    log.warning(
        "secret_file_exposed",
        path=str(path),
        mode=f"{bits:04o}",
        reason=f"{what} is readable or writable by group or others; run `chmod 600 {path}`",
    )
    return True


def mentions_token(data: bytes) -> bool:
    """A YAML config that sets a token at its top level (`token:` or `agent-token:`)."""
    for line in data.splitlines():
        stripped = line.split(b"#", 1)[0].rstrip()
        if stripped[:1] in (b" ", b"\t"):
            continue
        key = stripped.split(b":", 1)[0].strip().strip(b"\"'").rstrip(b"+")
        if key in (b"token", b"agent-token") and b":" in stripped:
            return True
    return False
