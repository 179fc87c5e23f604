"""The engine's cost per policy: sandbox step vs a bare JAX + Flax + optax step, telemetry and guard.

    python scripts/bench_step.py --size small --policies fp32,bf16,fp16,fp8
    python scripts/bench_step.py --size tiny --compare --policies bf16,fp8,fp8_current,mxfp8,nvfp4

Targets: sandbox >= 0.95x bare tokens/s; telemetry off within 2% of bare, on within 15%;
default guard within 3% of no guard. Variants are timed round-robin (sandbox/bench.py).

--compare: the cost of each policy relative to the first, e.g. what each emulated recipe
costs per CPU step against bf16: the sandbox steps of all the policies are timed
round-robin in one process (a shared machine's load hits them alike), with telemetry
off (the lean step that runs between telemetry steps) and on.
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
    ap.add_argument("--compare", action="store_true", help="time the policies against the first (module doc)")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args)

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


def compare(args) -> int:
    policies = args.policies.split(",")
    variants = []
    for policy in policies:
        cfg = bench.load_config(args.size, policy)
        variants += [bench.sandbox_variant(cfg, name=f"{policy}", telemetry=False),
                     bench.sandbox_variant(cfg, name=f"{policy}+telemetry")]
    print(f"{args.size}: timing {len(variants)} steps round-robin ...", file=sys.stderr, flush=True)
    bench.measure(variants, steps=args.steps, repeats=args.repeats)
    best = {v.name: min(v.times) for v in variants}
    base = best[policies[0]]
    table = [{"policy": p, "step_ms": best[p] * 1e3, "vs_first": best[p] / base,
              "step_ms_telemetry": best[f"{p}+telemetry"] * 1e3, "telemetry_vs_first": best[f"{p}+telemetry"] / base,
              "compile_s": next(v.compile_s for v in variants if v.name == p)} for p in policies]
    env = bench.environment()
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "size": args.size, "table": table}, f, indent=2)
    cols = [("policy", "policy", ""), ("step_ms", "step ms", ".1f"), ("vs_first", f"vs {policies[0]}", ".2f"),
            ("step_ms_telemetry", "step ms, telemetry on", ".1f"),
            ("telemetry_vs_first", f"telemetry on vs {policies[0]}", ".2f"), ("compile_s", "compile s", ".1f")]
    bench.print_report(env, table, cols, repeats=args.repeats, steps=args.steps, json_path=args.json,
                       note=f"size {args.size}; step time per policy, round-robin; ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
