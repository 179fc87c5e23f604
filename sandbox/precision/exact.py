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
"""

from __future__ import annotations

from typing import Any, Callable

import jax

COMPILER_OPTIONS: dict[str, Any] = {"xla_allow_excess_precision": False}


def jit(fn: Callable, *, compiler_options: dict[str, Any] | None = None, **kwargs) -> Callable:
    """`jax.jit(fn, **kwargs)` that keeps every cast in `fn` (and any extra XLA options given)."""
    return jax.jit(fn, compiler_options={**COMPILER_OPTIONS, **(compiler_options or {})}, **kwargs)
