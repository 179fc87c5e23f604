"""The recipes as training policies: which layers they quantize, their keys, their telemetry.

The quantizers themselves are checked bit for bit against the spec references in
test_recipes_quant.py; here the references are reused to check what the model and
the step do with them, on tiny shapes (one block, width 32) so each compile is short.
"""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sandbox.cli import main as cli_main
from sandbox.errors import UserError
from sandbox.precision.policy import PRESETS, RECIPE_POLICIES, make_policy
from sandbox.precision.recipes import preset
from sandbox.precision.recipes.module import QUANT_PROBE, QUANT_RNG, RecipeDotGeneral
from sandbox.precision.recipes.recipe import customized
from sandbox.precision.recipes.telemetry import HIST_MIN, N_SCALARS, summarize
from sandbox.train import setup
from sandbox.train.step import train_step
from tests.test_recipes_quant import ref_dequantize, ref_quantize

SMALL = ["model.d_model=32", "model.context=16", "training.batch_size=4"]


def _run(tiny, policy, *sets):
    return setup.build(tiny(sets=[f"precision.policy={policy}", *SMALL, *sets]))


def _probe_paths(run):
    shapes = jax.eval_shape(run.parts.model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    return sorted("/".join(k.key for k in path[:-2])
                  for path, _ in jax.tree_util.tree_flatten_with_path(shapes.get(QUANT_PROBE, {}))[0])


def test_every_recipe_is_a_policy_preset_with_bf16_compute():
    for name in RECIPE_POLICIES:
        policy = PRESETS[name]
        assert policy.recipe == preset(name) and policy.fp8 is None
        assert jnp.dtype(policy.compute_dtype) == jnp.bfloat16 and jnp.dtype(policy.param_dtype) == jnp.float32


def test_recipe_quantizes_every_dense_layer_but_kept_blocks_and_the_head(tiny):
    dense = ["fc", "out", "proj", "qkv"]
    two = ["model.n_layer=2"]
    assert _probe_paths(_run(tiny, "mxfp8", *two)) == [f"block_{i}/{d}" for i in (0, 1) for d in dense]
    assert _probe_paths(_run(tiny, "mxfp8", *two, "precision.recipe.keep_bf16=[last]")) == \
        [f"block_0/{d}" for d in dense]
    assert _probe_paths(_run(tiny, "mxfp8", *two, "precision.recipe.keep_bf16=[first, block_1]")) == []
    head = _run(tiny, "mxfp8", "precision.recipe.head=true")
    assert "" in _probe_paths(head)  # the head's own RecipeDotGeneral ("head_dot")
    assert _probe_paths(_run(tiny, "bf16")) == []


def test_dense_forward_reads_spec_quantized_operands():
    """nn.Dense under MXFP4 equals the float64 product of the spec reference's quantized x and w."""
    recipe = preset("mxfp4")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    layer = nn.Dense(16, use_bias=False, dot_general_cls=functools.partial(RecipeDotGeneral, recipe=recipe))
    variables = layer.init(jax.random.key(0), x)
    w = np.asarray(variables["params"]["kernel"])
    out = np.asarray(layer.apply({"params": variables["params"]}, x))
    xq = ref_dequantize(x.astype(np.float64), recipe.input, axis=1)
    wq = ref_dequantize(w.astype(np.float64), recipe.kernel, axis=0)
    # both operands are exact in fp32, so only the fp32 accumulation differs from float64
    bound = (64 + 3) * 2**-24 * (np.abs(xq) @ np.abs(wq))  # (K + 3) ulps of the sum of |terms|
    assert np.all(np.abs(out - xq @ wq) <= bound)
    assert not np.allclose(out, x @ w, rtol=1e-2)  # and MXFP4 is visibly not the fp32 product


def test_switches_take_the_nvfp4_recipe_apart():
    base = preset("nvfp4")
    assert customized(base) == base
    off = customized(base, wgrad_hadamard="off", stochastic_rounding="off", weight_blocks="off")
    assert not off.wgrad_hadamard and off.output_grad.rounding == "nearest"
    assert off.kernel.granularity == "tile" and off.kernel.block_size == 16
    assert off.input == base.input
    with pytest.raises(UserError, match="weight_blocks"):
        customized(preset("fp8_rowwise"), weight_blocks="on")


def _one_step(run, seed=None):
    state = setup.initial_state(run)
    batch = setup.place_batch(run, run.pipeline.train_batch(0))
    ctx = run.ctx if seed is None else run.ctx.__class__(**{**run.ctx.__dict__, "seed": seed})
    new, metrics = jax.jit(functools.partial(train_step, ctx=ctx))(state, batch)
    return new, metrics


def _kernel_grad(recipe, key):
    layer = nn.Dense(32, use_bias=False, dot_general_cls=functools.partial(RecipeDotGeneral, recipe=recipe))
    x = jax.random.normal(jax.random.key(0), (32, 64))
    params = layer.init(jax.random.key(1), x)["params"]
    rngs = {QUANT_RNG: key} if key is not None else {}
    return np.asarray(jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply({"params": p}, x, rngs=rngs))))(params)["kernel"])


