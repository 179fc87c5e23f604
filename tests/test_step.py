"""The train step's metrics contract: guard flags are booleans, whatever the loss scaling and nan_policy.

Shapes and dtypes come from `jax.eval_shape` (no compilation), so the whole
matrix of loss-scale modes x nan policies runs in seconds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from sandbox.train import setup
from sandbox.train.step import train_step

GUARD_FLAGS = ("overflow", "nonfinite", "spike", "applied", "stalled")


@pytest.mark.parametrize("nan_policy", ["halt", "skip", "capture"])
@pytest.mark.parametrize("mode", ["dynamic", "static", "none"])
def test_every_guard_flag_is_a_bool(tiny, mode, nan_policy):
    run = setup.build(tiny(sets=["precision.policy=fp16", f"precision.loss_scale.mode={mode}",
                                f"forensics.nan_policy={nan_policy}", "forensics.skip_spikes=true"]))
    assert run.ctx.scaler.mode == mode
    state = jax.eval_shape(lambda: setup.init_state_of(run.cfg, run.parts))
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


# ---------------------------------------------------------------- one step against the golden curves

import numpy as np  # noqa: E402

from sandbox import config as config_lib  # noqa: E402
from tests.golden.runs import COMMON, REPO, RUNS, load_records, machine_key  # noqa: E402

GOLDEN = load_records().get(machine_key())  # None: no record for this machine class (tests/golden/runs.py)
POLICY_RUNS = ("fp32", "bf16", "fp16", "fp8", "tf32", "bf16_pure", "fp16_noscale", "naive_softmax", "fp16_overflow")
FAST = ("fp32", "fp16_overflow", "fp8")


def _golden_value(text: str) -> float:
    return float(text.strip("'"))  # 'nan' is recorded quoted


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in POLICY_RUNS])
def test_one_step_metrics_match_the_golden_curve_and_state_dtypes_hold(name, tmp_path):
    """The step on its own (no loop) reproduces the golden run's first row bit for bit; after it, the
    loss scale, fp8 meta and guard state keep their fp32/int32 dtypes."""
    path, extra = RUNS[name]
    cfg = config_lib.load_config(REPO / path, [*COMMON, f"run_root={tmp_path}", f"name={name}", *extra])
    run = setup.build(cfg)
    state = setup.initial_state(run)
    new_state, m = run.step_fn(state, setup.place_batch(run, run.pipeline.train_batch(0)))
    m, new_state = jax.device_get((m, new_state))
    assert new_state.loss_scale.scale.dtype == np.float32 and new_state.loss_scale.good_steps.dtype == np.int32
    assert {leaf.dtype for leaf in jax.tree.leaves(new_state.fp8_meta)} <= {np.dtype(np.float32)}
    assert bool(new_state.fp8_meta) == (name == "fp8")
    for field, leaf in new_state.guard._asdict().items():
        assert leaf.dtype == (np.float32 if field == "loss_window" else np.int32), field
    assert new_state.step.dtype == np.int32 and new_state.opt_step.dtype == np.int32 and int(new_state.step) == 1
    if GOLDEN is None:
        pytest.skip(f"dtypes hold; no golden record for this machine ({machine_key()}, tests/golden/runs.py)")
    want = GOLDEN[name]
    for key in ("loss", "grad_norm", "loss_scale"):
        got, expected = float(m[key]), _golden_value(want[key][0])
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (key, got, expected)
    assert float(m["applied"]) == _golden_value(want["applied"][0])


def test_telemetry_is_a_step_context_field_not_a_second_model(tiny):
    """The lean step shares the model object; only the static context differs, and it drops the stats."""
    run = setup.build(tiny(sets=["precision.policy=fp8", "precision.telemetry_every=2"]))
    lean_ctx = dataclasses.replace(run.ctx, telemetry=False)
    assert lean_ctx.model is run.ctx.model and run.lean_step_fn is not None
    state = jax.eval_shape(lambda: setup.init_state_of(run.cfg, run.parts))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in run.pipeline.train_batch(0).as_dict().items()}
    _, full = jax.eval_shape(functools.partial(train_step, ctx=run.ctx), state, batch)
    _, lean = jax.eval_shape(functools.partial(train_step, ctx=lean_ctx), state, batch)
    assert {"fp8_stats", "lost_update_frac", "update_ratio"} <= set(full)
    assert not {"fp8_stats", "lost_update_frac", "update_ratio"} & set(lean)
