"""Experiment and lesson plots: both file formats, titles, CE axes, the difference-from-baseline panel, labels."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from scipy import stats  # noqa: E402

from sandbox.ablate import plots  # noqa: E402
from sandbox.ablate.report import load_experiment, summarize, write_report  # noqa: E402
from sandbox.teaching import lessons  # noqa: E402

# Final val CE per seed. "bf16" is 0.01 nats worse than fp32: the effect the difference panel must show.
VAL = {"fp32": [2.000, 2.004, 1.996], "bf16": [2.010, 2.014, 2.006], "fp16": [2.30, 2.33, 2.28, 2.31]}
LONG = "fp16 with loss scaling and a very long descriptive name"


def make_experiment(root: Path, val: dict = VAL, failed: str | None = "fp16_noscale") -> Path:
    """An experiment directory as `sandbox ablate` leaves it, with the given final val CE per seed."""
    exp = root / "exp"
    cells = []
    for variant, vals in val.items():
        policy = variant if variant in ("fp32", "bf16", "fp16") else "fp16"
        for seed, v in enumerate(vals):
            name = f"{variant.replace(' ', '-')}_s{seed}"
            cells.append({"name": name, "variant": variant, "seed": seed, "policy": policy,
                          "settings": {"precision.policy": policy, "seed": seed}})
            d = exp / "cells" / name
            d.mkdir(parents=True)
            rows = []
            for k in range(1, 11):
                overflow = float(policy == "fp16" and k in (2, 3, 7))
                rows.append({"step": 10 * k, "split": "train", "loss": 4.0 - 0.2 * k, "overflow": overflow,
                             "loss_scale": 2.0 ** (16 - (k >= 3) - (k >= 7)) if policy == "fp16" else 1.0})
                rows.append({"step": 10 * k, "split": "val", "ce": v + (10 - k) * 0.1})
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "summary.json").write_text(json.dumps({
                "status": "finished", "train_ce": v - 0.05, "val_ce": v, "tokens_per_s": 1000.0 + 10 * seed,
                "overflow_skips": 3 if policy == "fp16" else 0, "nonfinite_skips": 0}))
    if failed:
        cells.append({"name": "noscale_s0", "variant": failed, "seed": 0, "policy": "fp16_noscale",
                      "settings": {"precision.policy": "fp16_noscale", "seed": 0}})
        (exp / "cells" / "noscale_s0").mkdir(parents=True)
        (exp / "cells" / "noscale_s0" / "summary.json").write_text(json.dumps({"status": "failed", "failed_step": 7}))
    (exp / "experiment.json").write_text(json.dumps(
        {"name": "fake", "baseline": "fp32", "alpha": 0.05, "target_loss": None, "cells": cells}))
    return exp


@pytest.fixture
def experiment(tmp_path):
    exp = load_experiment(make_experiment(tmp_path))
    rows, _ = summarize(exp)
    return exp, rows


@pytest.fixture
def figures(experiment):
    figs = plots.build_figures(*experiment)
    yield figs
    for fig in figs.values():
        plt.close(fig)


def test_every_plot_is_written_as_png_and_svg(tmp_path):
    exp = make_experiment(tmp_path)
    written = write_report(exp)["plots"]
    stems = {p.stem for p in written}
    assert stems == {"val_loss", "loss_scale", "final_values", "vs_baseline"}  # no fp8 cell: no fp8 plot
    for stem in stems:
        png, svg = exp / "plots" / f"{stem}.png", exp / "plots" / f"{stem}.svg"
        assert png in written and svg in written
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        text = svg.read_text(encoding="utf-8")
        assert text.startswith("<?xml") and "<svg" in text and text.rstrip().endswith("</svg>")
    assert sorted(p.name for p in (exp / "plots").iterdir()) == sorted(p.name for p in written)


def test_every_axes_of_every_figure_has_a_title(figures):
    assert set(figures) == {"val_loss", "loss_scale", "final_values", "vs_baseline"}
    for name, fig in figures.items():
        for ax in fig.axes:
            assert ax.get_title().strip(), (name, ax.get_ylabel())


def _ce_axes(fig):
    (ax,) = [a for a in fig.axes if "cross-entropy" in a.get_xlabel()]
    return ax


def _dots(ax) -> list:
    """(x, y) of every scatter dot in the axes."""
    return [tuple(xy) for coll in ax.collections if isinstance(coll, PathCollection) for xy in coll.get_offsets()]


def test_ce_axis_of_the_final_values_does_not_start_at_zero(figures):
    lo, hi = _ce_axes(figures["final_values"]).get_xlim()
    everything = [v for vals in VAL.values() for v in vals]
    assert 0 < lo < min(everything) and hi > max(everything)
    assert hi - lo < 1.0  # zoomed on the data (0.33 nats of spread), not on [0, 2.3]


def test_per_seed_points_are_drawn_on_the_final_values(figures):
    ax = _ce_axes(figures["final_values"])
    xs = sorted(x for x, _ in _dots(ax))
    assert xs == pytest.approx(sorted(v for vals in VAL.values() for v in vals))


def _welch_interval(a, b, alpha):
    """Difference of means with its (1 - alpha) Welch interval, written out from the textbook formula."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(1 - alpha / 2, df) * math.sqrt(va + vb)
    diff = a.mean() - b.mean()
    return diff, diff - half, diff + half


