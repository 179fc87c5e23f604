"""Conformance of the recipe quantizers and the emulated scaled_dot.

Every quantizer is compared bit for bit with an independent reference written
here from the specs in numpy float64 + ml_dtypes value tables: rounding is a
search in the table of all finite values of the format (ties to the even
code), scale selection follows OCP MX v1.0 section 6.3 / the NVFP4 recipe /
fp8.py's rule written out, and groups are sliced with plain numpy loops. The
fp8 delayed recipe is compared with sandbox.precision.fp8 itself; the MXFP8
and NVFP4 dots with jax.nn.scaled_dot_general.

Inputs are fp32 normals or zeros: XLA on CPU flushes fp32 subnormals, so the
reference treats them as zero (documented in quantize.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax._src.cudnn import scaled_matmul_stablehlo as jax_sm  # private: jax.nn.scaled_dot_general's quantizer
from jax._src.interpreters import mlir

from sandbox.errors import UserError
from sandbox.precision import fp8
from sandbox.precision.recipes import (
    PRESETS,
    OperandSpec,
    dequantize,
    fake_quant,
    init_delayed_meta,
    preset,
    quantize,
    rounding_key,
    scaled_dot,
)
from sandbox.precision.recipes import formats
from sandbox.precision.recipes.hadamard import random_hadamard
from sandbox.precision.recipes.rounding import round_stochastic

RNG = np.random.default_rng(17)
DIMS = (((1,), (0,)), ((), ()))
ELEMENT_DTYPES = {
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m1": ml_dtypes.float4_e2m1fn,
}


# ---- the reference, from the specs -------------------------------------------


def value_table(dtype):
    """(values, codes): every finite non-negative value of `dtype`, ascending, and its code."""
    bits = ml_dtypes.finfo(dtype).bits
    codes = np.arange(2 ** (bits - 1), dtype=np.uint8)  # sign bit clear
    values = codes.view(dtype).astype(np.float64)
    keep = np.isfinite(values)
    order = np.argsort(values[keep], kind="stable")
    return values[keep][order], codes[keep][order]


def ref_round(v, dtype):
    """Round to nearest, ties to the even code, saturating at the format's max; sign kept."""
    values, codes = value_table(dtype)
    v = np.asarray(v, np.float64)
    magnitude = np.minimum(np.abs(v), values[-1])
    i = np.clip(np.searchsorted(values, magnitude, side="right") - 1, 0, len(values) - 1)
    j = np.minimum(i + 1, len(values) - 1)
    lo, hi = values[i], values[j]
    up = (magnitude - lo > hi - magnitude) | ((magnitude - lo == hi - magnitude) & (codes[i] % 2 == 1))
    out = np.copysign(np.where(up, hi, lo), v)
    return np.where(np.isnan(v), np.nan, out)


