"""scaled_dot: an emulated low-precision dot_general for any Recipe.

Three GEMMs, each reading operands quantized per the recipe and accumulating
in fp32 (what block-scaled tensor cores do):

    forward  out = Q_in(X, along K)  @ Q_w(W, along K)
    dgrad    dX  = Q_g(G, along N)   @ Q_w(W, along N)^T
    wgrad    dW  = Q_in(X', along M)^T @ Q_g(G', along M)
                   X', G' = RHT(X), RHT(G) along the token axis M when
                   recipe.wgrad_hadamard, else X, G

The same tensor is quantized once per GEMM it enters, with its groups along
that GEMM's contracting axis (what MX/NVFP4 hardware needs: a "rowwise" and a
"columnwise" copy). Weights with 2-D block granularity get the same blocks,
hence the same values, in forward and dgrad. Gradients with respect to X and
W pass straight through the rounding (as fp8.py). Each quantization that
rounds stochastically gets its own key, `fold_in(key, use)`, from the one key
the caller passes (see recipe.rounding_key).

The maths is `quantize.fake_quant`; this module is the thin custom_vjp around
it (the split of Flax's fp8_ops). Emulated dots run at Precision.HIGHEST:
the dequantized operands are exact fp32 values, and a TPU's default bf16
passes would round them again.

Delayed recipes (fp8_delayed) go through fp8.py's own custom_vjps
(`in_qdq`, `fp8_dot`, `out_grad_qdq`): the scales come from `meta` (the
FP8_META layer dict) and each tensor's amax leaves through the cotangent of
its amax history, so `jax.grad` w.r.t. meta yields the observed amaxes that
`update_delayed_meta` (fp8.update_fp8_meta) records; bit-identical to
Fp8DotGeneral.

Only contracting dimensions are supported (no batch dimensions): that covers
every Dense / DenseGeneral; attention's batched dots stay in the compute dtype.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from sandbox.precision import fp8
from sandbox.precision.recipes.formats import element_format
from sandbox.precision.recipes.hadamard import rht
from sandbox.precision.recipes.quantize import fake_quant
from sandbox.precision.recipes.recipe import ROLES, Recipe
from sandbox.precision.recipes.telemetry import N_STATS, quantize_with_stats

# fold_in ids of the six quantizations of one scaled_dot
_FWD_INPUT, _FWD_KERNEL, _DGRAD_GRAD, _DGRAD_KERNEL, _WGRAD_INPUT, _WGRAD_GRAD = range(6)


def _matmul_f32(a, b):
    return jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )


def _fq(x, spec, axis, key, use, with_stats=False):
    """(fake-quantized x, its telemetry vector or None)."""
    k = jax.random.fold_in(key, use)
    if with_stats:
        return quantize_with_stats(x, spec, axis=axis, key=k)
    return fake_quant(x, spec, axis=axis, key=k), None


def _forward(x, w, key, recipe, with_stats=False):
    xq, x_stats = _fq(x, recipe.input, 1, key, _FWD_INPUT, with_stats)
    wq, w_stats = _fq(w, recipe.kernel, 0, key, _FWD_KERNEL, with_stats)
    return _matmul_f32(xq, wq), (x_stats, w_stats)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _emulated_matmul(x_MK, w_KN, key, probe, recipe: Recipe, out_dtype, with_stats):
    del probe  # only its cotangent matters: the telemetry (module doc of telemetry.py)
    return _forward(x_MK, w_KN, key, recipe)[0].astype(out_dtype)


def _emulated_matmul_fwd(x_MK, w_KN, key, probe, recipe, out_dtype, with_stats):
    out, fwd_stats = _forward(x_MK, w_KN, key, recipe, with_stats)
    return out.astype(out_dtype), (x_MK, w_KN, key, jnp.zeros_like(probe), fwd_stats)


def _emulated_matmul_bwd(recipe, out_dtype, with_stats, residuals, g_MN):
    x_MK, w_KN, key, probe_ct, (x_stats, w_stats) = residuals
    g_q, g_stats = _fq(g_MN, recipe.output_grad, 1, key, _DGRAD_GRAD, with_stats)
    w_q, wt_stats = _fq(w_KN, recipe.kernel, 1, key, _DGRAD_KERNEL, with_stats)
    dx_MK = _matmul_f32(g_q, w_q.T)
    x_w, g_w = x_MK, g_MN
    if recipe.wgrad_hadamard:
        x_w = rht(x_MK, 0, recipe.hadamard_size, recipe.hadamard_seed)
        g_w = rht(g_MN, 0, recipe.hadamard_size, recipe.hadamard_seed)
    x_q, xt_stats = _fq(x_w, recipe.input, 0, key, _WGRAD_INPUT, with_stats)
    g_q, gt_stats = _fq(g_w, recipe.output_grad, 0, key, _WGRAD_GRAD, with_stats)
    dw_KN = _matmul_f32(x_q.T, g_q)
    if with_stats:  # each tensor over both GEMMs it enters, rows in ROLES order
        probe_ct = jnp.stack([x_stats + xt_stats, w_stats + wt_stats, g_stats + gt_stats])
    return dx_MK.astype(x_MK.dtype), dw_KN.astype(w_KN.dtype), None, probe_ct


_emulated_matmul.defvjp(_emulated_matmul_fwd, _emulated_matmul_bwd)


def _as_matrices(lhs, rhs, dimension_numbers):
    """(x_MK, w_KN, out_shape): lhs and rhs flattened around their contracting dims."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if lhs_batch or rhs_batch:
        raise ValueError("scaled_dot supports contracting dimensions only, not batch dimensions")
    lhs_free = [i for i in range(lhs.ndim) if i not in lhs_contract]
    rhs_free = [i for i in range(rhs.ndim) if i not in rhs_contract]
    k = math.prod(lhs.shape[i] for i in lhs_contract)
    x_MK = jnp.transpose(lhs, lhs_free + list(lhs_contract)).reshape(-1, k)
    w_KN = jnp.transpose(rhs, list(rhs_contract) + rhs_free).reshape(k, -1)
    out_shape = tuple(lhs.shape[i] for i in lhs_free) + tuple(rhs.shape[i] for i in rhs_free)
    return x_MK, w_KN, out_shape


