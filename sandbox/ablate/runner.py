"""Running an experiment's cells, each in its own process, resumably.

Layout of an experiment directory:

    experiment.json        the manifest: spec name, cells, variants, settings
    spec.yaml              a copy of the spec as run
    configs/<cell>.yaml    each cell's resolved, validated config
    cells/<cell>/          each cell's run directory (summary.json, metrics.jsonl, checkpoints)
    logs/<cell>.log        the cell process's stdout and stderr
    logs/<cell>.json       its last exit code, wall time and stderr tail
    tb/<cell>/             TensorBoard events: `tensorboard --logdir EXPERIMENT/tb` overlays all
    table.md, summary.csv, plots/   written by report.py

Why processes: a cell that crashes (or leaks device memory) cannot take the
others down, and `--jobs N` is just N waiting threads around N processes.
A cell's status comes from its exit code and summary.json: 0 + `finished`,
3 = stopped on a non-finite value (`failed`, with a bundle), anything else
= `crashed`. On re-running, finished and failed cells are kept (a NaN
failure is a deterministic result, not an accident), everything else is
started again with `--resume`, which continues from the latest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from sandbox import config as config_lib
from sandbox.ablate.spec import Cell, Spec
from sandbox.errors import UserError

TERMINAL = ("finished", "failed")
STDERR_TAIL = 15  # lines kept in logs/<cell>.json for a crashed cell


@dataclass
class Outcome:
    cell: str
    status: str  # finished | failed | interrupted | crashed
    returncode: int | None
    wall_s: float
    summary: dict
    stderr_tail: str = ""


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def cell_status(exp_dir: Path, cell: str) -> str:
    """finished | failed | interrupted | crashed | pending, from the last exit code and summary.json."""
    record = {}
    try:
        record = json.loads((exp_dir / "logs" / f"{cell}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        pass
    rc = record.get("returncode")
    if rc not in (None, 0, 3):
        return "crashed"
    summary = read_summary(exp_dir / "cells" / cell)
    return summary.get("status", "pending") if summary else ("crashed" if rc is not None else "pending")


def write_manifest(spec: Spec, exp_dir: Path) -> None:
    manifest = {
        "name": spec.name, "spec": str(spec.path), "target_loss": spec.target_loss,
        "baseline": spec.baseline, "alpha": spec.alpha,
        "cells": [{"name": c.name, "variant": c.variant, "seed": c.seed, "settings": c.settings,
                   "policy": c.config.precision.policy} for c in spec.cells],
    }
    (exp_dir / "experiment.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    shutil.copyfile(spec.path, exp_dir / "spec.yaml")


def _check_unchanged(cell: Cell, run_dir: Path) -> None:
    """A cell directory left by an earlier, different spec must not be silently resumed."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    # Compare validated configs, not raw files: a field added to the schema
    # since the cell ran takes its default and is no change.
    try:
        old = config_lib.to_dict(config_lib.from_dict(config_lib.read_yaml(path)))
    except UserError:
        old = None
    if old != config_lib.to_dict(cell.config):
        raise UserError(f"{run_dir}: this cell was run with a different config; "
                        f"pass --overwrite to start the experiment again")


def run_cell(cell: Cell, exp_dir: Path) -> Outcome:
    cfg_path = exp_dir / "configs" / f"{cell.name}.yaml"
    cmd = [sys.executable, "-m", "sandbox.ablate.worker", str(cfg_path), "--tb-dir", str(exp_dir / "tb" / cell.name)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    (exp_dir / "logs" / f"{cell.name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    tail = "\n".join(proc.stderr.strip().splitlines()[-STDERR_TAIL:])
    record = {"returncode": proc.returncode, "wall_s": round(wall, 2), "stderr_tail": tail}
    (exp_dir / "logs" / f"{cell.name}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    status = cell_status(exp_dir, cell.name)
    return Outcome(cell.name, status, proc.returncode, wall, read_summary(exp_dir / "cells" / cell.name), tail)


def describe(o: Outcome) -> str:
    s = o.summary
    if o.status == "finished":
        val = s.get("val_ce")
        return f"finished in {o.wall_s:.0f}s" + (f", val_ce {val:.4f}" if isinstance(val, (int, float)) else "")
    if o.status == "failed":
        return f"FAILED: non-finite at step {s.get('failed_step')}" + (f", bundle {s['bundle']}" if s.get("bundle") else "")
    if o.status == "crashed":
        last = o.stderr_tail.splitlines()[-1] if o.stderr_tail else ""
        return f"CRASHED (exit {o.returncode}): {last}"
    return f"{o.status} at step {s.get('steps')}"


class _Progress:
    """One overall bar when stderr is a terminal, plain lines otherwise."""

    def __init__(self, total: int, done: int):
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]ablate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self.task = self.bar.add_task("ablate", total=total, completed=done)
            self.bar.start()

    def line(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self.bar:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def run_experiment(spec: Spec, exp_dir: str | Path, jobs: int = 1, overwrite: bool = False) -> list[Outcome]:
    """Runs every cell not already finished or failed; returns the outcomes of this invocation."""
    exp_dir = Path(exp_dir)
    if jobs < 1:
        raise UserError(f"--jobs: expected >= 1, got {jobs}")
    if overwrite:
        for sub in ("cells", "configs", "logs", "tb", "plots"):
            shutil.rmtree(exp_dir / sub, ignore_errors=True)
    try:
        for sub in ("cells", "configs", "logs", "tb"):
            (exp_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{exp_dir}: cannot write the experiment directory ({e.strerror})") from None
    todo = []
    for cell in spec.cells:
        _check_unchanged(cell, exp_dir / "cells" / cell.name)
        (exp_dir / "configs" / f"{cell.name}.yaml").write_text(config_lib.dump_yaml(cell.config), encoding="utf-8")
        if cell_status(exp_dir, cell.name) not in TERMINAL:
            todo.append(cell)
    write_manifest(spec, exp_dir)
    total, done = len(spec.cells), len(spec.cells) - len(todo)
    progress = _Progress(total, done)
    if done:
        progress.line(f"{done} of {total} cells already done (finished or failed); skipping them")
    outcomes = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(run_cell, cell, exp_dir) for cell in todo]
        for fut in as_completed(futures):
            o = fut.result()
            outcomes.append(o)
            done += 1
            progress.advance()
            progress.line(f"[{done}/{total}] {o.cell}: {describe(o)}")
    finally:
        # On Ctrl-C the running cells got the SIGINT too and are checkpointing;
        # wait for them, but start no new ones.
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return outcomes