def _groups(m, spec):
    """(scale index, slice) for every scale group of the 2-D matrix m (contracting axis 1)."""
    rows, k = m.shape
    n = spec.block_size
    if spec.granularity == "tensor":
        return [((0,), np.s_[:, :])]
    if spec.granularity == "row":
        return [((r,), np.s_[r, :]) for r in range(rows)]
    if spec.granularity == "tile":
        return [((r, b), np.s_[r, b * n:(b + 1) * n]) for r in range(rows) for b in range(-(-k // n))]
    return [
        ((i, j), np.s_[i * n:(i + 1) * n, j * n:(j + 1) * n])
        for i in range(-(-rows // n))
        for j in range(-(-k // n))
    ]


def _scale_shape(m, spec):
    rows, k = m.shape
    n = max(spec.block_size, 1)
    return {
        "tensor": (1,),
        "row": (rows,),
        "tile": (rows, -(-k // n)),
        "block": (-(-rows // n), -(-k // n)),
    }[spec.granularity]


def ref_fp32_group(g, spec, scale=None):
    """fp8.py's rule written out: scale = max / (2**margin * amax), 1 if unusable."""
    fmt_max = np.float32(ml_dtypes.finfo(ELEMENT_DTYPES[spec.element]).max)
    if scale is None:
        amax = np.max(np.abs(g)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            scale = fmt_max / (np.float32(2.0**spec.margin) * amax)
        if not (amax > 0 and np.isfinite(amax) and np.isfinite(scale)):
            scale = np.float32(1.0)
    scaled = (g.astype(np.float32) * np.float32(scale)).astype(np.float32)
    return ref_round(scaled, ELEMENT_DTYPES[spec.element]), np.float32(1.0) / np.float32(scale)


def ref_mx_group(g, spec):
    """OCP MX v1.0 6.3: X = 2**(floor(log2 amax) - emax_elem) in E8M0; returns (elements, E8M0 code)."""
    dtype = ELEMENT_DTYPES[spec.element]
    fmt_max = float(ml_dtypes.finfo(dtype).max)
    emax_elem = math.floor(math.log2(fmt_max))
    amax = float(np.max(np.abs(g.astype(np.float64))))
    if not math.isfinite(amax):
        return np.zeros(g.shape), 255
    if amax < 2.0**-126:  # zero, or an fp32 subnormal that XLA flushes
        shared = -127
    elif spec.e8m0_rounding == "floor":
        shared = math.frexp(amax)[1] - 1 - emax_elem
    else:  # ceil(log2(fp32(amax * fp32(1 / max)))); a ratio flushed by XLA gives -127
        ratio = float(np.float32(amax) * (np.float32(1) / np.float32(fmt_max)))
        mantissa, exponent = math.frexp(ratio)
        shared = (exponent - 1 if mantissa == 0.5 else exponent) if ratio >= 2.0**-126 else -127
    shared = min(max(shared, -127), 127)
    return ref_round(g.astype(np.float64) / 2.0**shared, dtype), shared + 127


def ref_nvfp4_tensor_scale(x):
    finite = np.abs(x[np.isfinite(x)])
    amax = np.float32(finite.max() if finite.size else 0.0)
    t = np.float32(amax / np.float32(6 * 448))
    return t if (t > 0 and np.isfinite(t)) else np.float32(1.0)


def ref_nvfp4_group(g, t):
    """NVFP4: u = x * fp32(1/t), s = e4m3(amax(u) * fp32(1/6)), q = e2m1(u * fp32(1/s)).

    Divisions by fp32 reciprocal multiplies: the rule as XLA computes it (quantize.py).
    """
    over_t = (g.astype(np.float32) * (np.float32(1) / t)).astype(np.float32)
    amax = np.max(np.abs(over_t))
    if not np.isfinite(amax):
        return np.zeros(g.shape), np.nan
    block = np.float32(amax * (np.float32(1) / np.float32(6)))
    s = ref_round(np.float32(min(block, 448.0)), ml_dtypes.float8_e4m3fn)
    if s == 0:
        return np.zeros(g.shape), 0.0
    scaled = (over_t * (np.float32(1) / np.float32(s))).astype(np.float32)
    return ref_round(scaled, ml_dtypes.float4_e2m1fn), s


def ref_quantize(x, spec, axis, scale=None):
    """(elements float64 like x, block scales in quantize's layout, tensor scale)."""
    m = np.asarray(x, np.float32)
    m = m if axis in (1, -1) else m.T
    m = np.where(np.abs(m) < 2.0**-126, np.float32(0), m)  # XLA flushes fp32 subnormals
    elements = np.zeros(m.shape)
    scales = np.zeros(_scale_shape(m, spec))
    t = ref_nvfp4_tensor_scale(m) if spec.tensor_scale else np.float32(1.0)
    for index, where in _groups(m, spec):
        if spec.scale == "fp32":
            elements[where], scales[index] = ref_fp32_group(m[where], spec, scale)
        elif spec.scale == "e8m0":
            elements[where], scales[index] = ref_mx_group(m[where], spec)
        else:
            elements[where], scales[index] = ref_nvfp4_group(m[where], t)
    return (elements if axis in (1, -1) else elements.T), scales, t


def ref_dequantize(x, spec, axis):
    """float64 values the GEMM reads, from the reference quantizer."""
    elements, scales, t = ref_quantize(x, spec, axis)
    m = elements if axis in (1, -1) else elements.T
    wide = np.zeros(m.shape)
    for index, where in _groups(m, spec):
        s = scales[index]
        s = 2.0 ** (s - 127) if spec.scale == "e8m0" else s
        wide[where] = m[where] * s * (t if spec.tensor_scale else 1.0)
    return wide if axis in (1, -1) else wide.T


# ---- test data ------------------------------------------------------------------


def _random(shape):
    return RNG.normal(size=shape).astype(np.float32)


def _outliers(shape):
    x = RNG.normal(size=shape).astype(np.float32)
    mask = RNG.random(shape) < 0.03
    return np.where(mask, x * np.float32(3e3), x * np.float32(1e-2)).astype(np.float32)


def _zero_blocks(shape):
    x = _random(shape)
    x[: shape[0] // 2] = 0.0  # whole rows of zero groups, and a partly-zero tensor
    x[:, :5] = 0.0
    return x


def _ties(shape, element="e4m3"):
    """Midpoints of the element grid under a power-of-two scale: every element is a tie."""
    values, _ = value_table(ELEMENT_DTYPES[element])
    mids = (values[:-1] + values[1:]) / 2
    x = RNG.choice(mids, size=shape) * RNG.choice([-1.0, 1.0], size=shape)
    x[:, ::16] = values[-1]  # one max element per group fixes the scale at 2**0
    return x.astype(np.float32)


DATA = {"random": _random, "outliers": _outliers, "zeros": _zero_blocks, "ties": _ties}


def _assert_values_equal(actual, expected, what):
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    same &= np.signbit(a) == np.signbit(e)
    assert same.all(), (
        f"{what}: {np.count_nonzero(~same)} of {a.size} differ, first at {np.argwhere(~same)[:3].tolist()}: "
        f"{a[~same][:3]} vs {e[~same][:3]}"
    )


def _assert_quantize_matches(x, spec, axis=1):
    q, scales = quantize(jnp.asarray(x), spec, axis=axis)
    elements, ref_scales, t = ref_quantize(x, spec, axis)
    _assert_values_equal(q, elements, "elements")
    if spec.scale == "e8m0":
        np.testing.assert_array_equal(np.asarray(scales.block).view(np.uint8), ref_scales.astype(np.uint8))
    else:
        _assert_values_equal(scales.block, ref_scales, "scales")
    assert np.float32(scales.tensor) == np.float32(t)


# ---- quantizers vs the reference ----------------------------------------------

QUANTIZER_SPECS = {
    "fp8_current_e4m3": PRESETS["fp8_current"].input,
    "fp8_current_e5m2": PRESETS["fp8_current"].output_grad,
    "fp8_rowwise": PRESETS["fp8_rowwise"].input,
    "fp8_block_tile": dataclasses.replace(PRESETS["fp8_block"].input, block_size=32),
    "fp8_block_square": dataclasses.replace(PRESETS["fp8_block"].kernel, block_size=16),
    "mxfp8_e4m3": PRESETS["mxfp8"].input,
    "mxfp8_e5m2": dataclasses.replace(PRESETS["mxfp8"].input, element="e5m2"),
    "mxfp8_ceil": dataclasses.replace(PRESETS["mxfp8"].input, e8m0_rounding="ceil"),
    "mxfp6_e2m3": PRESETS["mxfp6"].input,
    "mxfp6_e3m2": PRESETS["mxfp6"].output_grad,
    "mxfp4": PRESETS["mxfp4"].input,
    "nvfp4_tile": PRESETS["nvfp4"].input,
    "nvfp4_square": PRESETS["nvfp4"].kernel,
}


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("name", sorted(QUANTIZER_SPECS))
def test_quantizer_is_bit_exact_against_spec_reference(name, data):
    spec = QUANTIZER_SPECS[name]
    maker = DATA[data]
    x = maker((6, 70), spec.element) if data == "ties" else maker((6, 70))  # 70: partial groups
    _assert_quantize_matches(x, spec, axis=1)
    _assert_quantize_matches(x.T.copy(), spec, axis=0)  # groups along the other axis


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_ceil", "mxfp6_e3m2", "mxfp4"])
def test_e8m0_edge_cases_follow_ocp_mx(name):
    spec = QUANTIZER_SPECS[name]
    x = _random((8, 32))
    x[0] = 0.0  # amax 0: smallest scale 2**-127, all elements 0
    x[1] *= np.float32(2.0**127) / np.abs(x[1]).max() * np.float32(1.9)  # amax ~ 1.9 * 2**127
    x[2] = np.float32(2.0**-125) * RNG.uniform(0.5, 1.0, 32).astype(np.float32)  # tiny amax: clamps at -127
    x[3, 5] = np.nan  # NaN poisons its block: scale NaN (0xFF)
    x[4, 7] = np.inf
    x[5, 0] = -np.inf
    x[6] = np.float32(2.0**-100)  # constant block: exactly 2**emax per element
    x[7, 1:] = np.float32(2.0**-20)  # element subnormals under a large block amax
    _assert_quantize_matches(x, spec)
    q, scales = quantize(jnp.asarray(x), spec)
    codes = np.asarray(scales.block).view(np.uint8)[:, 0]
    assert codes[0] == 0 and codes[2] == 0 and (codes[3:6] == 255).all()
    wide = np.asarray(dequantize(q, scales, spec))
    assert np.isnan(wide[3:6]).all() and (wide[0] == 0).all()
    np.testing.assert_array_equal(wide[6], x[6])


def test_nvfp4_edge_cases():
    spec = PRESETS["nvfp4"].input
    x = _random((4, 48))
    x[0, :16] = 0.0  # zero block: scale 0, elements 0 (no 0/0)
    x[1, 20] = np.nan  # only its own block turns NaN; the tensor scale ignores it
    x[2, 40] = np.float32(1e4)  # an outlier sets the tensor scale to amax / 2688
    _assert_quantize_matches(x, spec)
    q, scales = quantize(jnp.asarray(x), spec)
    assert np.float32(scales.tensor) == np.float32(np.float32(1e4) / np.float32(2688))
    wide = np.asarray(dequantize(q, scales, spec))
    assert np.isnan(wide[1, 16:32]).all() and np.isfinite(np.delete(wide[1], range(16, 32))).all()
    assert (wide[0, :16] == 0).all()


def test_dequantize_matches_reference_values():
    x = _outliers((6, 70))
    for name in ("fp8_rowwise", "fp8_block_square", "mxfp8_e4m3", "mxfp6_e2m3", "nvfp4_square"):
        spec = QUANTIZER_SPECS[name]
        got = np.asarray(fake_quant(jnp.asarray(x), spec), np.float64)
        # fp32 rounding of q * scale (and * tensor scale) is the only difference allowed.
        np.testing.assert_allclose(got, ref_dequantize(x, spec, 1), rtol=2**-23, atol=0, err_msg=name)


def test_two_dimensional_blocks_give_the_same_weight_along_either_axis():
    w = jnp.asarray(_outliers((40, 50)))
    for name in ("fp8_block", "nvfp4"):
        spec = preset(name).kernel
        spec = dataclasses.replace(spec, block_size=16)
        np.testing.assert_array_equal(fake_quant(w, spec, axis=0), fake_quant(w, spec, axis=1))


# ---- fp8 delayed: unchanged --------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_delayed_quantizer_is_fp8_py_bit_for_bit(compute_dtype):
    x = jnp.asarray(_outliers((8, 40))).astype(compute_dtype)
    recipe = PRESETS["fp8_delayed"]
    for spec, dtype in ((recipe.input, jnp.float8_e4m3fn), (recipe.output_grad, jnp.float8_e5m2)):
        for s in (1.0, 0.37, 448.0 / 91.0, 3e-3):
            scale = jnp.float32(s)
            q, scales = quantize(x, spec, scale=scale)
            expected_q = fp8.quantize(x, dtype, scale, compute_dtype)
            np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(expected_q).view(np.uint8))
            got = dequantize(q, scales, spec, dtype=compute_dtype)
            expected = fp8.qdq(x, dtype, scale, compute_dtype)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


def test_fp8_current_uses_fp8_py_scale_rule():
    x = jnp.asarray(_outliers((8, 40)))
    amax = jnp.max(jnp.abs(x))
    scale = fp8.compute_scale(amax, jnp.float32(1.0), 448.0)
    expected = fp8.qdq(x, jnp.float8_e4m3fn, scale, jnp.float32)
    np.testing.assert_array_equal(fake_quant(x, PRESETS["fp8_current"].input), expected)
    # An amax reduced elsewhere (other devices) is used as given.
    np.testing.assert_array_equal(fake_quant(x, PRESETS["fp8_current"].input, amax=amax), expected)
    with pytest.raises(ValueError, match="tensor amax"):
        quantize(x, PRESETS["fp8_rowwise"].input, amax=amax)


def test_fp8_delayed_scaled_dot_is_fp8dotgeneral_bit_for_bit():
    recipe = PRESETS["fp8_delayed"]
    x, w = jnp.asarray(_random((4, 32))), jnp.asarray(_random((32, 8)))
    meta = dict(init_delayed_meta(recipe))
    meta["input_scale"], meta["kernel_scale"], meta["output_grad_scale"] = (
        jnp.float32(90.0), jnp.float32(150.0), jnp.float32(2000.0),
    )
    layer = fp8.Fp8DotGeneral()

    def via_module(x, w, meta):
        return layer.apply({fp8.FP8_META: meta}, x, w, DIMS)

    def via_recipe(x, w, meta):
        return scaled_dot(x, w, DIMS, recipe, meta=meta)

    for fn in (via_module, via_recipe):
        assert fn(x, w, meta).shape == (4, 8)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)  # noqa: E731
    expected = jax.grad(loss(via_module), (0, 1, 2))(x, w, meta)
    got = jax.grad(loss(via_recipe), (0, 1, 2))(x, w, meta)
    np.testing.assert_array_equal(via_recipe(x, w, meta), via_module(x, w, meta))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert float(got[2]["output_grad_amax_history"][0]) > 0  # the amax left through the cotangent


# ---- stochastic rounding -----------------------------------------------------------

SR_VALUES = {
    "e4m3": [0.3, -1.37, 200.0, 0.0041, 445.0],
    "e5m2": [0.3, -1.37, 3e4, 2.5e-5],
    "e2m3": [0.3, -1.37, 5.3, 0.06],
    "e3m2": [0.3, -1.37, 21.0, 0.1],
    "e2m1": [0.3, -1.37, 4.9, 0.1, 5.5],
}


@pytest.mark.parametrize("element", sorted(SR_VALUES))
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(element):
    fmt = formats.element_format(element)
    draws = 20000
    y = np.repeat(np.array(SR_VALUES[element], np.float32)[:, None], draws, axis=1)
    out = np.asarray(round_stochastic(jnp.asarray(y), fmt, jax.random.key(5))).astype(np.float64)
    values, _ = value_table(ELEMENT_DTYPES[element])
    for row, v in zip(out, SR_VALUES[element]):
        i = np.searchsorted(values, abs(v), side="right") - 1
        lo, hi = values[i], values[min(i + 1, len(values) - 1)]
        assert set(np.unique(np.abs(row))) <= {lo, hi}, (v, np.unique(row))
        p = (abs(v) - lo) / (hi - lo)
        sigma = (hi - lo) * math.sqrt(p * (1 - p) / draws)
        assert abs(row.mean() - v) <= 5 * sigma + 1e-12 * abs(v), (v, row.mean(), sigma)


def test_stochastic_rounding_is_deterministic_per_key_and_step():
    spec = PRESETS["nvfp4"].output_grad
    x = jnp.asarray(_random((8, 64)))
    first = quantize(x, spec, key=rounding_key(3, 10, 42))[0]
    again = quantize(x, spec, key=rounding_key(3, 10, 42))[0]
    other_step = quantize(x, spec, key=rounding_key(3, 11, 42))[0]
    np.testing.assert_array_equal(np.asarray(first).view(np.uint8), np.asarray(again).view(np.uint8))
    assert (np.asarray(first, np.float32) != np.asarray(other_step, np.float32)).any()
    with pytest.raises(ValueError, match="needs a key"):
        quantize(x, spec)


# ---- the emulated dot ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gradient_flows_and_dgrad_matches_finite_difference(name):
    recipe = preset(name)
    x, w = _random((8, 64)), _random((64, 48))
    c = RNG.choice([-1.0, 1.0], size=(8, 48)).astype(np.float32)  # exact in every format
    kwargs = {"meta": init_delayed_meta(recipe)} if recipe.is_delayed else {"key": rounding_key(0, 1, 2)}

    def loss(x, w):
        return jnp.sum(jnp.asarray(c) * scaled_dot(x, w, DIMS, recipe, **kwargs))

    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(x), jnp.asarray(w))
    # d/dx against the dequantized weight (as dgrad reads it: groups along N), float64.
    if recipe.is_delayed:  # scale 1 from the initial meta: fp8(w) itself
        w_q = ref_round(w, ELEMENT_DTYPES[recipe.kernel.element])
    else:
        w_q = ref_dequantize(w, recipe.kernel, 1)
    phi = lambda x: np.sum(c * (x @ w_q))  # noqa: E731
    h = 1e-3
    fd = np.zeros_like(x, np.float64)
    for i, j in [(0, 0), (3, 17), (7, 63), (5, 40)]:
        e = np.zeros_like(x, np.float64)
        e[i, j] = h
        fd[i, j] = (phi(x + e) - phi(x - e)) / (2 * h)
        np.testing.assert_allclose(float(dx[i, j]), fd[i, j], rtol=1e-5, atol=1e-5)
    exact_dw = x.astype(np.float64).T @ c
    rel = np.linalg.norm(np.asarray(dw) - exact_dw) / np.linalg.norm(exact_dw)
    assert np.isfinite(np.asarray(dw)).all() and rel < 0.3, rel


def test_wgrad_hadamard_is_orthogonal_and_keeps_the_exact_product():
    q = random_hadamard(16, 0)
    np.testing.assert_allclose(q @ q.T, np.eye(16), atol=1e-12)
    exact = dataclasses.replace(
        preset("nvfp4"),
        input=OperandSpec("e4m3", "tensor"), kernel=OperandSpec("e4m3", "tensor"),
        output_grad=OperandSpec("e5m2", "tensor"),
    )
    # With quantization replaced by fp8 at a generous scale, RHT must not change dW beyond fp8 error.
    x, w = jnp.asarray(_random((20, 32))), jnp.asarray(_random((32, 8)))
    g = lambda r: jax.jit(jax.grad(lambda w: jnp.sum(scaled_dot(x, w, DIMS, r) ** 2)))(w)  # noqa: E731
    with_rht, without = g(exact), g(dataclasses.replace(exact, wgrad_hadamard=False))
    np.testing.assert_allclose(with_rht, without, rtol=0.1, atol=0.15 * float(jnp.abs(without).max()))


def test_scaled_dot_rejects_missing_state_and_batch_dims():
    x, w = jnp.ones((4, 32)), jnp.ones((32, 8))
    with pytest.raises(ValueError, match="needs key="):
        scaled_dot(x, w, DIMS, preset("nvfp4"))
    with pytest.raises(ValueError, match="needs meta="):
        scaled_dot(x, w, DIMS, preset("fp8_delayed"))
    with pytest.raises(ValueError, match="batch dimensions"):
        scaled_dot(jnp.ones((2, 4, 32)), jnp.ones((2, 32, 8)), (((2,), (1,)), ((0,), (0,))), preset("mxfp8"))


def test_bad_recipe_fields_are_one_line_user_errors():
    with pytest.raises(UserError, match="granularity"):
        OperandSpec(granularity="column")
    with pytest.raises(UserError, match="block_size"):
        OperandSpec(granularity="tile")
    with pytest.raises(UserError, match="unknown recipe"):
        preset("mxfp3")


# ---- cross-check with jax.nn.scaled_dot_general ----------------------------------------


@pytest.fixture(scope="module")
def scaled_matmul_on_cpu():
    """jax.nn.scaled_dot_general on CPU.

    jaxlib has no CPU lowering of its `scaled_matmul` primitive (only cuDNN
    and ROCm). Its ROCm lowering emits XLA's own `scaled_dot` op, which XLA:CPU
    expands to convert, multiply by the broadcast scales, dot. Registering that
    lowering for CPU runs jax.nn.scaled_dot_general's real code (its quantizer,
    shape normalization, custom_vjp) unchanged; the registration only adds a
    rule where none existed.
    """
    mlir.register_lowering(jax_sm._scaled_matmul_p, jax_sm._scaled_matmul_rocm_lowering, platform="cpu")
    return jax.nn.scaled_dot_general


def _mxfp8_ceil():
    return dataclasses.replace(
        preset("mxfp8"), **{r: dataclasses.replace(preset("mxfp8").spec(r), e8m0_rounding="ceil")
                            for r in ("input", "kernel", "output_grad")}
    )


def _fp32_dot_bound(a, b):
    """Worst-case error of an fp32 dot of length K plus 3 scale roundings: (K + 3) u sum|a||b|."""
    return (a.shape[-1] + 3) * 2.0**-24 * (np.abs(a) @ np.abs(b))


def _assert_close_to_exact(actual, a, b, what):
    """|actual - a @ b| within the fp32 bound, a and b the float64 dequantized operands."""
    err = np.abs(np.asarray(actual, np.float64) - a @ b)
    assert np.all(err <= _fp32_dot_bound(a, b)), (what, float(np.max(err / _fp32_dot_bound(a, b))))


def test_mxfp8_quantizer_is_jax_scaled_dot_generals_bit_for_bit():
    x = jnp.asarray(_outliers((16, 96)))
    q_jax, s_jax = jax_sm.quantize(x[None], jax.nn.get_scaled_dot_general_config("mxfp8"))
    q, scales = quantize(x, _mxfp8_ceil().input)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(q_jax[0]).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(scales.block).view(np.uint8), np.asarray(s_jax[0]).view(np.uint8))


def test_mxfp8_dot_agrees_with_jax_scaled_dot_general(scaled_matmul_on_cpu):
    # jax needs every contracting dim (K=96, N=32, M=32) to be a multiple of 32.
    x, w, c = _outliers((32, 96)), _random((96, 32)), _random((32, 32))
    configs = [jax.nn.get_scaled_dot_general_config("mxfp8")] * 3
    spec = _mxfp8_ceil().input
    theirs = lambda x, w: scaled_matmul_on_cpu(x, w, DIMS, configs=configs)  # noqa: E731
    ours = lambda x, w: scaled_dot(x, w, DIMS, _mxfp8_ceil())  # noqa: E731
    grads = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.asarray(c) * f(x, w)), (0, 1)))(  # noqa: E731
        jnp.asarray(x), jnp.asarray(w)
    )
    # The GEMM operands as each GEMM quantizes them (groups along its contracting axis).
    fwd = ref_dequantize(x, spec, 1), ref_dequantize(w, spec, 0)
    dgrad = ref_dequantize(c, spec, 1), ref_dequantize(w, spec, 1).T
    wgrad = ref_dequantize(x, spec, 0).T, ref_dequantize(c, spec, 0)
    for f in (ours, theirs):
        _assert_close_to_exact(jax.jit(f)(jnp.asarray(x), jnp.asarray(w)), *fwd, "forward")
        dx, dw = grads(f)
        _assert_close_to_exact(dx, *dgrad, "dgrad")
        _assert_close_to_exact(dw, *wgrad, "wgrad")


def test_mxfp8_ocp_and_ceil_rules_differ_only_on_saturating_blocks():
    x = _random((16, 96))
    spec = preset("mxfp8").input
    floor_codes = np.asarray(quantize(jnp.asarray(x), spec)[1].block).view(np.uint8).astype(int)
    ceil_spec = dataclasses.replace(spec, e8m0_rounding="ceil")
    ceil_codes = np.asarray(quantize(jnp.asarray(x), ceil_spec)[1].block).view(np.uint8).astype(int)
    amax = np.abs(x.reshape(16, 3, 32)).max(-1)
    mantissa = amax / 2.0 ** np.floor(np.log2(amax))
    np.testing.assert_array_equal(ceil_codes - floor_codes, (mantissa > 448 / 256).astype(int))


def test_nvfp4_dot_agrees_with_jax_scaled_dot_general(scaled_matmul_on_cpu):
    x, w = _outliers((16, 96)), _random((96, 24))
    recipe = dataclasses.replace(
        preset("nvfp4"), kernel=dataclasses.replace(preset("nvfp4").input)  # jax: 1x16 tiles only
    )
    configs = [
        jax.nn.get_scaled_dot_general_config("nvfp4", jnp.asarray([ref_nvfp4_tensor_scale(a)]))
        for a in (x, w.T)
    ]
    # Quantizer: same E4M3 block scales, same E2M1 elements wherever the block
    # scale is nonzero (where it underflows to 0 jax stores x/0 -> +-6, we 0:
    # both decode to 0).
    q_jax, s_jax = jax_sm.quantize(jnp.asarray(x)[None], configs[0])
    q, scales = quantize(jnp.asarray(x), recipe.input)
    s_ours = np.asarray(scales.block).view(np.uint8)
    np.testing.assert_array_equal(s_ours, np.asarray(s_jax[0]).view(np.uint8))
    live = np.repeat(np.asarray(scales.block, np.float32) > 0, 16, axis=1)
    np.testing.assert_array_equal(np.asarray(q, np.float32)[live], np.asarray(q_jax[0], np.float32)[live])
    # Dot: jax multiplies both fp32 tensor scales onto the fp32 sum, we onto each
    # operand before it; each is within the fp32 dot bound of the exact product.
    theirs = scaled_matmul_on_cpu(jnp.asarray(x), jnp.asarray(w), DIMS, configs=configs + configs[:1])
    ours = scaled_dot(jnp.asarray(x), jnp.asarray(w), DIMS, recipe, key=jax.random.key(0))
    fwd = ref_dequantize(x, recipe.input, 1), ref_dequantize(w, recipe.kernel, 0)
    _assert_close_to_exact(ours, *fwd, "ours")
    _assert_close_to_exact(theirs, *fwd, "jax")
    # With power-of-two tensor scales both orders are exact: bit-identical.
    x2 = x.copy()
    x2[0, 0] = np.float32(2688 * 16.0)
    w2 = w.copy()
    w2[0, 0] = np.float32(2688 / 2.0)
    configs = [jax.nn.get_scaled_dot_general_config("nvfp4", jnp.asarray([t], jnp.float32)) for t in (16.0, 0.5)]
    theirs = scaled_matmul_on_cpu(jnp.asarray(x2), jnp.asarray(w2), DIMS, configs=configs + configs[:1])
    ours = scaled_dot(jnp.asarray(x2), jnp.asarray(w2), DIMS, recipe, key=jax.random.key(0))
    _assert_close_to_exact(ours, ref_dequantize(x2, recipe.input, 1), ref_dequantize(w2, recipe.kernel, 0), "pow2")
    _assert_close_to_exact(theirs, ref_dequantize(x2, recipe.input, 1), ref_dequantize(w2, recipe.kernel, 0), "pow2")
