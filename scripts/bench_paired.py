"""Whole-command wall time of two commits, paired and interleaved in one run (issue 18's nanoGPT recipe).

    python scripts/bench_paired.py --old 4ebffbe                         # the 2000-step recipe, 2 pairs
    python scripts/bench_paired.py --old 4ebffbe --steps 300 --pairs 3   # shorter

Each commit runs `python -m sandbox train CONFIG` as a user would (compile, evaluation and checkpoint
included) in a subprocess whose `sandbox` package comes from that commit: the old one from a
`git worktree` of it, put first on PYTHONPATH; the new one from this checkout. Runs alternate
old, new, old, new... so machine noise hits both alike; the table gives medians of wall, user and
sys seconds and minor page faults (getrusage of the child), each as new/old ratio, and the val CE
of each side (it must not change). Both sides read the same corpus file by absolute path, since an
old commit may not know `builtin:` corpora.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sandbox import bench

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "sandbox" / "data" / "corpora" / "tinyshakespeare.txt"


def run_once(src: Path, config: Path, sets: list[str], run_root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, "-m", "sandbox", "train", str(config), "--overwrite",
           "--set", f"run_root={run_root}", "--set", "logging.progress=false", *sum((["--set", s] for s in sets), [])]
    p, times = bench.timed_child(cmd, env=env, cwd=src)
    if p.returncode != 0:
        raise SystemExit(f"{src}: exit {p.returncode}\n{p.stderr[-2000:]}")
    summary = json.loads(next(run_root.glob("*/summary.json")).read_text())
    return {**times, "val_ce": summary.get("val_ce")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the commit to compare against (e.g. 4ebffbe)")
    ap.add_argument("--config", default="configs/shakespeare_char.yaml")
    ap.add_argument("--steps", type=int, default=0, help="training.steps override (0 = the config's)")
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args(argv)
    sets = [f"data.paths=[{CORPUS}]"] + ([f"training.steps={args.steps}"] if args.steps else [])
    with tempfile.TemporaryDirectory(prefix="paired-") as tmp:
        old_src = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_src), args.old], cwd=REPO, check=True,
                       capture_output=True)
        try:
            rows = {"old": [], "new": []}
            for i in range(args.pairs):
                for side, src in (("old", old_src), ("new", REPO)):
                    print(f"pair {i + 1}/{args.pairs}: {side} ...", file=sys.stderr, flush=True)
                    rows[side].append(run_once(src, src / args.config, sets, Path(tmp) / f"runs-{side}-{i}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_src)], cwd=REPO, capture_output=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0] if rs[0][k] is not None}
           for side, rs in rows.items()}
    print(f"\n{args.config}, steps {args.steps or 'as configured'}, {args.pairs} interleaved pairs, medians; "
          f"old = {args.old}, new = working tree\n")
    print("| metric | old | new | new/old |\n|---|---|---|---|")
    for k in ("wall_s", "user_s", "sys_s", "minor_faults", "val_ce"):
        if k in med["old"] and k in med["new"]:
            o, n = med["old"][k], med["new"][k]
            print(f"| {k} | {o:,.4g} | {n:,.4g} | {n / o:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
