"""Every path rke2certd touches under the data dir (docs/RKE2-COMPATIBILITY.md §3, §4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# CA name -> path relative to server/tls, without extension.
CA_NAMES = ("server-ca", "client-ca", "request-header-ca", "etcd/server-ca", "etcd/peer-ca")


@dataclass(frozen=True)
class Layout:
    data_dir: Path

    @property
    def server(self) -> Path:
        return self.data_dir / "server"

    @property
    def tls(self) -> Path:
        return self.server / "tls"

    @property
    def cred(self) -> Path:
        return self.server / "cred"

    @property
    def agent(self) -> Path:
        return self.data_dir / "agent"

    def ca_cert(self, ca: str) -> Path:
        return self.tls / f"{ca}.crt"

    def ca_key(self, ca: str) -> Path:
        return self.tls / f"{ca}.key"

    @property
    def service_key(self) -> Path:
        return self.tls / "service.key"

    @property
    def service_current_key(self) -> Path:
        return self.tls / "service.current.key"

    def nochain(self, ca: str) -> Path:
        return self.tls / f"{ca}.nochain.crt"

    @property
    def dynamic_cert_regenerate(self) -> Path:
        return self.tls / "dynamic-cert-regenerate"

    @property
    def force_restart(self) -> Path:
        return self.data_dir / "force-restart"

    @property
    def agent_server_ca(self) -> Path:
        return self.agent / "server-ca.crt"

    @property
    def agent_client_ca(self) -> Path:
        return self.agent / "client-ca.crt"

    def kubeconfig(self, name: str) -> Path:
        return self.cred / f"{name}.kubeconfig"

    def ca_files(self) -> list[Path]:
        """The ten CA files a custom CA set must provide (service.key is separate)."""
        out: list[Path] = []
        for ca in CA_NAMES:
            out += [self.ca_cert(ca), self.ca_key(ca)]
        return out
