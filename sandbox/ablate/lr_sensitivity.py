"""Learning-rate sensitivity of an experiment whose cells sweep `optimizer.lr` (Wortsman et al. 2023).

Not a second runner: a spec with an `optimizer.lr` axis of at least MIN_LRS values, run by
`sandbox ablate`, gets these extra outputs from `sandbox report` (report.write_report calls
`write` when `is_sweep` holds):

* `lr_sensitivity.md` / `lr_sensitivity.csv`: per *line* (a cell's settings without the lr and the
  seed) the final validation loss at each lr, the best lr, the LR sensitivity, and per cell its
  divergence step and the largest attention logit and |log Z| it logged;
* `plots/lr_sweep.{png,svg}`: final loss against lr (log axis), the shape of the paper's figure 1,
  one panel per combination of the PANEL_KEYS the spec varies (precision, width: the "scale" axes),
  one line per remaining setting (qk_norm, z_loss, softcaps: the treatments);
* `plots/attn_logit_growth.{png,svg}`: the max attention logit (over blocks) against step of every
  cell at the sweep's two highest lrs, per panel, log axis.

Definitions:

* l0, the loss at initialization: the first logged train loss of a cell (step 1), the median over cells.
* final loss l(lr): mean over the cell's finished seeds of the final validation CE; a failed seed
  (non-finite) or a loss above l0 counts as l0 (the paper's min(l, l0): a diverged run is as bad as
  an untrained one, never worse, so one divergence does not swamp the average).
* LR sensitivity of a line: mean over its lrs of min(l(lr), l0) - l*, l* the line's best final
  loss. 0 = every lr equally good; larger = the lr matters more.
* divergence step of a cell: its failed step when it stopped on a non-finite value; otherwise the
  first step at which the train loss, averaged over the last SMOOTH steps, is DIVERGE_RISE nats
  above the lowest such average so far (a sustained rise, not a spike); '-' when neither happens.
* attention blow-up step of a cell: the first step whose largest attention logit (over blocks) is
  at least ATTN_BLOWUP: past it every attention row is one-hot (e^100 : 1), whatever the loss does.
  Small models at high lr often stall on a plateau instead of diverging; this names the step at
  which the attention instability happened.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from sandbox.plotting import new_figure, write_figure
from sandbox.rundir import atomic_write, real_subdir

LR_KEY = "optimizer.lr"
MIN_LRS = 3
PANEL_KEYS = ("precision.policy", "model.d_model", "model.n_layer", "model.n_head", "model.context",
              "training.steps", "training.batch_size")
SMOOTH = 10  # steps in the moving average of the divergence rule
DIVERGE_RISE = 1.0  # nats above the lowest moving average that count as diverging
ATTN_BLOWUP = 100.0  # attention logit that marks the attention blow-up step
FIGURES = ("lr_sweep", "attn_logit_growth")
FORMATS = ("png", "svg")


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def is_sweep(exp) -> bool:
    """Whether the experiment's cells sweep optimizer.lr over at least MIN_LRS values."""
    return len({c.settings.get(LR_KEY) for c in exp.cells if LR_KEY in c.settings}) >= MIN_LRS


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _label(settings: dict, keys) -> str:
    return " ".join(f"{_short(k)}={settings[k]}" for k in keys if k in settings) or "all"


def divergence_step(train_rows: list[dict]) -> int | None:
    """First step whose SMOOTH-step mean train loss is DIVERGE_RISE above the lowest mean so far."""
    steps = [r["step"] for r in train_rows if _num(r.get("loss")) is not None]
    loss = np.array([r["loss"] for r in train_rows if _num(r.get("loss")) is not None], float)
    best = math.inf
    for i in range(SMOOTH, len(loss) + 1):
        window = loss[i - SMOOTH:i]
        if not np.all(np.isfinite(window)):
            return steps[i - 1]
        mean = float(window.mean())
        if mean > best + DIVERGE_RISE:
            return steps[i - 1]
        best = min(best, mean)
    return None


def _largest(rows: list[dict], prefix: str, suffix: str) -> float | None:
    vals = [v for r in rows for k, v in r.items() if k.startswith(prefix) and k.endswith(suffix)
            and _num(v) is not None and math.isfinite(v)]
    return max(vals) if vals else None


