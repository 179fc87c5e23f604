"""What quantization did to a tensor: SNR, flushed and saturated elements, scale exponents.

`quantize_with_stats(x, spec, axis, key)` returns the same values as
`fake_quant` (one quantize, one dequantize: bit for bit the operand a GEMM
reads) and a float32 vector of *additive* statistics:

    [0] signal     sum x^2 over finite x
    [1] error      sum (x - fq(x))^2 over finite x
    [2] nonzero    count of x != 0
    [3] flushed    count of x != 0 whose quantized value is 0
    [4] saturated  count of |x| past the format's top: |x| > d * (max + half an
                   ulp of the top binade), d the element's decode scale; the
                   clip, not rounding, decided its value (fp8.py's threshold)
    [5] elements   count of finite x
    [6] groups     count of scale groups with a positive finite decode scale
    [7:] histogram of floor(log2(decode scale)) over those groups, exponents
                   HIST_MIN .. HIST_MIN + HIST_BINS - 1, the ends clamped

Sums, not fractions, so that the two quantizations of one tensor (forward
and backward GEMM), the calls of a layer and the microbatches of a step add
up (cotangents sum, see dot.py), and one division at the end gives the
fractions (`summarize`). SNR = 10 log10(signal / error) dB; an exact
quantization (error 0) reports SNR_CAP_DB.
"""

import jax
import jax.numpy as jnp

from sandbox.precision import exact
from sandbox.precision.recipes.formats import element_format
from sandbox.precision.recipes.layout import blocked
from sandbox.precision.recipes.quantize import Scales, dequantize, e8m0_decode, quantize
from sandbox.precision.recipes.recipe import OperandSpec

HIST_MIN = -96  # decode scales from 2**-96 (tiny gradients) ...
HIST_BINS = 128  # ... to 2**31
N_SCALARS = 7
N_STATS = N_SCALARS + HIST_BINS
SNR_CAP_DB = 300.0


def saturation_threshold(element: str) -> float:
    """max + half an ulp of the top binade: beyond it the clip decided the value."""
    fmt = element_format(element)
    return fmt.max + 2.0**fmt.emax * 2.0**-fmt.mantissa_bits / 2


def decode_scales(scales: Scales, spec: OperandSpec):
    """fp32 decode scale per group (x ~= q * d); NaN for an E8M0 NaN scale."""
    if spec.scale == "e8m0":
        first, second = e8m0_decode(scales.block)
        return first * second
    return scales.block.astype(jnp.float32) * scales.tensor


def stats(x, fake, scales: Scales, spec: OperandSpec, axis: int):
    """The N_STATS vector of one quantization of x (module doc)."""
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    err = x32 - jax.lax.stop_gradient(fake).astype(jnp.float32)
    finite = jnp.isfinite(x32)
    f = jnp.float32
    nonzero = finite & (x32 != 0)
    d = decode_scales(jax.lax.stop_gradient(scales), spec)
    xb, _ = blocked(jnp.where(finite, x32, 0.0), spec.granularity, spec.block_size, axis)
    saturated = jnp.abs(xb) > d[..., None] * saturation_threshold(spec.element)
    usable = (d > 0) & jnp.isfinite(d)
    _, e = jnp.frexp(jnp.where(usable, d, 1.0))  # d = m * 2**e, m in [0.5, 1): floor(log2 d) = e - 1
    bins = jnp.clip(e - 1 - HIST_MIN, 0, HIST_BINS - 1)
    hist = jnp.zeros((HIST_BINS,), f).at[bins.reshape(-1)].add(usable.reshape(-1).astype(f))
    scalars = jnp.stack([
        jnp.sum(jnp.where(finite, x32 * x32, 0.0)),
        jnp.sum(jnp.where(finite, err * err, 0.0)),
        jnp.sum(nonzero, dtype=f),
        jnp.sum(nonzero & (fake == 0), dtype=f),
        jnp.sum(saturated & usable[..., None], dtype=f),
        jnp.sum(finite, dtype=f),
        jnp.sum(usable, dtype=f),
    ])
    return jnp.concatenate([scalars, hist])


def quantize_with_stats(x, spec: OperandSpec, *, axis: int = -1, key=None):
    """(fake_quant(x, spec, axis, key), its N_STATS vector), from one quantization."""
    q, scales = quantize(x, spec, axis=axis, key=key)
    dtype = x.dtype if spec.scale == "fp32" else jnp.float32
    fake = dequantize(q, scales, spec, axis=axis, dtype=dtype)
    # The statistics read one stored copy (exact.stored, CPU): fused, XLA:CPU would recompute the
    # whole quantization in each of their reductions, and contract x - q * s into an FMA, so that the
    # error was not x - fq(x) (nonzero for an exactly representable x). The GEMM reads `fake` as before.
    return fake, stats(x, exact.stored(fake), scales, spec, axis)


def summarize(vec) -> dict:
    """SNR (dB) and fractions from a (summed) N_STATS vector; works on jnp or numpy arrays."""
    signal, error, nonzero, flushed, saturated, elements = (vec[..., i] for i in range(6))
    snr = 10.0 * jnp.log10(jnp.maximum(signal, 1e-30) / jnp.maximum(error, 1e-30))
    return {
        "snr_db": jnp.where(error > 0, jnp.minimum(snr, SNR_CAP_DB), SNR_CAP_DB),
        "flushed_frac": flushed / jnp.maximum(nonzero, 1.0),
        "saturated_frac": saturated / jnp.maximum(elements, 1.0),
    }


def histogram(vec):
    """The scale-exponent histogram part of an N_STATS vector (counts per exponent)."""
    return vec[..., N_SCALARS:]


def hist_exponents():
    """The exponent of each histogram bin (the ends hold everything beyond them)."""
    return list(range(HIST_MIN, HIST_MIN + HIST_BINS))
