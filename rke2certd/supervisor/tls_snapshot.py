"""The endpoint's TLS material: one consistent snapshot of the CA files and a serving context.

The serving cert (CN `rke2`, O `rke2`, server auth, the server SANs, EC P-256, 365 days) is
issued from server-ca and kept in memory only: it reaches OpenSSL through an anonymous memfd, so
no key file is added beside RKE2's and nothing needs cleaning up. Agents pin the CA (by the
token's hash), not this cert, so a fresh one per start costs nothing. The CA files are checked by
stat signature at each use: after a renew or CA rotation rewrites them, the next connection gets
a cert, a bundle and a signer from the new files, with no restart (a set caught half-renamed
fails to load and the previous snapshot stays until it is whole).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from rke2certd.clock import Clock
from rke2certd.errors import Rke2certdError
from rke2certd.log import log
from rke2certd.ops.ca_material import CA, load_ca_set
from rke2certd.ops.node import Node
from rke2certd.pki import build, certs, keys
from rke2certd.pki.layout import Layout
from rke2certd.pki.profiles import server_sans

TLS_DAYS = 365
TLS_REISSUE_BEFORE = timedelta(days=30)  # a daemon up for a year gets a fresh serving cert

Stamp = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class Material:
    """One consistent snapshot: the CAs that sign, and a TLS context serving from server-ca."""

    stamp: Stamp
    cas: dict[str, CA]
    context: ssl.SSLContext
    tls_not_after: datetime


def stamp(layout: Layout) -> Stamp:
    """The CA files' stat signatures: a change in any of them means a new snapshot."""
    out: list[tuple[int, int, int] | None] = []
    for name in ("server-ca", "client-ca"):
        for path in (layout.ca_cert(name), layout.ca_key(name)):
            try:
                st = path.stat()
            except OSError:
                out.append(None)
                continue
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@contextlib.contextmanager
def _memfile(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read `data` from, without the bytes touching a disk."""
    fd = os.memfd_create("rke2certd-supervisor", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with _memfile(chain_pem) as cert_path, _memfile(key_pem) as key_path:
            context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:  # e.g. no /proc in this mount namespace
        raise Rke2certdError(f"cannot load the endpoint's serving certificate: {exc}") from exc
    return context


def load_material(node: Node, now: datetime) -> Material:
    """Read the CA files and issue a serving cert from server-ca (raises when unusable)."""
    first = stamp(node.layout)  # before reading: a change during the load shows up next time
    cas = load_ca_set(node.layout).cas
    server_ca = cas["server-ca"]
    key = keys.new_ec_key()
    cert = build.leaf(
        "rke2",
        ("rke2",),
        "server",
        server_sans(node.ident),
        key.public_key(),
        server_ca.cert,
        server_ca.key,
        now,
        TLS_DAYS,
    )
    context = _server_context(certs.bundle_pem([cert]) + server_ca.bundle, keys.key_to_pem(key))
    return Material(first, cas, context, certs.not_after(cert))


class TlsSnapshot:
    """The snapshot in use, replaced when the CA files change or the serving cert ages."""

    def __init__(self, node: Node, clock: Clock) -> None:
        self.node, self.clock = node, clock
        self._lock = threading.Lock()
        self._material = load_material(node, clock())
        self._failed_stamp: Stamp | None = None

    def current(self) -> Material:
        with self._lock:
            material, now = self._material, self.clock()
            seen = stamp(self.node.layout)
            fresh = now < material.tls_not_after - TLS_REISSUE_BEFORE
            if (seen == material.stamp or seen == self._failed_stamp) and fresh:
                return material
            try:
                self._material = load_material(self.node, now)
            except (Rke2certdError, OSError, ssl.SSLError) as exc:
                self._failed_stamp = seen  # retry only when the files change again
                log.warning(
                    "supervisor_reload_failed",
                    cert_path=str(self.node.layout.tls),
                    reason=f"{exc}; still serving the previous CA snapshot",
                )
                return material
            self._failed_stamp = None
            log.info(
                "supervisor_reloaded",
                cert_path=str(self.node.layout.tls),
                reason="CA files changed" if seen != material.stamp else "serving cert renewed",
                cert_not_after=self._material.tls_not_after.isoformat(),
            )
            return self._material

    def reload(self) -> None:
        """Load the CA files now (raises when they are unusable)."""
        material = load_material(self.node, self.clock())
        with self._lock:
            self._material, self._failed_stamp = material, None
