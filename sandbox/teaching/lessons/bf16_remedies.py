"""Lesson: bf16 weights with no fp32 master copy that still learn.

The sequel to `bf16_master_weights`, on the same runs (configs/bf16_master.yaml
at lr 1e-4, where most Adam steps are below half a bf16 ulp of the weight).
Two remedies keep the weights in bf16 and change only how an update lands:

* `bf16_sr`: stochastic rounding. w + u is rounded up or down with
  probabilities that make it exact on average; no extra state.
* `bf16_kahan`: a bf16 compensation buffer carries what the last rounding
  dropped into the next update; 2 more bytes per parameter.

What is measured: the final train loss against the fp32-master run (`bf16`)
and the stalled `bf16_pure`; `recovered_update_frac` (updates that rounding
to nearest would have dropped but the remedy kept); and the train state's
bytes per parameter from summary.json (`state_bytes_per_param`).

Kahan's `lost_update_frac` stays high: most steps still leave the bf16 weight
unchanged, but the update waits in the buffer rather than vanishing, which is
why the loss is the verdict and not that fraction.
"""

from __future__ import annotations

from pathlib import Path

from sandbox.teaching.lessons import LessonResult, plot_runs, train_lesson_runs

NAME = "bf16_remedies"
TITLE = "bf16 weights that still learn: stochastic rounding and Kahan-compensated updates"
NARRATIVE = """\
Without fp32 master weights, bf16 rounds most small updates away and training stalls (lesson
bf16_master_weights). Two remedies keep the weights in bf16. Stochastic rounding rounds w + u up or
down at random, with the probabilities that make it right on average, so small updates survive in
expectation. Kahan compensation keeps a second bf16 buffer holding what each rounding lost and adds
it to the next update. We train bf16 weights plainly, with each remedy, and with fp32 master weights,
and compare the loss, the updates each remedy recovered and the bytes the training state needs."""

RUNS = ("bf16_master", "bf16_pure", "bf16_sr", "bf16_kahan")


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    res = LessonResult(NAME)
    results = train_lesson_runs(res, RUNS, Path(out_dir), ["training.steps=20"] if quick else [])
    s = {n: results[n].summary for n in RUNS}
    ce = {n: s[n]["train_ce"] for n in RUNS}
    gap = ce["bf16_pure"] - ce["bf16_master"]
    res.check("bf16_pure stalls: its final loss is > 0.05 nats above the master-weights run",
              f"train loss {ce['bf16_pure']:.4f} pure vs {ce['bf16_master']:.4f} master (gap {gap:+.4f})",
              gap > 0.05)
    for n in ("bf16_sr", "bf16_kahan"):
        own = ce[n] - ce["bf16_master"]
        res.check(f"{n} recovers: less than a quarter of bf16_pure's gap to the master-weights run remains",
                  f"train loss {ce[n]:.4f} (gap {own:+.4f} vs pure's {gap:+.4f})", own < 0.25 * gap)
        rec = s[n]["recovered_update_frac"]
        res.check(f"{n}: > 5% of nonzero updates land that rounding to nearest would drop",
                  f"recovered_update_frac {rec:.3f}", rec > 0.05)
    mem = {n: s[n]["state_bytes_per_param"] for n in RUNS}
    res.check("state memory per parameter: SR about half of fp32 master weights + fp32 Adam, Kahan two thirds",
              ", ".join(f"{n} {mem[n]:.2f} B" for n in RUNS),
              0.45 < mem["bf16_sr"] / mem["bf16_master"] < 0.55 and 0.6 < mem["bf16_kahan"] / mem["bf16_master"] < 0.72)
    # Every run has lost_update_frac (only the remedies have recovered_update_frac): Kahan's stays high,
    # its updates wait in the buffer; the loss panel shows which runs learned.
    res.plots.append(plot_runs({n: results[n].run_dir for n in RUNS}, "lost_update_frac",
                               "updates not applied this step", Path(out_dir) / "bf16_remedies.png"))
    return res
