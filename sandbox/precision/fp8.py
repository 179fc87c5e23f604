"""fp8 matmuls with delayed per-tensor scaling.

How it works, in short. fp8 has 3-4 significant bits and a tiny range, so a
tensor is stored as q = fp8(x * scale) with one fp32 scale per tensor chosen to
put its largest magnitude (amax) near the top of the format:

    scale = fp8_max / (2**margin * amax)       # "multiply before quantize"
    quantize(x)   = fp8(clip(x * scale, -fp8_max, fp8_max))
    dequantize(q) = wide(q) * (1 / scale)

(Flax's fp8_ops stores the reciprocal and divides; NVIDIA TE stores this scale
and keeps scale_inv. Same numbers, inverted bookkeeping.) `margin` buys
2**margin headroom against growth between steps at the cost of margin bits of
resolution at the bottom of the range.

Formats ("hybrid" recipe). Forward tensors (input activations, kernels) use
E4M3 (max 448, more mantissa); output gradients use E5M2 (max 57344, more
range), since gradients span more binades. Passing E4M3 for both gives the
all-E4M3 recipe.

Delayed scaling. Computing amax of the tensor about to be quantized costs a
full extra pass over it before the matmul can start. Instead each tensor keeps
an amax history (the last `history_len` amaxes) and this step's scale comes
from it (`max` of the window, or `most_recent`); this step's amax is recorded
for the next. A sudden 1000x jump therefore saturates at +-fp8_max for one
step, then the scale catches up. Step 0 starts from scale 1 and empty history.

Graph shape. Each dot is written as

    dot_general(convert(q_lhs: f8 -> wide) * s_lhs_inv,
                convert(q_rhs: f8 -> wide) * s_rhs_inv,
                preferred_element_type=f32)

with scalar scales. On CPU this is just a simulation of the rounding; on
Hopper, XLA's GEMM rewriter matches convert(f8) times (or divided by) a
broadcast scalar feeding a dot, and emits one fp8 cuBLASLt GEMM with the
scales folded in (see Flax's fp8 guide). Any other op between the multiply
and the dot (a convert to f32, say) silently gives a wide GEMM. That is why
the dot has its own custom_vjp (`fp8_dot`): plain autodiff of an
f32-accumulating dot converts both operands to f32 before the two backward
GEMMs. With it, both backward GEMMs read the dequantized e5m2 gradient and a
dequantized e4m3 operand, so all three GEMMs of a layer can run in fp8. A dot
with a wider output (the head's fp32 logits) still quantizes its gradient in
the compute dtype; the bf16 -> fp32 -> bf16 convert pair around the custom_vjp
boundary is a no-op that XLA's simplifier removes.

State. Per fp8 dot there are three tensors, `input`, `kernel`, `output_grad`,
each with `{name}_amax_history` (fp32 [history_len]) and `{name}_scale` (fp32
[]), in the Flax collection FP8_META, never in "params". This state is not
learned: an optimizer would decay it (weight decay), renormalise it (Adam),
and count it in the global norm (a history holding 1e4 would clip every real
gradient to nothing). It is updated only by `update_fp8_meta`.

Getting amaxes out of a jitted forward/backward. Each quantizer is a
custom_vjp whose cotangent for its `amax_history` input is a vector that is
zero except slot 0 = amax observed this step (the input/kernel quantizer sees
x in the forward; the output-grad quantizer is the identity forward and sees
the incoming gradient in the backward, which it quantizes to the gradient
format). So

    g = jax.grad(loss)({"params": p, FP8_META: meta})
    observed = g[FP8_META]; meta = update_fp8_meta(meta, observed, ...)

costs no extra pass and no host sync. Cotangents of the scales are 0.
`update_fp8_meta` takes the max over each observed vector. A layer called
twice gets its cotangents summed, so it records the sum of the per-call
amaxes: at most (calls x true amax), a slightly low scale, never saturation.

Max, never sum. Amax is a max: under gradient accumulation combine
microbatches with `combine_observed` (elementwise max; summing would inflate
it, keeping the last would miss the largest). Across devices, under jit with
sharded arrays `jnp.max` over a global tensor already compiles to a
max-all-reduce; under shard_map/pmap use `lax.pmax`, never `psum`.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sandbox.errors import UserError

FP8_META = "fp8_meta"  # Flax collection holding amax histories and scales
FP8_STATS = "fp8_stats"  # Flax collection of saturation/flush fractions, sown when the caller makes it mutable
TENSORS = ("input", "kernel", "output_grad")
AMAX_ALGOS = ("max", "most_recent")


def fp8_max(dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for E4M3, 57344 for E5M2)."""
    return float(jnp.finfo(dtype).max)


