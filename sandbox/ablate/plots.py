"""Experiment plots, drawn to be read and published (matplotlib, Agg backend: files only).

Figures (each written as `NAME.png` and `NAME.svg`):

* `val_loss`: validation CE against step, one line per variant (mean over
  seeds) with a band from the lowest to the highest seed;
* `loss_scale`: for fp16-style variants (any cell whose loss scale moves or
  that overflowed), the loss scale per seed on a log2 axis and the
  cumulative count of overflow (skipped) steps;
* `fp8_scaling`: amax and scale of a few fp8 tensors of one fp8 cell;
* `final_values`: final validation CE per variant (mean ± std, every seed
  as a dot) and throughput; variants with no finished seed are an empty,
  labelled slot;
* `vs_baseline`: the difference-from-baseline panel. Per variant, final val
  CE minus the mean of its baseline variant (`report._baseline_variant`: same
  settings, baseline policy) with a (1 - alpha) Welch interval, the same
  statistics as the table's test, so an interval that misses 0 is a
  `worse`/`better` there. Every seed is a dot. Its axis spans the
  differences, not the losses, so a 0.01-nat effect is visible.

Conventions, each checked by tests/test_ablate_plots.py: every axes has a
title; a CE axis is zoomed on the data (it never starts at 0: CE differences
that matter are 1% of its value); count and step axes have integer ticks;
variant names are wrapped and laid out by matplotlib's constrained layout
so no label overlaps another; legends sit outside the data.

A figure whose data does not exist in this experiment (no fp16 or fp8 cell)
is not drawn; `write_plots` returns only the files it wrote. Each is rendered
in memory and written atomically; `plots/` itself must not be a link.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from sandbox.plotting import integer_ticks, new_figure, pyplot, write_figure
from sandbox.rundir import real_subdir

FP8_TENSORS_SHOWN = 4
FORMATS = ("png", "svg")
DPI = 110
FIGURES = ("val_loss", "loss_scale", "fp8_scaling", "final_values", "vs_baseline")
RETIRED_FIGURES = ("final_bars",)  # written by earlier versions
LABEL_WIDTH = 18  # characters per line of a wrapped variant name
CE_LABEL = "final validation cross-entropy (nats/token)"


def _wrap(name: str) -> str:
    return textwrap.fill(name, LABEL_WIDTH, break_long_words=True, break_on_hyphens=False)


def _legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts)
    return np.asarray(steps, float), np.asarray(vals, float)


def _finished_values(cells, key: str) -> list[float]:
    return [float(v) for c in cells if c.status == "finished"
            and isinstance(v := c.summary.get(key), (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _zoomed_limits(values: list[float], pad_frac: float = 0.15) -> tuple[float, float]:
    """Limits around the data; positive data keeps a positive lower limit."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * pad_frac or abs(hi) * 0.01 or 0.01
    low = lo - pad
    if lo > 0 and low <= 0:
        low = lo / 2
    return low, hi + pad


# ----------------------------------------------------------------- curves


def plot_val_loss(exp, plt):
    fig, ((ax,),) = new_figure(1, 1, (8, 4.5))
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
        return None
    ax.set_xlabel("step")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(f"{exp.name}: validation loss (mean over seeds, band: min-max)")
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def plot_loss_scale(exp, plt):
    scaled = []
    for c in exp.cells:
        s, scale = _series(c.rows("train"), "loss_scale")
        _, ovf = _series(c.rows("train"), "overflow")
        if len(s) and (np.ptp(scale) > 0 or ovf.sum() > 0 or c.policy.startswith("fp16")):
            scaled.append((c, s, scale, ovf))
    if not scaled:
        return None
    fig, ((top,), (bottom,)) = new_figure(2, 1, (8, 6), sharex=True)
    for c, s, scale, ovf in scaled:
        line, = top.plot(s, np.maximum(scale, 1e-30), label=c.name)
        bottom.step(s, np.cumsum(ovf > 0), where="post", color=line.get_color(), label=c.name)
        hits = s[ovf > 0]
        top.plot(hits, np.maximum(scale[ovf > 0], 1e-30), "x", color=line.get_color(), ms=5)
    top.set_yscale("log", base=2)
    top.set_ylabel("loss scale")
    top.set_title(f"{exp.name}: dynamic loss scale per cell (x = overflow)")
    _legend_outside(top)
    bottom.set_ylabel("overflow events (cumulative)")
    bottom.set_title("overflow (skipped) steps so far")
    integer_ticks(bottom.yaxis)
    bottom.set_xlabel("step")
    integer_ticks(bottom.xaxis)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return fig


