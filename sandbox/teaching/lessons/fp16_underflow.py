"""Lesson: fp16 gradients underflow without loss scaling; the dynamic scaler fixes it.

What is measured. The train step reports `underflow_frac`: of the nonzero
fp32 logit gradients (already multiplied by the loss scale), the fraction that
become 0 when cast to fp16, the boundary where the backward pass enters the
compute dtype. With a mean loss over N tokens each entry is (p - onehot)/N,
so tokens the model has pushed to tiny probability p have gradients p/N that
fall below fp16's smallest subnormal (2^-24 ~ 6e-8) and flush to 0. The
dynamic scaler multiplies them by 2^16 (backing off on overflow) first.

Why the final losses stay close here. What flushes is the gradient of tokens
that already have ~0 probability, and Adam normalises each parameter's
update by its own gradient history, so the surviving gradients still train.
The lesson therefore checks that the scaler removes the underflow and costs
no more loss than its skipped start-up steps (it starts at 2^16, the first
steps overflow and are skipped while it backs off); it does not claim a large loss gap this small model does not
show. (In deep models the same flushing hits activation gradients layer by
layer, which is where unscaled fp16 training stalls.)
"""

from __future__ import annotations

from pathlib import Path

from sandbox.teaching.lessons import LessonResult, plot_runs, train_lesson_runs, train_rows

NAME = "fp16_underflow"
TITLE = "fp16 gradients underflow without loss scaling; the dynamic loss scaler fixes it"
NARRATIVE = """\
fp16 stores magnitudes down to about 6e-8 (subnormal); anything smaller becomes 0. A loss that is
a mean over 2048 tokens gives each token's logit gradient a factor 1/2048, and once the model is
confident the wrong tokens' gradients p/2048 are far below 6e-8. We train the same tiny model twice
in fp16: without loss scaling (fp16_noscale) and with the dynamic loss scaler (fp16), and compare
the fraction of logit gradients that flush to zero and the final training loss."""

RUNS = ("fp16_noscale", "fp16_scaled")


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    res = LessonResult(NAME)
    results = train_lesson_runs(res, RUNS, Path(out_dir), ["training.steps=25"] if quick else [])
    noscale, scaled = (results[n].summary for n in RUNS)
    late = {n: [r["underflow_frac"] for r in train_rows(results[n].run_dir)][-3:] for n in RUNS}
    u_no, u_sc = (sum(v) / len(v) for v in late.values())
    res.check("without scaling, >50% of nonzero logit gradients flush to 0 (last logged steps)",
              f"underflow_frac {u_no:.3f}", u_no > 0.5)
    res.check("with the dynamic scaler, <1% flush", f"underflow_frac {u_sc:.4f} "
              f"(final scale {scaled['final_loss_scale']:.0f})", u_sc < 0.01)
    # The scaler's only cost: the first steps overflow at 2^16 and are skipped while it backs off.
    res.check("the scaler costs at most its skipped start-up steps: final loss within 0.03 nats",
              f"train loss {scaled['train_ce']:.4f} scaled vs {noscale['train_ce']:.4f} unscaled; "
              f"{scaled['overflow_skips']} overflow steps skipped",
              scaled["train_ce"] <= noscale["train_ce"] + 0.03)

    res.plots.append(plot_runs({n: results[n].run_dir for n in RUNS}, "underflow_frac",
                               "fraction of logit gradients flushed to 0 in fp16", Path(out_dir) / "fp16_underflow.png",
                               log_loss=True))
    return res
