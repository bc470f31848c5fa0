"""A real TLS handshake between a Python `ssl` server (in a thread) and a Python `ssl` client.

Python's ssl is OpenSSL, so this is what curl and every OpenSSL-based client decide:

    result = handshake(ServerSide(chain_file, key_file, client_ca=None),
                       ClientSide(trust_file, cert=None, key=None))
    assert result.ok, result.error

`chain_file` is the leaf followed by its chain (as RKE2 writes leaf files). With `client_ca` the
server requires a client certificate verified against that file.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
_REPLY = b"hello over tls"


@dataclass(frozen=True)
class ServerSide:
    chain: Path  # leaf + chain PEM
    key: Path
    client_ca: Path | None = None  # set: client certs required and verified against it


@dataclass(frozen=True)
class ClientSide:
    trust: Path  # the only trust anchors
    cert: Path | None = None  # leaf + chain PEM presented to the server
    key: Path | None = None
    server_name: str = "localhost"
    strict: bool = False  # VERIFY_X509_STRICT, as Python 3.13+ sets by default


@dataclass(frozen=True)
class HandshakeResult:
    ok: bool
    client_error: str | None
    server_error: str | None

    @property
    def error(self) -> str:
        return f"client: {self.client_error}; server: {self.server_error}"


def handshake(server: ServerSide, client: ClientSide, timeout: float = 10.0) -> HandshakeResult:
    """One connection; ok only when both sides verified the other and data went through."""
    listener = socket.create_server((HOST, 0))
    listener.settimeout(timeout)
    port = listener.getsockname()[1]
    errors: dict[str, str] = {}
    thread = threading.Thread(target=_serve, args=(listener, server, errors), daemon=True)
    thread.start()
    client_error = None
    try:
        if _client(port, client, timeout) != _REPLY:
            client_error = "no reply from the server"
    except (OSError, ssl.SSLError) as exc:
        client_error = f"{type(exc).__name__}: {exc}"
    finally:
        thread.join(timeout)
        listener.close()
    server_error = errors.get("server")
    ok = client_error is None and server_error is None
    return HandshakeResult(ok, client_error, server_error)


def _serve(listener: socket.socket, side: ServerSide, errors: dict[str, str]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(side.chain), str(side.key))
    if side.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(side.client_ca))
    try:
        conn, _ = listener.accept()
    except OSError as exc:
        errors["server"] = f"accept: {exc}"
        return
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(_REPLY)
    except (OSError, ssl.SSLError) as exc:
        errors["server"] = f"{type(exc).__name__}: {exc}"


def _client(port: int, side: ClientSide, timeout: float) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks
    ctx.load_verify_locations(cafile=str(side.trust))
    if side.strict:
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if side.cert is not None:
        ctx.load_cert_chain(str(side.cert), str(side.key) if side.key else None)
    with (
        socket.create_connection((HOST, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=side.server_name) as tls,
    ):
        data = b""
        while len(data) < len(_REPLY):
            chunk = tls.recv(len(_REPLY) - len(data))
            if not chunk:
                break
            data += chunk
        return data