def test_stochastic_rounding_draws_from_the_quant_rng_stream():
    """Same key, same bits; another key, other bits; rounding to nearest ignores the key."""
    sr = preset("nvfp4")
    assert np.array_equal(_kernel_grad(sr, jax.random.key(5)), _kernel_grad(sr, jax.random.key(5)))
    assert not np.array_equal(_kernel_grad(sr, jax.random.key(5)), _kernel_grad(sr, jax.random.key(6)))
    nearest = customized(sr, stochastic_rounding="off")
    assert np.array_equal(_kernel_grad(nearest, jax.random.key(5)), _kernel_grad(nearest, jax.random.key(6)))


@pytest.mark.slow  # two compiles of a full NVFP4 step: ~1 min
def test_train_step_rounding_key_is_a_function_of_the_run_seed(tiny):
    """The step passes fold_in(microbatch key, 1) as the quant stream: the run's seed changes the
    stochastic rounding of the gradients (Adam's first moment); the same seed gives the same bits."""
    run = _run(tiny, "nvfp4", "precision.telemetry=false")
    a, _ = _one_step(run)
    b, _ = _one_step(run, seed=1)
    again, _ = _one_step(run)
    # equal_nan: the guard's loss window holds NaN for its empty slots
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(again)))
    mu_a, mu_b = (s.opt_state[1][0].mu for s in (a, b))  # (clip, then adamw's ScaleByAdamState)
    assert not np.array_equal(mu_a["block_0"]["qkv"]["kernel"], mu_b["block_0"]["qkv"]["kernel"])


def _ref_stats(x, spec, axis):
    """float64 SNR / flushed / saturated of the spec reference's quantization of x."""
    x = np.asarray(x, np.float64)
    fq = ref_dequantize(x, spec, axis)
    err = np.sum((x - fq) ** 2)
    snr = 10 * np.log10(np.sum(x**2) / err)
    return snr, np.sum((x != 0) & (fq == 0)), fq


def test_probe_cotangent_is_each_operands_telemetry():
    """The probe's cotangent sums each operand's two quantizations (forward + backward GEMM);
    SNR and flushed counts match the float64 reference computed from the spec quantizer."""
    recipe = preset("mxfp6")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, 64)) * np.exp(rng.standard_normal((32, 1)) * 3)).astype(np.float32)
    w = (rng.standard_normal((64, 32)) * 0.02).astype(np.float32)
    g = (rng.standard_normal((32, 32)) * 1e-3).astype(np.float32)
    layer = nn.Dense(32, use_bias=False, dot_general_cls=functools.partial(RecipeDotGeneral, recipe=recipe))
    variables = layer.init(jax.random.key(0), x)
    probe = jax.tree.map(jnp.zeros_like, variables[QUANT_PROBE])

    def f(params, probe):
        return layer.apply({"params": params, QUANT_PROBE: probe}, x, rngs={QUANT_RNG: jax.random.key(3)})

    _, vjp = jax.vjp(f, {"kernel": jnp.asarray(w)}, probe)
    _, ct = vjp(jnp.asarray(g))
    stats = np.asarray(ct["RecipeDotGeneral_0"]["stats"])
    for row, (t, spec, fwd_axis, bwd_axis) in enumerate([(x, recipe.input, 1, 0), (w, recipe.kernel, 0, 1),
                                                          (g, recipe.output_grad, 1, 0)]):
        (snr1, fl1, fq1), (snr2, fl2, fq2) = (_ref_stats(t, spec, a) for a in (fwd_axis, bwd_axis))
        t64 = np.asarray(t, np.float64)
        signal, error = 2 * np.sum(t64**2), np.sum((t64 - fq1) ** 2) + np.sum((t64 - fq2) ** 2)
        np.testing.assert_allclose(stats[row, :2], [signal, error], rtol=1e-4)
        assert stats[row, 3] == fl1 + fl2 and stats[row, 5] == 2 * t.size
        got = summarize(stats[row])
        np.testing.assert_allclose(float(got["snr_db"]), 10 * np.log10(signal / error), atol=1e-3)
        # scale histogram: one count per 1x32 group and GEMM, at each E8M0 exponent
        exps = np.concatenate([(ref_quantize(t, spec, a)[1] - 127).ravel() for a in (fwd_axis, bwd_axis)])
        want = np.bincount((exps - HIST_MIN).astype(int), minlength=stats.shape[1] - N_SCALARS)
        np.testing.assert_array_equal(stats[row, N_SCALARS:], want)


@pytest.mark.slow  # the CLI test below covers the same path end to end, in the default run
def test_training_step_reports_recipe_telemetry_per_tensor(tiny):
    _, metrics = _one_step(_run(tiny, "nvfp4"))
    quant = jax.device_get(metrics["quant"])
    assert set(quant) == {f"block_0/{d}/{r}_{s}" for d in ("qkv", "proj", "fc", "out")
                          for r in ("input", "kernel", "output_grad")
                          for s in ("snr_db", "flushed_frac", "saturated_frac")}
    snrs = [v for k, v in quant.items() if k.endswith("snr_db")]
    assert all(10 < s < 30 for s in snrs), snrs  # fp4: about 3 bits of signal per element
    assert set(jax.device_get(metrics["quant_hist"])) == {
        f"block_0/{d}/{r}" for d in ("qkv", "proj", "fc", "out") for r in ("input", "kernel", "output_grad")}


