"""The train state: one pytree holding everything a step reads and writes.

Each kind of state has its own field (master parameters, optimizer state,
loss-scale state, fp8 meta, guard counters), so casts and selects act by type
and the optimizer never sees fp8 bookkeeping.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax._src import core as jax_core  # trace_state_clean: no public equivalent

from sandbox.model import GPT
from sandbox.precision import exact
from sandbox.precision.lowp_optim import adamw_lowp
from sandbox.precision.loss_scale import LossScaler, LossScaleState


class GuardState(NamedTuple):
    failed_step: jax.Array  # int32: first step with a non-finite loss/grad/param, -1 if none
    skipped_nonfinite: jax.Array  # int32: updates dropped by nan_policy=skip
    skipped_overflow: jax.Array  # int32: updates dropped by the loss scaler (not failures)
    skipped_spikes: jax.Array  # int32: updates dropped as loss spikes
    loss_window: jax.Array  # fp32 [W]: recent losses for spike detection (NaN = empty: the only
    #                          non-finite values a saved state may hold)
    consecutive_skips: jax.Array  # int32: steps in a row that applied no update (any reason)
    floor_overflows: jax.Array  # int32: overflows in a row that began at the scaler's min_scale
    stalled_step: jax.Array  # int32: step (0-based) at which the run stopped updating for good, -1 if none


class TrainState(NamedTuple):
    step: jax.Array  # int32: steps run (skipped ones included)
    opt_step: jax.Array  # int32: updates applied; drives the lr schedule
    params: Any  # master parameters, in the policy's param dtype
    opt_state: Any
    loss_scale: LossScaleState
    fp8_meta: Any  # {} unless the policy uses fp8
    guard: GuardState


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    decay = opt_cfg.decay_steps or total_steps
    warmup = min(opt_cfg.warmup_steps, decay)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
        decay_steps=max(decay, warmup + 1), end_value=opt_cfg.lr * opt_cfg.min_lr_ratio)


def _decay_mask(params):
    # Weight decay on matrices only: not on norms, biases (the usual GPT recipe).
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int, moments: str = "auto") -> optax.GradientTransformation:
    """Clip (after unscaling, since grads arrive unscaled) then AdamW on a warmup-cosine schedule.

    `moments`: "auto" is optax.adamw (moments in the parameters' dtype); fp32 | bf16 | fp8 store
    them so and update them in fp32 (`lowp_optim.adamw_lowp`; resolved by `lowp_optim.resolve_moments`).
    optax's AdamW decays by weight_decay * lr(t); with `independent_weight_decay` the coefficient is
    divided by the peak lr, so the decay is weight_decay * lr(t)/lr and an lr sweep does not also sweep
    the decay (Wortsman et al. 2023, sec. 3.2.2).
    """
    parts = [optax.clip_by_global_norm(opt_cfg.grad_clip)] if opt_cfg.grad_clip > 0 else []
    wd = opt_cfg.weight_decay
    if opt_cfg.independent_weight_decay and opt_cfg.lr > 0:
        wd = wd / opt_cfg.lr
    adamw = optax.adamw if moments == "auto" else functools.partial(adamw_lowp, moments=moments)
    parts.append(adamw(make_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                       eps=opt_cfg.eps, weight_decay=wd, mask=_decay_mask))
    return optax.chain(*parts)


# Compiling the init without XLA's algebraic simplifier keeps it bit-identical to running it op by op:
# with it, XLA folds an initializer's constant scalings together (normal * sqrt(2) * stddev becomes
# normal * c), a 1-ulp change in ~30% of the weights (tests/test_state.py checks every leaf).
_INIT_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "algsimp"}


def init_state(model: GPT, tx: optax.GradientTransformation, scaler: LossScaler, seed: int,
               context: int, spike_window: int) -> TrainState:
    """The step-0 state, as one compiled program.

    Op by op, Flax's init compiles each primitive on its own (~90 compiles, 5 to 8 s of a cold run's
    start on a 2-core CPU, issue 18); jitted it is one compile of ~2 s with the same bits.
    """
    fn = functools.partial(init_state_op_by_op, model, tx, scaler, seed, context, spike_window)
    if not jax_core.trace_state_clean():  # under eval_shape or jit: traced anyway, and options are top-level only
        return fn()
    return exact.jit(fn, compiler_options=_INIT_COMPILER_OPTIONS)()


def init_state_op_by_op(model: GPT, tx: optax.GradientTransformation, scaler: LossScaler, seed: int,
                        context: int, spike_window: int) -> TrainState:
    """init_state's definition; called directly it runs op by op (the reference its test holds it to)."""
    tokens = jnp.zeros((1, context), jnp.int32)
    variables = model.init(jax.random.key(seed), tokens)
    params = variables["params"]
    fp8_meta = variables.get("fp8_meta", {})
    guard = GuardState(failed_step=jnp.int32(-1), skipped_nonfinite=jnp.int32(0), skipped_overflow=jnp.int32(0),
                       skipped_spikes=jnp.int32(0), loss_window=jnp.full((spike_window,), jnp.nan, jnp.float32),
                       consecutive_skips=jnp.int32(0), floor_overflows=jnp.int32(0), stalled_step=jnp.int32(-1))
    return TrainState(jnp.int32(0), jnp.int32(0), params, tx.init(params), scaler.init(), fp8_meta, guard)
