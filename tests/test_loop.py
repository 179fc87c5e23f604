"""The loop dispatches, then reads back: never the step it has just dispatched (sandbox/train/loop.py)."""

from __future__ import annotations

import json
import statistics
import time

from sandbox.train import loop


class InFlight:
    """Counts dispatched steps; a hook records how many were dispatched when each step's metrics arrive."""

    def __init__(self):
        self.dispatched = 0
        self.seen: list[tuple[int, int]] = []  # (step, steps dispatched by then)

    def wrap(self, step_fn):
        def counting(*args):
            self.dispatched += 1
            return step_fn(*args)

        return counting

    def on_step_end(self, step, metrics, state):
        self.seen.append((step, self.dispatched))


def _train_counting(cfg) -> tuple[InFlight, loop.RunResult]:
    probe = InFlight()
    trainer = loop.Trainer(cfg, [probe], quiet=True)
    trainer.run.step_fn = probe.wrap(trainer.run.step_fn)
    return probe, trainer.train()


def test_metrics_are_read_only_after_the_next_step_is_dispatched(tiny):
    probe, result = _train_counting(tiny(sets=["training.steps=6", "training.log_every=1"]))
    assert result.status == "finished"
    assert [s for s, _ in probe.seen] == [1, 2, 3, 4, 5, 6]  # every step handed on, in order
    # step k (1-based) is read while step k+1 is in flight; only the last step waits for nothing
    assert all(dispatched == step + 1 for step, dispatched in probe.seen[:-1]), probe.seen
    assert probe.seen[-1] == (6, 6)


def test_a_checkpoint_reads_its_own_step_and_the_log_interval_still_defers(tiny):
    """A checkpoint needs the state, so its step is read at once; log-only intervals stay one behind."""
    probe, result = _train_counting(tiny(sets=["training.steps=8", "training.log_every=2", "checkpoint.every=4"]))
    assert result.status == "finished"
    by_step = dict(probe.seen)
    assert by_step[2] == 3 and by_step[6] == 7  # log intervals: read after the next dispatch
    assert by_step[4] == 4 and by_step[8] == 8  # checkpoint and last step: read before going on


def test_step_timings_leave_out_evaluation_checkpoints_and_the_compile(tiny, monkeypatch):
    """The logged step_time and the summary's tokens/s describe training steps only.

    Evaluation and checkpoint saves are made slow on purpose (0.6 s each, against milliseconds for a
    tiny step): no logged interval may absorb them, and the summary's tokens/s is the median over
    every log interval but the first (which holds the step's compile), not one interval's value.
    """
    slow = 0.6
    real_eval, real_save = loop.Trainer.evaluate, loop.Trainer.save_checkpoint

    def slow_eval(self, *a, **k):
        time.sleep(slow)
        return real_eval(self, *a, **k)

    def slow_save(self, *a, **k):
        time.sleep(slow)
        return real_save(self, *a, **k)

    monkeypatch.setattr(loop.Trainer, "evaluate", slow_eval)
    monkeypatch.setattr(loop.Trainer, "save_checkpoint", slow_save)
    cfg = tiny(sets=["training.steps=24", "training.log_every=4", "training.eval_every=8", "checkpoint.every=12"])
    result = loop.Trainer(cfg, quiet=True).train()
    assert result.status == "finished"
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    per_interval = {r["step"]: r for r in rows if r["split"] == "train" and r["step"] % 4 == 0}
    assert sorted(per_interval) == [4, 8, 12, 16, 20, 24]
    later = [per_interval[s] for s in (8, 12, 16, 20, 24)]
    # an interval that absorbed a 0.6 s pause would show >= 0.15 s per step (4 steps)
    assert all(r["step_time"] < slow / 4 for r in later), [r["step_time"] for r in later]
    assert result.summary["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in later)
