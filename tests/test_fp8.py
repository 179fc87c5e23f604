"""fp8 delayed scaling: cross-checked against flax.linen.fp8_ops, plus the meta-update loop.

Flax stores the reciprocal scale (quantize divides), so "equivalent scales"
below means flax_scale = 1 / our_scale. With power-of-two scales both
conventions are exact and must agree bit for bit.
"""

from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen import fp8_ops as F
from jax import lax
from jax.extend.core import jaxprs_in_params

from sandbox.errors import UserError
from sandbox.precision.fp8 import (
    FP8_META,
    FP8_STATS,
    Fp8DotGeneral,
    combine_observed,
    compute_scale,
    dequantize,
    fp8_max,
    quantize,
    update_fp8_meta,
)

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
DIMS = (((1,), (0,)), ((), ()))
RNG = np.random.default_rng(0)  # numpy data: eager jax.random ops each cost a compile


def _normal(*shape, std=1.0):
    return jnp.asarray(RNG.normal(size=shape, scale=std).astype(np.float32))


def _bits(x):
    """Raw bit patterns, so NaN == NaN and -0 != +0 in comparisons."""
    return np.asarray(x).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _meta(history_len=16, **amax):
    """One layer's meta whose histories hold the given amax in slot 0 and matching scales."""
    layer = {}
    for name, q in (("input", E4M3), ("kernel", E4M3), ("output_grad", E5M2)):
        a = np.float32(amax.get(name, 0.0))
        history = np.zeros(history_len, np.float32)
        history[0] = a
        layer[f"{name}_amax_history"] = jnp.asarray(history)
        # numpy on purpose: no per-call XLA compile; same IEEE division as compute_scale.
        layer[f"{name}_scale"] = jnp.asarray(np.float32(fp8_max(q)) / a if a > 0 else np.float32(1))
    return layer


def _dot(layer_meta, x, w, **kw):
    return Fp8DotGeneral(**kw).apply({FP8_META: layer_meta}, x, w, DIMS)


def test_fp8_max():
    assert fp8_max(E4M3) == 448.0 and fp8_max(E5M2) == 57344.0


@pytest.mark.parametrize("q_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("compute", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale", [64.0, 2.0**-3])
def test_quantize_dequantize_bit_identical_to_flax(q_dtype, compute, scale):
    x = _normal(4096, std=30.0)
    # Values that saturate, flush to zero, and exact zero.
    x = x.at[:3].set(jnp.asarray([1e6, -1e6, 1e-9])).at[3].set(0.0).astype(compute)
    ours_s, flax_s = jnp.float32(scale), jnp.float32(1.0 / scale)
    q = quantize(x, q_dtype, ours_s, compute)
    q_ref = F.quantize(x, q_dtype, flax_s, compute)
    assert q.dtype == q_dtype
    np.testing.assert_array_equal(_bits(q), _bits(q_ref))
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == fp8_max(q_dtype)
    np.testing.assert_array_equal(
        _bits(dequantize(q, ours_s, compute)), _bits(F.dequantize(q_ref, compute, flax_s))
    )


def test_dequantize_bit_identical_for_any_scale():
    q = _normal(512).astype(E4M3)
    for s in (448 / 3.7, 0.37, 123.456):
        for compute in (jnp.float32, jnp.bfloat16):
            ours = dequantize(q, jnp.float32(s), compute)
            ref = F.dequantize(q, compute, 1.0 / jnp.float32(s))
            np.testing.assert_array_equal(_bits(ours), _bits(ref))


def test_compute_scale_matches_flax_reciprocal():
    amax = jnp.asarray([0.1, 3.7, 448.0, 1e4, 0.0, jnp.inf, jnp.nan, 1e-44])
    prev = jnp.full(amax.shape, 5.0)
    for margin in (0, 2):
        ours = compute_scale(amax, prev, 448.0, margin)
        ref = 1.0 / F.compute_scale(amax[:4], 1.0 / prev[:4], jnp.float32(448.0), margin)
        np.testing.assert_allclose(ours[:4], ref, rtol=1e-6)
        # 0, inf, NaN and an amax so small the scale would be inf: keep prev.
        np.testing.assert_array_equal(ours[4:], prev[4:])
    assert float(compute_scale(7.0, 1.0, 448.0, 1)) == 32.0  # margin halves per unit


