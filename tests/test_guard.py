"""The step's guard seen from a whole run: stalls stop as failures, events tell the truth, checkpoints stay finite.

Step numbering throughout: a step is named by `state.step` after it (1-based),
in metrics.jsonl, events, summary.json and the CLI's message alike.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import optax
import pytest

from sandbox import config as config_lib
from sandbox.cli import main
from sandbox.logger import read_metrics
from sandbox.runs import load_run_state
from sandbox.train import loop


def rows_of(run_dir, split):
    return [r for r in read_metrics(run_dir) if r["split"] == split]


def test_collapsed_loss_scaler_stops_as_failure_with_cause_bundle_and_exit_code(tiny, tmp_path, capsys):
    """fp16, weights so large that gradients overflow at any scale: the run must not end `finished`.

    init_scale 8, backoff 0.5, min_scale 1: steps 1-3 back off to the floor, steps 4, 5, 6 overflow
    at the floor, and the third of those (min_scale_overflows = 3) stops the run at step 6.
    """
    cfg = tiny(sets=["training.steps=40", "precision.policy=fp16", "model.init_std=10",
                     "precision.loss_scale.init_scale=8"])
    config_file = tmp_path / "collapse.yaml"
    config_file.write_text(config_lib.dump_yaml(cfg), encoding="utf-8")
    code = main(["train", str(config_file), "--set", "logging.progress=false"])
    out = capsys.readouterr().out
    assert code == loop.EXIT_FAILURE
    assert "training stopped at step 6: gradients overflow even at the minimum loss scale" in out
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == 6 and summary["steps"] == 6
    assert summary["cause"] == "gradients overflow even at the minimum loss scale"
    assert summary["overflow_skips"] == 6 and summary["final_loss_scale"] == 1.0
    assert (cfg.run_dir / "failure" / "meta.json").exists()
    train_rows = rows_of(cfg.run_dir, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]  # nothing logged past the stopping step
    assert not any(r["applied"] for r in train_rows)
    # each overflow event's loss_scale_after is the scale the next step really used (floor included)
    events = [r for r in rows_of(cfg.run_dir, "event") if r["event"].startswith("overflow")]
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6]
    used = [r["loss_scale"] for r in train_rows]
    assert used == [8.0, 4.0, 2.0, 1.0, 1.0, 1.0]
    assert [e["loss_scale_after"] for e in events[:-1]] == used[1:]
    assert all(e["nonfinite_grads"].split(" ")[0].isdigit() for e in events)  # a count first
    stalled = [r for r in rows_of(cfg.run_dir, "event") if r["event"] == "stalled"]
    assert [s["step"] for s in stalled] == [6]


@pytest.mark.parametrize("steps,max_skipped,stop_at,cause", [
    (6, 100, 6, "no update applied in any of the 6 steps"),  # shorter than the limit: its last step
    (20, 3, 4, "no update applied in any of the 4 steps"),  # more than 3 skips in a row: the 4th
])
def test_skip_policy_run_that_skips_every_step_fails(tiny, steps, max_skipped, stop_at, cause):
    """A naive fp16 softmax is NaN on every batch; nan_policy=skip would skip forever."""
    cfg = tiny(overrides={"model": {"init_std": 0.3}, "precision": {"policy": "fp16", "naive_softmax": True},
                          "forensics": {"nan_policy": "skip", "max_skipped_steps": max_skipped}},
               sets=[f"training.steps={steps}"])
    result = loop.train(cfg, quiet=True)
    s = result.summary
    assert result.status == "failed" and s["status"] == "failed"
    assert s["failed_step"] == stop_at == s["steps"] and s["cause"].startswith(cause)
    assert s["nonfinite_skips"] == stop_at and int(result.state.opt_step) == 0
    assert [r["step"] for r in rows_of(result.run_dir, "train")][-1] == stop_at


def test_halt_names_the_failed_step_the_same_everywhere(tiny):
    """Fails at the first step: summary steps, failed_step, the event and the last metrics row all say 1."""
    cfg = tiny(overrides={"model": {"init_std": 0.3}, "precision": {"policy": "fp16", "naive_softmax": True},
                          "forensics": {"nan_policy": "halt"}})
    result = loop.train(cfg, quiet=True)
    assert result.status == "failed"
    assert result.summary["failed_step"] == 1 and result.summary["steps"] == 1
    assert [r["step"] for r in rows_of(result.run_dir, "train")] == [1]
    event = next(r for r in rows_of(result.run_dir, "event") if r["event"].startswith("non-finite"))
    assert event["step"] == 1 and "failed_step" not in rows_of(result.run_dir, "train")[0]


HUGE = ["optimizer.grad_clip=0", "model.init_std=1e19", "training.log_every=2"]


def test_nonfinite_optimizer_state_is_caught_and_named(tiny):
    """Weights of 1e19, no clipping: gradients stay finite but square to inf in Adam's nu.

    The event must name exactly the leaves an unguarded optax update makes non-finite (computed
    here from the held pre-failure state with plain jax.grad + optax), with their count.
    """
    cfg = tiny(sets=["training.steps=4", *HUGE])
    result = loop.train(cfg, quiet=True)
    assert result.status == "failed"
    failed = result.summary["failed_step"]
    event = next(r for r in rows_of(result.run_dir, "event") if r["event"].startswith("non-finite"))
    assert event["step"] == failed and math.isfinite(event["loss"])

    run = loop.build(cfg)
    state = result.state  # held: the state before the failed step
    batch = run.pipeline.train_batch(failed - 1).as_dict()

    def loss(params):
        logits = run.ctx.model.apply({"params": params}, batch["inputs"], deterministic=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    grads = jax.grad(loss)(state.params)
    assert all(bool(np.isfinite(g).all()) for g in jax.tree.leaves(grads))  # the gradient is finite
    _, new_opt = run.ctx.tx.update(grads, state.opt_state, state.params)
    bad = [n for n, leaf in zip(loop.leaf_paths(new_opt), jax.tree.leaves(new_opt))
           if not bool(np.isfinite(np.asarray(leaf)).all())]
    assert bad and all("/nu/" in n for n in bad)
    assert event["nonfinite"] == loop.name_list([f"opt_state/{n}" for n in bad])


def test_checkpoint_never_holds_a_nonfinite_leaf(tiny):
    """nan_policy=skip through the same overflow of nu: the run goes on, and its checkpoint is finite.

    The only non-finite values a state may hold are the NaN 'empty' markers of guard/loss_window.
    """
    result = loop.train(tiny(sets=["training.steps=4", "forensics.nan_policy=skip", *HUGE]), quiet=True)
    assert result.summary["nonfinite_skips"] >= 1 and result.status == "finished"
    _, state, step = load_run_state(result.run_dir)
    assert step == 4
    names = loop.leaf_paths(state)
    bad = [n for n, leaf in zip(names, jax.tree.leaves(state))
           if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.isfinite(np.asarray(leaf)).all()]
    assert bad == ["guard/loss_window"]
