"""One ablation cell in its own process: `python -m sandbox.ablate.worker CONFIG --tb-dir DIR [--progress FILE]`.

This is `sandbox train CONFIG --resume` plus what that command cannot say:
where the TensorBoard events go (every cell of an experiment writes to
EXPERIMENT/tb/<cell>, so one `tensorboard --logdir EXPERIMENT/tb` overlays
them), and where to report progress: `ProgressFile`, a trainer hook, writes
the step reached to a small JSON file the runner polls (runner.py). Exit
codes match `sandbox train`: 0 finished (or interrupted, see summary.json),
3 stopped on a non-finite value, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from sandbox.errors import UserError
from sandbox.rundir import atomic_write

PROGRESS_EVERY_S = 0.5  # a log interval can be milliseconds on a tiny model: don't fsync each one


class ProgressFile:
    """Trainer hook: `{"step", "total", "loss"}` at log intervals, at most every PROGRESS_EVERY_S, and the last step."""

    def __init__(self, path: Path, total: int):
        self.path, self.total = Path(path), total
        self.written_at = -math.inf

    def on_step_end(self, step: int, metrics: dict, state) -> None:
        if state is None:  # not the last step of a logged batch: more are coming right now
            return
        now = time.monotonic()
        if now - self.written_at < PROGRESS_EVERY_S and step < self.total:
            return
        loss = metrics.get("loss")
        loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
        atomic_write(self.path, json.dumps({"step": int(step), "total": self.total, "loss": loss}))
        self.written_at = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.ablate.worker")
    parser.add_argument("config")
    parser.add_argument("--tb-dir", required=True)
    parser.add_argument("--progress", help="JSON file to keep the step reached in")
    args = parser.parse_args(argv)
    try:
        from sandbox.config import load_config
        from sandbox.train.loop import EXIT_FAILURE, train

        cfg = load_config(args.config)
        hooks = [ProgressFile(Path(args.progress), cfg.training.steps)] if args.progress else []
        result = train(cfg, hooks, resume=True, tb_dir=Path(args.tb_dir))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    return EXIT_FAILURE if result.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
