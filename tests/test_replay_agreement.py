"""The replay says whether op-by-op evaluation went non-finite where the compiled step did.

Op by op each operation rounds once; the compiled step fuses operations (XLA:CPU contracts a * b + c
into a fused multiply-add, and sums in its own order), so the two differ in the last bits. The
replay's origin is an op-by-op finding: the report must say whether that evaluation made the same
tensors non-finite as the compiled step (its guard flags), and say so plainly when it did not.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from sandbox.forensics.bundle import load_bundle, save_bundle
from sandbox.forensics.localize import Localization
from sandbox.forensics.replay import agreement, format_agreement, format_report, replay
from sandbox.train import loop
from sandbox.train.metrics import guard_leaf_names


@pytest.mark.slow  # a train and a replay of two phases (30-60 s); the update branch's names: the next test
def test_op_by_op_and_compiled_agree_on_an_update_failure_named_independently(tiny):
    # Weights of 1e19 and no clipping: finite gradients that square to inf in Adam's nu
    # (tests/test_guard.py), so the replay localizes the update.
    cfg = tiny(sets=["training.steps=4", "optimizer.grad_clip=0", "model.init_std=1e19"])
    result = loop.train(cfg, quiet=True, capture=save_bundle)
    assert result.status == "failed"
    report = replay(load_bundle(result.bundle))
    a = report.agreement
    assert report.phase == "update" and a.compared == "update" and a.same is True

    # The moments an unguarded optax update makes non-finite, from plain jax.grad + optax.
    run = loop.build(cfg)
    state, batch = result.state, run.pipeline.train_batch(result.summary["failed_step"] - 1).as_dict()

    def loss(params):
        logits = run.ctx.model.apply({"params": params}, batch["inputs"], deterministic=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    _, new_opt = run.ctx.tx.update(jax.grad(loss)(state.params), state.opt_state, state.params)
    expected = [f"opt_state/{n}" for n, leaf in zip(loop.leaf_paths(new_opt), jax.tree.leaves(new_opt))
                if not np.isfinite(np.asarray(leaf)).all()]
    assert expected and a.compiled == a.op_by_op == expected
    text = format_report(report)
    assert "op by op vs compiled step: the same non-finite new parameters and optimizer moments" in text


def _metrics(state, bad: set[str], loss: float) -> dict:
    names = guard_leaf_names(state)
    return {"loss": np.float32(loss), "nonfinite_leaves": np.array([n in bad for n in names])}


def test_a_difference_is_reported_with_both_sides_named(tiny):
    run = loop.build(tiny())
    state = run.abstract_state
    grads = jax.tree.map(lambda _: False, state.params)
    grads_bad = dict(grads, ln_f={**grads["ln_f"], "scale": True})

    # The compiled step: a NaN loss and the final norm's scale gradient; op by op: only the loss.
    metrics = _metrics(state, {"grads/ln_f/scale"}, float("nan"))
    found = Localization(None, None, (True, grads, {}))
    a = agreement(run.ctx, state, metrics, "gradients", found)
    assert (a.compared, a.same, a.compiled, a.op_by_op) == ("gradients", False, ["loss", "grads/ln_f/scale"],
                                                            ["loss"])
    lines = format_agreement(a)
    assert lines[0].startswith("op by op vs compiled step: DIFFERENT non-finite loss and gradients")
    assert "grads/ln_f/scale" in lines[0] and "need not be where the compiled step did" in lines[1]

    # The same tensors on both sides.
    found = Localization(None, None, (True, grads_bad, {}))
    a = agreement(run.ctx, state, metrics, "gradients", found)
    assert a.same is True and format_agreement(a)[0].startswith("op by op vs compiled step: the same")

    # Nothing non-finite op by op while the compiled step failed: every flagged tensor is listed.
    a = agreement(run.ctx, state, metrics, "none", Localization(None, None))
    assert (a.compared, a.same, a.op_by_op) == ("none", False, []) and a.compiled == ["loss", "grads/ln_f/scale"]

    # A stall: neither side made anything non-finite.
    a = agreement(run.ctx, state, _metrics(state, set(), 1.0), "none", Localization(None, None))
    assert a.same is True and format_agreement(a) == ["op by op vs compiled step: neither made any of the "
                                                      "tensors non-finite"]


def test_update_phase_compares_new_parameters_and_moments_by_their_guard_names(tiny):
    run = loop.build(tiny())
    state = run.abstract_state
    params = jax.tree.map(lambda _: False, state.params)
    opt = jax.tree.map(lambda _: False, state.opt_state)
    nu = [n for n in guard_leaf_names(state) if n.startswith("opt_state/") and "/nu/" in n]
    flags = [n in nu[:2] for n in loop.leaf_paths(jax.tree.map(lambda _: 0, {"opt_state": state.opt_state}))]
    opt_bad = jax.tree.unflatten(jax.tree.structure(opt), flags)
    # A NaN gradient leaf is not compared here: the update phase is about the new state.
    metrics = _metrics(state, {"grads/ln_f/scale", *nu[:2]}, 1.0)
    a = agreement(run.ctx, state, metrics, "update", Localization(None, None, (params, opt_bad)))
    assert (a.compared, a.same, a.compiled, a.op_by_op) == ("update", True, nu[:2], nu[:2])
    a = agreement(run.ctx, state, metrics, "update", Localization(None, None, (params, opt)))
    assert (a.same, a.op_by_op) == (False, [])


def test_not_compared_under_gradient_accumulation(tiny):
    run = loop.build(tiny(sets=["optimizer.accum_steps=2", "training.batch_size=16"]))
    state = run.abstract_state
    a = agreement(run.ctx, state, _metrics(state, set(), float("nan")), "gradients",
                  Localization(None, None, (True, jax.tree.map(lambda _: False, state.params), {})))
    assert a.compared == "" and a.same is None and "sums 2 microbatches" in a.note
    assert format_agreement(a) == [f"op by op vs compiled step: {a.note}"]