def init_delayed_meta(recipe: Recipe):
    """FP8_META layer dict for a delayed recipe: zero histories, unit scales (as Fp8DotGeneral)."""
    meta = {}
    for name in ROLES:
        meta[f"{name}_amax_history"] = jnp.zeros((recipe.history_len,), jnp.float32)
        meta[f"{name}_scale"] = jnp.ones((), jnp.float32)
    return meta


def update_delayed_meta(meta, observed, recipe: Recipe, amax_compute_algo="max"):
    """fp8.update_fp8_meta with the recipe's formats and margin."""
    return fp8.update_fp8_meta(
        meta,
        observed,
        amax_compute_algo,
        element_format(recipe.input.element).dtype,
        element_format(recipe.output_grad.element).dtype,
        recipe.input.margin,
    )


def _delayed_dot(lhs, rhs, dimension_numbers, recipe, meta, precision, out_dtype):
    compute_dtype = lhs.dtype
    fwd_dtype = element_format(recipe.input.element).dtype
    bwd_dtype = element_format(recipe.output_grad.element).dtype
    quantized = [
        fp8.in_qdq(fwd_dtype, x, meta[f"{name}_scale"], meta[f"{name}_amax_history"])
        for name, x in (("input", lhs), ("kernel", rhs.astype(compute_dtype)))
    ]
    out = fp8.fp8_dot(*quantized, dimension_numbers, precision, out_dtype)
    return fp8.out_grad_qdq(
        bwd_dtype, jnp.dtype(compute_dtype), out,
        meta["output_grad_scale"], meta["output_grad_amax_history"],
    )


def scaled_dot(
    lhs, rhs, dimension_numbers, recipe: Recipe, precision=None, preferred_element_type=None,
    *, key=None, meta=None, probe=None,
):
    """dot_general whose three GEMMs read operands quantized per `recipe`.

    key:   required when any operand rounds stochastically (recipe.rounding_key).
    meta:  the FP8_META layer dict (init_delayed_meta), required for delayed recipes.
    probe: optional zeros [len(ROLES), telemetry.N_STATS]; its cotangent under jax.grad is
           each operand's telemetry vector (forward and backward quantization summed).
    `functools.partial(scaled_dot, recipe=..., key=...)` is a drop-in dot_general.
    """
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if recipe.is_delayed:
        if meta is None:
            raise ValueError(f"recipe {recipe.name!r} uses delayed scaling and needs meta=")
        return _delayed_dot(lhs, rhs, dimension_numbers, recipe, meta, precision, out_dtype)
    if key is None:
        if recipe.needs_key:
            raise ValueError(f"recipe {recipe.name!r} rounds stochastically and needs key=")
        key = jax.random.key(0)  # unused: every rounding is to nearest
    x_MK, w_KN, out_shape = _as_matrices(lhs, rhs, dimension_numbers)
    with_stats = probe is not None
    if probe is None:
        probe = jnp.zeros((len(ROLES), N_STATS), jnp.float32)
    return _emulated_matmul(x_MK, w_KN, key, probe, recipe, out_dtype, with_stats).reshape(out_shape)
