"""Element and scale formats of the low-precision recipes, read from ml_dtypes.

A block-scaled number is `element * scale`. The element formats are tiny
floats (OCP OFP8 and the OCP MX v1.0 fp6/fp4 formats); the scale formats are
fp32 (per-tensor, per-row or per-tile scales of the fp8 recipes), E8M0 (the
power-of-two MX scale: 8 exponent bits, no sign, no mantissa, one NaN) and
E4M3 (NVFP4's block scale). Every constant here comes from
`ml_dtypes.finfo`, never typed in, so a format is only ever described once.

Storage. XLA:CPU in this jaxlib cannot compile a convert to the fp6 types
(E2M3, E3M2: "Failed to translate module to LLVM IR"), so inside jit fp6
elements are rounded in the value domain (rounding.py) and held in the fp8
type that contains every fp6 value exactly (E2M3 in E4M3: same 3 mantissa
bits, wider exponent; E3M2 in E5M2). `storage` names that type; for every
other format it is the format itself. Converting a stored element to the fp6
dtype on the host (`np.asarray(q).astype(fmt.dtype)`) is exact.

`emax` is the exponent of the largest normal power of two (8 for E4M3,
15 for E5M2, 2 for E2M3 and E2M1, 4 for E3M2): the OCP MX scale rule
subtracts it from the block's exponent so the largest element lands in the
top binade of the element format.
"""

from dataclasses import dataclass

import jax.numpy as jnp
import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Format:
    """A floating-point storage format: its dtype and range constants."""

    name: str
    dtype: np.dtype
    max: float  # largest finite value
    min_normal: float  # smallest positive normal
    min_subnormal: float  # smallest positive value (== min_normal if none)
    mantissa_bits: int  # stored fraction bits
    emin: int  # exponent of min_normal
    emax: int  # exponent of the largest normal power of two
    has_nan: bool
    storage: np.dtype  # dtype holding the elements inside jit (see Storage)


def _format(name: str, dtype, storage=None) -> Format:
    info = ml_dtypes.finfo(dtype)
    return Format(
        name=name,
        dtype=np.dtype(dtype),
        max=float(info.max),
        min_normal=float(info.smallest_normal),
        min_subnormal=float(info.smallest_subnormal),
        mantissa_bits=int(info.nmant),
        emin=int(np.log2(float(info.smallest_normal))),
        emax=int(np.floor(np.log2(float(info.max)))),
        has_nan=bool(np.isnan(np.array(np.nan, np.float32).astype(dtype).astype(np.float32))),
        storage=np.dtype(storage or dtype),
    )


E4M3 = _format("e4m3", ml_dtypes.float8_e4m3fn)
E5M2 = _format("e5m2", ml_dtypes.float8_e5m2)
E2M3 = _format("e2m3", ml_dtypes.float6_e2m3fn, storage=ml_dtypes.float8_e4m3fn)
E3M2 = _format("e3m2", ml_dtypes.float6_e3m2fn, storage=ml_dtypes.float8_e5m2)
E2M1 = _format("e2m1", ml_dtypes.float4_e2m1fn)
E8M0 = _format("e8m0", ml_dtypes.float8_e8m0fnu)
FP32 = _format("fp32", np.float32)

ELEMENT_FORMATS = {f.name: f for f in (E4M3, E5M2, E2M3, E3M2, E2M1)}
SCALE_FORMATS = {f.name: f for f in (FP32, E8M0, E4M3)}

# jnp exposes the same ml_dtypes types; checked once so a mismatch fails at import.
assert jnp.dtype(jnp.float4_e2m1fn) == E2M1.dtype and jnp.dtype(jnp.float8_e8m0fnu) == E8M0.dtype


def element_format(name: str) -> Format:
    return ELEMENT_FORMATS[name]


def scale_format(name: str) -> Format:
    return SCALE_FORMATS[name]