def test_difference_panel_values_equal_a_direct_computation(experiment, figures):
    exp, rows = experiment
    diffs = {d["variant"]: d for d in plots.baseline_differences(exp, rows)}
    summaries = {v: [c.summary["val_ce"] for c in exp.of(v)] for v in VAL}
    for variant in ("bf16", "fp16"):
        diff, lo, hi = _welch_interval(summaries[variant], summaries["fp32"], 0.05)
        d = diffs[variant]
        assert d["baseline"] == "fp32"
        assert (d["mean"], d["low"], d["high"]) == pytest.approx((diff, lo, hi), rel=1e-9)
        assert d["seeds"] == pytest.approx(np.asarray(summaries[variant]) - np.mean(summaries["fp32"]))
    assert diffs["bf16"]["mean"] == pytest.approx(0.01)
    assert diffs["fp32"]["mean"] == 0 and diffs["fp32"]["seeds"] == pytest.approx([0.0, 0.004, -0.004])
    assert diffs["fp16_noscale"]["mean"] is None and "failed" in diffs["fp16_noscale"]["note"]

    # What is drawn is these numbers: the interval bars and the per-seed dots.
    (ax,) = figures["vs_baseline"].axes
    drawn_dots = sorted(x for x, _ in _dots(ax))
    want_dots = sorted(itertools.chain.from_iterable(d["seeds"] for d in diffs.values()))
    assert drawn_dots == pytest.approx(want_dots)
    xs = [x for line in ax.lines for x in line.get_xdata()]
    for variant in ("bf16", "fp16"):
        assert any(x == pytest.approx(diffs[variant]["low"]) for x in xs)
        assert any(x == pytest.approx(diffs[variant]["high"]) for x in xs)
    # 0.01 nats is visible: the x range is set by the differences, not by the CE values.
    lo, hi = ax.get_xlim()
    assert hi - lo < 1.0 and lo < 0 < hi


