"""The op-level NaN/inf localizer names the right op, module path, phase and cause."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sandbox.forensics.causes import classify, classify_divergence
from sandbox.forensics.localize import format_origin, localize_nonfinite

F16 = jnp.float16


class Attention(nn.Module):
    """Naive fp16 softmax over the features: exp overflows once a score passes 11.09."""

    @nn.compact
    def __call__(self, x_TD):
        scale = self.param("scale", nn.initializers.ones, ())  # fp32 master weight
        scores_TD = x_TD * scale.astype(F16)
        with jax.named_scope("softmax"):
            e_TD = jnp.exp(scores_TD)
            return e_TD / jnp.sum(e_TD, axis=-1, keepdims=True)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x_TD):
        # A scaled residual: each block's scores are about 1.5x the previous block's.
        return 1.5 * x_TD + Attention(name="attention")(x_TD)


class TwoBlocks(nn.Module):
    @nn.compact
    def __call__(self, x_TD):
        for i in range(2):
            x_TD = Block(name=f"block_{i}")(x_TD)
        return x_TD.astype(jnp.float32).sum()


def _two_block_loss(x_TD):
    model = TwoBlocks()
    params = model.init(jax.random.PRNGKey(0), x_TD)
    return jax.value_and_grad(lambda p: model.apply(p, x_TD)), params


def test_naive_fp16_softmax_overflow_is_named_in_the_second_block():
    # block_0 sees scores 8..9 (exp < 8104, sums fit fp16); block_1 sees 12..14: exp overflows.
    x_TD = jnp.linspace(8.0, 9.0, 8).reshape(2, 4).astype(F16)
    fn, params = _two_block_loss(x_TD)
    origin = localize_nonfinite(fn, params)
    assert origin.primitive == "exp"
    assert origin.name_stack == "TwoBlocks/block_1/attention/softmax"
    assert origin.cause == "exp_overflow"
    assert origin.phase == "forward"
    assert origin.dtype == "float16"
    assert origin.shape == (2, 4)
    assert origin.inputs[0].max_abs > 11.09 and origin.inputs[0].finite
    assert origin.output_stats.posinf > 0
    assert "naive" in origin.explanation and "11.09" in origin.explanation
    assert origin.source_line.startswith(__file__) and origin.source_line.endswith("(Attention.__call__)")


def test_first_overflowing_block_wins():
    x_TD = jnp.linspace(12.0, 13.0, 8).reshape(2, 4).astype(F16)  # both blocks overflow
    fn, params = _two_block_loss(x_TD)
    assert localize_nonfinite(fn, params).name_stack == "TwoBlocks/block_0/attention/softmax"


def test_jit_and_sharding_constraint_are_transparent():
    x_TD = jnp.linspace(8.0, 9.0, 8).reshape(2, 4).astype(F16)
    fn, params = _two_block_loss(x_TD)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    step = jax.jit(lambda p: fn(jax.lax.with_sharding_constraint(p, cpu)))
    wrapped, plain = localize_nonfinite(step, params), localize_nonfinite(fn, params)
    assert wrapped.op_index > plain.op_index  # the jit and the constraints count as ops
    assert dataclasses.replace(wrapped, op_index=0) == dataclasses.replace(plain, op_index=0)


_SHARDED_STEP = """
import json, jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from sandbox.forensics.localize import localize_nonfinite
x = jnp.linspace(1.0, 13.0, 8).astype(jnp.float16)
found = []
for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        def loss(v):
            y = jnp.exp(v)
            if axis_type == AxisType.Auto:
                y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P()))
            else:
                y = jax.sharding.reshard(y, P())
            return jnp.sum(y.astype(jnp.float32))
        origin = localize_nonfinite(jax.jit(jax.value_and_grad(loss)), xs)
        found.append([origin.primitive, origin.cause, origin.shape])
