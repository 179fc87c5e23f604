"""Compile so that XLA keeps every rounding the policy asks for.

XLA's `xla_allow_excess_precision` is on by default. It lets the compiler keep a value wider than the
program says wherever that is cheaper: a convert pair `f32 -> bf16 -> f32` is dropped, a bf16 matmul
whose result is then widened hands on its f32 accumulator unrounded, and on GPU a round trip through
an f8 type is removed altogether. For a training job that is a harmless speed-up; for a lab that
measures what a number format does, it replaces the format under study with a wider one, silently.

Measured (session 12):
- H100, jax 0.11.2: `x.astype(float8_e4m3fn).astype(bfloat16)` compiled to no f8 at all, and the
  fp8 policy's optimised train step held no f8 value: its "fp8" run trained in bf16 (shakespeare_char,
  2000 steps: val CE 1.8002; with the casts kept, 1.8186).
- CPU, jax 0.10.2: a bf16 x bf16 matmul widened after it returned unrounded f32 values, and the bf16
  policy's first step moved (grad norm 3.014270 -> 3.014583); fp16 and fp32 did not.

So every program the sandbox compiles to train, evaluate, replay or teach goes through `jit` below,
which turns the option off. JAX accepts compiler options only on a top-level jit: a jitted function
built here must not be called inside another jit (call the function it wraps instead).

Stored cotangents (`stored_cotangent`). XLA:CPU fuses a cheap elementwise chain into every reader
of its result rather than storing it once. A dense layer's output cotangent has three readers (the
two backward GEMMs' operand fusions and the bias sum), and in the MLP it is GELU's derivative times
the incoming gradient: ~40 ops, computed three times per layer. XLA:CPU has no fp16 arithmetic, so
under an fp16 compute dtype each of those ops is a convert pair around an f32 op, and the copies
cost: the fp16 step of the `small` benchmark took 170 ms, with the cotangent stored 141 ms (fp32's
step: 140 ms), bits unchanged (session 13, Intel Xeon). An `optimization_barrier` stores a value, but
XLA:CPU removes barriers before fusing (pass `cse_barrier_expander`), so `jit` turns that pass off:
the sandbox emits barriers only through `stored` and `stored_cotangent` below, and they are
identities. They are emitted only when lowering for CPU; GPU and TPU fuse as they choose.

Where a value is stored also decides how it is rounded: XLA:CPU contracts `a * b + c` (and
`x - q * s`) into one fused multiply-add inside a fusion (measured: for 15,443 of 65,536 random fp32
triples `x - q * s` returned the FMA's single rounding, not numpy's two). The recipes' quantization
statistics therefore read a stored copy of the fake-quantized operand (`stored`,
recipes/telemetry.py): their error `x - fq(x)` is then computed from fq(x) as the GEMM reads it,
and is exactly 0 for a tensor already on the format's grid (it was ~2e-11 under nvfp4).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax

COMPILER_OPTIONS: dict[str, Any] = {
    "xla_allow_excess_precision": False,
    "xla_disable_hlo_passes": "cse_barrier_expander",  # keeps `stored`'s barriers (module doc)
}


def jit(fn: Callable, *, compiler_options: dict[str, Any] | None = None, **kwargs) -> Callable:
    """`jax.jit(fn, **kwargs)` that keeps every cast in `fn` (and any extra XLA options given)."""
    return jax.jit(fn, compiler_options={**COMPILER_OPTIONS, **(compiler_options or {})}, **kwargs)


def stored(x: jax.Array) -> jax.Array:
    """`x`, computed once and stored on CPU for all its readers. Not differentiated through: use it
    on values autodiff does not see (statistics), or through `stored_cotangent`."""
    # platform_dependent picks the branch when lowering: the CPU graph gets the barrier, others none.
    return lax.platform_dependent(x, cpu=lax.optimization_barrier, default=lambda v: v)


@jax.custom_vjp
def stored_cotangent(x: jax.Array) -> jax.Array:
    """`x`; on CPU the backward computes x's cotangent once and stores it for all its readers."""
    return x


def _stored_fwd(x):
    return x, None


def _stored_bwd(_, g):
    return (stored(g),)


stored_cotangent.defvjp(_stored_fwd, _stored_bwd)
