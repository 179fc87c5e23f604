"""`sandbox replay BUNDLE [--json]`: reproduce a failed step and name its first bad op and cause.
`sandbox whatif RUN [--step K]`: each dense layer's quantization error under every recipe."""

from __future__ import annotations

import json
from pathlib import Path

from sandbox.errors import UserError
from sandbox.forensics.bundle import load_bundle
from sandbox.forensics.replay import format_report, replay
from sandbox.forensics.whatif import format_whatif, whatif
from sandbox.precision.policy import RECIPE_POLICIES
from sandbox.rundir import atomic_write


def cmd_replay(args) -> int:
    path = Path(args.bundle)
    if path.is_dir() and not (path / "meta.json").exists() and (path / "failure").is_dir():
        path = path / "failure"  # a run directory: its bundle
    report = replay(load_bundle(path))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.reproduced else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="re-run a failure bundle's step and localize the first non-finite op")
    p.add_argument("bundle", help="a failure bundle directory (RUN_DIR/failure) or a run directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_replay)
    register_whatif(subparsers)


def cmd_whatif(args) -> int:
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()] if args.recipes else list(RECIPE_POLICIES)
    if args.json and Path(args.json).exists():
        raise UserError(f"whatif --json: {args.json} exists; name a new file (nothing is overwritten)")
    report = whatif(args.run, args.step, recipes)
    print(format_whatif(report))
    if args.json:
        atomic_write(Path(args.json), json.dumps(report.to_dict(), indent=1))
    return 0


def register_whatif(subparsers) -> None:
    p = subparsers.add_parser("whatif", help="each dense layer's quantization error under every recipe, "
                                              "for a run's checkpoint")
    p.add_argument("run", help="a run directory with a checkpoint")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest intact one)")
    p.add_argument("--recipes", default="", help=f"comma-separated subset of {','.join(RECIPE_POLICIES)}")
    p.add_argument("--json", default="", help="also write the full report to this new JSON file")
    p.set_defaults(func=cmd_whatif)
