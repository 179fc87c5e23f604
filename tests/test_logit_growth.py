"""Logit-growth options and telemetry (issue 20): qk_norm, softcaps, z-loss, independent weight decay.

Each option is checked against an independent reference: float64 NumPy formulas (RMS per head,
cap*tanh(x/cap), the z-loss value and gradient in closed form, attention scores recomputed from the
weights), never against the code under test. Bad values of the new keys are one line, exit 2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sandbox.cli import main
from sandbox.config import ModelConfig, OptimizerConfig
from sandbox.model import GPT
from sandbox.objectives import kl_objective
from sandbox.precision.policy import make_policy
from sandbox.train import setup
from sandbox.train.state import make_optimizer
from sandbox.train.step import train_step

FP32 = make_policy("fp32")
B, T = 2, 6


def _model(**kw):
    cfg = ModelConfig(**{"vocab_size": 64, "context": 8, "n_layer": 1, "n_head": 2, "d_model": 16, **kw})
    model = GPT(cfg, FP32)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    return model, model.init(jax.random.key(0), tokens), tokens


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_qk_norm_gives_unit_rms_per_head(kind):
    model, variables, tokens = _model(qk_norm=kind)
    names = ("q_norm", "k_norm")
    _, state = model.apply(variables, tokens, capture_intermediates=lambda m, _: m.name in names,
                           mutable=["intermediates"])
    for name in names:
        x = np.asarray(state["intermediates"]["block_0"][name]["__call__"][0], np.float64)  # B, T, H, K
        assert x.shape == (B, T, 2, 8)
        rms = np.sqrt(np.mean(x**2, axis=-1))
        np.testing.assert_allclose(rms, 1.0, atol=2e-3)
        if kind == "layernorm":
            np.testing.assert_allclose(np.mean(x, axis=-1), 0.0, atol=1e-5)


def _scale_qk(variables, factor):
    """The qkv kernel with its q and k columns multiplied by `factor` (v untouched)."""
    kernel = variables["params"]["block_0"]["qkv"]["kernel"]
    d = kernel.shape[0]
    kernel = kernel.at[:, : 2 * d].multiply(factor)
    params = jax.tree.map(lambda x: x, variables["params"])
    params["block_0"]["qkv"]["kernel"] = kernel
    return {**variables, "params": params}


def test_qk_norm_makes_attention_invariant_to_the_scale_of_q_and_k():
    """The fix's mechanism: growing q/k weights cannot grow the scores once q and k are normalised."""
    for kind, invariant in (("layernorm", True), ("false", False)):
        model, variables, tokens = _model(qk_norm=kind, init_std=0.5)
        base = model.apply(variables, tokens)
        grown = model.apply(_scale_qk(variables, 30.0), tokens)
        same = np.allclose(np.asarray(base), np.asarray(grown), atol=1e-4)
        assert same == invariant, kind


def test_logit_softcap_is_cap_tanh_of_the_uncapped_logits():
    cap = 2.0
    model, variables, tokens = _model(init_std=1.0)
    raw = np.asarray(model.apply(variables, tokens), np.float64)
    capped_model, _, _ = _model(init_std=1.0, logit_softcap=cap)
    capped = np.asarray(capped_model.apply(variables, tokens), np.float64)
    assert np.abs(raw).max() > 3 * cap  # the cap has something to do
    np.testing.assert_allclose(capped, cap * np.tanh(raw / cap), atol=2e-5)
    assert np.abs(capped).max() < cap


def test_attention_softcap_bounds_the_scores():
    """cap -> 0 bounds every score by the cap: attention is uniform, exactly as with q = 0."""
    model, variables, tokens = _model(init_std=1.0, attn_softcap=1e-6)
    capped = model.apply(variables, tokens)
    plain, _, _ = _model(init_std=1.0)
    kernel = variables["params"]["block_0"]["qkv"]["kernel"]
    zero_q = jax.tree.map(lambda x: x, variables)
    zero_q["params"]["block_0"]["qkv"]["kernel"] = kernel.at[:, : kernel.shape[0]].set(0.0)
    zero_q["params"]["block_0"]["qkv"]["bias"] = variables["params"]["block_0"]["qkv"]["bias"].at[:16].set(0.0)
    uniform = plain.apply(zero_q, tokens)
    np.testing.assert_allclose(np.asarray(capped), np.asarray(uniform), atol=1e-4)
    assert not np.allclose(np.asarray(plain.apply(variables, tokens)), np.asarray(uniform), atol=1e-2)


def _lse(x):
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def test_z_loss_value_and_gradient_match_the_closed_form_in_float64():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 3, 7)) * 3 + 8).astype(np.float32)  # log Z far from 0
    targets = rng.integers(0, 7, size=(2, 3))
    coef = 1e-2

    def loss(lg, z):
        return kl_objective(lg, targets, z_loss=z)

    (with_z, parts), g_with = jax.value_and_grad(lambda lg: loss(lg, coef), has_aux=True)(jnp.asarray(logits))
    (without, parts0), g_without = jax.value_and_grad(lambda lg: loss(lg, 0.0), has_aux=True)(jnp.asarray(logits))
    x = logits.astype(np.float64)
    lse = _lse(x)
    n = lse.size
    np.testing.assert_allclose(float(with_z) - float(without), coef * np.mean(lse**2), rtol=1e-4)
    np.testing.assert_allclose(float(parts["z_loss"]), coef * np.mean(lse**2), rtol=1e-5)
    assert float(parts["ce"]) == float(parts0["ce"])  # the CE part is the CE alone
    softmax = np.exp(x - lse[..., None])
    closed = 2 * coef * lse[..., None] * softmax / n
    np.testing.assert_allclose(np.asarray(g_with, np.float64) - np.asarray(g_without, np.float64), closed,
                               rtol=1e-3, atol=1e-7)
    assert "z_loss" not in parts0