def attn_logit_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, max over blocks of attention/block_i/logit_max) of the rows that logged it."""
    steps, vals = [], []
    for r in rows:
        v = [x for k, x in r.items() if k.startswith("attention/") and k.endswith("/logit_max") and _num(x) is not None]
        if v:
            steps.append(r["step"])
            vals.append(max(v))
    return steps, vals


def blowup_step(rows: list[dict]) -> int | None:
    """First step whose largest attention logit is >= ATTN_BLOWUP, or None."""
    steps, vals = attn_logit_curve(rows)
    return next((s for s, v in zip(steps, vals) if v >= ATTN_BLOWUP), None)


def cell_points(exp) -> list[dict]:
    """One dict per cell: panel, line, lr, seed, status, final val CE, divergence step, logit maxima, l0."""
    varied = list(dict.fromkeys(k for c in exp.cells for k in c.settings if k not in (LR_KEY, "seed")))
    panels = [k for k in varied if k in PANEL_KEYS]
    lines = [k for k in varied if k not in PANEL_KEYS]
    out = []
    for c in exp.cells:
        if LR_KEY not in c.settings:
            continue
        rows = c.rows("train")
        first = next((_num(r.get("loss")) for r in rows if _num(r.get("loss")) is not None), None)
        failed = c.status == "failed"
        div = c.summary.get("failed_step") if failed else divergence_step(rows)
        out.append({"cell": c.name, "panel": _label(c.settings, panels), "line": _label(c.settings, lines),
                    "lr": float(c.settings[LR_KEY]), "seed": c.seed, "status": c.status,
                    "final_val_ce": _num(c.summary.get("val_ce")) if c.status == "finished" else None,
                    "divergence_step": div, "attn_blowup_step": blowup_step(rows), "initial_loss": first,
                    "max_attn_logit": _largest(rows, "attention/", "/logit_max"),
                    "max_abs_log_z": _largest(rows, "output/", "log_z_absmax"),
                    "_rows": rows})
    return out


def sensitivity(points: list[dict]) -> tuple[list[dict], float | None]:
    """Per (panel, line): final loss per lr, best lr, LR sensitivity; and l0 (see the module notes)."""
    inits = [p["initial_loss"] for p in points if p["initial_loss"] is not None and math.isfinite(p["initial_loss"])]
    l0 = float(np.median(inits)) if inits else None
    lines = {}
    for p in points:
        lines.setdefault((p["panel"], p["line"]), {}).setdefault(p["lr"], []).append(p)
    out = []
    for (panel, line), by_lr in lines.items():
        lrs = sorted(by_lr)
        finals = {}
        for lr in lrs:
            vals = [p["final_val_ce"] if p["final_val_ce"] is not None else math.inf for p in by_lr[lr]
                    if p["status"] in ("finished", "failed")]
            if vals:
                finals[lr] = float(np.mean([min(v, l0) if l0 is not None else v for v in vals]))
        best = min(finals.values()) if finals else None
        row = {"panel": panel, "line": line, "lrs": lrs, "final": finals,
               "best_lr": min(finals, key=finals.get) if finals else None, "best_loss": best,
               "lr_sensitivity": float(np.mean([v - best for v in finals.values()])) if finals and
               all(math.isfinite(v) for v in finals.values()) else None,
               "diverged": {lr: [p["divergence_step"] for p in by_lr[lr] if p["divergence_step"] is not None]
                            for lr in lrs},
               "blowup": {lr: [p["attn_blowup_step"] for p in by_lr[lr] if p["attn_blowup_step"] is not None]
                          for lr in lrs},
               "max_attn_logit": {lr: max((p["max_attn_logit"] for p in by_lr[lr] if p["max_attn_logit"] is not None),
                                          default=None) for lr in lrs}}
        out.append(row)
    return out, l0


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(exp, lines: list[dict], l0: float | None) -> str:
    lrs = sorted({lr for r in lines for lr in r["lrs"]})
    head = ["panel", "line"] + [f"lr {lr:g}" for lr in lrs] + ["best lr", "LR sensitivity", "diverged at (lr: step)",
                                                                 f"attn logit >= {ATTN_BLOWUP:g} at (lr: step)",
                                                                 "max attn logit (top lr)"]
    out = [f"# LR sensitivity: `{exp.name}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lines:
        div, blow = (", ".join(f"{lr:g}: {'/'.join(map(str, s))}" for lr, s in r[key].items() if s) or "-"
                     for key in ("diverged", "blowup"))
        top = r["max_attn_logit"].get(max(r["lrs"]))
        out.append("| " + " | ".join([r["panel"], r["line"]] + [_fmt(r["final"].get(lr)) for lr in lrs]
                                      + [_fmt(r["best_lr"], "g"), _fmt(r["lr_sensitivity"]), div, blow,
                                         _fmt(top, ".4g")]) + " |")
    out += ["", "Legend:",
            f"- lr columns: final validation CE (nats/token), mean over finished seeds; a non-finite run or a "
            f"loss above the initial loss l0 = {_fmt(l0)} counts as l0.",
            "- LR sensitivity: mean over the lrs of (final loss - the line's best final loss); lower is more "
            "robust to the learning rate (Wortsman et al. 2023).",
            f"- diverged at: the step a run stopped on a non-finite value, or where its {SMOOTH}-step mean "
            f"train loss rose {DIVERGE_RISE:g} nat above its lowest.",
            f"- attn logit >= {ATTN_BLOWUP:g} at: the first step whose largest attention logit (over blocks) "
            f"reached {ATTN_BLOWUP:g} (one-hot attention rows).",
            "- max attn logit: the largest attention score logged in any block, at the sweep's highest lr."]
    return "\n".join(out) + "\n"


def write_csv(points: list[dict], path) -> None:
    keys = ["cell", "panel", "line", "lr", "seed", "status", "final_val_ce", "divergence_step", "attn_blowup_step",
            "initial_loss",
            "max_attn_logit", "max_abs_log_z"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for p in points:
        w.writerow({k: "" if p.get(k) is None else p[k] for k in keys})
    atomic_write(path, text.getvalue())


def _panels(points: list[dict]) -> list[str]:
    return list(dict.fromkeys(p["panel"] for p in points))


def _figure_legend(fig, axes) -> None:
    """One legend for all panels, each label once, outside the data on the right."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), fontsize=7, loc="outside right upper")