def test_quantized_dot_and_grads_match_flax_composition():
    x = _normal(8, 32, std=4.0)  # some |x| > 7: saturates
    w = _normal(32, 16, std=0.3)
    cot = _normal(8, 16, std=0.05)
    g_amax = 57344.0 / 2**20  # power-of-two scales: 64, 512, 2**20
    meta = _meta(input=7.0, kernel=0.875, output_grad=g_amax)
    assert [float(meta[k]) for k in ("input_scale", "kernel_scale", "output_grad_scale")] == [
        64.0, 512.0, 2.0**20
    ]

    def ours(x, w, meta):
        return jnp.sum(_dot(meta, x, w) * cot)

    def flax_ref(x, w, hx, hw, hg):
        one = jnp.ones((1,))  # Flax recomputes the scale from the history itself.
        xq = F.in_qdq(jnp.float32, E4M3, x, one, hx)
        wq = F.in_qdq(jnp.float32, E4M3, w, one, hw)
        y = F.dot_general_with_precision(xq, wq, DIMS)
        return jnp.sum(F.out_qdq(jnp.float32, E5M2, y, one, hg) * cot)

    hists = [meta[f"{n}_amax_history"] for n in ("input", "kernel", "output_grad")]
    y = jax.jit(_dot)(meta, x, w)
    y_ref = jax.jit(lambda x, w: F.dot_general_with_precision(
        F.qdq(x, E4M3, jnp.float32(1 / 64), jnp.float32),
        F.qdq(w, E4M3, jnp.float32(1 / 512), jnp.float32),
        DIMS,
    ))(x, w)
    np.testing.assert_array_equal(y, y_ref)
    gx, gw, gmeta = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, w, meta)
    rx, rw, rhx, rhw, rhg = jax.jit(jax.grad(flax_ref, argnums=(0, 1, 2, 3, 4)))(x, w, *hists)
    np.testing.assert_array_equal(gx, rx)
    np.testing.assert_array_equal(gw, rw)
    # Both report this step's amax in slot 0 (Flax returns a whole new history).
    assert float(gmeta["input_amax_history"][0]) == float(rhx[0]) == float(jnp.max(jnp.abs(x)))
    assert float(gmeta["kernel_amax_history"][0]) == float(rhw[0])
    g_observed = float(gmeta["output_grad_amax_history"][0])
    assert g_observed == float(rhg[0]) == float(jnp.max(jnp.abs(cot)))
    assert float(jnp.sum(gmeta["input_amax_history"][1:])) == 0.0
    assert float(gmeta["input_scale"]) == 0.0
    # Sanity that the e5m2 grad quantization is active: unquantized grads differ.
    assert not np.array_equal(gw, x.T @ cot)


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _walk(sub)


def _vjp_name(eqn):
    """Python name of the function behind a custom_vjp_call ('in_qdq at file:line')."""
    return eqn.params["call_jaxpr"].jaxpr.debug_info.func_src_info.split()[0]


def _skip_noop_converts(var, producers):
    """`a` for `var` = convert(convert(a: T -> wider) -> T): XLA's simplifier removes such pairs."""
    outer = producers.get(var)
    if outer is None or outer.primitive.name != "convert_element_type":
        return var
    inner = producers.get(outer.invars[0])
    if inner is None or inner.primitive.name != "convert_element_type":
        return var
    source = inner.invars[0]
    widened = jnp.finfo(inner.outvars[0].aval.dtype).bits > jnp.finfo(source.aval.dtype).bits
    return source if widened and source.aval.dtype == var.aval.dtype else var


def _dequantized_fp8_dtype(var, producers):
    """The fp8 dtype if `var` = convert(fp8 -> wide) * scalar, else None."""
    mul = producers.get(_skip_noop_converts(var, producers))
    if mul is None or mul.primitive.name != "mul" or mul.invars[1].aval.shape != ():
        return None
    widen = producers.get(mul.invars[0])
    if widen is None or widen.primitive.name != "convert_element_type":
        return None
    dtype = widen.invars[0].aval.dtype
    return dtype if dtype in (jnp.dtype(E4M3), jnp.dtype(E5M2)) else None