def _layernorm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_step_telemetry_matches_a_direct_float64_computation(tiny):
    run = setup.build(tiny(sets=["model.n_layer=1"]))
    state = setup.init_state_of(run.cfg, run.parts)
    batch = run.pipeline.train_batch(0).as_dict()
    _, metrics = jax.jit(functools.partial(train_step, ctx=run.ctx))(state, batch)
    got = jax.device_get(metrics)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(state.params))
    tokens = np.asarray(batch["inputs"])
    b, t = tokens.shape
    h, d = run.cfg.model.n_head, run.cfg.model.d_model
    k = d // h
    x = p["embed"]["embedding"][tokens] + p["pos_embed"][None, :t]
    blk = p["block_0"]
    y = _layernorm(x, blk["ln_1"]["scale"], blk["ln_1"]["bias"])
    qkv = (y @ blk["qkv"]["kernel"] + blk["qkv"]["bias"]).reshape(b, t, 3 * h, k)
    q, kk = qkv[:, :, :h] * k**-0.5, qkv[:, :, h:2 * h]
    scores = np.einsum("bthk,bshk->bhts", q, kk)
    causal = np.tril(np.ones((t, t), bool))
    s = np.where(causal, scores, -np.inf)
    logp = s - _lse(s)[..., None]
    logp = np.where(causal, logp, 0.0)  # masked entries: p = 0 contributes 0 (not 0 * -inf)
    ent = -np.where(causal, np.exp(logp) * logp, 0.0).sum(-1)  # B, H, T
    ent_h = ent.mean(axis=(0, 2))
    att = got["attention"]["block_0"]
    np.testing.assert_allclose(att["logit_max"], scores[:, :, causal].max(), rtol=1e-4)
    np.testing.assert_allclose(att["entropy_mean"], ent_h.mean(), rtol=1e-4)
    np.testing.assert_allclose(att["entropy_min"], ent_h.min(), rtol=1e-4)

    logits = np.asarray(run.ctx.model.apply({"params": state.params}, batch["inputs"]), np.float64)
    lse = _lse(logits)
    out = got["output"]
    np.testing.assert_allclose(out["log_z_mean"], lse.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["log_z_absmax"], np.abs(lse).max(), rtol=1e-5)
    np.testing.assert_allclose(out["logit_max"], logits.max(), rtol=1e-5)


def test_telemetry_is_only_computed_at_telemetry_steps(tiny):
    run = setup.build(tiny(sets=["precision.telemetry=false"]))
    state = jax.eval_shape(lambda: setup.init_state_of(run.cfg, run.parts))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in run.pipeline.train_batch(0).as_dict().items()}
    _, metrics = jax.eval_shape(functools.partial(train_step, ctx=run.ctx), state, batch)
    assert "attention" not in metrics and "output" not in metrics


def _decay_update(independent: bool, lr=0.01, wd=0.1):
    opt = OptimizerConfig(lr=lr, warmup_steps=0, weight_decay=wd, grad_clip=0.0,
                          independent_weight_decay=independent)
    tx = make_optimizer(opt, total_steps=100)
    params = {"w": jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)  # zero grads: decay only
    return float(updates["w"][0, 0])


def test_independent_weight_decay_does_not_scale_with_the_peak_lr():
    # at step 0 (no warmup) lr(t) = lr: coupled decay is lr * wd * w, independent is wd * w
    np.testing.assert_allclose(_decay_update(False), -0.01 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(_decay_update(True), -0.1, rtol=1e-6)
    np.testing.assert_allclose(_decay_update(True, lr=0.3), -0.1, rtol=1e-6)


@pytest.mark.parametrize("override, expected", [
    ("model.qk_norm=bogus", "model.qk_norm: expected one of false, layernorm, rmsnorm, got 'bogus'"),
    ("model.qk_norm=true", "model.qk_norm: expected a string, got True"),
    ("model.qk_norm=1", "model.qk_norm: expected a string"),
    ("model.attn_softcap=-1", "model.attn_softcap: expected >= 0.0, got -1"),
    ("model.logit_softcap=inf", "model.logit_softcap: expected a finite number"),
    ("objective.z_loss=-1e-4", "objective.z_loss: expected >= 0.0"),
    ("objective.z_loss=abc", "objective.z_loss: expected a number, got 'abc'"),
    ("optimizer.independent_weight_decay=maybe", "optimizer.independent_weight_decay: expected true or false"),
])
def test_bad_values_of_the_new_keys_exit_2_with_one_line(capsys, tmp_path, override, expected):
    code = main(["train", "configs/quickstart.yaml", "--set", override, "--set", f"run_root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert not list(tmp_path.iterdir())


def test_qk_norm_false_may_be_written_as_a_yaml_boolean(tiny):
    assert tiny(sets=["model.qk_norm=false"]).model.qk_norm == "false"
    assert tiny(sets=["model.qk_norm=layernorm"]).model.qk_norm == "layernorm"
