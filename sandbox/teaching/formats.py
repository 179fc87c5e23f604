"""Floating-point format registry: short names -> dtypes, properties computed.

Every property (bit widths, max, smallest normal/subnormal, epsilon, whether
inf exists) is derived from `ml_dtypes.finfo` (which defers to `numpy.finfo`
for fp16/fp32/fp64) or from an actual cast, never typed in, so the table the
teaching tools print and the limits the precision code uses cannot drift from
what the arrays really do.

E4M3 here is `float8_e4m3fn` ("finite"): it spends the inf encodings on more
finite values (max 448) and keeps one NaN pattern per sign, so numpy's cast of
anything past max rounds to NaN; fp8 training therefore clips to +/-max
before casting (a *saturating* cast). E5M2 is IEEE-like and overflows to inf.

Kept dependency-light (numpy, ml_dtypes): the precision engine imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from sandbox.errors import UserError


def _from_finfo(field: str, cast: type, doc: str = "") -> property:
    """A read-only property: `cast(ml_dtypes.finfo(dtype).<field>)`."""
    return property(lambda self: cast(getattr(self.finfo, field)), doc=doc)


@dataclass(frozen=True)
class FloatFormat:
    """One number format: its name, numpy dtype and a one-line description."""

    name: str  # short name used on the command line and in configs
    dtype: np.dtype  # numpy / ml_dtypes dtype that stores it
    description: str  # what it is and where it is used

    @property
    def finfo(self):
        return ml_dtypes.finfo(self.dtype)

    bits = _from_finfo("bits", int)
    exponent_bits = _from_finfo("nexp", int)
    mantissa_bits = _from_finfo("nmant", int, "Stored fraction bits (the leading 1 of normal numbers is implicit).")
    max = _from_finfo("max", float)
    smallest_normal = _from_finfo("smallest_normal", float)
    smallest_subnormal = _from_finfo("smallest_subnormal", float)
    epsilon = _from_finfo("eps", float, "Gap between 1 and the next larger value: 2**-mantissa_bits.")

    @property
    def exponent_bias(self) -> int:
        # The smallest normal exponent is 1 - bias for every format here.
        return int(1 - self.finfo.minexp)

    @property
    def has_inf(self) -> bool:
        return bool(np.isinf(self.cast(np.inf)))

    def cast(self, x) -> np.ndarray:
        """Round-to-nearest-even cast from float64, as numpy/ml_dtypes do it.

        Overflow to inf/NaN is a result here, not an accident: no warning.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(x, np.float64).astype(self.dtype)

    def saturating_cast(self, x) -> np.ndarray:
        """Clip to +/-max, then cast: what fp8 quantizers store (NaN stays NaN)."""
        return self.cast(np.clip(np.asarray(x, np.float64), -self.max, self.max))

    def bit_fields(self, stored) -> tuple[str, str, str]:
        """Sign, exponent and mantissa bit strings of one stored value."""
        word = int(np.asarray(stored, self.dtype).reshape(()).view(f"uint{self.bits}"))
        text = format(word, f"0{self.bits}b")
        return text[0], text[1 : 1 + self.exponent_bits], text[1 + self.exponent_bits :]


FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("fp64", np.dtype(np.float64), "IEEE double: numpy's default, references"),
        FloatFormat("fp32", np.dtype(np.float32), "IEEE single: master weights, losses"),
        FloatFormat("bf16", np.dtype(ml_dtypes.bfloat16), "bfloat16: fp32's range, 8 bits of precision"),
        FloatFormat("fp16", np.dtype(np.float16), "IEEE half: needs loss scaling"),
        FloatFormat("e4m3", np.dtype(ml_dtypes.float8_e4m3fn), "fp8 E4M3FN: forward activations/weights"),
        FloatFormat("e5m2", np.dtype(ml_dtypes.float8_e5m2), "fp8 E5M2: gradients (more range)"),
    )
}

# What the explorers show when no --formats is given.
DEFAULT_FORMATS = ("fp32", "bf16", "fp16", "e4m3", "e5m2")


def get_format(name: str) -> FloatFormat:
    """The format called `name`; UserError naming it (and the choices) if unknown."""
    try:
        return FORMATS[name.strip().lower()]
    except KeyError:
        raise UserError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}") from None


def parse_formats(spec: str) -> tuple[FloatFormat, ...]:
    """'fp32,bf16' -> the two formats, in that order."""
    names = [n for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"no formats in {spec!r}; choose from {', '.join(FORMATS)}")
    return tuple(get_format(n) for n in names)
