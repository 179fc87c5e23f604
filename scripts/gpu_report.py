"""What each precision policy compiles to on your GPU, and how fast it runs.

    python scripts/gpu_report.py --size small --policies fp32,bf16,fp16,fp8

For each policy the sandbox train step is compiled for the GPU (the same jit
as `sandbox train`), and the optimised HLO (`compiled.as_text()`) is searched
for the GEMMs XLA emitted: cuBLAS / cuBLASLt custom calls
(`__cublas$gemm`, `__cublas$lt$matmul`, `...$f8`) and Triton GEMM fusions
(`__triton_gemm`, `__triton_nested_gemm_fusion`), each classified by its first
operand's element type (printed inline, or looked up at the operand's definition
where newer XLA prints bare names). Under `fp8` on Hopper or Ada
the Dense layers should appear as fp8 GEMMs (3 per layer: forward and two
backward); a count of 0 means XLA did not match the fp8 pattern and the
matmuls run wide (tests/test_gpu_graph.py checks the pattern without a GPU).
Seen on an H100 with jax 0.11.2: 0, because Triton GEMM fusions take the dots
first; XLA_FLAGS=--xla_gpu_enable_triton_gemm=false gives cuBLASLt fp8 GEMMs
(docs/scaling.md, "On a real GPU").
Then the step is timed (sandbox/bench.py: best of `repeats` chunks) and
tokens/s, XLA's memory account, the device's peak memory and MFU against the
device's dense peak for the policy's matmul dtype are printed.

Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

import jax

from sandbox import bench

GEMM_TARGETS = re.compile(r'custom_call_target="(__cublas\$[^"]*)"')
# Triton GEMM fusions: "__triton_gemm" (older XLA), "__triton_nested_gemm_fusion" (jax 0.11, Hopper); a
# plain "__triton" fusion is a reduction or elementwise kernel, not a GEMM
TRITON_GEMM = re.compile(r'"kind":"__triton(_gemm|_nested_gemm_fusion)"|__triton_gemm')
TYPE = r"(f8e4m3fn|f8e5m2|f8e4m3fnuz|f8e5m2fnuz|bf16|f16|f32|f64|s8)\["
OPERAND_TYPE = re.compile(r"\b" + TYPE)
# "%name = f32[...]" or "%name = (bf16[...], s8[...])": an instruction's (first) result type. Newer XLA
# prints a call's operands as bare names, so an operand's type is looked up here.
DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = \(?" + TYPE)
KIND = {"f8e4m3fn": "fp8", "f8e5m2": "fp8", "f8e4m3fnuz": "fp8", "f8e5m2fnuz": "fp8", "bf16": "bf16",
        "f16": "fp16", "f32": "fp32", "f64": "fp64", "s8": "int8"}


def gemm_counts(hlo_text: str) -> Counter:
    """GEMMs in optimised HLO by their first operand's type ('fp8', 'bf16', ...), from cuBLAS custom
    calls and Triton GEMM fusions; the operand's type is printed inline or found at its definition."""
    lines = hlo_text.splitlines()
    types = {m.group(1): m.group(2) for m in map(DEFINITION.match, lines) if m}
    counts: Counter = Counter()
    for line in lines:
        if GEMM_TARGETS.search(line) is None and TRITON_GEMM.search(line) is None:
            continue
        call = next((c for c in (" custom-call(", " fusion(") if c in line), None)
        if call is None:
            continue  # a computation header or metadata mention, not the call itself
        operands = line.split(call, 1)[1]
        inline = OPERAND_TYPE.match(operands.lstrip())
        name = re.match(r"\s*%([\w.\-]+)", operands)
        dtype = inline.group(1) if inline else types.get(name.group(1)) if name else None
        counts[KIND.get(dtype, dtype) if dtype else "unknown"] += 1
    return counts


def report_policy(size: str, policy: str, steps: int, repeats: int) -> dict:
    cfg = bench.load_config(size, policy)
    variant = bench.sandbox_variant(cfg)
    bench.measure([variant], steps, repeats)
    flops = bench.flops_per_token(cfg, variant.carry.params)
    row = {"policy": policy, **bench.report(variant, cfg, flops)}
    counts = gemm_counts(variant.compiled.as_text())
    row.update({f"gemm_{k}": counts.get(k, 0) for k in ("fp8", "bf16", "fp16", "fp32")})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=bench.SIZES)
    ap.add_argument("--policies", default=",".join(bench.POLICIES), help="comma-separated precision policies")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed chunk")
    ap.add_argument("--repeats", type=int, default=5, help="timed chunks (best is reported)")
    ap.add_argument("--json", default="gpu_report.json", help="where to write all rows as JSON")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    if backend != "gpu":
        print(f"gpu_report: no GPU here (JAX backend: {backend}); nothing to report. On CPU use "
              f"scripts/bench_step.py; the GPU graph is checked without a GPU by tests/test_gpu_graph.py.")
        return 0
    rows = []
    for policy in args.policies.split(","):
        print(f"{args.size} {policy} ...", file=sys.stderr, flush=True)
        rows.append(report_policy(args.size, policy, args.steps, args.repeats))
    env = bench.environment()
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"environment": env, "size": args.size, "rows": rows}, f, indent=2)
    cols = [("policy", "policy", ""), ("tokens_per_s", "tok/s", ",.0f"), ("step_ms", "step ms", ".2f"),
            ("xla_step_mb", "XLA step MB", ".1f"), ("device_peak_mb", "device peak MB", ".1f"),
            ("mfu_6n", "MFU (6N)", ".1%"), ("mfu_attn", "MFU (6N+attn)", ".1%"), ("gemm_fp8", "fp8 GEMMs", "d"),
            ("gemm_bf16", "bf16 GEMMs", "d"), ("gemm_fp16", "fp16 GEMMs", "d"), ("gemm_fp32", "fp32 GEMMs", "d")]
    bench.print_report(env, rows, cols, repeats=args.repeats, steps=args.steps, json_path=args.json,
                       note=f"size {args.size}; ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
