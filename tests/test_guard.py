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
from sandbox.train import loop
from sandbox.train.setup import load_run_state


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


# ---------------------------------------------------------------- the pure decision table (train/guard.py)

from itertools import product  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from sandbox.train.guard import Checks, GuardRules, decide, spike  # noqa: E402
from sandbox.train.state import GuardState  # noqa: E402


def _guard(failed=-1, stalled=-1, skips=0, floor=0, window=4):
    return GuardState(failed_step=np.int32(failed), skipped_nonfinite=np.int32(0), skipped_overflow=np.int32(0),
                      skipped_spikes=np.int32(0), loss_window=np.full((window,), np.nan, np.float32),
                      consecutive_skips=np.int32(skips), floor_overflows=np.int32(floor),
                      stalled_step=np.int32(stalled))


def _expected(dynamic, nan_policy, loss_ok, grads_ok, state_ok, is_spike, failed_before, stalled_before):
    """The rules of train/guard.py's module doc, written out in plain Python."""
    held = (failed_before and nan_policy != "skip") or stalled_before
    overflow = dynamic and loss_ok and not grads_ok
    failure = (not loss_ok) or (grads_ok and not state_ok) or (not dynamic and not grads_ok)
    apply = loss_ok and grads_ok and state_ok and not is_spike and not held
    return {"apply": apply, "overflow": overflow and not held, "nonfinite": failure and not held,
            "spike": is_spike and not held, "keep_scale": held or failure}


@pytest.mark.parametrize("dynamic,nan_policy", list(product([False, True], ["skip", "halt", "capture"])))
def test_guard_decision_table_matches_the_written_rules(dynamic, nan_policy):
    """Every combination of finite flags, spike and held state (no stall limits): flags, counters, window."""
    rules = GuardRules(nan_policy=nan_policy, dynamic=dynamic, max_skipped_steps=0, min_scale_overflows=0)
    for loss_ok, grads_ok, state_ok, is_spike, failed_before, stalled_before in product([True, False], repeat=6):
        if is_spike and not loss_ok:
            continue  # the step never calls a non-finite loss a spike
        guard = _guard(failed=3 if failed_before else -1, stalled=3 if stalled_before else -1, skips=2)
        checks = Checks(*map(np.bool_, (loss_ok, grads_ok, state_ok, is_spike, False)))
        d = decide(rules, guard, checks, np.float32(1.5), np.int32(7), np.int32(5))
        want = _expected(dynamic, nan_policy, loss_ok, grads_ok, state_ok, is_spike, failed_before, stalled_before)
        case = (loss_ok, grads_ok, state_ok, is_spike, failed_before, stalled_before)
        got = {k: bool(getattr(d, k)) for k in want}
        assert got == want, case
        held = (failed_before and nan_policy != "skip") or stalled_before
        g = d.guard
        assert int(g.consecutive_skips) == (2 if held else 0 if want["apply"] else 3), case
        assert int(g.skipped_nonfinite) == int(want["nonfinite"]) and int(g.skipped_overflow) == int(want["overflow"])
        assert int(g.skipped_spikes) == int(want["spike"]), case
        first_failure = want["nonfinite"] and not failed_before
        assert int(g.failed_step) == (7 if first_failure else 3 if failed_before else -1), case
        assert (float(g.loss_window[0]) == 1.5) == want["apply"], case
        assert not bool(d.stalled) and int(g.stalled_step) == (3 if stalled_before else -1), case
        for name, leaf in g._asdict().items():
            assert leaf.dtype == (np.float32 if name == "loss_window" else np.int32), name


def test_guard_stalls_past_the_skip_limit_and_at_the_floor():
    skip = Checks(*map(np.bool_, (True, True, True, True, False)))  # a finite spike: skipped, not failed
    rules = GuardRules(nan_policy="capture", dynamic=True, max_skipped_steps=2, min_scale_overflows=3)
    d = decide(rules, _guard(skips=1), skip, np.float32(9.0), np.int32(4), np.int32(2))
    assert not bool(d.stalled) and int(d.guard.consecutive_skips) == 2
    d = decide(rules, d.guard, skip, np.float32(9.0), np.int32(5), np.int32(2))
    assert bool(d.stalled) and int(d.guard.stalled_step) == 5 and bool(d.keep_scale)
    overflow_at_floor = Checks(*map(np.bool_, (True, False, True, False, True)))
    d = decide(rules, _guard(floor=2), overflow_at_floor, np.float32(1.0), np.int32(8), np.int32(3))
    assert bool(d.overflow) and int(d.guard.floor_overflows) == 3 and bool(d.stalled)
    # the run's last step stalls when no step applied an update; one applied update is enough to finish
    last = GuardRules(total_steps=10, max_skipped_steps=0, min_scale_overflows=0)
    assert bool(decide(last, _guard(), skip, np.float32(1.0), np.int32(9), np.int32(0)).stalled)
    assert not bool(decide(last, _guard(), skip, np.float32(1.0), np.int32(9), np.int32(1)).stalled)


def test_disabled_guard_applies_every_update():
    bad = Checks(*map(np.bool_, (False, False, False, False, False)))
    assert bool(decide(GuardRules(enabled=False), _guard(), bad, np.float32(np.nan), np.int32(0), np.int32(0)).apply)


def test_spike_is_loss_above_mean_plus_sigma_std_of_the_finite_window():
    window = np.array([1.0, 2.0, 3.0, np.nan], np.float32)
    finite = window[np.isfinite(window)].astype(np.float64)
    threshold = finite.mean() + 2.0 * finite.std(ddof=1)  # numpy float64 reference
    assert not bool(spike(jnp.asarray(window), jnp.float32(threshold - 1e-3), 2.0))
    assert bool(spike(jnp.asarray(window), jnp.float32(threshold + 1e-3), 2.0))
    assert not bool(spike(jnp.asarray(np.full(4, np.nan, np.float32)), jnp.float32(1e9), 2.0))  # < half full
