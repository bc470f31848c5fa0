"""PURE: the metrics listen address (`metrics-address`): `host:port`, `[v6]:port`, or off."""

from __future__ import annotations

import ipaddress

OFF = ("", "off", "false", "no")


def parse_listen(value: str) -> tuple[str, int] | None:
    """(host, port), or None when the endpoint is off. ValueError says what is wrong."""
    text = value.strip()
    if text.lower() in OFF:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'{value!r} is not host:port (e.g. 127.0.0.1:9347), nor "" for off')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r}: the port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: the port must be 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(
                f"{value!r}: the host must be an IP address or localhost (the endpoint is "
                "meant for this node or a scraper on its network, not a name to resolve)"
            ) from None
    return host, port
