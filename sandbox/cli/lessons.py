"""`sandbox lesson list`, `sandbox lesson run NAME [--quick] [--out DIR]` and `sandbox lesson notebook`.

Thin: the lessons live in sandbox.teaching.lessons. `run` prints the
narrative, trains/computes, then a table expected / observed / verdict and
the plot paths. Exit status 0 when every check passed, 1 when one failed (a
lesson whose expectation did not hold is a finding, not a usage error).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sandbox.teaching import print_table
from sandbox.teaching.lessons import LESSON_MODULES, all_lessons, get
from sandbox.teaching.notebooks import write_notebook


def register(subparsers) -> None:
    lesson = subparsers.add_parser("lesson", help="guided lessons: runs plus an expected observation checked")
    sub = lesson.add_subparsers(dest="lesson_command", metavar="ACTION")
    sub.required = True
    listing = sub.add_parser("list", help="list the lessons in teaching order")
    listing.set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run one lesson and check its expectation")
    run.add_argument("name", metavar="NAME", help="lesson name (see `sandbox lesson list`)")
    run.add_argument("--quick", action="store_true", help="shortened runs (what the tests use)")
    run.add_argument("--out", default=None, metavar="DIR", help="output folder (default lessons/NAME)")
    run.set_defaults(func=cmd_run)
    nb = sub.add_parser("notebook", help="write lessons as Jupyter notebooks (generated from the lesson code)")
    nb.add_argument("names", nargs="*", metavar="NAME", help="lessons to write (default: all)")
    nb.add_argument("--out", default="lessons/notebooks", metavar="DIR", help="output folder")
    nb.add_argument("--quick", action="store_true", help="notebooks start with QUICK = True")
    nb.set_defaults(func=cmd_notebook)


def cmd_list(args: argparse.Namespace) -> int:
    rows = [(str(i), m.NAME, m.TITLE) for i, m in enumerate(all_lessons(), 1)]
    print_table("Lessons: sandbox lesson run NAME", ("#", "name", "what it shows"), rows)
    return 0


def cmd_notebook(args: argparse.Namespace) -> int:
    for name in args.names or LESSON_MODULES:
        print(write_notebook(name, Path(args.out), quick=args.quick))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    module = get(args.name)
    out = Path(args.out) if args.out else Path("lessons") / module.NAME
    print(f"# {module.TITLE}\n\n{module.NARRATIVE}\n", flush=True)
    t0 = time.perf_counter()
    result = module.run(out, quick=args.quick)
    rows = [(c.expected, c.observed, "PASS" if c.passed else "FAIL") for c in result.checks]
    notes = [f"plot: {p}" for p in result.plots] + [f"run: {r}" for r in result.runs]
    notes.append(f"{'all checks passed' if result.passed else 'a check FAILED'} "
                 f"({time.perf_counter() - t0:.0f} s)")
    print_table(f"Lesson {module.NAME}", ("expected", "observed", "verdict"), rows, notes)
    return 0 if result.passed else 1
