"""Running an experiment's cells, each in its own process, resumably.

Layout of an experiment directory:

    .sandbox-run           the marker: created by `sandbox ablate` (see sandbox/rundir.py)
    .sandbox-lock          held by the `sandbox ablate` running it: one at a time
    experiment.json        the manifest: spec name, cells, variants, settings
    spec.yaml              the spec as run, self-contained (its base config merged in)
    configs/<cell>.yaml    each cell's resolved, validated config
    cells/<cell>/          each cell's run directory (summary.json, metrics.jsonl, checkpoints)
    logs/<cell>.log        the cell process's stdout and stderr
    logs/<cell>.json       its last exit code, wall time and stderr tail
    logs/<cell>.progress.json   the step a running cell has reached (`sandbox train --progress`)
    tb/<cell>/             TensorBoard events: `tensorboard --logdir EXPERIMENT/tb` overlays all
    table.md, summary.csv, plots/   written by report.py

Why processes: a cell that crashes (or leaks device memory) cannot take the
others down, and `--jobs N` is just N waiting threads around N processes.
Each cell is `sandbox train CONFIG --resume --tb-dir EXPERIMENT/tb/<cell>
--progress logs/<cell>.progress.json`: the same command a user runs, so a
cell behaves (exit codes, stop requests, summary) exactly like a run.
The main thread shows what each running cell is doing: the train command's
`--progress` hook (sandbox.logger.ProgressFile) writes the step it reached to logs/<cell>.progress.json at log intervals
(metrics.jsonl is buffered, so its tail lags), and `_Progress` draws a bar
per running cell on a terminal, or, in a log, a line when a cell starts, a
`running:` line with every running cell's step at most every LINE_EVERY_S,
and a line when it ends with its step and elapsed time.
A cell's status comes from its exit code and summary.json: 0 + `finished`,
3 = stopped on a non-finite value (`failed`, with a bundle), anything else
= `crashed`. On re-running, finished and failed cells are kept (a NaN
failure is a deterministic result, not an accident), everything else is
started again with `--resume`, which continues from the latest checkpoint.

Only a directory `sandbox ablate` made is written to or cleared
(`rundir.open_dir`): `--overwrite` clears a marked experiment, never a
folder that merely has the same layout. Everything written here goes
through `rundir.atomic_write`. Records left by cells (logs/<cell>.json,
summary.json) are data: a damaged one counts as missing, so the cell is
run again rather than trusted or crashed on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sandbox import config as config_lib
from sandbox import rundir
from sandbox.ablate.spec import Cell, Spec
from sandbox.errors import UserError
from sandbox.runs import config_changes

TERMINAL = ("finished", "failed")
STDERR_TAIL = 15  # lines kept in logs/<cell>.json for a crashed cell
CELL_STATUSES = ("finished", "failed", "interrupted")  # what a cell's summary.json may say
SUBDIRS = ("cells", "configs", "logs", "tb")
POLL_S = 0.5  # how often the waiting loop reads the running cells' progress files
LINE_EVERY_S = 15.0  # without a terminal: at most one "running: ..." line this often


@dataclass
class Outcome:
    cell: str
    status: str  # finished | failed | interrupted | crashed
    returncode: int | None
    wall_s: float
    summary: dict
    stderr_tail: str = ""


def _read_json_object(path: Path) -> dict:
    """A JSON object from `path`; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_summary(run_dir: Path) -> dict:
    """A cell's summary.json; {} when missing or damaged (no status the runner knows)."""
    data = _read_json_object(Path(run_dir) / "summary.json")
    return data if data.get("status") in CELL_STATUSES else {}


def cell_status(exp_dir: Path, cell: str) -> str:
    """finished | failed | interrupted | crashed | pending, from the last exit code and summary.json."""
    rc = _read_json_object(exp_dir / "logs" / f"{cell}.json").get("returncode")
    if isinstance(rc, bool) or not isinstance(rc, int):
        rc = None  # no record, or a damaged one: the summary decides
    if rc not in (None, 0, 3):
        return "crashed"
    summary = read_summary(exp_dir / "cells" / cell)
    return summary["status"] if summary else ("crashed" if rc is not None else "pending")