def test_recipe_run_through_the_cli_logs_summary_columns_and_histograms(tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli_main(["train", "configs/quickstart.yaml", "--set", "precision.policy=mxfp8",
                     "--set", "training.steps=4", "--set", "training.log_every=2", "--set", "training.eval_every=0",
                     "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.context=16",
                     "--set", "training.batch_size=4", "--set", f"run_root={out}", "--set", "logging.progress=false"])
    assert code == 0
    run_dir = out / "quickstart"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    # MXFP8 (E4M3, 1x32, E8M0): about 30 dB. The OCP rule floors the shared exponent, so a block's
    # largest elements can land in [448, 512) and clip: a small but nonzero saturated fraction.
    assert 25 < summary["quant_snr_input_db"] < 40 and 25 < summary["quant_snr_kernel_db"] < 40
    assert 0 < summary["quant_saturated_frac"] < 0.02
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][-1]
    assert {k for k in train if k.startswith("quant/")} == {
        f"quant/block_0/{d}/{r}_{s}" for d in ("qkv", "proj", "fc", "out") for r in ("input", "kernel", "output_grad")
        for s in ("snr_db", "flushed_frac", "saturated_frac")}
    hists = [r for r in rows if r["split"] == "scale_hist"]
    assert [r["step"] for r in hists] == [2, 4]
    assert sum(hists[0]["hist"]["block_0/qkv/input"].values()) == 2 * 4 * 16 * 32 // 32 * 1  # groups x GEMMs


@pytest.mark.parametrize("sets, word", [
    (["precision.recipe.keep_bf16=[middle]"], "keep_bf16"),
    (["precision.recipe.keep_bf16=[block_7]"], "block_7"),
    (["precision.policy=fp8_rowwise", "precision.recipe.weight_blocks=on"], "weight_blocks"),
    (["precision.recipe.wgrad_hadamard=sideways"], "wgrad_hadamard"),
])
def test_bad_recipe_keys_are_one_line_exit_2(tmp_path, capsys, sets, word):
    args = ["train", "configs/quickstart.yaml", "--set", f"run_root={tmp_path / 'runs'}", "--set", "training.steps=1"]
    for s in ["precision.policy=nvfp4", *sets]:
        args += ["--set", s]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
    assert not (tmp_path / "runs").exists()


def test_make_policy_applies_the_recipe_section(tiny):
    cfg = tiny(sets=["precision.policy=nvfp4", "precision.recipe.wgrad_hadamard=off",
                     "precision.recipe.keep_bf16=[last]", "precision.recipe.head=true"])
    policy = make_policy(cfg.precision)
    assert not policy.recipe.wgrad_hadamard and policy.keep_bf16 == ("last",) and policy.quantize_head
    assert "wgrad RHT" not in policy.describe() and "kept in bf16: last" in policy.describe()


def test_whatif_reproduces_the_telemetry_of_the_step_it_describes(tmp_path, capsys):
    """`sandbox whatif RUN --step 2` on an MXFP8 run recomputes what training logged at step 3 (the
    step that trains on batch 2 from the step-2 checkpoint): same operands, same recipe, same numbers."""
    out = tmp_path / "runs"
    sets = ["precision.policy=mxfp8", "training.steps=3", "training.log_every=1", "training.eval_every=0",
            "checkpoint.every=2", "model.n_layer=1", "model.d_model=32", "model.context=16",
            "training.batch_size=4", f"run_root={out}", "logging.progress=false", "logging.tensorboard=false"]
    assert cli_main(["train", "configs/quickstart.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    run_dir = out / "quickstart"
    logged = next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if r["split"] == "train" and r["step"] == 3)
    capsys.readouterr()
    report = tmp_path / "whatif.json"
    assert cli_main(["whatif", str(run_dir), "--step", "2", "--recipes", "mxfp8", "--json", str(report)]) == 0
    assert "| mxfp8 |" in capsys.readouterr().out
    tensors = json.loads(report.read_text())["tensors"]["mxfp8"]
    assert sorted(tensors) == [f"block_0/{d}" for d in ("fc", "out", "proj", "qkv")]
    for layer, roles in tensors.items():
        for role, stats in roles.items():
            for stat, value in stats.items():
                np.testing.assert_allclose(value, logged[f"quant/{layer}/{role}_{stat}"], rtol=1e-5, atol=1e-9,
                                           err_msg=f"{layer} {role} {stat}")
    # the report is never written over an existing file; an unknown recipe is one line, exit 2
    assert cli_main(["whatif", str(run_dir), "--json", str(report)]) == 2
    assert cli_main(["whatif", str(run_dir), "--recipes", "fp7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "fp7" in err[1]