def plot_fp8(exp, plt):
    cell = next((c for c in exp.cells if c.status in ("finished", "failed")
                 and any(k.startswith("fp8/") and k.endswith("_amax") for r in c.rows("train")[:1] for k in r)),
                None)
    if cell is None:
        return None
    rows = cell.rows("train")
    names = sorted(k[: -len("_amax")] for k in rows[0] if k.startswith("fp8/") and k.endswith("_amax"))
    names = names[:FP8_TENSORS_SHOWN]
    fig, ((top,), (bottom,)) = new_figure(2, 1, (8, 6), sharex=True)
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
    integer_ticks(bottom.xaxis)
    top.set_title(f"{exp.name}: fp8 delayed scaling ({cell.name}): amax history")
    bottom.set_title("quantization scale used by each step")
    _legend_outside(top)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------- final values


def _seed_dots(ax, pos: float, values: list[float]) -> None:
    """Every seed as a dot on the row of its variant, spread a little so equal values stay visible."""
    if not values:
        return
    offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
    ax.scatter(values, pos + offsets, s=14, color="black", alpha=0.7, zorder=3)


def _variant_rows(plt, labels: list[str], ncols: int, width: float):
    """A figure with one horizontal row per (wrapped) variant name, first variant on top, like the table.

    Names sit on the y axis, one per row, each row tall enough for its wrapped
    lines, so long names never run into each other.
    """
    wrapped = [_wrap(label) for label in labels]
    lines = max(w.count("\n") + 1 for w in wrapped)
    height = 1.8 + len(labels) * (0.2 + 0.14 * lines)
    fig, axes = new_figure(1, ncols, (width, height), sharey=True)
    y = np.arange(len(labels))[::-1].astype(float)
    axes[0][0].set_yticks(y, wrapped, fontsize=8)
    axes[0][0].set_ylim(-0.6, len(labels) - 0.4)
    return fig, list(axes[0]), y


def _status_note(ax, y: float, text: str) -> None:
    """Says why a row is empty, at the left edge of the axes."""
    ax.text(0.02, y, text, transform=ax.get_yaxis_transform(), va="center", fontsize=8, color="tab:red")


def plot_final_values(exp, rows: list[dict], plt):
    if not rows:
        return None
    fig, (ce_ax, tps_ax), y = _variant_rows(plt, [r["variant"] for r in rows], 2, 11.0)
    ce_drawn = []
    for yi, r in zip(y, rows):
        cells = exp.of(r["variant"])
        vals = _finished_values(cells, "val_ce")
        if vals:
            std = r.get("val_ce_std") or 0.0
            ce_ax.errorbar([np.mean(vals)], [yi], xerr=[std], fmt="o", ms=7, capsize=4, color="tab:blue", zorder=2)
            _seed_dots(ce_ax, yi, vals)
            ce_drawn += vals
        else:
            _status_note(ce_ax, yi, r["status"])
        tps = _finished_values(cells, "tokens_per_s")
        if tps:
            tps_ax.barh(yi, np.mean(tps), height=0.6, color="tab:green", alpha=0.6)
            _seed_dots(tps_ax, yi, tps)
    if ce_drawn:  # zoomed on the data: CE differences that matter are ~1% of its value
        ce_ax.set_xlim(*_zoomed_limits(ce_drawn))
    ce_ax.set_xlabel(CE_LABEL)
    ce_ax.set_title("final validation CE (mean ± std; dots: seeds; axis zoomed)", fontsize=10)
    tps_ax.set_xlabel("tokens per second")
    tps_ax.set_title("throughput (mean; dots: seeds)", fontsize=10)
    for ax in (ce_ax, tps_ax):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{exp.name}: final values per variant")
    return fig


