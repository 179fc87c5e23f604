"""The train step's metrics contract: guard flags are booleans, whatever the loss scaling and nan_policy.

Shapes and dtypes come from `jax.eval_shape` (no compilation), so the whole
matrix of loss-scale modes x nan policies runs in seconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from sandbox.train import loop
from sandbox.train.step import train_step

GUARD_FLAGS = ("overflow", "nonfinite", "spike", "applied", "stalled")


@pytest.mark.parametrize("nan_policy", ["halt", "skip", "capture"])
@pytest.mark.parametrize("mode", ["dynamic", "static", "none"])
def test_every_guard_flag_is_a_bool(tiny, mode, nan_policy):
    run = loop.build(tiny(sets=["precision.policy=fp16", f"precision.loss_scale.mode={mode}",
                                f"forensics.nan_policy={nan_policy}", "forensics.skip_spikes=true"]))
    assert run.ctx.scaler.mode == mode
    state = jax.eval_shape(lambda: loop._init(run))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in run.pipeline.train_batch(0).as_dict().items()}
    new_state, metrics = jax.eval_shape(functools.partial(train_step, ctx=run.ctx), state, batch)
    for name in GUARD_FLAGS:
        assert metrics[name].dtype == jnp.bool_ and metrics[name].shape == (), (name, metrics[name])
    assert metrics["nonfinite_leaves"].dtype == jnp.bool_
    # and the counters they feed stay int32 (a bool added to an int32 counter must not promote it)
    for name in ("skipped_nonfinite", "skipped_overflow", "skipped_spikes", "consecutive_skips",
                 "floor_overflows", "stalled_step", "failed_step"):
        assert getattr(new_state.guard, name).dtype == jnp.int32, name
    assert new_state.opt_step.dtype == jnp.int32