def write_manifest(spec: Spec, exp_dir: Path) -> None:
    manifest = {
        "name": spec.name, "spec": str(spec.path), "target_loss": spec.target_loss,
        "baseline": spec.baseline, "alpha": spec.alpha,
        "cells": [{"name": c.name, "variant": c.variant, "seed": c.seed, "settings": c.settings,
                   "policy": c.config.precision.policy} for c in spec.cells],
    }
    rundir.atomic_write(exp_dir / "experiment.json", json.dumps(manifest, indent=2))
    sets = "".join(f" --set {t}" for t in spec.overrides)
    rundir.atomic_write(exp_dir / "spec.yaml", f"# written by sandbox ablate from {spec.path}{sets}, its base "
                        f"merged in\n" + yaml.safe_dump(spec.resolved, sort_keys=False))


def _check_unchanged(cell: Cell, run_dir: Path) -> None:
    """A cell directory left by an earlier, different spec must not be silently resumed."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    # Compare validated configs, not raw files: a field added to the schema
    # since the cell ran takes its default and is no change; nor is where the experiment lives.
    try:
        changed = list(config_changes(config_lib.from_dict(config_lib.read_yaml(path)), cell.config))
    except UserError:
        changed = ["(unreadable config.yaml)"]
    if changed:
        raise UserError(f"{run_dir}: this cell was run with a different config ({', '.join(changed[:5])}); "
                        f"pass --overwrite to start the experiment again")


def run_cell(cell: Cell, exp_dir: Path) -> Outcome:
    cfg_path = exp_dir / "configs" / f"{cell.name}.yaml"
    progress = progress_path(exp_dir, cell.name)
    progress.unlink(missing_ok=True)  # an earlier attempt's step is not this one's
    cmd = [sys.executable, "-m", "sandbox", "train", str(cfg_path), "--resume",
           "--tb-dir", str(exp_dir / "tb" / cell.name), "--progress", str(progress)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rundir.atomic_write(exp_dir / "logs" / f"{cell.name}.log", proc.stdout + proc.stderr)
    tail = "\n".join(proc.stderr.strip().splitlines()[-STDERR_TAIL:])
    record = {"returncode": proc.returncode, "wall_s": round(wall, 2), "stderr_tail": tail}
    rundir.atomic_write(exp_dir / "logs" / f"{cell.name}.json", json.dumps(record, indent=2))
    status = cell_status(exp_dir, cell.name)
    return Outcome(cell.name, status, proc.returncode, wall, read_summary(exp_dir / "cells" / cell.name), tail)


def progress_path(exp_dir: Path, cell: str) -> Path:
    return exp_dir / "logs" / f"{cell}.progress.json"


def read_progress(exp_dir: Path, cell: str) -> int | None:
    """The last step a running cell reported, or None before its first log interval."""
    step = _read_json_object(progress_path(exp_dir, cell)).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def describe(o: Outcome) -> str:
    s = o.summary
    if o.status == "finished":
        val = s.get("val_ce")
        return (f"finished at step {s.get('steps')} in {o.wall_s:.0f}s"
                + (f", val_ce {val:.4f}" if isinstance(val, (int, float)) else ""))
    if o.status == "failed":
        return f"FAILED: non-finite at step {s.get('failed_step')}" + (f", bundle {s['bundle']}" if s.get("bundle") else "")
    if o.status == "crashed":
        last = o.stderr_tail.splitlines()[-1] if o.stderr_tail else ""
        return f"CRASHED (exit {o.returncode}): {last}"
    return f"{o.status} at step {s.get('steps')}"


class _Progress:
    """A bar per running cell plus an overall one on a terminal; plain, complete lines otherwise."""

    def __init__(self, total: int, done: int, line_every_s: float = LINE_EVERY_S):
        self.bar = None
        self.total, self.done = total, done
        self.line_every_s = line_every_s
        self.tasks: dict[str, int] = {}  # running cell -> its bar (terminal) or last step shown (lines)
        self.last_line = time.monotonic()
        if sys.stderr.isatty():
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[state]}"))
            self.overall = self.bar.add_task("[bold]cells", total=total, completed=done, state="")
            self.bar.start()

    def line(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self, cell: Cell) -> None:
        steps = cell.config.training.steps
        if self.bar:
            # Process start and compile come before the first step: say so rather than sit at 0.
            self.tasks[cell.name] = self.bar.add_task(f"  {cell.name}", total=steps, state="starting, compiling")
        else:
            self.tasks[cell.name] = -1
            self.line(f"[start] {cell.name} ({steps} steps)")

    def update(self, steps: dict[str, int | None], elapsed: dict[str, float], totals: dict[str, int]) -> None:
        """Shows each running cell's step: its bar, or one `running:` line when a step moved and enough time passed."""
        if self.bar:
            for name, step in steps.items():
                if name in self.tasks and step is not None:
                    self.bar.update(self.tasks[name], completed=step, state="")
            return
        moved = any(step is not None and step != self.tasks.get(name) for name, step in steps.items())
        if not moved or time.monotonic() - self.last_line < self.line_every_s:
            return
        parts = [f"{name} step {'-' if step is None else step}/{totals[name]} ({elapsed[name]:.0f}s)"
                 for name, step in steps.items()]
        self.line("running: " + ", ".join(parts))
        self.tasks.update({name: step for name, step in steps.items() if step is not None})
        self.last_line = time.monotonic()

    def finish(self, o: Outcome) -> None:
        self.done += 1
        task = self.tasks.pop(o.cell, None)
        if self.bar:
            if task is not None:
                self.bar.remove_task(task)
            self.bar.advance(self.overall)
        self.line(f"[{self.done}/{self.total}] {o.cell}: {describe(o)}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def run_experiment(spec: Spec, exp_dir: str | Path, jobs: int = 1, overwrite: bool = False) -> list[Outcome]:
    """Runs every cell not already finished or failed, holding the experiment's lock; returns the outcomes."""
    exp_dir = Path(exp_dir)
    if jobs < 1:
        raise UserError(f"--jobs: expected >= 1, got {jobs}")
    # An existing experiment is resumed unless --overwrite clears it.
    with rundir.open_dir(exp_dir, "experiment", resume=not overwrite, overwrite=overwrite):
        return _run_cells(spec, exp_dir, jobs)


def _run_cells(spec: Spec, exp_dir: Path, jobs: int) -> list[Outcome]:
    for sub in SUBDIRS:
        rundir.real_subdir(exp_dir, sub)
    todo = []
    for cell in spec.cells:
        _check_unchanged(cell, exp_dir / "cells" / cell.name)
        rundir.atomic_write(exp_dir / "configs" / f"{cell.name}.yaml", config_lib.dump_yaml(cell.config))
        if cell_status(exp_dir, cell.name) not in TERMINAL:
            todo.append(cell)
    write_manifest(spec, exp_dir)
    total, done = len(spec.cells), len(spec.cells) - len(todo)
    progress = _Progress(total, done)
    if done:
        progress.line(f"{done} of {total} cells already done (finished or failed); skipping them")
    outcomes = []
    started: dict[str, float] = {}  # cell -> when its thread started it (set by the pool's threads)

    def start_and_run(cell: Cell) -> Outcome:
        started[cell.name] = time.monotonic()
        return run_cell(cell, exp_dir)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        waiting = {pool.submit(start_and_run, cell): cell for cell in todo}
        running: dict[str, Cell] = {}
        while waiting:
            ended, _ = wait(waiting, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for cell in waiting.values():
                if cell.name in started and cell.name not in running:
                    running[cell.name] = cell
                    progress.start(cell)
            for fut in ended:
                cell = waiting.pop(fut)
                running.pop(cell.name, None)
                outcomes.append(fut.result())
                progress.finish(outcomes[-1])
            now = time.monotonic()
            progress.update({n: read_progress(exp_dir, n) for n in running},
                            {n: now - started[n] for n in running},
                            {n: c.config.training.steps for n, c in running.items()})
    finally:
        # On Ctrl-C the running cells got the SIGINT too and are checkpointing;
        # wait for them, but start no new ones.
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return outcomes