def compute_scale(amax, prev_scale, fp8_max, margin=0):
    """fp8_max / (2**margin * amax); keeps prev_scale where amax is 0 or non-finite."""
    amax = jnp.asarray(amax, jnp.float32)
    scale = fp8_max / (2.0**margin * amax)
    # A subnormal amax would give an infinite scale: keep the old one then too.
    usable = (amax > 0) & jnp.isfinite(amax) & jnp.isfinite(scale)
    return jnp.where(usable, scale, prev_scale).astype(jnp.float32)


def quantize(x, q_dtype, scale, compute_dtype):
    """fp8(clip(x * scale)): saturate instead of overflowing E4M3 to NaN."""
    # Like Flax, the scale is rounded to the compute dtype; in bf16 that makes
    # bf16(s) * bf16(1/s) differ from 1 by up to ~2**-8, far below E4M3's 2**-4.
    limit = fp8_max(q_dtype)
    scaled = x.astype(compute_dtype) * scale.astype(compute_dtype)
    return jnp.clip(scaled, -limit, limit).astype(q_dtype)


def dequantize(q, scale, compute_dtype):
    """wide(q) * (1/scale): a convert then a multiply by a scalar, the fp8-GEMM pattern."""
    inv = (1.0 / jnp.asarray(scale, jnp.float32)).astype(compute_dtype)
    return q.astype(compute_dtype) * inv


def qdq(x, q_dtype, scale, compute_dtype):
    """Round-trip through fp8: what the matmul sees."""
    return dequantize(quantize(x, q_dtype, scale, compute_dtype), scale, compute_dtype)


def _amax(x):
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def _observed(amax, amax_history):
    return jnp.zeros_like(amax_history).at[0].set(amax)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def in_qdq(q_dtype, x, scale, amax_history):
    """qdq of a forward tensor; its amax leaves as the cotangent of amax_history."""
    del amax_history
    return qdq(x, q_dtype, scale, x.dtype)


def _in_qdq_fwd(q_dtype, x, scale, amax_history):
    out = qdq(x, q_dtype, scale, x.dtype)
    return out, (jnp.zeros_like(scale), _observed(_amax(x), amax_history))


def _in_qdq_bwd(q_dtype, res, g):
    zero_scale, observed = res
    # Straight-through: the rounding is treated as identity for the gradient.
    return g, zero_scale, observed


