"""The JSON shape of datastore values on the endpoint's cluster route (`POST /v1-rke2/cluster`).

Keys and values are base64 (values are bytes; keys may be any bytes another etcd client wrote),
revisions and leases plain integers. Shared by the server (`cluster_api`) and the agent's
`RemoteDatastore`, so that both sides read what the other wrote.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from rke2certd.datastore.base import KV, Event, EventType, Snapshot, key_bytes, key_str

MAX_WATCH_SECONDS = 25.0  # one long poll; the client's read timeout is longer
# When a server holds as many long polls as it will, it answers a watch at once with what has
# changed and this many seconds to wait before asking again: the agent polls until a place
# frees up, and no change is lost (it asks again from the same revision).
BUSY_RETRY_SECONDS = 10.0
# A refusal the client acts on carries a code in this header (the text is for people):
ERROR_HEADER = "rke2certd-Error"
LEASE_NOT_FOUND = "lease-not-found"  # the lease expired, was revoked, or is not this node's


class WireError(ValueError):
    """A malformed document (the server answers 400; the client treats it as unreachable)."""


def loads(data: bytes, max_depth: int) -> Any:
    """JSON from an untrusted peer: too deep a document is a WireError, never a RecursionError.

    Parsed first, then measured: the parser (C) stops at the interpreter's recursion limit with
    a RecursionError, caught here, so a bracket bomb costs a bounded parse. Measuring the
    parsed containers takes a step per list or object; a scan of the text before parsing
    walked every byte in Python: tens of milliseconds for a fleet's answer, at every read."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise WireError(f"the JSON nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise WireError(f"the body is not JSON ({str(exc)[:100]})") from None
    if container_depth(doc, max_depth) > max_depth:
        raise WireError(f"the JSON nests deeper than {max_depth} levels")
    return doc


def container_depth(doc: Any, limit: int) -> int:
    """How deep the lists and dicts of a parsed document nest (without recursion), counted
    up to the first level beyond `limit`."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        item, level = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, level)
        if level > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise WireError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{what} is not valid base64") from None


def key_out(key: str) -> str:
    return b64(key_bytes(key))


def key_in(text: object, what: str = "key") -> str:
    return key_str(unb64(text, what))


def integer(value: object, what: str, *, low: int = 0, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise WireError(f"{what} must be an integer >= {low}")
    return value


def kv_out(kv: KV) -> dict[str, Any]:
    return {
        "key": key_out(kv.key),
        "value": b64(kv.value),
        "mod_revision": kv.mod_revision,
        "create_revision": kv.create_revision,
        "lease": kv.lease,
    }


def kv_in(doc: object) -> KV:
    if not isinstance(doc, dict):
        raise WireError("a key-value must be an object")
    return KV(
        key_in(doc.get("key")),
        unb64(doc.get("value"), "value"),
        integer(doc.get("mod_revision"), "mod_revision") or 0,
        integer(doc.get("create_revision"), "create_revision") or 0,
        integer(doc.get("lease"), "lease", optional=True) or None,
    )


def snapshot_out(snap: Snapshot) -> dict[str, Any]:
    return {"kvs": [kv_out(kv) for kv in snap.kvs], "revision": snap.revision}


def snapshot_in(doc: object) -> Snapshot:
    if not isinstance(doc, dict) or not isinstance(doc.get("kvs"), list):
        raise WireError("a snapshot must be an object with a kvs list")
    return Snapshot([kv_in(kv) for kv in doc["kvs"]], integer(doc.get("revision"), "revision") or 0)


def keys_in(doc: object) -> list[str]:
    if not isinstance(doc, list):
        raise WireError("keys must be a list")
    return [key_in(k) for k in doc]


def events_out(events: list[Event]) -> list[dict[str, Any]]:
    return [{"type": e.type.value, "kv": kv_out(e.kv)} for e in events]


def events_in(doc: object) -> list[Event]:
    if not isinstance(doc, list):
        raise WireError("events must be a list")
    out = []
    for item in doc:
        if not isinstance(item, dict) or item.get("type") not in ("PUT", "DELETE"):
            raise WireError("an event must be an object with type PUT or DELETE")
        out.append(Event(EventType(item["type"]), kv_in(item.get("kv"))))
    return out
