"""The experiment summary: one row per variant, averaged over seeds.

Reads only what the cells left on disk (experiment.json, each cell's
summary.json, metrics.jsonl and logs/<cell>.json), so `sandbox report` can
regenerate everything after the fact, from any subset of finished cells.
Those files are input like any other: every field of experiment.json is
type- and range-checked (a damaged manifest is one line, exit 2); a cell's
damaged summary.json or exit record counts as missing (see runner.py), and
damaged metrics lines are skipped (`read_metrics`).
table.md, summary.csv, the plots (plots.py) and the cells' TensorBoard
hparams (hparams.py) are written atomically
(`rundir.atomic_write`): a link planted at one of those names is replaced,
never followed.

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
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sandbox.ablate import lr_sensitivity
from sandbox.ablate.hparams import write_hparams
from sandbox.ablate.plots import write_plots
from sandbox.ablate.runner import cell_status, read_summary
from sandbox.errors import UserError
from sandbox.floatio import show_value
from sandbox.logger import read_metrics
from sandbox.rundir import atomic_write, check_name

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
    ("recovered_update_frac", "recovered_update_frac", "recovered updates"),
    ("nu_underflow_frac", "nu_underflow_frac", "v underflow"),
    ("state_bytes_per_param", "state_bytes_per_param", "state B/param"),
    ("fp8_saturated_frac", "fp8_saturated_frac", "fp8 saturated"),
    ("quant_snr_input_db", "quant_snr_input_db", "SNR in (dB)"),
    ("quant_snr_kernel_db", "quant_snr_kernel_db", "SNR w (dB)"),
    ("quant_snr_output_grad_db", "quant_snr_output_grad_db", "SNR grad (dB)"),
    ("quant_flushed_frac", "quant_flushed_frac", "flushed"),
    ("quant_saturated_frac", "quant_saturated_frac", "saturated"),
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
            self._metrics = read_metrics(self.run_dir)  # rows are objects with an integer step
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


def _field(m: dict, key: str, path: Path, check, expected: str, where: str = ""):
    """m[key] if check(value) holds, else a one-line UserError naming the file and the field."""
    value = m.get(key) if isinstance(m, dict) else None
    if not check(value):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:60] + "..."
        raise UserError(f"{path}: {where}{key}: expected {expected}, got {shown}")
    return value


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _cell_data(exp_dir: Path, path: Path, i: int, c) -> CellData:
    where = f"cells[{i}]."
    if not isinstance(c, dict):
        raise UserError(f"{path}: cells[{i}]: expected an object, got {type(c).__name__}")
    name = _field(c, "name", path, _is_str, "a cell name", where)
    try:
        check_name(name, "name")  # it becomes a path under cells/ and logs/
    except UserError:
        raise UserError(f"{path}: {where}name: expected a plain name (one path component), got {name[:60]!r}") \
            from None
    variant = _field(c, "variant", path, _is_str, "a string", where)
    seed = _field(c, "seed", path, _is_int, "an integer", where)
    policy = _field(c, "policy", path, _is_str, "a string", where)
    settings = _field(c, "settings", path, lambda v: isinstance(v, dict), "an object", where)
    run_dir = exp_dir / "cells" / name
    return CellData(name, variant, seed, policy, settings, cell_status(exp_dir, name), read_summary(run_dir), run_dir)


def load_experiment(exp_dir: str | Path) -> Experiment:
    exp_dir = Path(exp_dir)
    path = exp_dir / "experiment.json"
    if not exp_dir.is_dir():
        raise UserError(f"{exp_dir}: not a directory")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{exp_dir}: no experiment.json (not an experiment directory; run `sandbox ablate SPEC` first)") from None
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable or malformed experiment manifest") from None
    if not isinstance(m, dict):
        raise UserError(f"{path}: expected a JSON object (an experiment manifest), got {type(m).__name__}")
    name = _field(m, "name", path, _is_str, "a string")
    baseline = _field(m, "baseline", path, _is_str, "a policy name")
    alpha = _field(m, "alpha", path, lambda v: _num(v) is not None and 0 < v < 1, "a number in (0, 1)")
    target = _field(m, "target_loss", path, lambda v: v is None or (_num(v) is not None and 0 < v < math.inf),
                    "a positive number or null")
    cells = _field(m, "cells", path, lambda v: isinstance(v, list), "a list of cells")
    data = [_cell_data(exp_dir, path, i, c) for i, c in enumerate(cells)]
    names = [c.name for c in data]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: cells: two cells share a name ({next(n for n in names if names.count(n) > 1)!r})")
    return Experiment(exp_dir, name, baseline, float(alpha), None if target is None else float(target), data)


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


def _final_val_by_seed(cells: list[CellData]) -> dict[int, float]:
    """Final val CE of each finished cell, by seed."""
    return {c.seed: v for c in cells if c.status == "finished" and (v := _num(c.summary.get("val_ce"))) is not None}


def _final_val(cells: list[CellData]) -> list[float]:
    return list(_final_val_by_seed(cells).values())


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value, or None when it is undefined (n < 2 or no variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    with warnings.catch_warnings():  # one variant's seeds all equal: scipy warns of "precision loss" in its
        warnings.simplefilter("ignore", RuntimeWarning)  # variance, which is exactly 0; the other's spread decides p
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def paired(variant: list[CellData], base: list[CellData]) -> dict:
    """Final val CE of `variant` minus `base` over the seeds both finished: mean, std, n, paired t-test p.

    Cells with the same seed share their initial weights and data order, so the seed-to-seed spread
    cancels in the difference: with few seeds this sees effects that Welch's test over all seeds cannot.
    """
    a, b = _final_val_by_seed(variant), _final_val_by_seed(base)
    seeds = sorted(a.keys() & b.keys())
    d = np.array([a[s] - b[s] for s in seeds])
    out = {"paired_n": len(seeds), "paired_diff": float(d.mean()) if len(d) else None,
           "paired_diff_std": float(d.std(ddof=1)) if len(d) > 1 else None, "paired_p": None}
    if len(d) > 1:
        from scipy import stats

        with warnings.catch_warnings():  # near-constant differences: scipy warns, and p is ~0 as it should be
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
        out["paired_p"] = p if math.isfinite(p) else None
    return out


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
        row["nan_step"] = ";".join(str(s) for s in nan_steps if _is_int(s)) or None
        crashed = [c.name for c in cells if c.status == "crashed"]
        row["crashed_cells"] = ";".join(crashed) or None
        base = _baseline_variant(exp, variant)
        row["baseline"] = base
        row["p_value"] = row["vs_baseline"] = None
        row.update(paired_n=0, paired_diff=None, paired_diff_std=None, paired_p=None)
        if base is not None and base != variant:
            row.update(paired(cells, exp.of(base)))
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
    spread = f" ± {std:.2g}" if isinstance(v, float) and std is not None else ""
    return show_value(v) + spread


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(rows[0]) if rows else ["variant"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in keys})
    atomic_write(path, text.getvalue())


def markdown_table(exp: Experiment, rows: list[dict], target: float | None) -> str:
    # Recipe telemetry columns only where some cell ran a recipe (they are empty otherwise).
    shown = [(c, h) for c, _, h in MEAN_COLUMNS
             if not c.startswith("quant_") or any(r.get(c) is not None for r in rows)]
    headers = ["variant", "status"] + [h for _, h in shown] + ["NaN step", f"vs {exp.baseline} (p)",
                                                               f"paired diff vs {exp.baseline} (p)"]
    lines = [f"# Experiment `{exp.name}`", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["variant"], r["status"]]
        cells += [_fmt(r[c], r.get(c + "_std")) for c, _ in shown]
        cells.append(_fmt(r["nan_step"]))
        verdict = r["vs_baseline"] or "-"
        if r["p_value"] is not None:
            verdict += f" (p={r['p_value']:.2g})"
        cells.append(verdict)
        if r["paired_diff"] is None:
            cells.append("-")
        else:
            spread = f" ± {r['paired_diff_std']:.2g}" if r["paired_diff_std"] is not None else ""
            p = f" (p={r['paired_p']:.2g})" if r["paired_p"] is not None else ""
            cells.append(f"{r['paired_diff']:+.2g}{spread}{p}, {r['paired_n']} seeds")
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
              f"(nonzero updates that leave the stored weight unchanged), recovered updates (nonzero updates "
              f"that rounding to nearest would have dropped but the Kahan buffer or stochastic rounding "
              f"kept), v underflow (nonzero entries of Adam's second moment stored as 0 in low precision): "
              f"means over every training step; state B/param: bytes of the train state (weights, master "
              f"copy, compensation buffer, moments, fp8 meta, counters) per parameter; "
              f"fp8 saturated: the max over steps; precision drift: KL of the policy's forward pass to the "
              f"fp32 forward on validation data, at the end.",
              *([f"- SNR in/w/grad: quantization signal-to-noise ratio 10 log10(sum x^2 / sum (x - Q(x))^2) "
                 f"of each recipe dot's inputs, weights and output gradients (forward and backward GEMM "
                 f"together), mean over layers and steps; flushed: nonzero elements quantized to 0; "
                 f"saturated: elements clipped at the format's max (both means over every quantized tensor)."]
                if any(c.startswith("quant_") for c, _ in shown) else []),
              f"- vs {exp.baseline}: Welch's t-test (unequal variances, two-sided) of final validation CE "
              f"against the same settings under the {exp.baseline} policy; `worse`/`better` when "
              f"p < {exp.alpha:g}, `same` otherwise (absence of evidence at this seed count, not equivalence); "
              f"`-` when either side has fewer than two finished seeds.",
              f"- paired diff vs {exp.baseline}: final validation CE minus the {exp.baseline} cell's of the same "
              f"seed (same initial weights and data order), mean ± std over the seeds both finished, and the "
              f"paired t-test's two-sided p. The seed-to-seed spread cancels in the difference, so with few "
              f"seeds it resolves effects Welch's test cannot; the verdict column stays Welch's."]
    return "\n".join(lines) + "\n"


def write_report(exp_dir: str | Path) -> dict:
    """Writes table.md, summary.csv, plots/*.{png,svg} and the cells' TensorBoard hparams; returns their paths."""
    exp = load_experiment(exp_dir)
    rows, target = summarize(exp)
    table = atomic_write(exp.dir / "table.md", markdown_table(exp, rows, target))
    csv_path = exp.dir / "summary.csv"
    write_csv(rows, csv_path)
    plots = write_plots(exp, rows, exp.dir / "plots")
    keys = {column: key for column, key, _ in MEAN_COLUMNS}
    hparams = write_hparams(exp, lambda cell, column: _cell_value(cell, column, keys[column], target))
    out = {"table": table, "csv": csv_path, "plots": plots, "hparams": hparams}
    if lr_sensitivity.is_sweep(exp):  # an optimizer.lr axis: final loss vs lr, LR sensitivity per line
        sweep = lr_sensitivity.write(exp)
        out.update(lr_table=sweep["table"], lr_csv=sweep["csv"])
        out["plots"] = plots + sweep["plots"]
    return out
