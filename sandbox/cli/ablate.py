"""`sandbox ablate SPEC [--set KEY=VALUE ...] [--jobs N] [--out DIR]` and `sandbox report EXPERIMENT_DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

from sandbox.ablate.report import write_report
from sandbox.ablate import runner
from sandbox.ablate.spec import load_spec
from sandbox.cli.options import add_set_option


def register(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="run a precision-ablation experiment spec (experiments/*.yaml)")
    p.add_argument("spec", help="experiment spec YAML: a base config plus axes")
    add_set_option(p, "override a config key in every cell, e.g. --set training.steps=100; not a key the spec varies")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    p.add_argument("--out", help="experiment directory (default: runs/<spec name>)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results instead of resuming")
    p.set_defaults(func=cmd_ablate)

    r = subparsers.add_parser("report", help="regenerate an experiment's table, CSV and plots")
    r.add_argument("experiment_dir", help="directory written by `sandbox ablate`")
    r.set_defaults(func=cmd_report)



def _print_written(paths: dict) -> None:
    print(f"table: {paths['table']}")
    print(f"csv:   {paths['csv']}")
    if "lr_table" in paths:
        print(f"lr sensitivity: {paths['lr_table']} ({paths['lr_csv'].name})")
    for p in paths["plots"]:
        print(f"plot:  {p}")


def cmd_ablate(args) -> int:
    spec = load_spec(args.spec, args.out, args.set or [])
    exp_dir = Path(args.out) if args.out else Path("runs") / spec.name
    print(f"experiment {spec.name}: {len(spec.cells)} cells ({len(spec.variants)} variants) in {exp_dir}",
          file=sys.stderr)
    outcomes = runner.run_experiment(spec, exp_dir, jobs=args.jobs, overwrite=args.overwrite)
    paths = write_report(exp_dir)
    print(paths["table"].read_text(encoding="utf-8"))
    _print_written(paths)
    print(f"tensorboard: tensorboard --logdir {exp_dir / 'tb'}")
    crashed = [o.cell for o in outcomes if o.status == "crashed"]
    if crashed:  # an expected NaN failure is a result; a crash is not
        print(f"{len(crashed)} cell(s) crashed: {', '.join(crashed)} (see {exp_dir / 'logs'})", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    paths = write_report(args.experiment_dir)
    print(paths["table"].read_text(encoding="utf-8"))
    _print_written(paths)
    return 0