def test_jaxpr_has_fp8_gemm_pattern():
    # XLA's Hopper GEMM rewriter fuses `dot(convert(f8 -> wide) * scalar, ...)`
    # into one fp8 cuBLASLt GEMM; any op in between (e.g. a convert to f32)
    # silently gives a wide GEMM. Forward: one f32-accumulating dot of two
    # dequantized e4m3 operands. Backward: both GEMMs take the dequantized e5m2
    # gradient and a dequantized e4m3 operand.
    x, w = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 2), jnp.bfloat16)
    meta = _meta(input=1.0, kernel=1.0, output_grad=1.0)
    fwd = jax.make_jaxpr(partial(_dot, meta))(x, w).jaxpr
    calls = {_vjp_name(e): e for e in fwd.eqns if e.primitive.name == "custom_vjp_call"}
    dot_call = calls["fp8_dot"]
    producers = {v: e for e in fwd.eqns for v in e.outvars}
    assert all(_vjp_name(producers[v]) == "in_qdq" for v in dot_call.invars)
    qdq_jaxpr = producers[dot_call.invars[0]].params["call_jaxpr"].jaxpr
    qdq_producers = {v: e for e in qdq_jaxpr.eqns for v in e.outvars}
    assert _dequantized_fp8_dtype(qdq_jaxpr.outvars[0], qdq_producers) == jnp.dtype(E4M3)
    inner = dot_call.params["call_jaxpr"].jaxpr
    (dot,) = [e for e in _walk(inner) if e.primitive.name == "dot_general"]
    assert dot.params["preferred_element_type"] == jnp.float32

    grad = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(_dot(meta, x, w)), argnums=(0, 1)))(x, w)
    producers = {v: e for e in grad.jaxpr.eqns for v in e.outvars}
    dots = [e for e in grad.jaxpr.eqns if e.primitive.name == "dot_general"]
    operand_formats = {tuple(_dequantized_fp8_dtype(v, producers) for v in e.invars) for e in dots}
    e5m2_grad = (jnp.dtype(E5M2), jnp.dtype(E4M3))
    assert e5m2_grad in operand_formats  # d/dx and d/dw GEMMs read the e5m2 gradient
    assert all(None not in formats for formats in operand_formats)


def test_fp32_output_dot_rounds_once_and_quantizes_the_same_operands():
    # The fp8 head returns fp32 logits (preferred_element_type): the forward must be the
    # fp32 accumulation of the same e4m3 operands, never rounded to bf16; the backward must
    # quantize the same e5m2 gradient, in bf16, as a bf16-output dot (whose bits Flax checks).
    x = _normal(8, 32, std=4.0).astype(jnp.bfloat16)
    w = _normal(32, 16, std=0.3).astype(jnp.bfloat16)
    cot = _normal(8, 16, std=0.05)
    meta = _meta(input=7.0, kernel=0.875, output_grad=57344.0 / 2**20)  # scales 64, 512, 2**20

    def wide(m, x, w):
        return Fp8DotGeneral().apply({FP8_META: m}, x, w, DIMS, preferred_element_type=jnp.float32)

    y = jax.jit(wide)(meta, x, w)
    y_ref = lax.dot_general(F.qdq(x, E4M3, jnp.float32(1 / 64), jnp.bfloat16),
                            F.qdq(w, E4M3, jnp.float32(1 / 512), jnp.bfloat16), DIMS,
                            preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, y_ref)
    assert not np.array_equal(y, y.astype(jnp.bfloat16).astype(jnp.float32))  # not rounded to bf16

    def loss(dot, x, w, m):
        return jnp.sum(dot(m, x, w).astype(jnp.float32) * cot)

    grads = jax.jit(jax.grad(partial(loss, wide), argnums=(0, 1, 2)))(x, w, meta)
    narrow = jax.jit(jax.grad(partial(loss, _dot), argnums=(0, 1, 2)))(x, w, meta)
    chex.assert_trees_all_equal(grads, narrow, strict=True)
    # The amax of the gradient as quantized: bf16(cot), not the fp32 cotangent.
    assert float(grads[2]["output_grad_amax_history"][0]) == float(np.max(np.abs(cot.astype(jnp.bfloat16))))

    jaxpr = jax.make_jaxpr(jax.grad(partial(loss, wide), argnums=(0, 1)))(x, w, meta).jaxpr
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    formats = {tuple(_dequantized_fp8_dtype(v, producers) for v in e.invars) for e in dots}
    assert (jnp.dtype(E5M2), jnp.dtype(E4M3)) in formats and all(None not in f for f in formats)


