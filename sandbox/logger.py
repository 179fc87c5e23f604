"""Run logging: metrics.jsonl, tensorboardX event files, a live progress bar, a progress file.

The loop hands over plain Python floats (already read to the host at a log
interval); nothing here touches device arrays.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import scalar

from sandbox import sharding
from sandbox.floatio import finite_or_none, json_float
from sandbox.rundir import atomic_write


def flatten(tree: Any, prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> {'a/b': float}; scalar leaves only."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    arr = np.asarray(tree)
    # ml_dtypes floats (bfloat16, float8_*) have numpy kind 'V': ask jnp, or they vanish from the log
    if arr.ndim == 0 and (arr.dtype.kind in "biuf" or jnp.issubdtype(arr.dtype, jnp.floating)):
        out[prefix] = float(arr)
    return out


# TensorBoard tags: per-step guard flags are events (metrics.jsonl has them as rows, the console prints
# them), not curves: as 0/1 scalars they only add panels. The rest is grouped by what a reader compares,
# with train and val side by side ("loss/train_ce" next to "loss/val_ce").
PROGRESS_EVERY_S = 0.5  # ProgressFile: at most one write this often
TB_SKIP = frozenset({"applied", "overflow", "nonfinite", "spike", "stalled", "failed_step"})
TB_GROUPS = (
    ("loss", ("loss", "ce", "kl", "beta", "bits_per_token", "bits_per_byte", "perplexity", "kl_to_source",
              "entropy", "kl_to_reference_reverse", "kl_to_reference_forward", "precision_drift")),
    ("optim", ("grad_norm", "lr", "update_ratio")),
    ("precision", ("loss_scale", "underflow_frac", "overflow_frac", "lost_update_frac", "recovered_update_frac",
                   "nu_underflow_frac")),
    ("speed", ("tokens_per_s", "step_time")),
)
TB_GROUP_OF = {key: group for group, keys in TB_GROUPS for key in keys}


def tb_tag(split: str, key: str) -> str | None:
    """The TensorBoard tag of a metric, or None for a flag that is not a curve."""
    if key in TB_SKIP:
        return None
    head, _, rest = key.partition("/")
    if rest:  # nested families keep their own group: fp8/<tensor>/..., fp8_stats/..., activations/...
        return f"{head}/{split}/{rest}"
    return f"{TB_GROUP_OF.get(key, 'other')}/{split}_{key}"


@functools.cache
def tb_value_tag(split: str, key: str) -> str | None:
    """tb_tag(split, key) as tensorboardX's `scalar` cleans a tag (spaces, colons ...), worked out once."""
    tag = tb_tag(split, key)
    return None if tag is None else scalar(tag, 0.0).value[0].tag


