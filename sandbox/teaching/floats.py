"""`sandbox floats`: what each number format stores for a value, and why.

For every (value, format) pair we cast the float64 value the way numpy and
ml_dtypes do (round to nearest, ties to even) and report the stored value,
its bit fields, the relative rounding error, and what went wrong:

- overflow: a finite value past the format's range became inf, or NaN for
  E4M3FN, which has no inf (numpy/ml_dtypes turn any float64 that rounds past
  448 into NaN, so an fp8 pipeline must clip before it casts);
- saturation: what a saturating (clip-then-cast) quantizer would store;
- underflow: a nonzero value rounded to zero (below half the smallest
  subnormal);
- subnormal: stored below the smallest normal, with fewer significant bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sandbox.teaching import print_table
from sandbox.teaching.formats import FloatFormat


@dataclass(frozen=True)
class FloatRow:
    """One value in one format."""

    value: float  # the input, as float64
    format: str  # format name
    stored: float  # the value the format holds (exact in float64)
    sign: str  # sign bit
    exponent: str  # exponent bits
    mantissa: str  # stored fraction bits
    rel_error: float  # |stored - value| / |value|; NaN when undefined (0, inf, NaN)
    overflow: bool  # finite input stored as inf or NaN
    saturated: float | None  # what a saturating cast stores when |value| > max
    underflow: bool  # nonzero input stored as zero
    subnormal: bool  # nonzero stored value below the smallest normal

    @property
    def flags(self) -> list[str]:
        out = []
        if self.overflow:
            out.append(f"overflow -> {'NaN (no inf)' if math.isnan(self.stored) else 'inf'}")
        if self.saturated is not None:
            out.append(f"saturating cast: {_number(self.saturated)}")
        if self.underflow:
            out.append("underflow -> 0")
        if self.subnormal:
            out.append("subnormal")
        return out


def analyze(value: float, fmt: FloatFormat) -> FloatRow:
    """Cast `value` to `fmt` and describe what was stored."""
    value = float(value)
    stored_raw = fmt.cast(value)
    stored = float(stored_raw)
    finite_in, finite_out = math.isfinite(value), math.isfinite(stored)
    if finite_in and value != 0 and finite_out:
        rel_error = abs(stored - value) / abs(value)
    else:
        rel_error = math.nan
    saturated = float(fmt.saturating_cast(value)) if finite_in and abs(value) > fmt.max else None
    sign, exponent, mantissa = fmt.bit_fields(stored_raw)
    return FloatRow(
        value=value,
        format=fmt.name,
        stored=stored,
        sign=sign,
        exponent=exponent,
        mantissa=mantissa,
        rel_error=rel_error,
        overflow=finite_in and not finite_out,
        saturated=saturated,
        underflow=value != 0 and stored == 0,
        subnormal=stored != 0 and finite_out and abs(stored) < fmt.smallest_normal,
    )


def analyze_all(values: Iterable[float], formats: Sequence[FloatFormat]) -> list[FloatRow]:
    """Rows for every value in every format, grouped by value."""
    return [analyze(v, f) for v in values for f in formats]


def format_rows(formats: Sequence[FloatFormat]) -> list[dict[str, object]]:
    """The properties `--table` prints, one dict per format."""
    return [
        {
            "format": f.name,
            "dtype": f.dtype.name,
            "bits": f.bits,
            "exponent": f.exponent_bits,
            "mantissa": f.mantissa_bits,
            "bias": f.exponent_bias,
            "max": f.max,
            "smallest normal": f.smallest_normal,
            "smallest subnormal": f.smallest_subnormal,
            "epsilon": f.epsilon,
            "inf": "yes" if f.has_inf else "no (overflow -> NaN)",
        }
        for f in formats
    ]


def _number(x: float) -> str:
    """Exact float64 text of a stored value; integers without '.0'."""
    if math.isfinite(x) and x == int(x) and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _with_power_of_two(x: float) -> str:
    """'0.0078125 = 2^-7' for powers of two: how the limits are defined."""
    mantissa, exponent = math.frexp(x)
    return f"{_number(x)} = 2^{exponent - 1}" if mantissa == 0.5 else _number(x)


def render_values(rows: Sequence[FloatRow]) -> None:
    headers = ("value", "format", "stored", "sign", "exponent", "mantissa", "rel. error", "flags")
    cells = [
        (
            _number(r.value), r.format, _number(r.stored), r.sign, r.exponent, r.mantissa,
            "-" if math.isnan(r.rel_error) else f"{r.rel_error:.2e}", ", ".join(r.flags),
        )
        for r in rows
    ]
    notes = ["Rounding is to nearest, ties to even; rel. error = |stored - value| / |value|."]
    if any(r.overflow and math.isnan(r.stored) for r in rows):
        notes.append(
            "E4M3FN has no inf: numpy/ml_dtypes cast values past max to NaN, "
            "so fp8 code clips to +/-max first (the saturating cast)."
        )
    if any(r.underflow or r.subnormal for r in rows):
        notes.append("Below the smallest normal, precision drops bit by bit; below half the smallest subnormal, 0.")
    print_table("What each format stores", headers, cells, notes)


def _power_of_two(x: float) -> str:
    """'2^-7' for a power of two (how the limits are defined), else 4 significant digits."""
    mantissa, exponent = math.frexp(x)
    return f"2^{exponent - 1}" if mantissa == 0.5 else f"{x:.4g}"


def render_formats(formats: Sequence[FloatFormat]) -> None:
    """One compact row per format (readable at 100 columns); exact decimal limits in the notes."""
    headers = ("format", "bits", "exp", "mant", "bias", "max", "min normal", "min subnormal", "epsilon", "inf")
    cells = [(f.name, str(f.bits), str(f.exponent_bits), str(f.mantissa_bits), str(f.exponent_bias),
              _power_of_two(f.max) if f.max > 1e6 else _number(f.max), _power_of_two(f.smallest_normal),
              _power_of_two(f.smallest_subnormal), _power_of_two(f.epsilon), "yes" if f.has_inf else "no: NaN")
             for f in formats]
    notes = [
        "epsilon: gap between 1 and the next value (2^-mantissa bits): the relative precision.",
        "dtypes and exact limits: " + "; ".join(
            f"{f.name} = {f.dtype.name}, epsilon {_with_power_of_two(f.epsilon)}, "
            f"min subnormal {_with_power_of_two(f.smallest_subnormal)}" for f in formats),
        "All values computed from ml_dtypes.finfo / numpy.finfo.",
    ]
    print_table("Floating-point formats", headers, cells, notes)