@jax.jit
def _step(meta, x, w, cot):
    """Observed amaxes (the fp8_meta cotangent) of one forward/backward."""
    return jax.grad(lambda m: jnp.sum(_dot(m, x, w) * cot))(meta)


@pytest.mark.parametrize("algo, expected", [("max", 448.0 / 4), ("most_recent", 448.0 / 2)])
def test_amax_history_rolls_and_scale_follows(algo, expected):
    x0 = jnp.asarray([[0.5, -1.0], [0.25, 0.0]])  # max |x0| = 1
    w, cot = jnp.eye(2), jnp.ones((2, 2))
    update = jax.jit(update_fp8_meta, static_argnames=("amax_compute_algo", "margin"))
    meta = _meta(history_len=4)
    for a in (4.0, 1.0, 2.0):
        meta = update(meta, _step(meta, a * x0, w, a * cot), algo)
    np.testing.assert_array_equal(meta["input_amax_history"], [2.0, 1.0, 4.0, 0.0])
    np.testing.assert_array_equal(meta["output_grad_amax_history"], [2.0, 1.0, 4.0, 0.0])
    np.testing.assert_array_equal(meta["kernel_amax_history"], [1.0, 1.0, 1.0, 0.0])
    assert float(meta["input_scale"]) == expected
    assert float(meta["output_grad_scale"]) == expected * 57344.0 / 448.0
    last = _step(meta, 2 * x0, w, cot)
    with_margin = update(meta, last, algo, margin=1)
    assert float(with_margin["input_scale"]) == expected / 2
    short = _meta(history_len=2)
    for a in (4.0, 1.0, 2.0):
        short = update(short, _step(short, a * x0, w, cot), algo)
    np.testing.assert_array_equal(short["input_amax_history"], [2.0, 1.0])  # 4 fell out
    assert float(short["input_scale"]) == 448.0 / 2


def test_update_meta_validation_and_nonfinite():
    meta = {"layer": _meta(input=2.0)}
    obs = {"layer": _meta(input=np.nan)}
    new = update_fp8_meta(meta, obs, "most_recent")
    assert float(new["layer"]["input_scale"]) == float(meta["layer"]["input_scale"])
    with pytest.raises(UserError, match="'mean'"):
        update_fp8_meta(meta, obs, "mean")
    # All-E4M3: the module's own update uses 448 for gradients too.
    obs["layer"]["output_grad_amax_history"] = _meta(output_grad=7.0)["output_grad_amax_history"]
    e4 = Fp8DotGeneral(bwd_dtype=E4M3).update_meta(meta, obs)
    assert float(e4["layer"]["output_grad_scale"]) == 64.0


