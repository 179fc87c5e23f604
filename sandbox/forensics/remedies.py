"""Remedies that fit the run: which config key to change, and to what.

Design
------
`causes.classify` sees one op and its values, so its remedy is generic ("keep
this op in fp32, use dynamic loss scaling"). What a user should change
depends on the run: "use dynamic loss scaling" is useless advice to a run
that already has it, and "lower the learning rate" means nothing at step 1,
when the weights are still the initial ones. `suggest` reads the run's own
facts from the bundle (`RunFacts`: the resolved config and policy, the loss
scaler's mode and the scale the failed step used, the step number) and the
localized origin (its dtype, phase, op and module path) and returns
`Remedy`s, each naming a config key as `--set` takes it, its value in this
run, a value to try, and why.

The rules, in order (a remedy already given is not repeated):

  teaching ablation   exp overflow in a naive softmax -> precision.naive_softmax: false;
                      log of an underflowed softmax with naive_log_softmax on -> false
  diverging run       the history shows an exploding update -> lower optimizer.lr,
                      turn optimizer.grad_clip on if it is off, warm up if there is none
  fp8 overflow        -> a larger precision.fp8.margin (amax_algo max when most_recent)
  fp16 overflow       forward: loss scaling never touches the forward pass ->
                      precision.policy bf16 (same width, fp32's range);
                      backward and the scale made it (it goes away when the step is
                      replayed at a smaller scale, `scale_sensitive`): no scaler ->
                      precision.loss_scale.mode dynamic (and a min_scale below the
                      scale that fitted, if it is under the floor); static -> a smaller
                      init_scale or dynamic; dynamic -> nothing about the scale (the
                      scaler already backs off);
                      backward and the values overflow at any scale -> bf16
  values too large    at step 1 -> a smaller model.init_std; later (fp32 range,
                      an update, values grown by training) -> lower optimizer.lr and
                      clip if clipping is off
  anything else       -> lower optimizer.lr / clip (the last resort: an earlier update
                      made the values that failed)

`growth_remedies` adds the fixes of Wortsman et al. 2023 / Gemma 2 when the recorded
history shows logit growth (`causes.logit_growth`): attention logits growing ->
model.qk_norm layernorm, then model.attn_softcap; output log Z drifting ->
objective.z_loss 1e-4, then model.logit_softcap. A knob already on is not suggested.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from sandbox import config as config_lib
from sandbox.forensics.localize import Origin

# Causes that mean "a value went past the format's range".
RANGE_CAUSES = frozenset({"overflow", "exp_overflow", "invalid_operation", "nonfinite_propagated",
                          "inf_minus_inf", "inf_times_zero"})
LR_FACTOR = 10.0  # suggested learning rate = lr / this
STATIC_SCALE_FACTOR = 2.0**8  # suggested static scale = init_scale / this
SCALE_PROBE_FACTOR = 2.0**8  # replay re-runs a backward fp16 overflow at scale / this (`scale_sensitive`)
INIT_STD_FACTOR = 10.0  # suggested init_std = init_std / this
SUGGESTED_CLIP = 1.0  # global-norm clip suggested when clipping is off
SUGGESTED_WARMUP = 100  # warmup steps suggested when there is none
SUGGESTED_Z_LOSS = 1e-4  # PaLM's z-loss coefficient
SUGGESTED_ATTN_SOFTCAP = 50.0  # Gemma 2's attention-score cap
SUGGESTED_LOGIT_SOFTCAP = 30.0  # Gemma 2's final-logit cap


@dataclasses.dataclass(frozen=True)
class Remedy:
    key: str  # config key as `--set` takes it, e.g. 'optimizer.lr'
    now: Any  # its value in this run
    value: Any  # the value to try
    why: str

    def __str__(self) -> str:
        return f"set {self.key}={_show(self.value)} (now {_show(self.now)}): {self.why}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What the bundle says about the run, beyond the op."""

    cfg: config_lib.Config
    compute_dtype: str  # the policy's compute dtype, e.g. 'float16'
    scaler_mode: str  # resolved loss scaling: 'dynamic' | 'static' | 'none'
    scale: float  # the loss scale the failed step used
    step: int  # the failed step, 1-based
    scale_sensitive: bool | None = None  # a backward overflow vanished at a smaller scale (None: not tried)


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def suggest(facts: RunFacts, cause: str, origin: Origin | None, phase: str,
            diverging: bool = False) -> list[Remedy]:
    """The remedies for this run, most specific first (see the module notes); never empty."""
    out: list[Remedy] = []
    for rule in (_ablation, _divergence, _fp8, _fp16, _too_large):
        for r in rule(facts, cause, origin, phase, diverging):
            if all(r.key != o.key for o in out):
                out.append(r)
    return out or _lower_lr(facts, "an earlier update made the values that failed")


def _ablation(facts, cause, origin, phase, diverging) -> list[Remedy]:
    p = facts.cfg.precision
    where = origin.name_stack if origin else ""
    if cause == "exp_overflow" and p.naive_softmax and "softmax" in where:
        return [Remedy("precision.naive_softmax", True, False,
                       "the stable softmax subtracts the row max before exp, so exp never overflows")]
    if cause == "log_of_zero" and p.naive_log_softmax:
        return [Remedy("precision.naive_log_softmax", True, False,
                       "log_softmax forms log-probabilities without log(0) of an underflowed softmax")]
    return []


def _divergence(facts, cause, origin, phase, diverging) -> list[Remedy]:
    if not (diverging or cause == "exploding_update"):
        return []
    return _lower_lr(facts, "the gradient norm or the loss was growing before the failure") + _warmup(facts)