class RunLogger:
    def __init__(self, run_dir: Path, cfg_logging, total_steps: int, start_step: int = 0,
                 tb_dir: Path | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg_logging
        self.jsonl = None
        primary = sharding.is_primary_process()  # multi-host: process 0 alone writes the run's logs
        if cfg_logging.jsonl and primary:
            path = self.run_dir / "metrics.jsonl"
            self._truncate_after(path, start_step)
            self.jsonl = path.open("a", encoding="utf-8")
        self.tb = None
        if cfg_logging.tensorboard and primary:
            self.tb = SummaryWriter(str(tb_dir or self.run_dir / "tb"), flush_secs=10)
        self.progress = None
        if cfg_logging.progress and primary and sys.stderr.isatty():
            # auto_refresh=False: no refresh thread that could outlive close() (a stop must leave no
            # thread running at exit, see interrupts.py); the bar is redrawn at each update instead.
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     transient=True, auto_refresh=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    @staticmethod
    def _truncate_after(path: Path, start_step: int) -> None:
        """On resume, drop rows past the restored step so the log matches an uninterrupted run.

        Rows carry `step` = steps completed, and everything up to a checkpoint's
        step is flushed before the checkpoint is written. Damaged lines (a crash
        mid-write, a stray byte) are dropped too, after the file as it was is
        copied aside and the lines are named in one message: the run resumes.
        """
        if not path.exists():
            return
        damaged: list[int] = []
        rows = read_metrics(path.parent, damaged)
        if damaged:
            aside = _free_name(path.with_name(path.name + ".damaged"))
            shutil.copyfile(path, aside)
            shown = ", ".join(map(str, damaged[:10])) + (f" (+{len(damaged) - 10} more)" if len(damaged) > 10 else "")
            print(f"{path}: skipped {len(damaged)} damaged line{'s' if len(damaged) > 1 else ''} ({shown}); "
                  f"the file as it was is kept as {aside.name}", file=sys.stderr, flush=True)
        keep = [row for row in rows if row["step"] <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def log(self, step: int, split: str, scalars: dict[str, float]) -> None:
        if self.jsonl:
            row = {"step": step, "split": split, "time": round(time.time(), 3)}
            row.update({k: json_float(v) for k, v in scalars.items()})
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()  # its tail is what other tools (ablate progress, tail -f) read
        if self.tb:
            # One event per row holding all its values, not `add_scalar` per value: that builds, stamps
            # and queues one event per value, ~30 per step, and on a 2-core machine the host time it
            # takes comes out of the step's (issue 18). For the same reason each value is built here
            # from its tag as tensorboardX's `scalar` cleans it, looked up once per (split, key):
            # `scalar` itself costs ~7 us a value. Same bytes (tests/test_logger.py).
            values = [Summary.Value(tag=tag, simple_value=float(v)) for k, v in scalars.items()
                      if (tag := tb_value_tag(split, k)) is not None]
            if values:
                self.tb.file_writer.add_summary(Summary(value=values), step)

    def histograms(self, step: int, hists: dict[str, tuple[list[int], Any]]) -> None:
        """Integer-binned histograms {name: (bin values, counts)}: one JSONL row (split "scale_hist",
        nonzero bins only, {name: {bin: count}}) and one TensorBoard histogram per name."""
        if self.jsonl:
            compact = {name: {str(b): float(c) for b, c in zip(bins, counts) if c}
                       for name, (bins, counts) in hists.items()}
            self.jsonl.write(json.dumps({"step": step, "split": "scale_hist", "hist": compact}) + "\n")
        if self.tb:
            for name, (bins, counts) in hists.items():
                counts = np.asarray(counts, np.float64)
                if counts.sum() == 0:
                    continue
                values = np.asarray(bins, np.float64)
                self.tb.add_histogram_raw(f"scale_exponent/{name}", min=float(values[counts > 0].min()),
                                          max=float(values[counts > 0].max()), num=float(counts.sum()),
                                          sum=float((values * counts).sum()),
                                          sum_squares=float((values**2 * counts).sum()),
                                          bucket_limits=(values + 0.5).tolist(), bucket_counts=counts.tolist(),
                                          global_step=step)

    def event(self, step: int, kind: str, detail: dict) -> None:
        """A discrete event (overflow, failure, ...) as its own JSONL row."""
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "split": "event", "event": kind, **detail}) + "\n")
        self.print(f"[step {step}] {kind}: " + ", ".join(f"{k}={v}" for k, v in detail.items()))

    def update_progress(self, step: int, info: str) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, info=info, refresh=True)

    def print(self, text: str) -> None:
        if self.progress:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        if self.jsonl:
            self.jsonl.flush()
        if self.tb:
            self.tb.flush()

    def close(self) -> None:
        progress, self.progress = self.progress, None  # idempotent; later prints go to plain stderr
        try:
            if progress:
                progress.stop()
        except OSError:  # the terminal went away (closed pty, hung-up ssh): the files still get closed
            pass
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class ProgressFile:
    """Trainer hook: `{"step", "total", "loss"}` in a small JSON file, for a process watching this run.

    metrics.jsonl is buffered, so its tail lags; this file is rewritten
    atomically at log intervals, at most every PROGRESS_EVERY_S (a log
    interval can be milliseconds on a tiny model: don't fsync each one), and
    at the last step. `sandbox train --progress FILE` adds it; `sandbox
    ablate` polls it for each running cell (sandbox/ablate/runner.py).
    """

    def __init__(self, path: Path, total: int):
        self.path, self.total = Path(path), total
        self.written_at = -math.inf

    def on_step_end(self, step: int, metrics: dict, state) -> None:
        if state is None:  # not the last step of a logged batch: more are coming right now
            return
        now = time.monotonic()
        if now - self.written_at < PROGRESS_EVERY_S and step < self.total:
            return
        record = {"step": int(step), "total": self.total, "loss": finite_or_none(metrics.get("loss"))}
        atomic_write(self.path, json.dumps(record))
        self.written_at = now


def read_metrics(run_dir: Path, damaged: list[int] | None = None) -> list[dict]:
    """The rows of run_dir/metrics.jsonl, each a dict with an integer `step`.

    A line that is not such a row (not UTF-8, not JSON, not an object, no integer step: a crash
    mid-write, a stray byte) is skipped, and its 1-based number appended to `damaged` if given.
    """
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
            if not line.strip():
                continue
            row = _parse_row(line)
            if row is not None:
                rows.append(row)
            elif damaged is not None:
                damaged.append(number)
    return rows


def _parse_row(line: bytes) -> dict | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return row if isinstance(step, int) and not isinstance(step, bool) else None


def _free_name(path: Path) -> Path:
    """path, or path.1, path.2, ...: the first that does not exist (an earlier copy is never overwritten)."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
