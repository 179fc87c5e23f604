"""quantize / dequantize / fake_quant for every OperandSpec: plain, jittable jnp.

    q, scales = quantize(x, spec, axis=-1, amax=None, scale=None, key=None)
    wide      = dequantize(q, scales, spec, axis=-1)      # q * scales, sliced back
    wide      = fake_quant(x, spec, ...)                   # the two in one

`q` has x's shape in the element dtype; `scales` is `Scales(block, tensor)`:
`block` has one decode scale per group (shape `xb.shape[:-1]` of
`layout.blocked`), `tensor` the fp32 second-level scale (1 unless
`spec.tensor_scale`). Decode scales everywhere: dequantize multiplies by them.

Three scale rules, by `spec.scale`:

fp32 (fp8 recipes: tensor, row, 1xN tile, NxN block). Exactly fp8.py's rule,
per group, through fp8.py's own functions: scale = max / (2**margin * amax)
(kept at 1 where amax is 0 or non-finite), q = fp8(clip(x * scale)) in the
compute dtype, decode = 1/scale. With `amax="delayed"` the caller passes the
fp32 `scale` from its FP8_META state and the result is bit-identical to
`fp8.qdq`; with "current" the amax is this tensor's (or `amax=`, e.g. one
already max-reduced across devices, tensor granularity only).

e8m0 (MX, OCP MX v1.0 section 6.3). Per block of 32:
    shared_exp = floor(log2(amax)) - emax_elem     ("floor", the spec)
               | ceil(log2(fp32(amax * fp32(1 / max_elem))))  ("ceil": NVIDIA's
                 MXFP8 recipe and jax.nn.scaled_dot_general; never saturates;
                 a ratio below 2**-126 gives -127, as XLA flushes it)
    shared_exp clamped to E8M0's [-127, 127]; X = 2**shared_exp
    q = round_to_nearest_even(clip(x / X, +-max_elem))
Choices where the spec leaves room: amax = 0 gives X = 2**-127 (the smallest
E8M0; all elements are 0). A block holding NaN or +-Inf gets X = NaN (E8M0's
one NaN, 0xFF) and zero elements, so the whole block decodes to NaN, as the
spec says of a NaN scale; fp4/fp6 elements have no NaN to carry it. x / X is
done as two power-of-two multiplies so no subnormal constant (2**-127) is
ever formed: XLA on CPU and GPU flushes fp32 subnormals, so fp32-subnormal
inputs count as zero here (and in the test reference).

e4m3 with tensor_scale (NVFP4). One fp32 tensor scale and one E4M3 scale per
16 elements (tile) or 16x16 square (block):
    t  = amax_tensor / (6 * 448)       (1 if that is 0 or not finite; amax over
                                        the finite elements, or `amax=`)
    u  = x * fp32(1 / t)
    s  = e4m3(min(max|u| * fp32(1/6), 448))   per group, round to nearest even
    q  = round(clip(u * fp32(1 / s), +-6))     0 where s == 0
    x ~= q * s * t
s is amax_block / 6 / t. Every division of a tensor is written as a multiply
by an fp32 reciprocal, because that is what XLA compiles it to anyway (its
algebraic simplifier turns `x / broadcast(d)` into `x * broadcast(1 / d)`):
written out, the rounding is explicit, the numpy reference can follow it,
and it is exactly what jax.nn.scaled_dot_general's `x / global_scale`,
`amax / 6`, `x / block_scale` compile to, so the two agree bit for bit.
A group holding NaN/Inf gets s = NaN, like MX.

Rounding is `spec.rounding`: nearest-even, or stochastic with `key` (the key
must differ per tensor and step; see recipe.rounding_key).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sandbox.precision import fp8
from sandbox.precision.recipes.formats import E4M3, E8M0, element_format
from sandbox.precision.recipes.layout import blocked
from sandbox.precision.recipes.recipe import OperandSpec
from sandbox.precision.recipes.rounding import round_to

NVFP4_TENSOR_DIVISOR = 6.0 * 448.0  # E2M1 max times E4M3 max
E8M0_BIAS = 127


class Scales(NamedTuple):
    """Decode scales: x ~= q * block (broadcast per group) * tensor."""

    block: jax.Array
    tensor: jax.Array


def _group_amax(xb):
    return jnp.max(jnp.abs(xb.astype(jnp.float32)), axis=-1)


def _pow2(exponent):
    """2**exponent for exponent in [-127, 127] without a subnormal constant."""
    half = exponent // 2
    return jnp.ldexp(jnp.float32(1.0), half), jnp.ldexp(jnp.float32(1.0), exponent - half)


def _times_pow2(x, exponent):
    first, second = _pow2(exponent)
    return (x * first) * second


# ---- fp32 scales (fp8 recipes) --------------------------------------------


def _quantize_fp32(xb, spec, fmt, amax, scale, key):
    compute_dtype = xb.dtype
    if spec.amax == "delayed":
        if scale is None:
            raise ValueError("a delayed-scaling operand needs scale= (from its FP8_META state)")
        encode = jnp.asarray(scale, jnp.float32).reshape(1)
    else:
        group_amax = _group_amax(xb) if amax is None else jnp.asarray(amax, jnp.float32).reshape(1)
        encode = fp8.compute_scale(group_amax, jnp.float32(1.0), fmt.max, spec.margin)
    if spec.rounding == "nearest":
        q = fp8.quantize(xb, fmt.dtype, encode[..., None], compute_dtype)
    else:
        scaled = xb.astype(compute_dtype) * encode[..., None].astype(compute_dtype)
        q = round_to(scaled, fmt, "stochastic", key)
    return q, Scales(1.0 / encode, jnp.float32(1.0))


# ---- E8M0 scales (MX) --------------------------------------------------------


def mx_shared_exponent(group_amax, fmt, rule: str):
    """Unbiased E8M0 exponent per group (OCP MX 6.3, or the ceil variant); NaN-free int32."""
    if rule == "floor":
        _, e = jnp.frexp(group_amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2) = e - 1
        shared = e - 1 - fmt.emax
        shared = jnp.where(group_amax > 0, shared, -E8M0_BIAS)
    else:
        ratio = group_amax * jnp.float32(1.0 / fmt.max)  # what XLA makes of amax / max
        m, e = jnp.frexp(ratio)
        shared = jnp.where(m == 0.5, e - 1, e)
        # A ratio below fp32's normal range is flushed by XLA (and by jax.nn's rule): -127.
        shared = jnp.where(ratio >= jnp.finfo(jnp.float32).tiny, shared, -E8M0_BIAS)
    return jnp.clip(shared, -E8M0_BIAS, E8M0_BIAS).astype(jnp.int32)


def _quantize_e8m0(xb, spec, fmt, key):
    xb = xb.astype(jnp.float32)
    group_amax = _group_amax(xb)
    finite = jnp.isfinite(group_amax)
    shared = mx_shared_exponent(jnp.where(finite, group_amax, 0.0), fmt, spec.e8m0_rounding)
    scaled = _times_pow2(xb, -shared[..., None])
    scaled = jnp.where(finite[..., None], scaled, 0.0)
    q = round_to(scaled, fmt, spec.rounding, key)
    biased = jnp.where(finite, shared + E8M0_BIAS, 255).astype(jnp.uint8)
    return q, Scales(jax.lax.bitcast_convert_type(biased, E8M0.dtype), jnp.float32(1.0))


def e8m0_decode(scale_e8m0):
    """(first, second) fp32 factors whose product is the E8M0 value; NaN for 0xFF."""
    biased = jax.lax.bitcast_convert_type(scale_e8m0, jnp.uint8).astype(jnp.int32)
    first, second = _pow2(biased - E8M0_BIAS)
    return jnp.where(biased == 255, jnp.nan, first), second


# ---- E4M3 block scales under an fp32 tensor scale (NVFP4) -------------------


def nvfp4_tensor_scale(x, amax=None):
    if amax is None:
        amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)).astype(jnp.float32)
    tensor = jnp.asarray(amax, jnp.float32) / jnp.float32(NVFP4_TENSOR_DIVISOR)
    return jnp.where((tensor > 0) & jnp.isfinite(tensor), tensor, jnp.float32(1.0))


def _quantize_e4m3(xb, spec, fmt, tensor, key):
    over_tensor = xb.astype(jnp.float32) * (1.0 / tensor)
    block = jnp.clip(_group_amax(over_tensor) * jnp.float32(1.0 / fmt.max), 0.0, E4M3.max)
    block = block.astype(E4M3.dtype)
    block_wide = block.astype(jnp.float32)
    usable = (block_wide > 0) & jnp.isfinite(block_wide)
    encode = jnp.where(usable, 1.0 / jnp.where(usable, block_wide, 1.0), 0.0)[..., None]
    scaled = jnp.where(usable[..., None], over_tensor * encode, 0.0)
    return round_to(scaled, fmt, spec.rounding, key), Scales(block, tensor)


# ---- public functions --------------------------------------------------------


def quantize(x, spec: OperandSpec, *, axis: int = -1, amax=None, scale=None, key=None):
    """(q, Scales) of x under `spec`; groups run along `axis` (the contracting axis)."""
    if amax is not None and spec.granularity != "tensor" and not spec.tensor_scale:
        raise ValueError("quantize(amax=...) is a tensor amax: tensor granularity or NVFP4 only")
    fmt = element_format(spec.element)
    xb, unblock = blocked(x, spec.granularity, spec.block_size, axis)
    if spec.scale == "fp32":
        qb, scales = _quantize_fp32(xb, spec, fmt, amax, scale, key)
    elif spec.scale == "e8m0":
        qb, scales = _quantize_e8m0(xb, spec, fmt, key)
    else:
        tensor = nvfp4_tensor_scale(x, amax) if spec.tensor_scale else jnp.float32(1.0)
        qb, scales = _quantize_e4m3(xb, spec, fmt, tensor, key)
    return unblock(qb), scales


def dequantize(q, scales: Scales, spec: OperandSpec, *, axis: int = -1, dtype=None):
    """q * scales, in `dtype` (default: fp32, or q's compute dtype for fp32 scales)."""
    qb, unblock = blocked(q, spec.granularity, spec.block_size, axis)
    if spec.scale == "fp32":
        compute_dtype = dtype or jnp.float32
        wide = qb.astype(compute_dtype) * scales.block[..., None].astype(compute_dtype)
        return unblock(wide)
    if spec.scale == "e8m0":
        first, second = e8m0_decode(scales.block)
        wide = (qb.astype(jnp.float32) * first[..., None]) * second[..., None]
    else:
        wide = qb.astype(jnp.float32) * scales.block.astype(jnp.float32)[..., None]
        if spec.tensor_scale:
            wide = wide * scales.tensor
    return unblock(wide).astype(dtype or jnp.float32)


def fake_quant(x, spec: OperandSpec, *, axis: int = -1, amax=None, scale=None, key=None):
    """dequantize(quantize(x)): the values an emulated low-precision GEMM reads."""
    q, scales = quantize(x, spec, axis=axis, amax=amax, scale=scale, key=key)
    dtype = x.dtype if spec.scale == "fp32" else jnp.float32
    return dequantize(q, scales, spec, axis=axis, dtype=dtype)