def _fp8(facts, cause, origin, phase, diverging) -> list[Remedy]:
    if origin is None or "float8" not in origin.dtype or cause not in RANGE_CAUSES:
        return []
    f = facts.cfg.precision.fp8
    out = [Remedy("precision.fp8.margin", f.margin, f.margin + 2,
                  f"scale fp8 tensors 2^{f.margin + 2} below the amax history's max, leaving headroom "
                  f"for values that grow between steps ({origin.dtype} overflowed)")]
    if f.amax_algo == "most_recent":
        out.append(Remedy("precision.fp8.amax_algo", "most_recent", "max",
                          "the history's max reacts to a past peak, the most recent amax does not"))
    return out


def _fp16(facts, cause, origin, phase, diverging) -> list[Remedy]:
    if origin is None or origin.dtype != "float16" or cause not in RANGE_CAUSES:
        return []
    ls = facts.cfg.precision.loss_scale
    bf16 = Remedy("precision.policy", facts.cfg.precision.policy, "bf16",
                  "bf16 has the same width as fp16 and fp32's range (max 3.4e38; fp16 stops at 65504)")
    if origin.phase == "forward":
        return [Remedy(bf16.key, bf16.now, bf16.value,
                       f"{bf16.why}; this overflow is in the forward pass, which loss scaling never touches")]
    if facts.scale_sensitive is False or facts.scaler_mode == "dynamic":
        at = "at any loss scale" if facts.scale_sensitive is False else \
            f"although the dynamic scaler already backs off (scale {facts.scale:g} at this step)"
        return [Remedy(bf16.key, bf16.now, bf16.value, f"{bf16.why}; these gradients overflow fp16 {at}")]
    if facts.scaler_mode == "static":
        return [Remedy("precision.loss_scale.init_scale", ls.init_scale, ls.init_scale / STATIC_SCALE_FACTOR,
                       f"the static scale {facts.scale:g} multiplies every gradient past fp16's max"),
                Remedy("precision.loss_scale.mode", ls.mode, "dynamic",
                       "a dynamic scale halves on each overflow (the step is skipped) instead of failing")]
    out = [Remedy("precision.loss_scale.mode", ls.mode, "dynamic",
                  "this run has no loss scaling; use dynamic loss scaling: an overflowing step is skipped "
                  "and the scale halves instead of the run failing")]
    if facts.scale_sensitive and facts.scale / SCALE_PROBE_FACTOR < ls.min_scale:
        out.append(Remedy("precision.loss_scale.min_scale", ls.min_scale, facts.scale / SCALE_PROBE_FACTOR,
                          f"these gradients overflow at scale {facts.scale:g} and fit at "
                          f"{facts.scale / SCALE_PROBE_FACTOR:g}: let the scale go that low"))
    return out


def _too_large(facts, cause, origin, phase, diverging) -> list[Remedy]:
    """Values beyond the format's range that no precision setting explains: the weights are too large."""
    if origin is None or (cause not in RANGE_CAUSES and phase != "update"):
        return []
    if facts.step == 1 and phase != "update":
        std = facts.cfg.model.init_std
        return [Remedy("model.init_std", std, std / INIT_STD_FACTOR,
                       "the failed step is the first, so the weights are the initial ones")]
    if phase == "update" or jnp.dtype(origin.dtype) == jnp.float32:
        return _lower_lr(facts, "values grew past fp32's range: the updates are too large")
    return []


def _lower_lr(facts, why: str) -> list[Remedy]:
    opt = facts.cfg.optimizer
    out = [Remedy("optimizer.lr", opt.lr, opt.lr / LR_FACTOR, why)]
    if opt.grad_clip == 0:
        out.append(Remedy("optimizer.grad_clip", 0.0, SUGGESTED_CLIP,
                          "gradient clipping is off; clipping the global norm bounds each update"))
    return out


def _warmup(facts) -> list[Remedy]:
    opt = facts.cfg.optimizer
    if opt.warmup_steps:
        return []
    steps = min(SUGGESTED_WARMUP, max(1, facts.cfg.training.steps // 10))
    return [Remedy("optimizer.warmup_steps", 0, steps, "no warmup: the first updates run at the full lr")]


def growth_remedies(cfg: config_lib.Config, kinds) -> list[Remedy]:
    """Remedies for the logit-growth findings `kinds` ('attention_logit_growth', 'output_logit_divergence')."""
    m, out = cfg.model, []
    if "attention_logit_growth" in kinds:
        if m.qk_norm == "false":
            out.append(Remedy("model.qk_norm", "false", "layernorm",
                              "attention logits were growing: normalised q and k bound every score by "
                              "sqrt(head width) times the norms' scales (qk-layernorm)"))
        if not m.attn_softcap:
            out.append(Remedy("model.attn_softcap", 0.0, SUGGESTED_ATTN_SOFTCAP,
                              "or cap the scores smoothly: cap*tanh(s/cap) keeps them below the cap"))
    if "output_logit_divergence" in kinds:
        if not cfg.objective.z_loss:
            out.append(Remedy("objective.z_loss", 0.0, SUGGESTED_Z_LOSS,
                              "log Z of the output logits was drifting: z-loss penalises (log Z)^2 and "
                              "holds it near 0"))
        if not m.logit_softcap:
            out.append(Remedy("model.logit_softcap", 0.0, SUGGESTED_LOGIT_SOFTCAP,
                              "or cap the output logits: cap*tanh(z/cap)"))
    return out
