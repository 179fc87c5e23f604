"""The train state (sandbox/train/state.py): each kind of state keeps its own dtype from step 0."""

from __future__ import annotations

import threading

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


@pytest.mark.parametrize("policy", ["fp32", "fp8", "nvfp4"])
def test_initial_state_is_one_compile_and_bit_identical_to_op_by_op(tiny, policy, fresh_compiles):
    # Op-by-op (eager) Flax init compiles every primitive on its own: ~90 compiles, 5-8 s of a cold
    # run's start on a 2-core CPU. Under one jit it is one compile, and must give the same bits as
    # op by op (the golden curves start from those): XLA's algebraic simplifier would reassociate
    # the initializers' constant scalings (1-ulp differences), so the jit runs without it.
    from jax import monitoring

    from sandbox.train import state as state_lib

    cfg = tiny(sets=[f"precision.policy={policy}", "seed=7"])
    p = setup.parts(cfg)
    args = (p.model, p.full_tx, p.scaler, cfg.seed, cfg.model.context, cfg.forensics.spike_window)
    compiles, here = [], threading.current_thread()

    def listener(event, duration, **_):  # this thread's compiles: the listener hears every thread's
        if event == "/jax/core/compile/backend_compile_duration" and threading.current_thread() is here:
            compiles.append(duration)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        got = state_lib.init_state(*args)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) == 1  # one program (and the listener does hear compiles)
    want = state_lib.init_state_op_by_op(*args)
    got_leaves, want_leaves = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for (path, g), w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and np.array_equal(g, w, equal_nan=True), jax.tree_util.keystr(path)
