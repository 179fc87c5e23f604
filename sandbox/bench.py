"""Step benchmarks: the sandbox step against a bare JAX + Flax + optax step.

What is measured. Each *variant* is a jitted step with its own state and a
few device-resident batches (cycled; data loading is not measured, the
trainer prefetches it on a thread). Compile time is `lower().compile()`;
steady-state time is the best of `repeats` chunks of `steps` steps, each
chunk ended by `block_until_ready`. Variants are timed round-robin, one
chunk each in turn, so slow drift in machine load (other processes on a
shared CPU) hits every variant alike; the best chunk is the least disturbed.
Memory is XLA's own account of the compiled step (arguments + outputs +
temporaries - aliased donated buffers), which exists on every backend; on
GPU/TPU the device's `peak_bytes_in_use` is reported too.

The bare step is the same Flax module (same policy casts, same fp8 dots) and
the same optax chain, with none of the engine: no loss scaling, guards,
telemetry or metrics beyond the loss. `sandbox / bare` is the engine's cost.

Model FLOPs per token (PaLM, appendix B): `6N` counts the matmuls that touch
parameters (2 FLOPs per multiply-add, forward 1x plus backward 2x); N counts
every parameter but the learned positions (an add, not a matmul); the tied
embedding is counted once, as the output head's matmul (the input lookup is
a gather). The attention term `12*L*H*Q*T` adds the two T x T matmuls per
head (QK^T and PV, 2*2*T*Q FLOPs per token forward, times 3). It is *not*
halved for causality: this model computes full T x T scores then masks
them, so the unhalved count is the work actually done (a causal flash kernel
would make the halved count the honest one). MFU = achieved model FLOP/s
over the device's dense peak for the policy's matmul dtype (`PEAK_TFLOPS`);
on a device without a table entry (CPU) the achieved GFLOP/s is reported.
"""

from __future__ import annotations

import dataclasses
import resource
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sandbox import config as config_lib
from sandbox.precision import exact
from sandbox.train.setup import Run, build, initial_state, place_batch
from sandbox.train.step import train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = ("tiny", "small", "medium")
POLICIES = ("fp32", "bf16", "fp16", "fp8")

# Dense (no sparsity) peak TFLOP/s by device kind substring and matmul dtype, from vendor datasheets.
PEAK_TFLOPS = {
    "H200": {"fp32": 67, "tf32": 494, "bf16": 989, "fp16": 989, "fp8": 1979},
    "H100": {"fp32": 67, "tf32": 494, "bf16": 989, "fp16": 989, "fp8": 1979},  # SXM
    "A100": {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312},
    "L4": {"fp32": 30, "tf32": 60, "bf16": 121, "fp16": 121, "fp8": 242},
    "A10": {"fp32": 31, "tf32": 62, "bf16": 125, "fp16": 125},
    "V100": {"fp32": 15.7, "fp16": 125},
    "TPU v4": {"bf16": 275},
    "TPU v5 lite": {"bf16": 197},
    "TPU v5e": {"bf16": 197},
    "TPU v5p": {"bf16": 459},
    "TPU v6": {"bf16": 918},
}


def matmul_dtype(policy) -> str:
    """The PEAK_TFLOPS column a policy's matmuls run in."""
    if policy.fp8 is not None:
        return "fp8"
    name = jnp.dtype(policy.compute_dtype).name
    if name == "float32":
        return "fp32" if policy.matmul_precision == "highest" else "tf32"
    return {"bfloat16": "bf16", "float16": "fp16"}[name]


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for kind, table in PEAK_TFLOPS.items():
        if kind.lower() in device_kind.lower():
            return table.get(dtype)
    return None


