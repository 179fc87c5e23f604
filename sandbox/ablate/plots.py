"""Experiment plots (matplotlib, Agg backend: files only, no display needed).

* `val_loss.png`: validation CE against step, one line per variant (mean
  over seeds) with a band from the lowest to the highest seed;
* `loss_scale.png`: for fp16-style variants (any cell whose loss scale
  moves or that overflowed), the loss scale per seed on a log2 axis and the
  cumulative count of overflow (skipped) steps;
* `fp8_scaling.png`: amax and scale of a few fp8 tensors of one fp8 cell;
* `final_bars.png`: final validation CE (± std) and tokens/s per variant;
  variants with no finished seed are drawn as an empty, labelled slot.

A plot whose data does not exist in this experiment (no fp16 or fp8 cell)
is not drawn; `write_plots` returns only the files it wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FP8_TENSORS_SHOWN = 4


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts)
    return np.asarray(steps, float), np.asarray(vals, float)


def plot_val_loss(exp, path: Path, plt) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for variant in exp.variants:
        curves = [_series(c.rows("val"), "ce") for c in exp.of(variant)]
        curves = [(s, v) for s, v in curves if len(s)]
        if not curves:
            continue
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
        if not common:  # seeds stopped at different steps: plot the longest
            s, v = max(curves, key=lambda sv: len(sv[0]))
            ax.plot(s, v, label=f"{variant} (1 seed)")
            drawn = True
            continue
        stack = np.stack([np.interp(common, s, v) for s, v in curves])
        line, = ax.plot(common, stack.mean(0), label=f"{variant} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(common, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(f"{exp.name}: validation loss (band: min-max across seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, plt)


def plot_loss_scale(exp, path: Path, plt) -> bool:
    scaled = []
    for c in exp.cells:
        s, scale = _series(c.rows("train"), "loss_scale")
        _, ovf = _series(c.rows("train"), "overflow")
        if len(s) and (np.ptp(scale) > 0 or ovf.sum() > 0 or c.policy.startswith("fp16")):
            scaled.append((c, s, scale, ovf))
    if not scaled:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for c, s, scale, ovf in scaled:
        line, = top.plot(s, np.maximum(scale, 1e-30), label=c.name)
        bottom.step(s, np.cumsum(ovf > 0), where="post", color=line.get_color(), label=c.name)
        hits = s[ovf > 0]
        top.plot(hits, np.maximum(scale[ovf > 0], 1e-30), "x", color=line.get_color(), ms=5)
    top.set_yscale("log", base=2)
    top.set_ylabel("loss scale (x = overflow)")
    top.set_title(f"{exp.name}: dynamic loss scaling")
    top.legend(fontsize=7)
    bottom.set_ylabel("overflow events (cumulative)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _save(fig, path, plt)


def plot_fp8(exp, path: Path, plt) -> bool:
    cell = next((c for c in exp.cells if c.status in ("finished", "failed")
                 and any(k.startswith("fp8/") and k.endswith("_amax") for r in c.rows("train")[:1] for k in r)),
                None)
    if cell is None:
        return False
    rows = cell.rows("train")
    names = sorted(k[: -len("_amax")] for k in rows[0] if k.startswith("fp8/") and k.endswith("_amax"))
    names = names[:FP8_TENSORS_SHOWN]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name in names:
        s, amax = _series(rows, name + "_amax")
        line, = top.plot(s, amax, label=name[len("fp8/"):].replace("/Fp8DotGeneral_0", ""))
        s2, scale = _series(rows, name + "_scale")
        bottom.plot(s2, scale, color=line.get_color())
    top.set_yscale("log")
    bottom.set_yscale("log")
    top.set_ylabel("amax")
    bottom.set_ylabel("scale")
    bottom.set_xlabel("step")
    top.set_title(f"{exp.name}: fp8 delayed scaling ({cell.name})")
    top.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _save(fig, path, plt)


def plot_bars(exp, rows: list[dict], path: Path, plt) -> bool:
    if not rows:
        return False
    labels = [r["variant"] for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ce = [r["val_ce"] if r["val_ce"] is not None else 0.0 for r in rows]
    err = [r.get("val_ce_std") or 0.0 for r in rows]
    left.bar(x, ce, yerr=err, capsize=3, color="tab:blue")
    tps = [r["tokens_per_s"] if r["tokens_per_s"] is not None else 0.0 for r in rows]
    right.bar(x, tps, color="tab:green")
    for i, r in enumerate(rows):
        if r["val_ce"] is None:
            left.text(i, 0, r["status"], rotation=90, ha="center", va="bottom", fontsize=8)
    for ax, title in ((left, "final validation CE (nats, ± std)"), (right, "throughput (tokens/s)")):
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(exp.name)
    return _save(fig, path, plt)


def write_plots(exp, rows: list[dict], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("val_loss.png", lambda p: plot_val_loss(exp, p, plt)),
                       ("loss_scale.png", lambda p: plot_loss_scale(exp, p, plt)),
                       ("fp8_scaling.png", lambda p: plot_fp8(exp, p, plt)),
                       ("final_bars.png", lambda p: plot_bars(exp, rows, p, plt))):
        path = out_dir / name
        path.unlink(missing_ok=True)  # a stale plot from an earlier report must not survive
        if draw(path):
            written.append(path)
    return written
