"""Lesson: a naive fp16 attention softmax overflows to NaN; forensics names it; the stable one fixes it.

What is run. The same tiny model twice under fp16: with the teaching
ablation `precision.naive_softmax` (exp(s)/sum(exp(s)) in fp16, no max
subtraction) and with the shipped stable softmax (exp(s - logsumexp(s)) in
fp32). A large `model.init_std` makes attention scores exceed log(65504) ~
11.1 from the first step. The naive run's loss goes NaN, the trainer stops
(nan_policy capture) and writes a failure bundle; `sandbox replay`'s library
function (`sandbox.forensics.replay.replay`) rebuilds the failing step from
the bundle and interprets it op by op, naming the first op whose finite
inputs gave a non-finite output. The expected origin is the `exp` inside
the attention's `softmax` name scope, cause `exp_overflow`: the NaN seen in
the loss is only the symptom (inf/inf a few ops later).
"""

from __future__ import annotations

import math
from pathlib import Path

from sandbox.floatio import read_float
from sandbox.forensics.bundle import load_bundle
from sandbox.forensics.replay import replay
from sandbox.teaching.lessons import LessonResult, label_axes, new_figure, save_figure, train_lesson_run, train_rows

NAME = "naive_softmax"
TITLE = "Attention overflow: a naive fp16 softmax turns into NaN; forensics names the softmax"
NARRATIVE = """\
softmax(s) = exp(s) / sum(exp(s)). In fp16, exp(s) is inf once s > log(65504) ~ 11.1, and inf/inf is
NaN. The stable form subtracts the maximum first (exp never sees a positive argument) and works in
fp32. We train a tiny fp16 model whose attention scores are large from the start, once with the
naive softmax and once with the stable one. The naive run stops with a failure bundle; replaying
the bundle op by op names the operation that first produced a non-finite value."""


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    out_dir = Path(out_dir)
    sets = ["training.steps=4"] if quick else []
    res = LessonResult(NAME)
    naive = train_lesson_run("naive_softmax", out_dir, sets)
    stable = train_lesson_run("stable_softmax", out_dir, sets)
    res.runs = [naive.run_dir, stable.run_dir]
    res.check("naive fp16 softmax: the run fails on a non-finite loss and writes a bundle",
              f"status {naive.status}, failed at step {naive.summary['failed_step']}, bundle "
              f"{'written' if naive.bundle else 'missing'}", naive.status == "failed" and naive.bundle)
    origin = replay(load_bundle(naive.bundle)).origin if naive.bundle else None
    where = f"{origin.primitive} at {origin.name_stack}, cause {origin.cause}" if origin else "no origin found"
    res.check("forensics: the first non-finite op is exp inside the attention softmax (exp_overflow)",
              where, origin is not None and "softmax" in origin.name_stack and origin.cause == "exp_overflow")
    losses = [read_float(r["loss"]) for r in train_rows(stable.run_dir)]
    res.check("stable softmax: same model and data, every logged loss finite",
              f"status {stable.status}, final loss {losses[-1]:.3f}" if losses else f"status {stable.status}",
              stable.status == "finished" and losses and all(math.isfinite(x) for x in losses))

    fig, (ax,) = new_figure(1)
    for r, label in ((naive, "naive fp16 softmax"), (stable, "stable softmax")):
        rows = train_rows(r.run_dir)
        ys = [read_float(x["loss"]) for x in rows]
        ax.plot([x["step"] for x in rows], ys, marker="o", label=label)
        for s in [x["step"] for x, y in zip(rows, ys) if not math.isfinite(y)]:
            ax.axvline(s, color="red", ls=":", label="non-finite loss (naive)")
    label_axes(ax, "step", "train loss (nats)", "fp16 softmax: naive overflows to non-finite, stable trains")
    res.plots.append(save_figure(fig, out_dir / "naive_softmax.png"))
    return res
