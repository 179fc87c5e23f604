"""Run logging: metrics.jsonl, tensorboardX event files, a live progress bar.

The loop hands over plain Python floats (already read to the host at a log
interval); nothing here touches device arrays.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np


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


def _json_value(v: float):
    return v if math.isfinite(v) else str(v)  # JSON has no inf/nan


class RunLogger:
    def __init__(self, run_dir: Path, cfg_logging, total_steps: int, start_step: int = 0,
                 tb_dir: Path | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg_logging
        self.jsonl = None
        if cfg_logging.jsonl:
            path = self.run_dir / "metrics.jsonl"
            self._truncate_after(path, start_step)
            self.jsonl = path.open("a", encoding="utf-8")
        self.tb = None
        if cfg_logging.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir or self.run_dir / "tb"), flush_secs=10)
        self.progress = None
        if cfg_logging.progress and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     transient=True)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    @staticmethod
    def _truncate_after(path: Path, start_step: int) -> None:
        """On resume, drop rows past the restored step so the log matches an uninterrupted run.

        Rows carry `step` = steps completed, and everything up to a checkpoint's
        step is flushed before the checkpoint is written.
        """
        if not path.exists():
            return
        keep = [row for row in read_metrics(path.parent) if row.get("step", 0) <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def log(self, step: int, split: str, scalars: dict[str, float]) -> None:
        if self.jsonl:
            row = {"step": step, "split": split, "time": round(time.time(), 3)}
            row.update({k: _json_value(v) for k, v in scalars.items()})
            self.jsonl.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def event(self, step: int, kind: str, detail: dict) -> None:
        """A discrete event (overflow, failure, ...) as its own JSONL row."""
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "split": "event", "event": kind, **detail}) + "\n")
        self.print(f"[step {step}] {kind}: " + ", ".join(f"{k}={v}" for k, v in detail.items()))

    def update_progress(self, step: int, info: str) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step, info=info)

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
        if self.progress:
            self.progress.stop()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
