"""What a command needs about the node: layout, identity, roles, and the safety checks."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from rke2certd.config import Config
from rke2certd.errors import StorageError
from rke2certd.pki.layout import Layout
from rke2certd.pki.profiles import NodeIdentity

SIOCGIFADDR = 0x8915


def default_route_ip() -> str | None:
    """The IPv4 address of the interface with the default route (RKE2's node-ip default)."""
    import fcntl
    import socket
    import struct

    try:
        with open("/proc/net/route") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            iface = fields[0]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    req = struct.pack("256s", iface.encode()[:15])
                    res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)
                except OSError:
                    return None
            return socket.inet_ntoa(res[20:24])
    return None


def identity(cfg: Config) -> NodeIdentity:
    node_ips = tuple(cfg.node_ip)
    if not node_ips:
        detected = default_route_ip()
        node_ips = (detected,) if detected else ()
    for ip in node_ips:
        ipaddress.ip_address(ip)  # validated early by config; guard the detected one
    return NodeIdentity(
        node_name=cfg.node,
        node_ips=node_ips,
        advertise_address=cfg.advertise_address,
        tls_sans=tuple(cfg.tls_san),
        cluster_domain=cfg.cluster_domain,
        service_cidrs=tuple(cfg.service_cidr),
    )


@dataclass(frozen=True)
class Node:
    cfg: Config
    layout: Layout
    ident: NodeIdentity

    @classmethod
    def from_config(cls, cfg: Config) -> Node:
        return cls(cfg, Layout(cfg.data_dir), identity(cfg))

    def key_dirs(self) -> list[Path]:
        """Every directory rke2certd writes keys into (they must not be writable by others)."""
        t = self.layout.tls
        return [
            self.layout.data_dir,
            self.layout.server,
            t,
            t / "etcd",
            t / "kube-scheduler",
            t / "kube-controller-manager",
            self.layout.cred,
            self.layout.agent,
        ]

    def write_dirs(self) -> list[Path]:
        """Every directory rke2certd writes into (recover looks for stray temps there),
        including the backups of `certificate rotate` (server/tls-<ts>/ and its subfolders)."""
        dirs = self.key_dirs()
        if self.layout.server.is_dir():
            for backup in sorted(self.layout.server.glob("tls-*")):
                if backup.is_dir() and not backup.is_symlink():
                    dirs += [backup, *sorted(d for d in backup.rglob("*") if d.is_dir())]
        return dirs


def check_dir_safety(paths: list[Path]) -> None:
    """Refuse to write keys into directories other users could write to."""
    problems = []
    for p in paths:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot inspect {p}: {exc.strerror}") from exc
        if st.st_mode & 0o022:
            problems.append(f"{p} is writable by group or others (mode {st.st_mode & 0o777:o})")
    if problems:
        raise StorageError(
            "refusing to write private keys: "
            + "; ".join(problems)
            + "; fix with chmod go-w and run again"
        )