def flops_per_token(cfg: config_lib.Config, params) -> dict:
    """Model FLOPs per token: 6N, and 6N + 12*L*H*Q*T (attention, not halved for causality)."""
    n = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if "pos_embed" not in jax.tree_util.keystr(path))
    m = cfg.model
    attn = 12 * m.n_layer * m.n_head * (m.d_model // m.n_head) * m.context
    return {"n_params_matmul": int(n), "flops_6n": 6 * n, "flops_6n_attn": 6 * n + attn}


def load_config(size: str, policy: str, sets=()) -> config_lib.Config:
    path = CONFIGS / f"bench_{size}.yaml"
    raw = config_lib.apply_overrides(config_lib.read_yaml(path), [f"precision.policy={policy}", *sets])
    return config_lib.from_dict(raw, default_name=f"bench_{size}")


# ----------------------------------------------------------------- variants


@dataclasses.dataclass
class Variant:
    """A jitted step `(carry, batch) -> (carry, out)`, its carry and its batches."""

    name: str
    fn: Callable
    carry: Any
    batches: list
    compiled: Any = None
    compile_s: float = 0.0
    times: list = dataclasses.field(default_factory=list)
    run_obj: Run | None = None  # the run it was built from (policy, pipeline, shardings)

    def compile(self) -> None:
        t = time.perf_counter()
        self.compiled = self.fn.lower(self.carry, self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps, blocking only at the end."""
        t = time.perf_counter()
        out = None
        for i in range(steps):
            self.carry, out = self.compiled(self.carry, self.batches[i % len(self.batches)])
        jax.block_until_ready((self.carry, out))
        return (time.perf_counter() - t) / steps

    def memory(self) -> dict:
        m = self.compiled.memory_analysis()
        if m is None:
            return {}
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return {"xla_step_mb": total / 2**20, "xla_temp_mb": m.temp_size_in_bytes / 2**20}


def sandbox_variant(cfg: config_lib.Config, name: str = "sandbox", n_batches: int = 4, **ctx_changes) -> Variant:
    """The trainer's own step (the one builder), optionally with StepContext fields changed (e.g. guard=False)."""
    run = build(cfg)
    frozen = run.frozen
    # The same jit as the builder's, on a changed context (shardings from the same mesh).
    ctx = dataclasses.replace(run.ctx, **ctx_changes) if ctx_changes else run.ctx
    if frozen:  # the frozen reference rides in the closure; exact.jit cannot wrap the builder's jitted step
        fn = exact.jit(lambda s, b: train_step(s, b, *frozen, ctx=ctx), donate_argnums=0)
    else:
        fn = run.jit_step(ctx) if ctx_changes else run.step_fn
    batches = [place_batch(run, run.pipeline.train_batch(k)) for k in range(n_batches)]
    return Variant(name, fn, initial_state(run), batches, run_obj=run)


def bare_step(model, tx, policy):
    """A plain JAX + Flax + optax step of the same model: forward, mean CE, grads, update."""

    def step(carry, batch):
        params, opt_state, meta = carry

        def loss_fn(p):
            variables = {"params": policy.cast_to_compute(p), **({"fp8_meta": meta} if meta else {})}
            logits = model.apply(variables, batch["inputs"]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(policy.cast_to_param(grads), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, meta), loss

    return step


def bare_variant(cfg: config_lib.Config, like: Variant) -> Variant:
    """The bare step on the same model, optimizer, initial parameters, batches and placement as `like`."""
    run = like.run_obj
    state = initial_state(run)
    tx = run.parts.full_tx
    carry = (state.params, tx.init(state.params), state.fp8_meta)
    fn = exact.jit(bare_step(run.parts.model, tx, run.policy), donate_argnums=0)
    return Variant("bare", fn, carry, like.batches, run_obj=run)


# ----------------------------------------------------------------- measurement


def measure(variants: list[Variant], steps: int, repeats: int, warmup: int = 2) -> None:
    """Compile each variant, then time them round-robin (see the module docstring)."""
    for v in variants:
        v.compile()
        v.run(warmup)
    for _ in range(repeats):
        for v in variants:
            v.times.append(v.run(steps))


def report(v: Variant, cfg: config_lib.Config, flops: dict) -> dict:
    """One result row: times, tokens/s, memory and MFU (or GFLOP/s) of a measured variant."""
    tokens = cfg.training.batch_size * cfg.model.context
    best = min(v.times)
    policy = v.run_obj.policy
    device = jax.devices()[0]
    row = {"variant": v.name, "compile_s": v.compile_s, "step_ms": best * 1e3,
           "step_ms_median": sorted(v.times)[len(v.times) // 2] * 1e3, "tokens_per_s": tokens / best,
           **v.memory()}
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        row["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20  # process-wide high-water mark
    for key in ("flops_6n", "flops_6n_attn"):
        achieved = flops[key] * tokens / best
        row[f"gflops_{key[6:] or '6n'}"] = achieved / 1e9
        peak = peak_tflops(device.device_kind, matmul_dtype(policy))
        if peak:
            row[f"mfu_{key[6:] or '6n'}"] = achieved / (peak * 1e12 * jax.device_count())
    return row


def bench_policy(size: str, policy: str, *, steps: int, repeats: int, bare: bool = True,
                 extra: dict[str, dict] | None = None, sets=()) -> list[dict]:
    """Rows for one (size, policy): the sandbox step, the bare step, and extra sandbox variants.

    `extra` maps a variant name to {"sets": [...config overrides], "ctx": {StepContext changes}}.
    """
    cfg = load_config(size, policy, sets)
    main = sandbox_variant(cfg)
    variants = [main] + ([bare_variant(cfg, main)] if bare else [])
    for name, spec in (extra or {}).items():
        v = sandbox_variant(load_config(size, policy, [*sets, *spec.get("sets", ())]), name, **spec.get("ctx", {}))
        variants.append(v)
    measure(variants, steps, repeats)
    flops = flops_per_token(cfg, main.carry.params)
    rows = []
    for v in variants:
        rows.append({"size": size, "policy": policy, **flops, **report(v, cfg, flops)})
    return rows


def environment() -> dict:
    d = jax.devices()[0]
    return {"backend": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__}


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table of `rows`; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def print_report(env: dict, rows: list[dict], columns, *, repeats: int, steps: int, json_path: str,
                 note: str = "") -> None:
    """The machine line, then the Markdown table (printed last, as the scripts promise)."""
    print(f"\n{env['device_kind']} x{env['devices']} ({env['backend']}), jax {env['jax']}; {note}"
          f"best of {repeats} x {steps} steps; JSON: {json_path}\n")
    print(markdown(rows, columns))


def timed_child(cmd: list[str], *, env: dict, cwd) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs a whole command as a child: (its result, wall seconds and its own user/sys seconds and minor
    page faults, from getrusage of children), what the whole-command benchmarks compare."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, {"wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
                  "sys_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt}
