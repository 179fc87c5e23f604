"""Floats in JSON files and on screen: one convention for inf and NaN.

JSON has no inf or NaN, and the run's records (metrics.jsonl, summary.json,
failure bundles, replay reports) must hold them: a NaN loss is the very thing
forensics records. They are written as the strings Python prints for them
("nan", "inf", "-inf") and read back with `read_float`, which also takes the
spellings other tools write ("NaN", "Infinity"). Anything else that is not a
number reads as NaN, so a damaged value plots as a gap instead of crashing a
report.
"""

from __future__ import annotations

import math
from typing import Any


NONFINITE_WORDS = frozenset({"nan", "inf", "-inf"})  # what json_float writes


def json_float(v: Any) -> Any:
    """`v` unchanged unless it is a non-finite float, which becomes its string ("nan", "inf", "-inf")."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_float(v: Any) -> float:
    """A value written by `json_float` (or any number or numeric string) as a float; NaN when it is none."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def finite_or_none(v: Any) -> float | None:
    """A finite number as a float, else None (JSON null: "no value yet" for a watcher)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def show_value(v: Any) -> str:
    """A table cell: "-" for None, 4 significant digits for a finite float, "nan"/"inf" as such."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)