def test_count_axes_have_integer_ticks(figures):
    fig = figures["loss_scale"]
    (counts,) = [a for a in fig.axes if "overflow" in a.get_ylabel()]
    ticks = [t for t in counts.get_yticks() if counts.get_ylim()[0] <= t <= counts.get_ylim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    for fig in figures.values():
        for ax in fig.axes:
            if ax.get_xlabel() == "step":
                assert all(float(t).is_integer() for t in ax.get_xticks())


def _overlaps(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_long_variant_names_do_not_overlap(tmp_path):
    val = {"fp32": [2.0, 2.01], **{f"{LONG} {i}": [2.1 + 0.01 * i, 2.12] for i in range(6)}}
    exp = load_experiment(make_experiment(tmp_path, val, failed=None))
    rows, _ = summarize(exp)
    figs = plots.build_figures(exp, rows)
    for name in ("final_values", "vs_baseline"):
        fig = figs[name]
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)  # runs the constrained layout
        for ax in fig.axes:
            lo, hi = sorted(ax.get_xlim())
            shown = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi] + ax.get_yticklabels()
            labels = [t for t in shown if t.get_text() and t.get_visible()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            assert not _overlaps(boxes), (name, ax.get_title())
            fig_box = fig.bbox
            assert all(b.x0 >= -1 and b.y0 >= -1 and b.x1 <= fig_box.x1 + 1 for b in boxes), name
    for fig in figs.values():
        plt.close(fig)


# ----------------------------------------------------------------- lesson plots


def _fake_run(root: Path, name: str, scale: float) -> Path:
    d = root / name
    d.mkdir()
    rows = [{"step": k, "split": "train", "loss": 3.0 - 0.1 * k * scale, "underflow_frac": 0.1 * scale}
            for k in range(1, 6)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_lesson_plot_runs_writes_png_and_svg_with_titles(tmp_path, monkeypatch):
    runs = {"a": _fake_run(tmp_path, "a", 1.0), "b": _fake_run(tmp_path, "b", 2.0)}
    saved = []
    real_save = lessons.save_figure
    monkeypatch.setattr(lessons, "save_figure", lambda fig, path: saved.append(fig) or real_save(fig, path))
    png = lessons.plot_runs(runs, "underflow_frac", "underflow fraction", tmp_path / "out" / "lesson.png")
    assert png == tmp_path / "out" / "lesson.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert png.with_suffix(".svg").read_text(encoding="utf-8").startswith("<?xml")
    (fig,) = saved
    assert len(fig.axes) == 2 and all(ax.get_title() for ax in fig.axes)


def test_lesson_save_figure_refuses_an_untitled_axes(tmp_path):
    fig, (titled, untitled) = lessons.new_figure(2)
    titled.set_title("has one")
    with pytest.raises(ValueError, match="axes 2 of 2 has no title"):
        lessons.save_figure(fig, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["kl_direction", "fp8_delayed_scaling"])  # the lessons that need no training
def test_lessons_without_training_write_titled_png_and_svg(tmp_path, name):
    result = lessons.get(name).run(tmp_path, quick=True)
    assert result.plots
    for png in result.plots:
        assert png.suffix == ".png" and png.exists() and png.with_suffix(".svg").exists()


def test_paired_comparison_over_shared_seeds_equals_scipys_paired_t_test(tmp_path):
    # Same seed = same init and data order, so the seed-to-seed spread (0.03 here) cancels in the
    # per-seed difference: Welch's test cannot see a 0.01 loss that the paired test finds.
    val = {"fp32": [2.000, 2.030, 1.970], "bf16": [2.011, 2.039, 1.982, 2.5]}  # bf16 seed 3: no partner
    exp = load_experiment(make_experiment(tmp_path, val, failed=None))
    rows, _ = summarize(exp)
    by = {r["variant"]: r for r in rows}
    d = np.array([0.011, 0.009, 0.012])
    assert by["bf16"]["paired_n"] == 3
    assert by["bf16"]["paired_diff"] == pytest.approx(d.mean(), rel=1e-9)
    assert by["bf16"]["paired_diff_std"] == pytest.approx(d.std(ddof=1), rel=1e-9)
    want_p = stats.ttest_rel([2.011, 2.039, 1.982], [2.000, 2.030, 1.970]).pvalue
    assert by["bf16"]["paired_p"] == pytest.approx(want_p, rel=1e-9) and want_p < 0.05
    assert by["bf16"]["p_value"] > 0.05  # Welch's, on all finished seeds
    assert by["fp32"]["paired_diff"] is None and by["fp32"]["paired_p"] is None
    text = write_report(exp.dir)["table"].read_text()
    assert "paired diff vs fp32" in text and f"+{d.mean():.2g}" in text
