"""Checking numbers where they enter (flags, target YAML, API arguments, agent requests).

One rule everywhere: a number is a real int or float (never a bool or a string), finite, and
inside its range; otherwise one ``UserError`` line that names the setting, the valid range and
what was given. Python's comparisons are false for NaN, so ``value > 0`` alone lets NaN through:
the finiteness test comes first.
"""

from __future__ import annotations

import math
from typing import Any

from deploy_prune.errors import UserError


def _range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, optional: bool = False) -> Any:
    """``value`` if it is a finite number (an integer when ``integer``) within the range, else a
    UserError such as ``--latency-ms must be a finite number > 0, got nan``. ``None`` passes
    when ``optional``."""
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a finite number"
    want = f"{name} must be {kind} {_range(lo, hi, lo_open, hi_open)}".rstrip()
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise UserError(f"{want}, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{want}, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise UserError(f"{want}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise UserError(f"{want}, got {value}")
    return value

