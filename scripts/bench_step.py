"""The engine's cost per policy: sandbox step vs a bare JAX + Flax + optax step, telemetry and guard.

    python scripts/bench_step.py --size small --policies fp32,bf16,fp16,fp8

Targets: sandbox >= 0.95x bare tokens/s; telemetry off within 2% of bare, on within 15%;
default guard within 3% of no guard. Variants are timed round-robin (sandbox/bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from sandbox import bench

EXTRA = {
    "telemetry_off": {"ctx": {"telemetry": False}},
    "no_guard": {"ctx": {"guard": False}},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=bench.SIZES)
    ap.add_argument("--policies", default=",".join(bench.POLICIES), help="comma-separated precision policies")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed chunk")
    ap.add_argument("--repeats", type=int, default=5, help="timed chunks per variant (best is reported)")
    ap.add_argument("--json", default="bench_step.json", help="where to write all rows as JSON")
    args = ap.parse_args(argv)

    table, raw = [], []
    for policy in args.policies.split(","):
        print(f"{args.size} {policy} ...", file=sys.stderr, flush=True)
        rows = bench.bench_policy(args.size, policy, steps=args.steps, repeats=args.repeats, extra=EXTRA)
        raw += rows
        t = {r["variant"]: r["tokens_per_s"] for r in rows}
        table.append({"policy": policy, "sandbox": t["sandbox"], "bare": t["bare"],
                      "ratio": t["sandbox"] / t["bare"], "telemetry_off": t["telemetry_off"],
                      "off_vs_bare": t["telemetry_off"] / t["bare"], "no_guard": t["no_guard"],
                      "guard_vs_none": t["sandbox"] / t["no_guard"]})
    env = bench.environment()
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "size": args.size, "table": table, "rows": raw}, f, indent=2)
    cols = [("policy", "policy", ""), ("sandbox", "sandbox tok/s", ",.0f"), ("bare", "bare tok/s", ",.0f"),
            ("ratio", "sandbox/bare (telemetry on)", ".3f"), ("telemetry_off", "telemetry off tok/s", ",.0f"),
            ("off_vs_bare", "off/bare", ".3f"), ("no_guard", "no-guard tok/s", ",.0f"),
            ("guard_vs_none", "guard/no-guard", ".3f")]
    bench.print_report(env, table, cols, repeats=args.repeats, steps=args.steps, json_path=args.json,
                       note=f"size {args.size}; ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
