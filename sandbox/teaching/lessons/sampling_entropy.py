"""Lesson: temperature, top-k and top-p change the entropy of what is sampled.

What is measured. A byte-level model is trained briefly on tiny shakespeare;
on held-out text we take its next-byte distribution at every position and
apply each sampling setting with `sandbox.sample.filter_logprobs` (the exact
function `sandbox sample` draws from). The entropy of the filtered
distribution, averaged over positions, is the expected surprise per sampled
byte: lower means more predictable, repetitive text; higher means more
varied and more error-prone text.

What to expect. Temperature T divides the logits: T < 1 sharpens (entropy
down), T > 1 flattens (entropy up). top-k keeps the k most likely bytes, so
entropy is at most ln k. top-p keeps the smallest set with probability >= p,
cutting the long tail. Both truncations can only lower entropy relative to
T = 1 when the removed tail had mass.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from sandbox.infotheory import entropy
from sandbox.sample import filter_logprobs
from sandbox.teaching.lessons import LessonResult, new_figure, save_figure
from sandbox.teaching.lessons._shakespeare import heldout_text, logprobs, trained_model

NAME = "sampling_entropy"
TITLE = "Temperature, top-k and top-p change the entropy of samples"
NARRATIVE = """\
A language model gives a distribution over the next token; sampling settings reshape it before the
draw. We train a small byte-level model on Shakespeare for a minute, then measure, on text it has
not seen, the average entropy (nats per byte) of the distribution each setting actually samples
from: temperature 0.5 / 1 / 1.5, top-k 5, top-p 0.9."""

SETTINGS = (  # label, temperature, top_k, top_p
    ("T=0.5", 0.5, 0, 1.0),
    ("T=1", 1.0, 0, 1.0),
    ("T=1.5", 1.5, 0, 1.0),
    ("top-k 5", 1.0, 5, 1.0),
    ("top-p 0.9", 1.0, 0, 0.9),
)


def mean_entropy(logp_NV: np.ndarray, temperature: float, top_k: int, top_p: float) -> float:
    filtered = jax.vmap(lambda lp: filter_logprobs(lp, temperature, top_k, top_p))(logp_NV)
    return float(np.mean(entropy(filtered)))


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    out_dir = Path(out_dir)
    res = LessonResult(NAME)
    result, cfg, model = trained_model(out_dir, quick)
    res.runs = [result.run_dir]
    logp, targets = logprobs(model, result.state.params, cfg, heldout_text(cfg, 16 * cfg.model.context))
    ce = float(-np.mean(logp[np.arange(len(targets)), targets]))
    H = {label: mean_entropy(logp, t, k, p) for label, t, k, p in SETTINGS}
    res.check("the model has learned something: held-out cross-entropy < ln 256 = 5.55 nats/byte",
              f"{ce:.3f} nats/byte", ce < np.log(256))
    res.check("temperature orders entropy: H(T=0.5) < H(T=1) < H(T=1.5)",
              f"{H['T=0.5']:.3f} < {H['T=1']:.3f} < {H['T=1.5']:.3f} nats", H["T=0.5"] < H["T=1"] < H["T=1.5"])
    res.check("top-k 5 lowers entropy below T=1 and below ln 5 = 1.609",
              f"{H['top-k 5']:.3f} nats", H["top-k 5"] < H["T=1"] and H["top-k 5"] <= np.log(5) + 1e-5)
    res.check("top-p 0.9 lowers entropy below T=1", f"{H['top-p 0.9']:.3f} nats", H["top-p 0.9"] < H["T=1"])

    fig, (ax,) = new_figure(1)
    ax.bar(list(H), list(H.values()), color=["C0", "C1", "C2", "C3", "C4"])
    ax.axhline(ce, color="grey", ls=":", label=f"held-out cross-entropy {ce:.2f}")
    ax.set_ylabel("mean entropy of the sampling distribution (nats/byte)")
    ax.set_title("entropy of what is sampled, per sampling setting")
    ax.legend()
    res.plots.append(save_figure(fig, out_dir / "sampling_entropy.png"))
    return res
