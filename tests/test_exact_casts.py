"""sandbox/precision/exact.py: the sandbox compiles with XLA's excess precision off, so a rounding the
policy asks for happens. The references are ml_dtypes rounding and float64 numpy, not the code under test."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sandbox.precision import exact
from sandbox.train import setup
from sandbox.train.step import train_step


def _bf16_matmul_then_widened(a, b):
    return jnp.dot(a, b).astype(jnp.float32) * 2  # the policy's bf16 output, then used in f32 (x2 is exact)


def _operands():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(64, 128)), jnp.bfloat16), jnp.asarray(rng.normal(size=(128, 32)), jnp.bfloat16))


def _is_bf16(x: np.ndarray) -> bool:
    return bool(np.array_equal(x.astype(ml_dtypes.bfloat16).astype(np.float32), x))


def test_a_bf16_matmul_output_is_rounded_to_bf16_even_when_widened_after():
    a, b = _operands()
    out = np.asarray(exact.jit(_bf16_matmul_then_widened)(a, b)) / 2
    assert _is_bf16(out)
    exact_f64 = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    # within a bf16 half-ulp of the float64 product (plus the fp32 accumulation's own error)
    assert np.all(np.abs(out - exact_f64) <= np.abs(exact_f64) * 2.0**-8 + 1e-4)


@pytest.mark.parametrize("policy", ["bf16", "fp8"])
def test_the_trainers_step_is_compiled_with_every_cast_kept(tiny, policy):
    """The trainer's compiled step equals the same step compiled with excess precision off, bit for bit
    (on main it was plain jax.jit's: the bf16 step's grad norm differed in the last bits)."""
    run = setup.build(tiny(sets=[f"precision.policy={policy}"]))
    batch = setup.place_batch(run, run.pipeline.train_batch(0))
    _, got = run.step_fn(setup.initial_state(run), batch)
    _, want = exact.jit(partial(train_step, ctx=run.ctx))(setup.initial_state(run), batch)
    got, want = jax.device_get((got, want))
    for k in ("loss", "grad_norm"):
        assert np.asarray(got[k]).tobytes() == np.asarray(want[k]).tobytes(), k
