"""Secrets never reach a log: a structlog processor that masks secret-named fields and any
PEM private key or join token inside a value, whatever the output format."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import PurePath
from typing import Any

from structlog.typing import EventDict, WrappedLogger

REDACTED = "[REDACTED]"

# A field whose name says "secret" is masked whatever its value. Names that only point at a
# secret (a path, a file name, a hash, a count...) stay readable: their values are still scanned.
_SECRET_NAME = re.compile(
    r"token|passw|passphrase|secret|private_?key|privkey|key_?pem|pem_?key|credential|"
    r"authorization|bearer|api_?key|^key$|_key$|^keys$|_keys$",
    re.IGNORECASE,
)
_HARMLESS_SUFFIX = re.compile(
    r"_(path|paths|file|files|dir|name|names|hash|type|id|count|usage|bits|algorithm|size|"
    r"fingerprint|valid|present|changed|expired)$",
    re.IGNORECASE,
)
# Any PEM private key block (PKCS#8, PKCS#1, SEC1, encrypted, OpenSSH), also when cut short.
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
# Join tokens, docs/RKE2-COMPATIBILITY.md §7: K10<64 hex>::<user>:<password>.
_JOIN_TOKEN = re.compile(r"K10[0-9a-fA-F]{64}::[^\s:]+:\S+")
_PEM_MASK = "[REDACTED PRIVATE KEY]"
_TOKEN_MASK = "K10[REDACTED TOKEN]"  # noqa: S105 - the mask, not a secret


def is_secret_name(name: str) -> bool:
    """True when a field called `name` must never be shown."""
    return bool(_SECRET_NAME.search(name)) and not _HARMLESS_SUFFIX.search(name)


def redact_text(text: str) -> str:
    """Mask PEM private keys and join tokens anywhere in `text`. A bare password (the short token
    form) cannot be recognised in free text: it is masked only as a secret-named field."""
    if "PRIVATE KEY-----" in text:
        text = _PEM_KEY.sub(_PEM_MASK, text)
    if "K10" in text:
        text = _JOIN_TOKEN.sub(_TOKEN_MASK, text)
    return text


def _redact_value(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
        masked = redact_text(text)
        return masked if masked != text else value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if depth >= 8:
        return redact_text(str(value))
    if isinstance(value, Mapping):
        return {
            str(k): (REDACTED if is_secret_name(str(k)) else _redact_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    # Anything else is rendered through str() by every sink: render it here so it is scanned.
    return redact_text(str(value))


def redact(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-named fields and secret-looking text in every value."""
    for key in list(event_dict):
        value = event_dict[key]
        if is_secret_name(key) and value is not None and not isinstance(value, bool):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(value)
    return event_dict