print(json.dumps(found))
"""


def test_step_sharded_over_four_devices_replays_on_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED_STEP], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True).stdout
    assert json.loads(out) == [["exp", "exp_overflow", [8]]] * 2


def test_log_of_underflowed_softmax():
    def loss(logits):
        return -jnp.sum(jnp.log(jax.nn.softmax(logits)))  # fp32; exp(-105) underflows to 0

    origin = localize_nonfinite(jax.value_and_grad(loss), jnp.array([0.0, -105.0, -1.0]))
    assert (origin.primitive, origin.cause, origin.phase) == ("log", "log_of_zero", "forward")
    assert "softmax that underflowed" in origin.explanation
    assert origin.output_stats.neginf == 1


def test_fp16_matmul_overflow_reports_max_input():
    def loss(a, b):
        return jnp.sum((a.astype(F16) @ b.astype(F16)).astype(jnp.float32))

    a_MK, b_KN = jnp.full((2, 1024), 300.0), jnp.full((1024, 3), 300.0)  # 300 * 300 * 1024 > 65504
    origin = localize_nonfinite(jax.value_and_grad(loss), a_MK, b_KN)
    assert (origin.primitive, origin.cause, origin.dtype) == ("dot_general", "overflow", "float16")
    assert [s.max_abs for s in origin.inputs] == [300.0, 300.0]
    assert "65504" in origin.explanation and "300" in origin.explanation


def test_zero_div_zero_and_sqrt_negative():
    origin = localize_nonfinite(lambda x: jnp.sum(x / x), jnp.array([0.0, 2.0]))
    assert (origin.primitive, origin.cause, origin.output_stats.nan) == ("div", "zero_div_zero", 1)
    origin = localize_nonfinite(lambda x: jnp.sum(jnp.sqrt(x)), jnp.array([-1.0, 4.0]))
    assert (origin.primitive, origin.cause) == ("sqrt", "sqrt_negative")


def test_sqrt_at_zero_fails_only_in_the_backward_pass():
    # The loss sqrt(0) = 0 is fine; its derivative 1 / (2 sqrt(0)) is inf.
    origin = localize_nonfinite(jax.value_and_grad(lambda x: jnp.sum(jnp.sqrt(x))), jnp.array([0.0, 4.0]))
    assert (origin.primitive, origin.cause, origin.phase) == ("div", "div_by_zero", "backward")


def test_fp16_gradient_overflow_is_backward():
    def loss(w):
        return jnp.sum(w.astype(F16)).astype(jnp.float32) * 1e5  # cotangent 1e5 > fp16 max

    origin = localize_nonfinite(jax.value_and_grad(loss), jnp.ones(3))
    assert (origin.primitive, origin.cause, origin.phase) == ("convert_element_type", "overflow", "backward")
    assert origin.dtype == "float16" and origin.inputs[0].max_abs == 1e5


def test_masked_log_leaves_zero_over_zero_in_the_gradient():
    # Forward: where() discards log(0) = -inf. Backward: log's derivative g / x is 0/0 there.
    def loss(x):
        return jnp.sum(jnp.where(x > 0, jnp.log(x), 0.0))

    value, _ = jax.value_and_grad(loss)(jnp.array([0.0, 1.0]))
    assert np.isfinite(value)
    origin = localize_nonfinite(jax.value_and_grad(loss), jnp.array([0.0, 1.0]))
    assert (origin.primitive, origin.cause, origin.phase) == ("div", "zero_div_zero", "backward")


def test_finite_function_and_absorbed_minus_inf_give_none():
    assert localize_nonfinite(jax.value_and_grad(lambda x: jnp.sum(x**2)), jnp.ones(3)) is None

    def masked_lse(x):  # a deliberate -inf that exp turns into 0
        return jax.nn.logsumexp(jnp.where(jnp.array([True, False]), x, -jnp.inf))

    assert localize_nonfinite(jax.value_and_grad(masked_lse), jnp.array([1.0, 2.0])) is None


def test_fully_masked_row_is_inf_minus_inf():
    def scores(x):
        s = jnp.where(jnp.zeros(2, bool), x, -jnp.inf)
        return jnp.sum(s - jnp.max(s))

    origin = localize_nonfinite(scores, jnp.array([1.0, 2.0]))
    assert (origin.primitive, origin.cause) == ("sub", "inf_minus_inf")


def test_nan_in_params_is_nonfinite_input():
    x_TD = jnp.linspace(1.0, 2.0, 8).reshape(2, 4).astype(F16)
    fn, params = _two_block_loss(x_TD)
    params["params"]["block_1"]["attention"]["scale"] = jnp.array(jnp.nan)
    origin = localize_nonfinite(fn, params)
    assert origin.cause == "nonfinite_input"
    assert origin.name_stack == "args[0]['params']['block_1']['attention']['scale']"
    assert origin.output_stats.nan == 1


def test_scan_is_unrolled_to_the_overflowing_iteration():
    def grow(x):
        def body(c, _):
            with jax.named_scope("step"):
                return c * jnp.float16(100.0), c
        return jnp.sum(jax.lax.scan(body, x.astype(F16), None, length=5)[1].astype(jnp.float32))

    origin = localize_nonfinite(grow, jnp.ones(2))
    assert (origin.primitive, origin.name_stack, origin.cause) == ("mul", "step", "overflow")
    assert origin.inputs[0].max_abs == 1e4  # the third iteration: 1e4 * 100 > 65504


def _custom_jvp(f):
    g = jax.custom_jvp(f)
    g.defjvp(lambda primals, tangents: (f(*primals), tangents[0] * f(*primals)))
    return g


def _custom_vjp(f):
    g = jax.custom_vjp(f)
    g.defvjp(lambda x: (f(x), f(x)), lambda y, ct: (ct * y,))
    return g


@pytest.mark.parametrize("wrap", [jax.jit, jax.checkpoint, _custom_jvp, _custom_vjp])
@pytest.mark.parametrize("grad", [False, True])
def test_call_like_wrappers_are_entered(wrap, grad):
    def inner(x):
        with jax.named_scope("inner"):
            return jnp.exp(x)

    def loss(x):
        with jax.named_scope("outer"):
            return jnp.sum(wrap(inner)(x.astype(F16)).astype(jnp.float32))

    origin = localize_nonfinite(jax.value_and_grad(loss) if grad else loss, jnp.array([1.0, 12.0]))
    assert (origin.primitive, origin.cause, origin.phase) == ("exp", "exp_overflow", "forward")
    assert origin.name_stack == "outer/inner"


def test_while_loop_is_unrolled():
    def grow(x, n):
        return jax.lax.fori_loop(0, n, lambda i, c: jnp.exp(c), x.astype(F16)).astype(jnp.float32)

    origin = localize_nonfinite(grow, jnp.array([1.0]), jnp.array(3))
    assert (origin.primitive, origin.cause) == ("exp", "exp_overflow")
    assert origin.inputs[0].max_abs == pytest.approx(np.exp(np.e), rel=1e-3)  # exp(exp(1)) = 15.2


def test_cond_runs_only_the_taken_branch():
    def f(x, pick):
        return jax.lax.cond(pick, lambda v: jnp.sum(jnp.log(v)), lambda v: jnp.sum(v), x)

    assert localize_nonfinite(f, jnp.array([0.0, 1.0]), jnp.array(False)) is None
    assert localize_nonfinite(f, jnp.array([0.0, 1.0]), jnp.array(True)).cause == "log_of_zero"


def test_origin_is_deterministic_and_serializable():
    x_TD = jnp.linspace(8.0, 9.0, 8).reshape(2, 4).astype(F16)
    fn, params = _two_block_loss(x_TD)
    first, second = localize_nonfinite(fn, params), localize_nonfinite(fn, params)
    assert first == second
    assert json.loads(json.dumps(first.to_dict()))["cause"] == "exp_overflow"
    report = format_origin(first)
    assert "exp_overflow" in report and "TwoBlocks/block_1/attention/softmax" in report


@pytest.mark.parametrize("dtype,limit", [(jnp.float8_e4m3fn, 448), (jnp.float8_e5m2, 57344)])
def test_classify_fp8_cast_overflow_names_dtype_max(dtype, limit):
    big = np.array([1e5], np.float32)
    cause, why, fix = classify("convert_element_type", [big], np.array([np.inf], np.float32).astype(dtype))
    assert cause == "overflow" and f"{limit:g}" in why and "fp32" in fix


def test_classify_fp32_exp_threshold():
    cause, why, fix = classify("exp", [np.array([89.0], np.float32)], np.array([np.inf], np.float32))
    assert cause == "exp_overflow" and "88.72" in why and "naive" not in why and "log-sum-exp" in fix


def test_classify_divergence():
    flat = classify_divergence([1.0, 1.1, 0.9, 1.0, 1.05], [3.0, 2.9, 2.95, 2.9, 2.85])
    assert flat is None
    cause, why, _ = classify_divergence([1.0, 1.1, 0.9, 1.0, 50.0], [3.0, 2.9, 2.9, 2.8, 2.9])
    assert cause == "exploding_update" and "50" in why
    rising = classify_divergence([1.0] * 6, [2.0, 2.5, 3.2, 4.0, 5.5, 8.0])
    assert rising[0] == "exploding_update"
