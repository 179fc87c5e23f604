"""Benchmark the train step per model size and precision policy; Markdown table last, JSON to a file.

    python scripts/bench.py                               # tiny, small, medium x fp32, bf16, fp16, fp8
    python scripts/bench.py --sizes small --policies fp32 --steps 10 --json bench.json

Columns and formulas: sandbox/bench.py (its docstring) and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from sandbox import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(bench.SIZES), help="comma-separated: tiny,small,medium")
    ap.add_argument("--policies", default=",".join(bench.POLICIES), help="comma-separated precision policies")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed chunk")
    ap.add_argument("--repeats", type=int, default=3, help="timed chunks per variant (best is reported)")
    ap.add_argument("--json", default="bench.json", help="where to write all rows as JSON")
    args = ap.parse_args(argv)

    rows = []
    for size in args.sizes.split(","):
        for policy in args.policies.split(","):
            print(f"{size} {policy} ...", file=sys.stderr, flush=True)
            sandbox, bare = bench.bench_policy(size, policy, steps=args.steps, repeats=args.repeats)
            sandbox.update(bare_tokens_per_s=bare["tokens_per_s"],
                           ratio=sandbox["tokens_per_s"] / bare["tokens_per_s"])
            rows.append(sandbox)
    env = bench.environment()
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=2)
    has_mfu = any("mfu_6n" in r for r in rows)
    cols = [("size", "size", ""), ("policy", "policy", ""), ("n_params_matmul", "N", ","),
            ("compile_s", "compile s", ".1f"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tok/s", ",.0f"),
            ("bare_tokens_per_s", "bare tok/s", ",.0f"), ("ratio", "sandbox/bare", ".3f"),
            ("xla_step_mb", "step mem MB", ".1f")]
    if any("device_peak_mb" in r for r in rows):
        cols.append(("device_peak_mb", "device peak MB", ".0f"))
    cols += ([("mfu_6n", "MFU 6N", ".1%"), ("mfu_6n_attn", "MFU 6N+attn", ".1%")] if has_mfu else
             [("gflops_6n", "GFLOP/s 6N", ".2f"), ("gflops_6n_attn", "GFLOP/s 6N+attn", ".2f")])
    bench.print_report(env, rows, cols, repeats=args.repeats, steps=args.steps, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