def _welch_interval(a: list[float], b: list[float], alpha: float) -> tuple[float, float] | None:
    """The (1 - alpha) Welch interval of mean(a) - mean(b); None with fewer than two values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(1 - alpha / 2, df) * math.sqrt(va + vb))
    return diff - half, diff + half


def baseline_differences(exp, rows: list[dict]) -> list[dict]:
    """Per variant with a baseline: final val CE minus the baseline's mean, its Welch interval, each seed's difference.

    Keys: variant, baseline, mean (None when either side has no finished
    seed), low/high (None without two seeds a side), seeds (one difference
    per finished seed), note (why there is no number).
    """
    out = []
    for r in rows:
        base = r.get("baseline")
        if base is None:
            continue
        mine, ref = _finished_values(exp.of(r["variant"]), "val_ce"), _finished_values(exp.of(base), "val_ce")
        d = {"variant": r["variant"], "baseline": base, "mean": None, "low": None, "high": None, "seeds": [],
             "note": ""}
        if not mine or not ref:
            d["note"] = f"no finished seed ({r['status']})" if not mine else f"baseline {base}: no finished seed"
        else:
            ref_mean = float(np.mean(ref))
            d["seeds"] = [v - ref_mean for v in mine]
            d["mean"] = float(np.mean(mine)) - ref_mean
            if base != r["variant"]:
                interval = _welch_interval(mine, ref, exp.alpha)
                if interval:
                    d["low"], d["high"] = interval
                else:
                    d["note"] = "one seed: no interval"
        out.append(d)
    return out


def plot_vs_baseline(exp, rows: list[dict], plt):
    diffs = baseline_differences(exp, rows)
    if not any(d["mean"] is not None and d["variant"] != d["baseline"] for d in diffs):
        return None
    level = round(100 * (1 - exp.alpha))
    labels = [d["variant"] + (" (baseline)" if d["variant"] == d["baseline"] else f" − {d['baseline']}")
              for d in diffs]
    fig, (ax,), y = _variant_rows(plt, labels, 1, 8.0)
    for yi, d in zip(y, diffs):
        if d["mean"] is None:
            _status_note(ax, yi, d["note"])
            continue
        if d["low"] is not None:
            ax.plot([d["low"], d["high"]], [yi, yi], color="tab:blue", lw=2.5, solid_capstyle="butt", zorder=2)
        ax.plot([d["mean"]], [yi], "D", color="tab:blue", ms=7, zorder=4)
        _seed_dots(ax, yi, d["seeds"])
        if d["note"]:
            ax.annotate(d["note"], (d["mean"], yi), xytext=(6, 6), textcoords="offset points", fontsize=7)
    ax.axvline(0.0, color="grey", lw=1, ls="--", zorder=1)
    points = [v for d in diffs for v in (d["seeds"] + [d["low"], d["high"], 0.0]) if v is not None]
    ax.set_xlim(*_zoomed_limits(points + [-1e-3, 1e-3]))
    ax.set_xlabel("final validation CE − baseline mean (nats/token); > 0 is worse")
    ax.set_title(f"{exp.name}: difference from baseline\n(diamond: mean, bar: {level}% Welch interval, "
                 f"dots: seeds)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------- writing


def build_figures(exp, rows: list[dict]) -> dict:
    """name -> matplotlib Figure, for the figures this experiment has data for."""
    plt = pyplot()
    figures = {"val_loss": plot_val_loss(exp, plt), "loss_scale": plot_loss_scale(exp, plt),
               "fp8_scaling": plot_fp8(exp, plt), "final_values": plot_final_values(exp, rows, plt),
               "vs_baseline": plot_vs_baseline(exp, rows, plt)}
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_plots(exp, rows: list[dict], out_dir: Path) -> list[Path]:
    """Writes plots/NAME.png and NAME.svg for every figure; removes stale ones; returns the paths written."""
    out_dir = real_subdir(out_dir.parent, out_dir.name)
    for name in FIGURES + RETIRED_FIGURES:  # a plot from an earlier report must not survive; others are not ours
        for fmt in FORMATS:
            (out_dir / f"{name}.{fmt}").unlink(missing_ok=True)
    written = []
    for name, fig in build_figures(exp, rows).items():
        written += write_figure(fig, out_dir / name, FORMATS, dpi=DPI)
    return written
