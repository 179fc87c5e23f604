"""One ablation cell in its own process: `python -m sandbox.ablate.worker CONFIG --tb-dir DIR`.

This is `sandbox train CONFIG --resume` plus the one thing that command
cannot say: where the TensorBoard events go. Every cell of an experiment
writes to EXPERIMENT/tb/<cell>, so one `tensorboard --logdir EXPERIMENT/tb`
overlays them. Exit codes match `sandbox train`: 0 finished (or interrupted,
see summary.json), 3 stopped on a non-finite value, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sandbox.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.ablate.worker")
    parser.add_argument("config")
    parser.add_argument("--tb-dir", required=True)
    args = parser.parse_args(argv)
    try:
        from sandbox.config import load_config
        from sandbox.train.loop import EXIT_FAILURE, train

        cfg = load_config(args.config)
        result = train(cfg, resume=True, tb_dir=Path(args.tb_dir))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    return EXIT_FAILURE if result.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
