"""Dynamic loss scaling: skip-and-halve, growth, floor/ceiling, dtypes, clipping order, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sandbox.errors import UserError
from sandbox.precision.loss_scale import (
    LossScaler,
    LossScaleState,
    all_finite,
    nonfinite_leaf_mask,
    select_tree,
)


def _params():
    return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7, "b": jnp.ones(3)}


def _fp16_grads(params, scaler, state, x):
    """Scaled grads of an fp16 forward/backward with the (mean) loss in fp32."""

    def loss(p):
        p16 = jax.tree.map(lambda t: t.astype(jnp.float16), p)
        y = x.astype(jnp.float16) @ p16["w"] + p16["b"]
        return scaler.scale_loss(jnp.mean(y.astype(jnp.float32)), state)

    return jax.grad(loss)(params)


def test_overflow_halves_scale_and_skips_step_bitwise():
    scaler = LossScaler()
    tx = optax.adamw(1e-2, weight_decay=0.1)

    @jax.jit
    def step(params, opt_state, ls, x):
        grads = scaler.unscale(_fp16_grads(params, scaler, ls, x), ls)
        finite = all_finite(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        kept = (select_tree(finite, new_params, params), select_tree(finite, new_opt, opt_state))
        return kept, scaler.update(ls, finite), finite, new_params

    params = _params()
    opt_state = tx.init(params)
    # One clean step first so optax's count and moments are non-trivial.
    small_x = jnp.full((4, 2), 1e-3)
    (params, opt_state), ls, finite, _ = step(params, opt_state, scaler.init(), small_x)
    assert bool(finite) and int(opt_state[0].count) == 1

    # Inputs of 10 give scaled dL/dw = 4 * 10 * 2**16 / 12 > 65504: a genuine fp16 overflow.
    (kept_params, kept_opt), new_ls, finite, unguarded = step(
        params, opt_state, ls, jnp.full((4, 2), 10.0)
    )
    assert not bool(finite)
    chex.assert_trees_all_equal(kept_params, params, strict=True)
    chex.assert_trees_all_equal(kept_opt, opt_state, strict=True)
    assert int(kept_opt[0].count) == 1  # optax's step count did not advance
    # Without the select the inf reaches the weights as NaN (adam: inf / inf).
    assert not bool(all_finite(unguarded))
    assert float(new_ls.scale) == 2.0**15 and int(new_ls.good_steps) == 0


def test_skip_by_multiplying_with_zero_is_wrong():
    params, updates = _params(), {"w": jnp.full((2, 3), jnp.nan), "b": jnp.ones(3)}
    zeroed = jax.tree.map(lambda p, u: p + 0.0 * u, params, updates)  # 0 * NaN = NaN
    assert not bool(all_finite(zeroed))
    chex.assert_trees_all_equal(select_tree(False, zeroed, params), params)


def test_grows_after_exactly_growth_interval_clean_steps():
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    state = scaler.init()
    seen = []
    for finite in [True, True, False, True, True, True, True]:
        state = scaler.update(state, jnp.asarray(finite))
        seen.append((float(state.scale), int(state.good_steps)))
    # The overflow resets the counter; growth needs 3 clean steps in a row.
    assert seen == [(8, 1), (8, 2), (4, 0), (4, 1), (4, 2), (8, 0), (8, 1)]


def test_floor_and_ceiling():
    scaler = LossScaler(growth_interval=1)
    down = jax.lax.fori_loop(0, 100, lambda _, s: scaler.update(s, False), scaler.init())
    assert float(down.scale) == scaler.min_scale == 1.0
    up = jax.lax.fori_loop(0, 200, lambda _, s: scaler.update(s, True), scaler.init())
    assert float(up.scale) == scaler.max_scale == 2.0**24
    assert bool(jnp.isfinite(up.scale))


def test_scale_stays_fp32_with_fp16_grads():
    scaler = LossScaler(init_scale=2.0**15)
    state = scaler.init()
    grads16 = {"g": jnp.asarray([2.0**-10, 1.0], jnp.float16)}
    state = scaler.update(state, all_finite(grads16))
    assert state.scale.dtype == jnp.float32 and state.good_steps.dtype == jnp.int32
    assert scaler.scale_loss(jnp.asarray(3.0, jnp.float16), state).dtype == jnp.float32
    out = scaler.unscale(grads16, state)
    assert out["g"].dtype == jnp.float32
    # 2**-25 is below fp16's smallest subnormal (2**-24): dividing in fp16 gives 0.
    assert float(out["g"][0]) == 2.0**-25
    assert float(grads16["g"][0] / jnp.float16(2.0**15)) == 0.0


def test_unscale_before_clipping():
    scaler = LossScaler(mode="static", init_scale=2.0**10)
    state = scaler.init()
    x = jnp.asarray([[0.3, -0.2], [0.1, 0.4]])
    params = _params()

    def loss(p):
        return jnp.sum((x @ p["w"] + p["b"]) ** 2) / 100

    true_grads = jax.grad(loss)(params)
    scaled = jax.grad(lambda p: scaler.scale_loss(loss(p), state))(params)
    clip = optax.clip_by_global_norm(1.0)
    assert float(optax.tree.norm(true_grads)) < 1.0  # clipping should be a no-op

    right, _ = clip.update(scaler.unscale(scaled, state), clip.init(params))
    reference, _ = clip.update(true_grads, clip.init(params))
    chex.assert_trees_all_close(right, reference, rtol=1e-6)
    chex.assert_trees_all_close(right, true_grads, rtol=1e-6)

    # Clipping the scaled grads sees a norm ~1000x too big and shrinks them.
    clipped_scaled, _ = clip.update(scaled, clip.init(params))
    wrong = scaler.unscale(clipped_scaled, state)
    assert float(optax.tree.norm(wrong)) == pytest.approx(1.0 / 2.0**10)
    assert float(optax.tree.norm(wrong)) < 0.05 * float(optax.tree.norm(true_grads))


def test_training_loop_under_jit_matches_eager():
    scaler = LossScaler(init_scale=4.0, growth_interval=2)
    tx = optax.adamw(1e-2, weight_decay=0.1)

    def step(carry, g):
        params, opt_state, ls = carry
        grads = scaler.unscale(jax.tree.map(lambda t: t * ls.scale, g), ls)
        finite = all_finite(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        carry = (
            select_tree(finite, new_params, params),
            select_tree(finite, new_opt, opt_state),
            scaler.update(ls, finite),
        )
        return carry, (ls.scale, finite)

    params = _params()
    base = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"]))(params)
    grads_seq = [base, jax.tree.map(lambda t: t.at[0].set(jnp.nan), base), base, base, base]
    init = (params, tx.init(params), scaler.init())

    eager, carry = [], init
    for g in grads_seq:
        carry, out = step(carry, g)
        eager.append(out)
    jit_step = jax.jit(step)
    jitted, jcarry = [], init
    for g in grads_seq:
        jcarry, out = jit_step(jcarry, g)
        jitted.append(out)
    chex.assert_trees_all_close(jcarry, carry, rtol=1e-6)
    scales = [float(s) for s, _ in jitted]
    assert scales == [4.0, 4.0, 2.0, 2.0, 4.0]
    assert [bool(f) for _, f in jitted] == [True, False, True, True, True]
    assert isinstance(jcarry[2], LossScaleState)


def test_static_and_none_modes():
    static = LossScaler(mode="static", init_scale=128.0)
    s = static.init()
    assert float(static.update(s, False).scale) == 128.0
    none = LossScaler(mode="none")
    n = none.init()
    assert float(n.scale) == 1.0
    assert float(none.update(n, False).scale) == 1.0
    g = none.unscale({"a": jnp.asarray([3.0], jnp.bfloat16)}, n)
    assert g["a"].dtype == jnp.float32 and float(g["a"][0]) == 3.0
    with pytest.raises(UserError, match="'dynamc'"):
        LossScaler(mode="dynamc")
    with pytest.raises(UserError, match="min_scale"):
        LossScaler(min_scale=0.0)


def test_finite_helpers():
    assert bool(all_finite({})) and bool(all_finite([]))
    tree = {"a": {"w": jnp.ones(3), "n": jnp.asarray(7, jnp.int32)}, "b": jnp.asarray([1, np.inf])}
    assert not bool(all_finite(tree))
    mask = nonfinite_leaf_mask(tree)
    bad = [
        jax.tree_util.keystr(path)
        for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0]
        if bool(flag)
    ]
    assert bad == ["['b']"]
    nan16 = {"x": jnp.asarray([np.nan], jnp.float16)}
    assert not bool(jax.jit(all_finite)(nan16))
    with pytest.raises(TypeError):
        select_tree(True, {"a": jnp.ones(2)}, {"a": jnp.ones(2, jnp.int32)})
