"""Lesson: fp8 delayed scaling lags one step behind an activation spike.

What is run. One `nn.Dense` whose matmul is `Fp8DotGeneral` (the same module
the fp8 policy puts in the model) sees the same activation tensor every step,
except at one step where it is multiplied by SPIKE. Each step does a forward
and backward pass, reads the amaxes observed in that pass (the cotangents of
the fp8 meta) and calls `update_fp8_meta`, exactly like the train step. The
weights stay fixed so that only the input's scaling moves. Per step we record
the input's saturation fraction (elements the clip, not rounding, decided,
from the layer's own telemetry) and the scale the step used.

What delayed scaling does, precisely. Step t quantizes with a scale computed
from the amax history *before* t, so:
- the spike step itself saturates (its amax is not yet in the history), with
  either amax algorithm, and only that step: from the next step on the spike's
  amax is in the history;
- `max`: the scale stays lowered by SPIKE for `history_len` steps, until the
  spike's amax leaves the window; normal activations meanwhile use 1/SPIKE of
  the format's range (they lose resolution, not values);
- `most_recent`: the scale is lowered for one step only (the step after the
  spike), then recovers; a spike that *persisted* would be caught just as fast.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sandbox.precision import exact
from sandbox.precision.fp8 import FP8_META, FP8_STATS, Fp8DotGeneral, update_fp8_meta
from sandbox.teaching.lessons import LessonResult, new_figure, save_figure

NAME = "fp8_delayed_scaling"
TITLE = "fp8 delayed scaling: an activation spike saturates until the amax history catches up"
NARRATIVE = """\
fp8 E4M3 holds magnitudes up to 448, so each tensor is multiplied by a scale that puts its
largest value (amax) near 448 before rounding. Computing this step's amax first would cost an
extra pass, so delayed scaling uses the amaxes of previous steps (a history of history_len
values; scale from its max, or from the most recent one). We feed one fp8 Dense layer a steady
activation and multiply it by 100 at one step, then watch how many elements saturate (are
clipped at 448) per step, and how long the lowered scale persists, for amax_algo max and
most_recent."""

SPIKE = 100.0


def simulate(algo: str, steps: int, spike_step: int, history_len: int, seed: int = 0) -> dict:
    """Per-step saturation fraction and input scale of one fp8 Dense layer."""
    dense = nn.Dense(16, dot_general_cls=partial(Fp8DotGeneral, history_len=history_len))
    x_NC = jax.random.normal(jax.random.key(seed), (64, 32), jnp.float32)
    variables = dense.init(jax.random.key(seed + 1), x_NC)
    params, meta = variables["params"], variables[FP8_META]

    def loss(meta, x):
        y, sown = dense.apply({"params": params, FP8_META: meta}, x, mutable=[FP8_STATS])
        return jnp.sum(y**2), sown[FP8_STATS]

    @exact.jit
    def step(meta, x):
        observed, stats = jax.grad(loss, has_aux=True)(meta, x)
        sat = next(v for p, v in jax.tree_util.tree_flatten_with_path(stats)[0]
                   if "input_saturated_frac" in jax.tree_util.keystr(p))
        used_scale = jax.tree_util.tree_leaves(
            {k: v for k, v in jax.tree_util.tree_flatten_with_path(meta)[0]
             if "input_scale" in jax.tree_util.keystr(k)})[0]
        return update_fp8_meta(meta, observed, algo), sat, used_scale

    sat, scale = [], []
    for t in range(steps):
        meta, s, sc = step(meta, x_NC * (SPIKE if t == spike_step else 1.0))
        sat.append(float(s))
        scale.append(float(sc))
    return {"saturated_frac": np.array(sat), "scale": np.array(scale)}


def _lowered_steps(scale: np.ndarray, spike_step: int) -> list[int]:
    normal = scale[spike_step]  # the spike step still used the pre-spike scale
    # Steps before the spike are not counted: step 0 runs on the initial scale 1.
    return [t for t in range(spike_step + 1, len(scale)) if scale[t] < normal / 2]


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    out_dir = Path(out_dir)
    history_len = 8 if quick else 16
    spike_step, steps = 5, 5 + history_len + 8
    res = LessonResult(NAME)
    sims = {algo: simulate(algo, steps, spike_step, history_len) for algo in ("max", "most_recent")}
    for algo, sim in sims.items():
        saturated = [t for t, f in enumerate(sim["saturated_frac"]) if f > 0]
        lowered = _lowered_steps(sim["scale"], spike_step)
        res.check(f"{algo}: only the spike step (step {spike_step}) saturates",
                  f"saturated steps {saturated}, peak fraction {sim['saturated_frac'].max():.2f}",
                  saturated == [spike_step] and sim["saturated_frac"][spike_step] > 0.5)
        want = history_len if algo == "max" else 1
        first = lowered[0] if lowered else None
        res.check(f"{algo}: scale lowered ~{SPIKE:.0f}x for {want} step(s) after the spike "
                  f"(history_len={history_len})",
                  f"lowered for {len(lowered)} step(s), from step {first}",
                  len(lowered) == want and first == spike_step + 1
                  and lowered == list(range(spike_step + 1, spike_step + 1 + want)))

    fig, (ax_sat, ax_scale) = new_figure(2)
    for algo, sim in sims.items():
        ax_sat.plot(sim["saturated_frac"], marker="o", ms=3, label=f"amax_algo={algo}")
        ax_scale.semilogy(sim["scale"], marker="o", ms=3, label=f"amax_algo={algo}")
    for ax in (ax_sat, ax_scale):
        ax.axvline(spike_step, color="grey", ls=":", label=f"x{SPIKE:.0f} spike")
        ax.set_xlabel("step")
        ax.legend()
    ax_sat.set_ylabel("input saturated fraction")
    ax_scale.set_ylabel("input scale used by the step")
    ax_sat.set_title("saturation: only the spike step")
    ax_scale.set_title(f"scale: lowered for history_len={history_len} (max) or 1 step")
    res.plots.append(save_figure(fig, out_dir / "fp8_delayed_scaling.png"))
    return res
