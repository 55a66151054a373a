"""Reading and checking single config values, shared by every layer (data, adapters, models, reproduce).

Kept free of heavy imports (no torch, peft or RecBole), so a data module can check a key without pulling
in the adapter registry. ``adapters.registry`` re-exports :func:`option` and :func:`positive_int`."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["choice", "option", "positive_int"]


def option(config, key: str, default=None):
    """``config[key]``, or ``default`` when the config lacks the key or holds ``~`` there (never for a
    0 or False: those are values). Works on RecBole Configs and plain dicts."""
    value = config[key] if key in config else None
    return default if value is None else value


def positive_int(value, key: str) -> int:
    """``value``, refused unless a positive int (a 0 is a mistake to report, not "use the default")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}.")
    return value


def choice(value, choices: Iterable[str], key: str, hint: str = "", given=None) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``key``, the allowed values, what was
    given (``given``, default ``value``: pass the raw value when ``value`` is normalised) and ``hint``
    (where the key is set, what each value means)."""
    choices = list(choices)
    if value not in choices:
        raw = value if given is None else given
        allowed = ", ".join(map(str, choices))
        raise ValueError(f"{key} must be one of {allowed}, got {raw!r}{' ' + hint if hint else ''}.")
    return value
