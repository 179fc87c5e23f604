"""`sandbox replay BUNDLE [--json]`: reproduce a failed step and name its first bad op and cause."""

from __future__ import annotations

import json
from pathlib import Path

from sandbox.forensics.bundle import load_bundle
from sandbox.forensics.replay import format_report, replay


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