in_qdq.defvjp(_in_qdq_fwd, _in_qdq_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def out_grad_qdq(q_dtype, compute_dtype, y, scale, amax_history):
    """Identity forward; in backward, qdq the incoming gradient and report its amax.

    The gradient is quantized and dequantized in the dot's `compute_dtype`
    (like Flax's out_qdq), whatever the output dtype: a head whose logits
    leave the dot in fp32 still records the same amax and feeds its backward
    GEMMs the same bf16(e5m2) * bf16(1/scale) values as a bf16-output dot.
    """
    del q_dtype, compute_dtype, scale, amax_history
    return y


def _out_grad_qdq_fwd(q_dtype, compute_dtype, y, scale, amax_history):
    return y, (scale, jnp.zeros_like(amax_history))


def _out_grad_qdq_bwd(q_dtype, compute_dtype, res, g):
    scale, zero_history = res
    g_compute = g.astype(compute_dtype)  # the tensor actually quantized, so its amax is the one recorded
    observed = zero_history.at[0].set(_amax(g_compute))
    g_qdq = qdq(g_compute, q_dtype, scale, compute_dtype).astype(g.dtype)
    return g_qdq, jnp.zeros_like(scale), observed


out_grad_qdq.defvjp(_out_grad_qdq_fwd, _out_grad_qdq_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def fp8_dot(lhs, rhs, dimension_numbers, precision, out_dtype):
    """dot_general of dequantized operands, fp32 accumulation (what fp8 tensor cores do)."""
    out = lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)


def _fp8_dot_fwd(lhs, rhs, dimension_numbers, precision, out_dtype):
    return fp8_dot(lhs, rhs, dimension_numbers, precision, out_dtype), (lhs, rhs)


def _fp8_dot_bwd(dimension_numbers, precision, out_dtype, res, g):
    # Plain autodiff of the f32-accumulating dot would convert both operands to
    # f32 before the two backward GEMMs, hiding the convert(f8)*scale pattern
    # from XLA. Transposing a same-dtype dot keeps the backward GEMMs on the
    # dequantized operands (cuBLAS and XLA:CPU still accumulate in fp32).
    lhs, rhs = res
    _, vjp = jax.vjp(
        lambda a, b: lax.dot_general(a, b, dimension_numbers, precision=precision), lhs, rhs
    )
    return vjp(g.astype(lhs.dtype))


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def _update_layer(layer, observed, algo, fwd_dtype, bwd_dtype, margin):
    new = dict(layer)
    for name, q_dtype in zip(TENSORS, (fwd_dtype, fwd_dtype, bwd_dtype)):
        history = layer[f"{name}_amax_history"]
        amax = jnp.max(observed[f"{name}_amax_history"]).astype(history.dtype)
        history = jnp.roll(history, 1).at[0].set(amax)  # slot 0 newest, then older
        basis = jnp.max(history) if algo == "max" else history[0]
        new[f"{name}_amax_history"] = history
        new[f"{name}_scale"] = compute_scale(
            basis, layer[f"{name}_scale"], fp8_max(q_dtype), margin
        )
    return type(layer)(new)


def update_fp8_meta(
    meta,
    observed,
    amax_compute_algo="max",
    fwd_dtype=jnp.float8_e4m3fn,
    bwd_dtype=jnp.float8_e5m2,
    margin=0,
):
    """New FP8_META tree: record each observed amax, recompute every scale."""
    if amax_compute_algo not in AMAX_ALGOS:
        raise UserError(
            f"fp8 amax_compute_algo must be one of {AMAX_ALGOS}, got {amax_compute_algo!r}"
        )

    def walk(node, obs):
        if "input_amax_history" in node:
            return _update_layer(node, obs, amax_compute_algo, fwd_dtype, bwd_dtype, margin)
        return type(node)({key: walk(child, obs[key]) for key, child in node.items()})

    return walk(meta, observed)


def combine_observed(a, b):
    """Merge observed amaxes of two microbatches (or devices): elementwise max."""
    return jax.tree.map(jnp.maximum, a, b)


def _saturation_threshold(q_dtype) -> float:
    # fp8_max plus half an ulp of the top binade: beyond it the clip, not rounding,
    # decided the value. Without this the amax element, which lands on fp8_max up
    # to rounding whenever the scale is fresh, would count as saturated.
    info = jnp.finfo(q_dtype)
    top_binade = 2.0 ** int(np.floor(np.log2(float(info.max))))
    return float(info.max) + top_binade * float(info.eps) / 2


def _telemetry(x, q_dtype, scale):
    """Saturated and flushed-to-zero fractions; cheap elementwise reductions XLA fuses."""
    x = lax.stop_gradient(x)
    scaled = x * scale.astype(x.dtype)
    q = quantize(x, q_dtype, scale, x.dtype).astype(x.dtype)
    saturated = jnp.abs(scaled) > _saturation_threshold(q_dtype)
    return {
        "amax": _amax(x),
        "saturated_frac": jnp.mean(saturated, dtype=jnp.float32),
        "flushed_frac": jnp.mean((x != 0) & (q == 0), dtype=jnp.float32),
    }


class Fp8DotGeneral(nn.Module):
    """Drop-in dot_general: `nn.Dense(n, dot_general_cls=partial(Fp8DotGeneral, ...))`."""

    fwd_dtype: Any = jnp.float8_e4m3fn  # format of inputs and kernels
    bwd_dtype: Any = jnp.float8_e5m2  # format of output gradients (e4m3 = all-E4M3)
    history_len: int = 16  # amaxes remembered per tensor
    margin: int = 0  # scale headroom in powers of two, applied by update_meta

    def _meta(self, name):
        history = self.variable(
            FP8_META, f"{name}_amax_history", jnp.zeros, (self.history_len,), jnp.float32
        )
        scale = self.variable(FP8_META, f"{name}_scale", jnp.ones, (), jnp.float32)
        return scale.value, history.value

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        compute_dtype = lhs.dtype
        rhs = rhs.astype(compute_dtype)
        quantized = []
        for name, x in (("input", lhs), ("kernel", rhs)):
            scale, history = self._meta(name)
            if self.is_mutable_collection(FP8_STATS):  # telemetry: the caller asked for the stats
                for stat, value in _telemetry(x, self.fwd_dtype, scale).items():
                    self.sow(FP8_STATS, f"{name}_{stat}", value)
            quantized.append(in_qdq(self.fwd_dtype, x, scale, history))
        out_dtype = jnp.dtype(preferred_element_type or compute_dtype)
        out = fp8_dot(*quantized, dimension_numbers, precision, out_dtype)
        return out_grad_qdq(self.bwd_dtype, jnp.dtype(compute_dtype), out, *self._meta("output_grad"))

    def update_meta(self, meta, observed, amax_compute_algo="max"):
        """update_fp8_meta with this layer's formats and margin, so they cannot disagree."""
        return update_fp8_meta(
            meta, observed, amax_compute_algo, self.fwd_dtype, self.bwd_dtype, self.margin
        )