def plot_sweep(exp, lines: list[dict], l0: float | None):
    panels = list(dict.fromkeys(r["panel"] for r in lines))
    fig, axes = new_figure(1, len(panels), (4.2 * len(panels), 3.8), sharey=True)
    for ax, panel in zip(axes[0], panels):
        drawn = False
        for r in (r for r in lines if r["panel"] == panel):
            xs = sorted(r["final"])
            drawn = drawn or bool(xs)
            (line,) = ax.plot(xs, [r["final"][x] for x in xs], marker="o", ms=4, label=r["line"])
            bad = [x for x in xs if r["diverged"].get(x)]
            ax.plot(bad, [r["final"][x] for x in bad], "x", ms=9, color=line.get_color())
        if l0 is not None:
            ax.axhline(l0, color="grey", ls=":", lw=1, label="loss at init")
        if drawn:  # a panel with no finished cell yet (a partial experiment) stays linear
            ax.set_xscale("log")
    return _finish(fig, axes, panels, "peak learning rate", "final validation CE (nats/token)",
                   f"{exp.name}: final loss vs learning rate (x: diverged)")


def plot_logit_growth(exp, points: list[dict]):
    top = sorted({p["lr"] for p in points})[-2:]
    panels = _panels(points)
    fig, axes = new_figure(1, len(panels), (4.2 * len(panels), 3.8))  # not sharey: empty panels stay linear
    styles = {lr: ls for lr, ls in zip(top, (":", "-"))}
    for ax, panel in zip(axes[0], panels):
        for i, line in enumerate(dict.fromkeys(p["line"] for p in points if p["panel"] == panel)):
            for p in (p for p in points if p["panel"] == panel and p["line"] == line and p["lr"] in top):
                steps, vals = attn_logit_curve(p["_rows"])
                if steps:
                    ax.plot(steps, np.maximum(np.abs(vals), 1e-2), ls=styles[p["lr"]], color=f"C{i}",
                            label=f"{line} lr={p['lr']:g}" if p["seed"] == points[0]["seed"] else None)
        if ax.lines:  # a panel with no logged attention logits yet (a partial experiment) stays linear
            ax.set_yscale("log")
    return _finish(fig, axes, panels, "step", "max attention logit over blocks (|.|)",
                   f"{exp.name}: attention-logit growth at the two highest lrs")


def _finish(fig, axes, panels, xlabel: str, ylabel: str, title: str):
    """Labels, panel titles, grid, one figure legend and the title shared by both figures."""
    for ax, panel in zip(axes[0], panels):
        ax.set_xlabel(xlabel)
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    _figure_legend(fig, axes[0])
    fig.suptitle(title, fontsize=10)
    return fig


def write(exp) -> dict:
    """Writes lr_sensitivity.md, lr_sensitivity.csv and the two plots; returns their paths."""
    points = cell_points(exp)
    lines, l0 = sensitivity(points)
    table = atomic_write(exp.dir / "lr_sensitivity.md", markdown(exp, lines, l0))
    csv_path = exp.dir / "lr_sensitivity.csv"
    write_csv(points, csv_path)
    out_dir = real_subdir(exp.dir, "plots")
    plots = write_figure(plot_sweep(exp, lines, l0), out_dir / "lr_sweep", FORMATS, dpi=110)
    plots += write_figure(plot_logit_growth(exp, points), out_dir / "attn_logit_growth", FORMATS, dpi=110)
    return {"table": table, "csv": csv_path, "plots": plots, "lines": lines, "l0": l0}
