"""Failure recipes on a tiny GPT: replay's attribution checked against an independent probe.

Each recipe is a config and an initial state with a few weights set so that
one named tensor leaves its format's range: the attention scores, the MLP
output projection or a LayerNorm in the forward pass (the loss is NaN); the
head in the backward pass only; gelu's derivative in the backward pass only
(a finite loss with non-finite gradients).

The probe does not use the localizer. It runs the model eagerly with Flax's
`nn.intercept_methods`, records every module call (inputs and output, in the
order calls finish), and adds a zero "tap" to every module output, so that
`jax.vjp` with respect to the taps gives each module output's cotangent (the
step's backward: cotangent `loss scale` on the mean cross-entropy, written
here with jax.nn.log_softmax). The first non-finite tensor of the forward
pass is the output of the first module call whose inputs were finite; the
first of the backward pass is the cotangent of the last module (in forward
order) whose output cotangent is non-finite. Float64 NumPy recomputations of
the overflowing quantity confirm each recipe does what it says.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sandbox import config as config_lib
from sandbox.forensics.remedies import RunFacts, suggest
from sandbox.forensics.replay import diagnose, format_report, localize_step, replay
from sandbox.train.loop import build, initial_state

FP16_MAX = 65504.0
B, T, D, V = 2, 8, 16, 16


def _config(**precision) -> config_lib.Config:
    return config_lib.from_dict({
        "name": "recipe", "seed": 0,
        "model": {"vocab_size": V, "context": T, "n_layer": 1, "n_head": 2, "d_model": D},
        "data": {"synthetic": {"alphabet": V}, "prefetch": 0},
        "training": {"steps": 20, "batch_size": B},
        "precision": precision, "mesh": {"data": 1}})


def _set(params, path: str, value):
    """A copy of `params` with the leaf at 'a/b/c' replaced."""
    head, _, rest = path.partition("/")
    out = dict(params)
    out[head] = _set(params[head], rest, value) if rest else np.asarray(value, np.float32)
    return out


@dataclasses.dataclass
class Recipe:
    cfg: config_lib.Config
    run: object
    state: object
    batch: dict


def _recipe(cfg, edits: dict) -> Recipe:
    run = build(cfg, with_data=False)
    state = jax.device_get(initial_state(run))
    rng = np.random.default_rng(0)
    params = state.params
    for path, make in edits.items():
        params = _set(params, path, make(rng, np.shape(_get(params, path))))
    batch = {k: rng.integers(0, V, (B, T)).astype(np.int32) for k in ("inputs", "targets")}
    return Recipe(cfg, run, state._replace(params=params), batch)


def _get(params, path: str):
    for k in path.split("/"):
        params = params[k]
    return params


def _normal(std):
    return lambda rng, shape: rng.standard_normal(shape) * std


def _const(v):
    return lambda rng, shape: np.full(shape, v)


RECIPES = {
    # q and k 100x too large: q.k / sqrt(8) reaches ~1e5 > 65504 (naive softmax keeps scores in fp16)
    "attention_scores": lambda: _recipe(_config(policy="fp16", naive_softmax=True),
                                        {"block_0/qkv/kernel": _normal(100.0)}),
    # fc pre-activations ~1e3 (gelu passes them), then the output projection sums 64 of ~1e3 x 1e2
    "mlp_out": lambda: _recipe(_config(policy="fp16"), {"block_0/fc/kernel": _normal(100.0),
                                                        "block_0/out/kernel": _normal(100.0)}),
    # a LayerNorm gain of 3e4 fits fp16, gain x normalized value (up to ~3.9) does not
    "layernorm": lambda: _recipe(_config(policy="fp16"), {"block_0/ln_2/scale": _const(3.0e4)}),
    # a static loss scale of 2^24: d(loss)/d(logits) x 2^24 ~ 1e6 enters fp16 at the head
    "head_backward": lambda: _recipe(_config(policy="fp16", loss_scale={"mode": "static", "init_scale": 2.0**24}),
                                     {}),
    # gelu passes pre-activations ~1e3 (its x**3 overflows and tanh absorbs it), a tiny output
    # projection keeps the loss finite, but gelu's derivative squares them: x**2 > 65504
    "gelu_backward": lambda: _recipe(_config(policy="fp16_noscale"), {"block_0/fc/kernel": _normal(100.0),
                                                                      "block_0/out/kernel": _normal(1e-3)}),
}


# --- the independent probe ------------------------------------------------------


@dataclasses.dataclass
class ProbeResult:
    calls: list  # (module path, inputs, output) in the order the calls finished
    loss: float
    first_bad_forward: str | None  # path of the first call with finite inputs and a non-finite output
    first_bad_cotangent: str | None  # path of the last module (forward order) with a non-finite output cotangent
    next_finite_cotangent: str | None  # the module after it in forward order (its output cotangent is finite)


def _path(module) -> str:
    return "/".join(module.scope.path)


def _floating(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def _finite(x) -> bool:
    return bool(np.isfinite(np.asarray(x, np.float64)).all())


def probe(r: Recipe) -> ProbeResult:
    model, policy = r.run.ctx.model, r.run.ctx.policy
    compute = jax.tree.map(lambda p: jnp.asarray(p, policy.compute_dtype), r.state.params)
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            calls.append((_path(context.module), [a for a in args if _floating(a)], out))
        return out

    with nn.intercept_methods(record):
        model.apply({"params": compute}, r.batch["inputs"])
    paths = [p for p, _, _ in calls]
    first_fwd = next((p for p, ins, out in calls if all(map(_finite, ins)) and not _finite(out)), None)

    def loss_fn(params, taps):
        def tap(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            p = _path(context.module)
            return out + taps[p] if context.method_name == "__call__" and p in taps else out

        with nn.intercept_methods(tap):
            logits = model.apply({"params": params}, r.batch["inputs"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, r.batch["targets"][..., None], -1))

    taps = {p: jnp.zeros_like(out) for p, _, out in calls}
    loss, vjp = jax.vjp(loss_fn, compute, taps)
    _, cts = vjp(jnp.asarray(r.state.loss_scale.scale, jnp.float32))
    bad = [p for p in paths if not _finite(cts[p])]
    last_bad = max(bad, key=paths.index) if bad else None
    after = paths[paths.index(last_bad) + 1] if last_bad and paths.index(last_bad) + 1 < len(paths) else None
    return ProbeResult(calls, float(loss), first_fwd, last_bad, after)


def _call(result: ProbeResult, path: str):
    return next((ins, out) for p, ins, out in result.calls if p == path)


# --- attribution ----------------------------------------------------------------


@pytest.fixture(scope="module")
def found():
    """recipe -> (recipe, probe result, (phase, Localization) from replay's localizer)."""
    out = {}
    for name, make in RECIPES.items():
        r = make()
        out[name] = (r, probe(r), localize_step(r.run.ctx, r.state, r.batch, 0))
    return out


def test_attention_score_overflow_is_the_forward_origin(found):
    r, pr, (phase, loc) = found["attention_scores"]
    # Probe: qkv's output is finite, the block's output is not, and no module inside it failed first:
    # the first bad value is made inline, in the block's attention. Float64 scores from qkv's output:
    assert not np.isfinite(pr.loss) and pr.first_bad_forward == "block_0"
    _, qkv = _call(pr, "block_0/qkv")
    q, k, _ = np.split(np.asarray(qkv, np.float64).reshape(B, T, 6, D // 2), 3, axis=2)
    scores = np.einsum("bthk,bshk->bhts", q * (D // 2) ** -0.5, k)
    assert np.abs(scores).max() > FP16_MAX
    o = loc.origin
    assert (phase, o.phase, o.primitive) == ("gradients", "forward", "dot_general")
    assert o.name_stack.startswith("GPT/block_0/attention")  # (jnp.einsum may add its spec to the path)
    assert o.shape == (B, 2, T, T) and o.dtype == "float16" and o.cause == "overflow"  # the scores


def test_mlp_output_overflow_is_the_origin_and_gelu_backward_is_separate(found):
    r, pr, (phase, loc) = found["mlp_out"]
    assert not np.isfinite(pr.loss) and pr.first_bad_forward == "block_0/out"
    o = loc.origin
    assert (o.phase, o.primitive, o.cause, o.dtype) == ("forward", "dot_general", "overflow", "float16")
    assert o.name_stack == "GPT/block_0/mlp/out"
    # The separate backward event: gelu's derivative squares the fc pre-activations (float64 check).
    (fc_in,), fc_out = _call(pr, "block_0/fc")
    assert (np.asarray(fc_out, np.float64) ** 2).max() > FP16_MAX
    b = loc.first_backward
    assert (b.phase, b.primitive, b.name_stack, b.cause) == ("backward", "integer_pow", "GPT/block_0/mlp",
                                                             "overflow")
    assert b.op_index < o.op_index  # earlier in execution order, and still not the origin


def test_layernorm_overflow_is_the_forward_origin(found):
    r, pr, (phase, loc) = found["layernorm"]
    assert not np.isfinite(pr.loss) and pr.first_bad_forward == "block_0/ln_2"
    (x,), _ = _call(pr, "block_0/ln_2")
    x = np.asarray(x, np.float64)
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    assert (np.abs(xhat) * 3.0e4).max() > FP16_MAX
    o = loc.origin
    assert o.phase == "forward" and o.name_stack == "GPT/block_0/mlp/ln_2" and o.dtype == "float16"


def test_head_backward_only_overflow(found):
    r, pr, (phase, loc) = found["head_backward"]
    # Probe: a finite loss; the logits' cotangent is finite, ln_f's output cotangent is not: the head.
    assert np.isfinite(pr.loss) and pr.first_bad_forward is None
    assert (pr.first_bad_cotangent, pr.next_finite_cotangent) == ("ln_f", "")  # "" = GPT itself (the logits)
    o = loc.origin
    assert o.phase == "backward" and o.name_stack == "GPT/head" and o.dtype == "float16"
    assert loc.first_backward is None  # the origin is the backward event itself


def test_finite_loss_with_nonfinite_gradients(found):
    r, pr, (phase, loc) = found["gelu_backward"]
    assert np.isfinite(pr.loss) and pr.first_bad_forward is None
    # The last module with a bad output cotangent is fc; out's (after gelu) is finite: gelu's derivative.
    assert (pr.first_bad_cotangent, pr.next_finite_cotangent) == ("block_0/fc", "block_0/out")
    o = loc.origin
    assert (o.phase, o.primitive, o.name_stack) == ("backward", "integer_pow", "GPT/block_0/mlp")
    assert loc.first_backward is None


# --- remedies -------------------------------------------------------------------


def _facts(r: Recipe, step: int = 1, sensitive=None) -> RunFacts:
    return RunFacts(r.cfg, jnp.dtype(r.run.ctx.policy.compute_dtype).name, r.run.ctx.scaler.mode,
                    float(r.state.loss_scale.scale), step, sensitive)


def _keys(remedies) -> dict:
    return {x.key: x.value for x in remedies}


def test_dynamic_scaler_run_is_never_told_to_use_dynamic_scaling(found):
    for name in ("mlp_out", "layernorm", "attention_scores"):
        r, _, (phase, loc) = found[name]
        assert r.run.ctx.scaler.mode == "dynamic"
        for event in (loc.origin, loc.first_backward):
            if event is None:
                continue
            for sensitive in (None, True, False):
                rem = suggest(_facts(r, sensitive=sensitive), event.cause, event, phase)
                assert "precision.loss_scale.mode" not in _keys(rem), (name, rem)
                assert not any("use dynamic loss scaling" in str(x) for x in rem)


def test_forward_fp16_overflow_suggests_bf16_not_scaling(found):
    r, _, (phase, loc) = found["mlp_out"]
    rem = _keys(suggest(_facts(r), loc.origin.cause, loc.origin, phase))
    assert rem["precision.policy"] == "bf16" and rem["model.init_std"] == pytest.approx(0.002)


def test_naive_softmax_recipe_suggests_turning_the_ablation_off(found):
    r, _, (phase, loc) = found["attention_scores"]
    # the scores themselves overflow (dot_general): the format, not the softmax, is the problem
    assert _keys(suggest(_facts(r), loc.origin.cause, loc.origin, phase))["precision.policy"] == "bf16"


def test_no_scaler_fp16_backward_overflow_suggests_dynamic_scaling(found):
    r, _, (phase, loc) = found["head_backward"]
    cfg = config_lib.replace(r.cfg, precision={"policy": "fp16_noscale", "loss_scale": {"mode": "auto"}})
    facts = dataclasses.replace(_facts(r, sensitive=True), cfg=cfg, scaler_mode="none", scale=1.0)
    rem = suggest(facts, loc.origin.cause, loc.origin, phase)
    assert _keys(rem)["precision.loss_scale.mode"] == "dynamic"
    assert any("use dynamic loss scaling" in str(x) for x in rem)
    assert _keys(rem)["precision.loss_scale.min_scale"] == 2.0**-8  # it overflowed at 1: let it go lower


def test_static_scale_overflow_suggests_a_smaller_scale(found):
    r, _, (phase, loc) = found["head_backward"]
    rem = _keys(suggest(_facts(r, sensitive=True), loc.origin.cause, loc.origin, phase))
    assert rem["precision.loss_scale.init_scale"] == 2.0**16 and rem["precision.loss_scale.mode"] == "dynamic"


def test_scale_insensitive_backward_overflow_suggests_bf16(found):
    r, _, (phase, loc) = found["gelu_backward"]
    rem = _keys(suggest(_facts(r, sensitive=False), loc.origin.cause, loc.origin, phase))
    assert rem == {"precision.policy": "bf16", "model.init_std": pytest.approx(0.002)}


def test_lr_divergence_suggests_lower_lr_and_clipping_when_off():
    cfg = config_lib.replace(_config(policy="fp32"), optimizer={"lr": 0.5, "grad_clip": 0.0, "warmup_steps": 0})
    r = _recipe(cfg, {"block_0/fc/kernel": _normal(1e20), "block_0/out/kernel": _normal(1e20)})
    phase, loc = localize_step(r.run.ctx, r.state, r.batch, 5)
    history = [{"step": i + 1, "loss": 2.0, "grad_norm": g} for i, g in enumerate([1.0, 1.1, 0.9, 1.0, 80.0])]
    divergence, cause, why, _, rem = diagnose(_facts(r, step=6), phase, loc.origin, history)
    assert cause == "exploding_update" and loc.origin.dtype == "float32"
    assert _keys(rem) == {"optimizer.lr": 0.05, "optimizer.grad_clip": 1.0, "optimizer.warmup_steps": 2}
    clipped = dataclasses.replace(_facts(r, step=6), cfg=config_lib.replace(cfg, optimizer={"grad_clip": 1.0}))
    assert "optimizer.grad_clip" not in _keys(diagnose(clipped, phase, loc.origin, history)[4])


# --- end to end: the fp16 MLP-output recipe through `sandbox replay` ------


@pytest.mark.slow  # compiles the whole train step (~15 s on an idle 2-core CPU)
def test_replay_of_mlp_output_recipe_names_forward_origin_and_labels_backward(found, tmp_path):
    from sandbox.forensics.bundle import load_bundle, save_bundle

    r, _, _ = found["mlp_out"]
    path = save_bundle(tmp_path / "failure", r.cfg, r.state, r.batch, 0,
                       [{"step": 1, "loss": float("nan"), "grad_norm": float("nan"), "nonfinite": True}])
    report = replay(load_bundle(path))
    assert report.reproduced and report.failed_step == 1  # 1-based, as summary.json and metrics.jsonl
    assert (report.origin.primitive, report.origin.phase) == ("dot_general", "forward")
    assert report.first_backward.primitive == "integer_pow"
    text = format_report(report)
    assert text.startswith(f"bundle {path}: step 1 ") and "0-based" not in text
    assert "First backward overflow: overflow (backward pass)" in text
    assert "use dynamic loss scaling" not in text and "use dynamic loss scaling" not in str(report.to_dict())
    d = report.to_dict()
    assert d["failed_step"] == 1 and d["first_backward"]["op_index"] < d["origin"]["op_index"]
    assert d["remedies"][0] == {"key": "precision.policy", "now": "fp16", "value": "bf16",
                                "why": d["remedies"][0]["why"]}