def test_dense_training_keeps_meta_out_of_optimizer():
    model = nn.Sequential([
        nn.Dense(16, dot_general_cls=partial(Fp8DotGeneral, history_len=4)),
        nn.relu,
        nn.Dense(1, dot_general_cls=partial(Fp8DotGeneral, history_len=4)),
    ])
    x = _normal(32, 8)
    y = jnp.sum(x[:, :2], axis=1, keepdims=True)
    variables = jax.jit(model.init)(jax.random.key(3), x)
    params, meta = variables["params"], variables[FP8_META]
    fresh = meta["layers_2"]["Fp8DotGeneral_0"]
    assert fresh["output_grad_amax_history"].shape == (4,) and float(fresh["kernel_scale"]) == 1.0
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.1))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, meta):
        def loss(v):
            return jnp.mean((model.apply(v, x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)({"params": params, FP8_META: meta})
        updates, opt_state = tx.update(grads["params"], opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, update_fp8_meta(meta, grads[FP8_META]), value, grads[FP8_META]

    update_meta = jax.jit(update_fp8_meta)  # recomputed outside the train step
    losses = []
    for _ in range(5):
        kernel0 = params["layers_0"]["kernel"]
        before = meta
        params, opt_state, meta, value, observed = train_step(params, opt_state, meta)
        losses.append(float(value))
        chex.assert_trees_all_equal(meta, update_meta(before, observed), strict=True)
        layer0 = observed["layers_0"]["Fp8DotGeneral_0"]
        assert float(layer0["input_amax_history"][0]) == float(jnp.max(jnp.abs(x)))
        assert float(layer0["kernel_amax_history"][0]) == float(jnp.max(jnp.abs(kernel0)))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
    assert not any("amax" in p or "scale" in p for p in paths)
    assert jax.tree.structure(opt_state[1][0].mu) == jax.tree.structure(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(meta))
    scale0 = meta["layers_0"]["Fp8DotGeneral_0"]["input_scale"]
    assert float(scale0) == float(jnp.float32(448.0) / jnp.max(jnp.abs(x)))
    assert losses[-1] < losses[0]


def test_microbatch_amaxes_combine_by_max():
    w, cot = jnp.eye(2), jnp.ones((2, 2))
    meta = _meta(history_len=4)
    big = _step(meta, jnp.asarray([[5.0, 0.0], [0.0, 1.0]]), w, cot)
    small = _step(meta, jnp.asarray([[2.0, 0.0], [0.0, 1.0]]), w, cot)
    combined = combine_observed(big, small)
    assert float(jnp.max(combined["input_amax_history"])) == 5.0
    summed = jax.tree.map(jnp.add, big, small)  # what naive grad accumulation does
    assert float(jnp.max(summed["input_amax_history"])) == 7.0
    assert float(update_fp8_meta(meta, combined)["input_scale"]) == float(jnp.float32(448 / 5))


def test_saturation_then_adaptation_with_telemetry():
    w, cot = jnp.eye(4), jnp.ones((1, 4))
    x = jnp.asarray([[1.0, -0.5, 0.25, 0.125]])
    meta = update_fp8_meta(_meta(), _step(_meta(), x, w, cot))
    assert float(meta["input_scale"]) == 448.0

    def forward(meta, x):
        y, stats = Fp8DotGeneral().apply(
            {FP8_META: meta}, x, w, DIMS, mutable=[FP8_STATS]
        )
        return y, {name: float(v[0]) for name, v in stats[FP8_STATS].items()}

    big = 1000.0 * x
    q = quantize(big, E4M3, meta["input_scale"], jnp.float32)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == 448.0
    y, stats = forward(meta, big)
    assert float(jnp.max(jnp.abs(y))) == 1.0  # everything clipped to 448 / 448
    assert stats["input_saturated_frac"] == 1.0 and stats["input_amax"] == 1000.0
    meta = update_fp8_meta(meta, _step(meta, big, w, cot))
    assert float(meta["input_scale"]) == pytest.approx(0.448)
    y, stats = forward(meta, big)
    np.testing.assert_allclose(y, big, rtol=2**-4)
    assert stats["input_saturated_frac"] == 0.0


def test_telemetry_counts_flush_to_zero():
    x = jnp.asarray([[1e3, 1e-4, 0.0, 1.0, 2.0, -3.0, 1e-5, 0.5]])  # scale 1 at init
    _, stats = Fp8DotGeneral().apply(
        {FP8_META: _meta()}, x, jnp.eye(8), DIMS, mutable=[FP8_STATS]
    )
    layer = {name: float(v[0]) for name, v in stats[FP8_STATS].items()}
    assert layer["input_saturated_frac"] == 1 / 8  # 1e3 > 448
    assert layer["input_flushed_frac"] == 2 / 8  # 1e-4, 1e-5 < 2**-10; exact 0 is not "flushed"
    assert layer["kernel_flushed_frac"] == 0.0 and layer["kernel_amax"] == 1.0
