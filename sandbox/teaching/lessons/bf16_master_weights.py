"""Lesson: bf16 without fp32 master weights loses its updates and stalls.

What is measured. The train step reports `lost_update_frac`: of the
parameters whose optimizer update was nonzero, the fraction whose stored
value did not change (new == old), i.e. updates rounded away. bf16 keeps 8
significant bits, so adding u to w is lost when |u| < |w| * 2^-9. With Adam
every update is about lr in size, so a small lr and parameters of order
0.1-1 (LayerNorm scales are 1) lose most updates when the parameters are
themselves bf16 (`bf16_pure`). With fp32 master weights (`bf16`) the same
updates accumulate. The loss gap is the cost of the lost updates.
"""

from __future__ import annotations

from pathlib import Path

from sandbox.teaching.lessons import LessonResult, plot_runs, train_lesson_runs

NAME = "bf16_master_weights"
TITLE = "bf16 without fp32 master weights: updates are rounded away and training stalls"
NARRATIVE = """\
bf16 has the range of fp32 but only 8 significant bits: 1 + 0.001 rounds back to 1. An optimizer
step changes each weight by about the learning rate, so with a small learning rate most updates to
weights stored in bf16 vanish. Mixed precision therefore keeps fp32 "master" weights and casts
them to bf16 for the forward pass. We train the same model with fp32 master weights (bf16) and
with weights stored in bf16 (bf16_pure), and compare the fraction of updates lost and the loss."""

RUNS = ("bf16_master", "bf16_pure")


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    res = LessonResult(NAME)
    results = train_lesson_runs(res, RUNS, Path(out_dir), ["training.steps=20"] if quick else [])
    master, pure = (results[n].summary for n in RUNS)
    res.check("bf16_pure: >10% of nonzero updates leave the bf16 weight unchanged",
              f"lost_update_frac {pure['lost_update_frac']:.3f}", pure["lost_update_frac"] > 0.1)
    res.check("fp32 master weights: <1% lost", f"lost_update_frac {master['lost_update_frac']:.2e}",
              master["lost_update_frac"] < 0.01)
    gap = pure["train_ce"] - master["train_ce"]
    res.check("bf16_pure stalls: its final loss is > 0.05 nats above the master-weights run",
              f"train loss {pure['train_ce']:.4f} pure vs {master['train_ce']:.4f} master (gap {gap:+.4f})",
              gap > 0.05)

    res.plots.append(plot_runs({n: results[n].run_dir for n in RUNS}, "lost_update_frac",
                               "fraction of updates rounded away", Path(out_dir) / "bf16_master_weights.png"))
    return res
