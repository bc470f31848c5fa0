"""The logger every module uses: `from rke2certd.log import log`, then structured events,
`log.info("cert_renewed", cert_path=..., cert_service="kubelet")` (lowercase snake-case names).

structlog and the set-up (`output.py`: formats and sinks; `journald.py`, `redact.py`) are
imported on the first event, not at start: the startup hook runs before every RKE2 start, and a
run with nothing to do logs nothing, so it should not pay for the logging stack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from rke2certd.constants import LogFormat

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

# (format, level) from setup(), applied at the first event.
_settings: list[tuple[LogFormat, str]] = []

# Called with (event, fields) for every event, whatever the log level: the daemon's metrics
# count what happened from the events the code logs anyway (rke2certd/daemon/metrics.py).
Observer = Callable[[str, dict[str, Any]], None]
_observers: list[Observer] = []
_EMITTERS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical"})


def add_observer(fn: Observer) -> None:
    _observers.append(fn)


def remove_observer(fn: Observer) -> None:
    with contextlib.suppress(ValueError):
        _observers.remove(fn)


def notify(event: str, **fields: Any) -> None:
    """Tell the observers about an event that is not logged (one per request, say)."""
    for fn in list(_observers):
        with contextlib.suppress(Exception):  # a metric must never break the work it counts
            fn(event, fields)


def setup(fmt: LogFormat, level: str) -> None:
    """Remember the log settings; they are applied when the first event is logged."""
    _settings[:] = [(fmt, level)]
    _Lazy.real = None


class _Lazy:
    real: Any = None

    def __getattr__(self, name: str) -> Any:
        if _Lazy.real is None:
            import structlog

            if _settings:
                # Imported at the first event for its cost (structlog); output.py does not
                # import this module.
                from rke2certd.log import output

                output.configure(*_settings[0])
            _Lazy.real = structlog.get_logger("rke2certd")
        method = getattr(_Lazy.real, name)
        if not _observers or (name not in _EMITTERS and name != "log"):
            return method
        if name == "log":  # log.log(level, event, ...)

            def emit_at(level: int, event: str, *args: Any, **fields: Any) -> Any:
                notify(event, **fields)
                return method(level, event, *args, **fields)

            return emit_at

        def emit(event: str, *args: Any, **fields: Any) -> Any:
            notify(event, **fields)
            return method(event, *args, **fields)

        return emit


log = cast("FilteringBoundLogger", _Lazy())
