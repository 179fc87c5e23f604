"""The malloc tuning's effect on a real run: `sandbox train` with and without it.

    python scripts/bench_malloc.py --steps 500 --repeats 2

Each repeat runs the same `sandbox train CONFIG --set training.steps=N` twice
in fresh processes, once as shipped and once with SANDBOX_MALLOC_TUNING=0
(sandbox/_malloc.py), alternating which goes first. Wall time is the child's
whole life (start, compile, steps, evaluation, checkpoint); user, sys and
minor faults are the kernel's account of that child (getrusage of children,
the difference across each run). The table shows medians over repeats and
tuned/untuned ratios; val CE is there to show the numerics are untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from sandbox import bench

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"tuned": "1", "untuned": "0"}  # SANDBOX_MALLOC_TUNING
METRICS = (("wall_s", "wall s", ",.1f"), ("user_s", "user s", ",.1f"), ("sys_s", "sys s", ",.1f"),
           ("minor_faults", "minor faults", ",.0f"), ("val_ce", "val CE", ".4f"))


def run_once(config: str, steps: int, tuning: str, root: Path, name: str) -> dict:
    """One `sandbox train` child; its wall time, rusage deltas and val CE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own knobs off
    env["SANDBOX_MALLOC_TUNING"] = tuning
    cmd = [sys.executable, "-m", "sandbox", "train", config, "--name", name, "--overwrite",
           "--set", f"training.steps={steps}", "--set", f"run_root={root}", "--set", "logging.progress=false"]
    proc, times = bench.timed_child(cmd, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"bench_malloc: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((root / name / "summary.json").read_text(encoding="utf-8"))
    return {**times, "val_ce": summary["val_ce"]}


def table(results: dict[str, list[dict]]) -> list[dict]:
    """One row per metric: the median of each variant and their ratio, formatted."""
    rows = []
    for key, label, fmt in METRICS:
        tuned, untuned = (statistics.median(r[key] for r in results[v]) for v in VARIANTS)
        rows.append({"metric": label, "tuned": format(tuned, fmt), "untuned": format(untuned, fmt),
                     "ratio": f"{tuned / untuned:.3f}" if untuned else "-"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/shakespeare_char.yaml")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved")
    ap.add_argument("--json", default="bench_malloc.json", help="where to write every run as JSON")
    args = ap.parse_args(argv)

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench_malloc_") as tmp:
        for r in range(args.repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for v in order:
                print(f"repeat {r + 1}/{args.repeats}: {v} ...", file=sys.stderr, flush=True)
                results[v].append(run_once(args.config, args.steps, VARIANTS[v], Path(tmp), f"{v}_{r}"))
    rows = table(results)
    env = bench.environment()
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "config": args.config, "steps": args.steps, "runs": results}, f, indent=2)
    columns = [("metric", "", ""), ("tuned", "tuned", ""), ("untuned", "SANDBOX_MALLOC_TUNING=0", ""),
               ("ratio", "tuned/untuned", "")]
    print(f"\n{args.config}, {args.steps} steps, median of {args.repeats} interleaved runs per variant "
          f"({env['device_kind']}, {os.cpu_count()} CPUs, jax {env['jax']}); JSON: {args.json}\n")
    print(bench.markdown(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
