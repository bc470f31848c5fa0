"""The logger every module uses.

structlog (and the set-up in `logs.py`) is imported on the first event, not at start: the
startup hook runs before every RKE2 start, and a run with nothing to do logs nothing, so it
should not pay for the logging stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_settings: dict[str, str] = {}


def setup(fmt: str, level: str) -> None:
    """Remember the log settings; they are applied when the first event is logged."""
    _settings.update(fmt=fmt, level=level)
    _Lazy.real = None


class _Lazy:
    real: Any = None

    def __getattr__(self, name: str) -> Any:
        if _Lazy.real is None:
            import structlog

            if _settings:
                from rke2certd import logs

                logs.configure(_settings["fmt"], _settings["level"])  # type: ignore[arg-type]
            _Lazy.real = structlog.get_logger("rke2certd")
        return getattr(_Lazy.real, name)


log = cast("FilteringBoundLogger", _Lazy())
