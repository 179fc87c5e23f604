"""The experiment summary: one row per variant, averaged over seeds.

Reads only what the cells left on disk (experiment.json, each cell's
summary.json, metrics.jsonl and logs/<cell>.json), so `sandbox report` can
regenerate everything after the fact, from any subset of finished cells.

Statistics, stated again in the table's legend:

* numbers are the mean over the variant's *finished* seeds, `± std` the
  sample standard deviation across them; failed and crashed seeds are
  counted in the status column and contribute only their NaN step;
* "vs baseline" is Welch's unequal-variance t-test of final validation
  cross-entropy against the baseline variant (same settings, baseline
  policy): `worse`/`better` when p < alpha, else `same`; it needs two
  finished seeds on each side, otherwise `-`. With 3 seeds the test only
  sees large effects; a `same` is absence of evidence, not equivalence.
* steps to target: the first logged train step whose loss is <= the target
  (spec `target_loss`, default 1.1 x the baseline's final train CE).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sandbox.ablate.runner import cell_status, read_summary
from sandbox.errors import UserError
from sandbox.logger import read_metrics

# (csv column, summary.json key or None if derived, markdown header)
MEAN_COLUMNS = [
    ("train_ce", "train_ce", "train CE"),
    ("val_ce", "val_ce", "val CE"),
    ("val_perplexity", "val_perplexity", "val ppl"),
    ("val_bits_per_token", "val_bits_per_token", "val bits/tok"),
    ("steps_to_target", None, "steps to target"),
    ("tokens_per_s", "tokens_per_s", "tokens/s"),
    ("overflow_events", "overflow_skips", "overflows"),
    ("skipped_steps", None, "skipped steps"),
    ("final_loss_scale", "final_loss_scale", "final loss scale"),
    ("underflow_frac", "underflow_frac", "underflow"),
    ("lost_update_frac", "lost_update_frac", "lost updates"),
    ("fp8_saturated_frac", "fp8_saturated_frac", "fp8 saturated"),
    ("precision_drift", "precision_drift", "precision drift"),
]
WITH_SPREAD = ("train_ce", "val_ce")


@dataclass
class CellData:
    name: str
    variant: str
    seed: int
    policy: str
    settings: dict
    status: str
    summary: dict
    run_dir: Path
    _metrics: list | None = field(default=None, repr=False)

    @property
    def metrics(self) -> list[dict]:
        if self._metrics is None:
            self._metrics = read_metrics(self.run_dir)
        return self._metrics

    def rows(self, split: str) -> list[dict]:
        return [r for r in self.metrics if r.get("split") == split]


@dataclass
class Experiment:
    dir: Path
    name: str
    baseline: str
    alpha: float
    target_loss: float | None
    cells: list[CellData]

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(c.variant for c in self.cells))

    def of(self, variant: str) -> list[CellData]:
        return [c for c in self.cells if c.variant == variant]


def load_experiment(exp_dir: str | Path) -> Experiment:
    exp_dir = Path(exp_dir)
    path = exp_dir / "experiment.json"
    if not exp_dir.is_dir():
        raise UserError(f"{exp_dir}: not a directory")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        cells = [CellData(c["name"], c["variant"], c["seed"], c["policy"], c["settings"],
                          cell_status(exp_dir, c["name"]), read_summary(exp_dir / "cells" / c["name"]),
                          exp_dir / "cells" / c["name"]) for c in m["cells"]]
        return Experiment(exp_dir, m["name"], m["baseline"], float(m["alpha"]), m.get("target_loss"), cells)
    except FileNotFoundError:
        raise UserError(f"{exp_dir}: no experiment.json (not an experiment directory; run `sandbox ablate SPEC` first)") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path}: unreadable or malformed experiment manifest") from None


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def steps_to(cell: CellData, target: float) -> float | None:
    for r in cell.rows("train"):
        loss = _num(r.get("loss"))
        if loss is not None and loss <= target:
            return float(r["step"])
    return None


def _cell_value(cell: CellData, column: str, key: str | None, target: float | None):
    s = cell.summary
    if column == "steps_to_target":
        return steps_to(cell, target) if target is not None else None
    if column == "skipped_steps":
        parts = [_num(s.get(k)) for k in ("overflow_skips", "nonfinite_skips", "spike_skips")]
        return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    return _num(s.get(key))


def _baseline_variant(exp: Experiment, variant: str) -> str | None:
    """Same settings with the baseline policy; else the variant that is only the baseline policy."""
    cell = exp.of(variant)[0]
    want = {k: v for k, v in cell.settings.items() if k != "seed"}
    want["precision.policy"] = exp.baseline
    fallback = None
    for v in exp.variants:
        s = {k: x for k, x in exp.of(v)[0].settings.items() if k != "seed"}
        if s == want:
            return v
        if fallback is None and exp.of(v)[0].policy == exp.baseline and set(s) <= {"precision.policy"}:
            fallback = v
    return fallback


def _final_val(cells: list[CellData]) -> list[float]:
    return [v for c in cells if c.status == "finished" and (v := _num(c.summary.get("val_ce"))) is not None]


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value, or None when it is undefined (n < 2 or no variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def default_target(exp: Experiment) -> float | None:
    if exp.target_loss is not None:
        return float(exp.target_loss)
    base = [v for v in exp.variants if exp.of(v)[0].policy == exp.baseline] or exp.variants
    finals = [_num(c.summary.get("train_ce")) for v in base for c in exp.of(v) if c.status == "finished"]
    finals = [f for f in finals if f is not None]
    return 1.1 * float(np.mean(finals)) if finals else None


def summarize(exp: Experiment) -> tuple[list[dict], float | None]:
    """One dict per variant (CSV columns), and the target loss used."""
    target = default_target(exp)
    rows = []
    for variant in exp.variants:
        cells = exp.of(variant)
        ok = [c for c in cells if c.status == "finished"]
        counts = {s: sum(c.status == s for c in cells) for s in dict.fromkeys(c.status for c in cells)}
        row = {"variant": variant, "policy": cells[0].policy, "seeds": len(cells), "finished": len(ok),
               "status": ", ".join(f"{n} {s}" for s, n in counts.items())}
        for column, key, _ in MEAN_COLUMNS:
            vals = [v for c in ok if (v := _cell_value(c, column, key, target)) is not None]
            row[column] = float(np.mean(vals)) if vals else None
            if column in WITH_SPREAD:
                row[column + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        nan_steps = [c.summary.get("failed_step") for c in cells if c.status == "failed"]
        row["nan_step"] = ";".join(str(s) for s in nan_steps if s is not None) or None
        crashed = [c.name for c in cells if c.status == "crashed"]
        row["crashed_cells"] = ";".join(crashed) or None
        base = _baseline_variant(exp, variant)
        row["baseline"] = base
        row["p_value"] = row["vs_baseline"] = None
        if base is not None and base != variant:
            a, b = _final_val(cells), _final_val(exp.of(base))
            p = welch(a, b)
            row["p_value"] = p
            if p is not None:
                diff = np.mean(a) - np.mean(b)
                row["vs_baseline"] = ("worse" if diff > 0 else "better") if p < exp.alpha else "same"
            elif not a:
                row["vs_baseline"] = "no finished run"
        elif base == variant:
            row["vs_baseline"] = "baseline"
        rows.append(row)
    return rows, target


def _fmt(v, std=None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        text = f"{v:.4g}" if math.isfinite(v) else str(v)
        return text + (f" ± {std:.2g}" if std is not None else "")
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(rows[0]) if rows else ["variant"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in keys})


def markdown_table(exp: Experiment, rows: list[dict], target: float | None) -> str:
    headers = ["variant", "status"] + [h for _, _, h in MEAN_COLUMNS] + ["NaN step", f"vs {exp.baseline} (p)"]
    lines = [f"# Experiment `{exp.name}`", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["variant"], r["status"]]
        cells += [_fmt(r[c], r.get(c + "_std")) for c, _, _ in MEAN_COLUMNS]
        cells.append(_fmt(r["nan_step"]))
        verdict = r["vs_baseline"] or "-"
        if r["p_value"] is not None:
            verdict += f" (p={r['p_value']:.2g})"
        cells.append(verdict)
        lines.append("| " + " | ".join(cells) + " |")
    tgt = f"{target:.4g}" if target is not None else "-"
    lines += ["", "Legend:",
              f"- Values are means over each variant's finished seeds; `± x` is the sample standard deviation "
              f"across seeds. Failed (non-finite, with a failure bundle) and crashed seeds appear only in "
              f"`status` and `NaN step` (the step at which training stopped).",
              f"- CE in nats per token; perplexity = exp(CE); bits/token = CE / ln 2.",
              f"- steps to target: first logged train step with loss <= {tgt} nats.",
              f"- overflows: steps the loss scaler skipped; skipped steps: overflow + non-finite + spike skips.",
              f"- underflow (nonzero logit gradients that flush to zero in the compute dtype), lost updates "
              f"(nonzero updates that leave the stored weight unchanged): means over every training step; "
              f"fp8 saturated: the max over steps; precision drift: KL of the policy's forward pass to the "
              f"fp32 forward on validation data, at the end.",
              f"- vs {exp.baseline}: Welch's t-test (unequal variances, two-sided) of final validation CE "
              f"against the same settings under the {exp.baseline} policy; `worse`/`better` when "
              f"p < {exp.alpha:g}, `same` otherwise (absence of evidence at this seed count, not equivalence); "
              f"`-` when either side has fewer than two finished seeds."]
    return "\n".join(lines) + "\n"


def write_report(exp_dir: str | Path) -> dict:
    """Writes table.md, summary.csv and plots/*.png; returns their paths."""
    from sandbox.ablate.plots import write_plots

    exp = load_experiment(exp_dir)
    rows, target = summarize(exp)
    table = exp.dir / "table.md"
    table.write_text(markdown_table(exp, rows, target), encoding="utf-8")
    csv_path = exp.dir / "summary.csv"
    write_csv(rows, csv_path)
    plots = write_plots(exp, rows, exp.dir / "plots")
    return {"table": table, "csv": csv_path, "plots": plots}
