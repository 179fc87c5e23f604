"""The train state (sandbox/train/state.py): each kind of state keeps its own dtype from step 0."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sandbox.train import setup


@pytest.mark.parametrize("policy", ["fp16", "fp8", "bf16_pure"])
def test_initial_state_dtypes_by_kind(tiny, policy):
    cfg = tiny(sets=[f"precision.policy={policy}", "forensics.spike_window=8"])
    state = setup.abstract_state(cfg)  # eval_shape: nothing allocated
    param_dtype = np.dtype("bfloat16") if policy == "bf16_pure" else np.dtype(np.float32)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {param_dtype}
    assert state.loss_scale.scale.dtype == np.float32 and state.loss_scale.good_steps.dtype == np.int32
    assert {x.dtype for x in jax.tree.leaves(state.fp8_meta)} <= {np.dtype(np.float32)}
    assert bool(jax.tree.leaves(state.fp8_meta)) == (policy == "fp8")
    assert state.guard.loss_window.shape == (8,) and state.guard.loss_window.dtype == np.float32
    assert state.step.dtype == np.int32 and state.opt_step.dtype == np.int32
