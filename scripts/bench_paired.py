"""Whole `sandbox train` commands timed paired and interleaved in one run: two commits, or several policies.

    python scripts/bench_paired.py --old 4ebffbe                           # the 2000-step recipe, 2 pairs
    python scripts/bench_paired.py --old 4ebffbe --steps 300 --pairs 3     # shorter
    python scripts/bench_paired.py --policies fp32,bf16,fp16,fp8 --steps 300 --pairs 2
    python scripts/bench_paired.py --old 4ebffbe --policies fp32,bf16,fp16,fp8 --steps 300

Each run is `python -m sandbox train CONFIG` as a user would type it (compile, evaluation and
checkpoints included) in a subprocess whose `sandbox` package comes from one commit: the old one
from a `git worktree` of it, put first on PYTHONPATH; the new one from this checkout. Runs go round
robin (pair 1: every policy on old then new, pair 2: again, ...) so the machine's load drifts over
all alike. Reported: medians of wall, user and sys seconds and minor page faults (getrusage of the
child), the run's own tokens/s (training steps only) and its val CE (which a speed change must leave
as it was); new/old per policy, and each policy's tokens/s against the first policy's on the same
commit. Both sides read the same corpus file by absolute path, since an old commit may not know
`builtin:` corpora.
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
METRICS = ("wall_s", "user_s", "sys_s", "minor_faults", "tokens_per_s", "val_ce")


def run_once(src: Path, config: Path, sets: list[str], run_root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, "-m", "sandbox", "train", str(config), "--overwrite",
           "--set", f"run_root={run_root}", "--set", "logging.progress=false", *sum((["--set", s] for s in sets), [])]
    p, times = bench.timed_child(cmd, env=env, cwd=src)
    if p.returncode != 0:
        raise SystemExit(f"{src}: exit {p.returncode}\n{p.stderr[-2000:]}")
    summary = json.loads(next(run_root.glob("*/summary.json")).read_text())
    return {**times, "val_ce": summary.get("val_ce"), "tokens_per_s": summary.get("tokens_per_s")}


def medians(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in METRICS if all(r.get(k) is not None for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="a commit to compare the working tree against (e.g. 4ebffbe)")
    ap.add_argument("--config", default="configs/shakespeare_char.yaml")
    ap.add_argument("--policies", default="", help="comma-separated precision policies (default: the config's)")
    ap.add_argument("--steps", type=int, default=0, help="training.steps override (0 = the config's)")
    ap.add_argument("--pairs", type=int, default=2, help="rounds of the whole round robin")
    args = ap.parse_args(argv)
    sets = [f"data.paths=[{CORPUS}]"] + ([f"training.steps={args.steps}"] if args.steps else [])
    policies = [p for p in args.policies.split(",") if p] or [None]
    with tempfile.TemporaryDirectory(prefix="paired-") as tmp:
        sides = {"new": REPO}
        if args.old:
            sides = {"old": Path(tmp) / "old", "new": REPO}
            subprocess.run(["git", "worktree", "add", "--detach", str(sides["old"]), args.old], cwd=REPO,
                           check=True, capture_output=True)
        try:
            rows: dict[tuple, list] = {(p, s): [] for p in policies for s in sides}
            for i in range(args.pairs):
                for policy in policies:
                    extra = [f"precision.policy={policy}"] if policy else []
                    for side, src in sides.items():
                        print(f"round {i + 1}/{args.pairs}: {policy or 'as configured'} on {side} ...",
                              file=sys.stderr, flush=True)
                        root = Path(tmp) / f"runs-{side}-{policy}-{i}"
                        rows[policy, side].append(run_once(src, src / args.config, sets + extra, root))
        finally:
            if args.old:
                subprocess.run(["git", "worktree", "remove", "--force", str(sides["old"])], cwd=REPO,
                               capture_output=True)
    med = {key: medians(rs) for key, rs in rows.items()}
    print(f"\n{args.config}, steps {args.steps or 'as configured'}, {args.pairs} interleaved rounds, medians; "
          + (f"old = {args.old}, " if args.old else "") + "new = working tree\n")
    for policy in policies:
        if len(policies) > 1 or policy:
            print(f"### {policy}\n")
        head = "| metric | " + (" old | new | new/old |" if args.old else " new |")
        print(head + "\n|" + "---|" * (head.count("|") - 1))
        for k in METRICS:
            if k not in med[policy, "new"]:
                continue
            n = med[policy, "new"][k]
            if args.old and k in med[policy, "old"]:
                o = med[policy, "old"][k]
                fmt = ".6f" if k == "val_ce" else ",.4g"  # a speed change must leave the loss as it was
                print(f"| {k} | {o:{fmt}} | {n:{fmt}} | {n / o:.3f} |")
            else:
                print(f"| {k} | {n:{'.6f' if k == 'val_ce' else ',.4g'}} |")
        print()
    if len(policies) > 1:
        first = policies[0]
        print(f"### tokens/s relative to {first} (same commit, same round robin)\n")
        print("| policy | " + " | ".join(sides) + " |\n|---|" + "---|" * len(sides))
        for policy in policies:
            cells = [med[policy, s].get("tokens_per_s", float("nan")) / med[first, s].get("tokens_per_s", float("nan"))
                     for s in sides]
            print(f"| {policy} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
