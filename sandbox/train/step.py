"""The pure train step `(state, batch) -> (state, metrics)` and the eval step.

One step, in order:

1. forward in the compute dtype (parameters cast once by the policy), logits
   out of the head in fp32; the objective and d(loss)/d(logits) in fp32;
2. the fp32 logit gradient is multiplied by the loss scale and enters the
   compute dtype: this is the boundary where fp16 gradients underflow, so the
   telemetry measures it exactly here;
3. backward through the model (`jax.vjp`), which also yields the fp8 amaxes
   observed this step (as cotangents of the fp8 meta, see precision/fp8.py);
   microbatches are summed (grads) and max-reduced (amaxes);
4. gradients unscaled in fp32, checked, clipped and applied by optax (bf16
   weights under bf16_sr / bf16_kahan: through the policy's rounding stage,
   `optimizer_update`);
5. guards: a non-finite loss or gradient, or a non-finite leaf anywhere in
   the new state (parameters, optimizer moments: a finite gradient of 1e20
   squares to inf in Adam's nu, fp8 meta, loss scale), never enters the
   state. Skips are a select between old and new state (0 x NaN is NaN).
   What is skipped, failed, held or stalled is decided by the pure table in
   `train/guard.py` (overflow vs failure, spikes, nan_policy, stalls); the
   host reads its flags only at log intervals, never inside the step.

What varies between compiled variants is a field of the static StepContext
(`telemetry`, `guard`), never of the policy or the model: one step
function, one compiled variant per distinct context. The pieces the step is
made of (`microbatch`, `microbatch_key`, `kl_beta`, `microbatch_grads`,
`accumulate`, `unscaled`, `optimizer_update`) are public, so forensics'
replay runs the step's own code, not a copy of it.

Step numbering: `guard.failed_step`/`stalled_step` hold the 0-based index of
the step (`state.step` before it); the host names a step by `state.step`
after it (1-based, as metrics.jsonl rows do), so step index k is "step k+1".

Everything returned in `metrics` is an array; the loop reads it to the host
at log intervals.

Logit-growth telemetry (telemetry steps only, no host sync): per block,
`attention/block_i/{logit_max, entropy_mean, entropy_min}` sown by the model
(`model.ATTN`), and of the output logits `output/{log_z_mean, log_z_absmax,
logit_max}` (log Z = fp32 logsumexp per position). With accumulation, the
attention figures are the max over microbatches and the output ones their
mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sandbox.model import ATTN, GPT, STATS
from sandbox.objectives import kl_objective
from sandbox.precision.fp8 import FP8_STATS, combine_observed, update_fp8_meta
from sandbox.precision.loss_scale import LossScaler, all_finite, nonfinite_leaf_mask, select_tree
from sandbox.precision.lowp_optim import lost_update_frac, nu_underflow_of, recovered_update_frac
from sandbox.precision.policy import FP8_DTYPES, Policy
from sandbox.precision.recipes.module import QUANT_PROBE, QUANT_RNG
from sandbox.precision.recipes.recipe import ROLES
from sandbox.precision.recipes.telemetry import histogram, summarize
from sandbox.reference import frozen_logits, precision_drift
from sandbox.train.guard import Checks, GuardRules, decide, spike
from sandbox.train.state import TrainState


@dataclass(frozen=True)
class StepContext:
    """Everything static a step needs, bound with functools.partial before jit."""

    model: GPT
    policy: Policy
    scaler: LossScaler
    tx: optax.GradientTransformation
    schedule: Any
    seed: int
    accum_steps: int = 1
    label_smoothing: float = 0.0
    nan_policy: str = "capture"
    skip_spikes: bool = False
    spike_sigma: float = 6.0
    max_skipped_steps: int = 100  # stall after more consecutive steps without an update (0 = never)
    min_scale_overflows: int = 3  # stall after this many overflows in a row at min_scale (0 = never)
    total_steps: int = 0  # the run's last step stalls if no step applied an update (0 = no such check)
    collect_stats: bool = False  # per-block activation statistics
    telemetry: bool = True  # underflow/overflow/lost-update/fp8 statistics (precision.telemetry[_every])
    guard: bool = True  # False only to measure the guard's cost (scripts/bench_step.py): updates always applied
    naive_log_softmax: bool = False  # teaching ablation: the loss takes log(softmax) (objectives.py)
    z_loss: float = 0.0  # objective.z_loss coefficient (objectives.py)
    kl: Any = None  # reference.KLTerm when objective.kl is on; its weights come in as `frozen`
    twin: Any = None  # fp32 twin GPT for precision drift in eval_step (reference.fp32_twin)
    rounding: Any = None  # the policy's last optimizer stage (stochastic rounding, Kahan), run after `tx`

    @property
    def mutable(self) -> list[str]:
        cols = [FP8_STATS] if self.policy.fp8 is not None and self.telemetry else []
        cols += [ATTN] if self.telemetry else []
        return cols + ([STATS] if self.collect_stats else [])

    @property
    def guard_rules(self) -> GuardRules:
        return GuardRules(nan_policy=self.nan_policy, dynamic=self.scaler.mode == "dynamic",
                          max_skipped_steps=self.max_skipped_steps, min_scale_overflows=self.min_scale_overflows,
                          total_steps=self.total_steps, enabled=self.guard)


def forward(ctx: StepContext, params, fp8_meta, inputs_BT, *, key=None, mutable=(), probes=None):
    """Logits (fp32) of the model under the policy, and the sown collections.

    `key` (training) seeds dropout and, folded once more, stochastic rounding (QUANT_RNG);
    `probes` (recipe_probes) ask the recipe dots for their telemetry, as cotangents.
    """
    variables = {"params": ctx.policy.cast_to_compute(params)}
    if fp8_meta:
        variables["fp8_meta"] = fp8_meta
    if probes:
        variables[QUANT_PROBE] = probes
    rngs = {"dropout": key, QUANT_RNG: jax.random.fold_in(key, 1)} if key is not None else {}
    logits, sown = ctx.model.apply(variables, inputs_BT, deterministic=key is None, rngs=rngs,
                                   mutable=list(mutable))
    return logits, sown


def _boundary_stats(dlogits_scaled, compute_dtype) -> dict:
    """Fractions of the fp32 logit gradient that underflow to 0 / overflow to inf in the compute dtype."""
    cast = dlogits_scaled.astype(compute_dtype)
    nonzero = dlogits_scaled != 0
    finite = jnp.isfinite(dlogits_scaled)
    n_nonzero = jnp.maximum(jnp.sum(nonzero), 1)
    return {
        "underflow_frac": jnp.sum(nonzero & (cast == 0)) / n_nonzero,
        "overflow_frac": jnp.sum(finite & jnp.isinf(cast)) / jnp.maximum(jnp.sum(finite), 1),
    }


def recipe_probes(ctx: StepContext, inputs_BT) -> dict:
    """Zero telemetry probes of the model's recipe dots ({} when there are none or no telemetry)."""
    if ctx.policy.recipe is None or not ctx.telemetry:
        return {}
    shapes = jax.eval_shape(ctx.model.init, jax.random.key(0), inputs_BT).get(QUANT_PROBE, {})
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def recipe_metrics(stats) -> tuple[dict, dict]:
    """(per-tensor SNR/flushed/saturated scalars, per-tensor scale-exponent histograms) of probe cotangents."""
    scalars, hists = {}, {}
    for path, vec in jax.tree_util.tree_flatten_with_path(stats)[0]:
        keys = [getattr(k, "key", str(k)) for k in path[:-1]]  # the last is the probe's own name
        where = "/".join(k for k in keys if not k.startswith("RecipeDotGeneral_"))  # 'block_0/qkv', 'head_dot'
        for i, role in enumerate(ROLES):
            scalars.update({f"{where}/{role}_{k}": v for k, v in summarize(vec[i]).items()})
            hists[f"{where}/{role}"] = histogram(vec[i])
    return scalars, hists


def output_stats(logits_BTV) -> dict:
    """log Z (fp32 logsumexp per position): its mean and largest magnitude; and the largest logit."""
    x = jax.lax.stop_gradient(logits_BTV).astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(x, axis=-1)
    return {"log_z_mean": jnp.mean(log_z_BT), "log_z_absmax": jnp.max(jnp.abs(log_z_BT)), "logit_max": jnp.max(x)}


def microbatch_grads(ctx: StepContext, params, fp8_meta, inputs_BT, targets_BT, scale, key,
                     ref_logits=None, beta=0.0):
    """Scaled grads (param dtype), observed fp8 amaxes, loss and auxiliary metrics of one microbatch.

    With a recipe policy at telemetry steps, aux["quant_stats"] holds each recipe dot's telemetry
    sums (recipes/telemetry.py), the cotangents of its probe.
    """
    policy = ctx.policy
    probes = recipe_probes(ctx, inputs_BT)

    def fwd(p, m, pr):
        return forward(ctx, p, m, inputs_BT, key=key, mutable=ctx.mutable, probes=pr)

    logits, vjp_fn, sown = jax.vjp(fwd, params, fp8_meta, probes, has_aux=True)

    def objective(lg):  # ref_logits is a stop_gradient constant: only the model's logits get d/d
        return kl_objective(lg, targets_BT, ref_logits, beta=beta, direction=ctx.kl.direction if ctx.kl else "",
                            label_smoothing=ctx.label_smoothing, naive_log_softmax=ctx.naive_log_softmax,
                            z_loss=ctx.z_loss)

    (loss, parts), dlogits = jax.value_and_grad(objective, has_aux=True)(logits)
    dlogits_scaled = dlogits * scale.astype(dlogits.dtype)
    aux = dict(parts)
    if ctx.telemetry and jnp.dtype(policy.compute_dtype) != jnp.float32:
        aux.update(_boundary_stats(dlogits_scaled, policy.compute_dtype))
    if ctx.telemetry:
        aux["output"] = output_stats(logits)
    grads, observed, quant_stats = vjp_fn(dlogits_scaled)
    if quant_stats:
        aux["quant_stats"] = quant_stats
    sown = jax.tree.map(lambda x: x[0] if isinstance(x, tuple) else x, sown,
                        is_leaf=lambda x: isinstance(x, tuple))
    return grads, observed, loss, aux, sown


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_microbatches(batch, n: int):
    """The batch as [n, B/n, ...] arrays: microbatch i is row i (the order the step runs them)."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def microbatch(batch, n: int, i: int):
    """Microbatch `i` of `n` of a batch, as the step splits it."""
    return jax.tree.map(lambda x: x[i], split_microbatches(batch, n))


def microbatch_key(ctx: StepContext, step, i):
    """The dropout key of microbatch `i` of the step at 0-based index `step` (`state.step` before it)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(ctx.seed), step), i)


def kl_beta(ctx: StepContext, step):
    """The KL term's weight at the step (0.0 without a KL term)."""
    return ctx.kl.beta_at(step) if ctx.kl else 0.0


def accumulate(ctx: StepContext, state: TrainState, batch, frozen=None):
    """Microbatch results combined: scaled grads summed in fp32, amaxes and activation stats max-reduced.

    Returns (grads, observed, loss, aux, sown), the loss and aux averaged over microbatches.
    """
    n = ctx.accum_steps
    beta = kl_beta(ctx, state.step)

    def run(i, mb):
        ref_logits = ctx.kl.logits(frozen, mb["inputs"]) if ctx.kl else None
        return microbatch_grads(ctx, state.params, state.fp8_meta, mb["inputs"], mb["targets"],
                                state.loss_scale.scale, microbatch_key(ctx, state.step, i), ref_logits, beta)

    if n == 1:
        return run(0, batch)
    mbs = split_microbatches(batch, n)

    def body(carry, xs):
        g, o, loss, aux, sown = run(*xs)
        cg, co, closs, caux, csown = carry
        return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), cg, g), combine_observed(co, o),
                closs + loss, jax.tree.map(jnp.add, caux, aux), jax.tree.map(jnp.maximum, csown, sown)), None

    g, o, loss, aux, sown = run(0, jax.tree.map(lambda x: x[0], mbs))
    carry, _ = jax.lax.scan(body, (_to_f32(g), o, loss, aux, sown),
                            (jnp.arange(1, n), jax.tree.map(lambda x: x[1:], mbs)))
    grads, observed, loss, aux, sown = carry
    return grads, observed, loss / n, jax.tree.map(lambda x: x / n, aux), sown


def unscaled(ctx: StepContext, grads, loss_scale):
    """The accumulated scaled gradients as fp32 true gradients (unscaled, averaged over microbatches)."""
    return jax.tree.map(lambda g: g / ctx.accum_steps, ctx.scaler.unscale(grads, loss_scale))


def optimizer_update(ctx: StepContext, grads32, opt_state, params):
    """(updates, new params, new optimizer state in the old state's dtypes) from fp32 gradients.

    `updates` are the optimizer's, before any rounding stage: with `ctx.rounding` the state is
    optax.chain(tx, rounding)'s pair and the stage runs apart, so telemetry can compare the update
    with what the rounded weights kept (lost / recovered fractions). Same result as the chain.
    """
    grads = ctx.policy.cast_to_param(grads32)
    if ctx.rounding is None:
        updates, new_opt = ctx.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
    else:
        updates, inner = ctx.tx.update(grads, opt_state[0], params)
        deltas, last = ctx.rounding.update(updates, opt_state[1], params)  # w' - w: apply_updates lands on w'
        new_params, new_opt = optax.apply_updates(params, deltas), (inner, last)
    new_opt = jax.tree.map(lambda n, o: n.astype(o.dtype), new_opt, opt_state)
    return updates, new_params, new_opt


def fp8_summary(meta) -> dict:
    """Per-tensor latest amax and scale, keyed like 'block_0/qkv/input'."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(meta)[0]:
        keys = [getattr(k, "key", str(k)) for k in path]
        name = keys[-1]
        where = "/".join(keys[:-1])
        if name.endswith("_amax_history"):
            out[f"{where}/{name[:-len('_amax_history')]}_amax"] = leaf[0]
        elif name.endswith("_scale"):
            out[f"{where}/{name}"] = leaf
    return out


def guarded_tree(grads, params, opt_state, fp8_meta, loss_scale) -> dict:
    """What the guard checks, by name: the gradients and every part of the candidate new state.

    The loop names the leaves of `nonfinite_leaves` from this same structure (metrics.guard_leaf_names).
    """
    return {"grads": grads, "params": params, "opt_state": opt_state, "fp8_meta": fp8_meta,
            "loss_scale": loss_scale}


def _telemetry(ctx: StepContext, updates, new_params, params, new_opt) -> dict:
    """Update ratio and the fraction of nonzero updates rounded away, in fp32 whatever the param dtype;
    with a rounding stage, the fraction it kept that rounding to nearest would have dropped; with
    low-precision moments, the fraction of Adam's second moment that underflowed to 0."""
    ratio = optax.tree.norm(_to_f32(updates)) / jnp.maximum(optax.tree.norm(_to_f32(params)), 1e-12)
    out = {"update_ratio": ratio, "lost_update_frac": lost_update_frac(params, updates, new_params)}
    if ctx.rounding is not None:
        out["recovered_update_frac"] = recovered_update_frac(params, updates, new_params)
    if (nu_underflow := nu_underflow_of(new_opt)) is not None:
        out["nu_underflow_frac"] = nu_underflow
    return out


def train_step(state: TrainState, batch, frozen=None, *, ctx: StepContext):
    """`frozen`: the KL reference's {"params", "fp8_meta"} (not donated, not in the state), or None."""
    policy, scaler = ctx.policy, ctx.scaler
    grads, observed, loss, aux, sown = accumulate(ctx, state, batch, frozen)
    quant_stats = aux.pop("quant_stats", None)  # sums averaged over microbatches: ratios unchanged
    grads32 = unscaled(ctx, grads, state.loss_scale)

    loss_finite = jnp.isfinite(loss)
    grads_finite = all_finite(grads32)
    updates, new_params, new_opt = optimizer_update(ctx, grads32, state.opt_state, state.params)
    new_meta = state.fp8_meta
    if state.fp8_meta:
        f = policy.fp8
        new_meta = update_fp8_meta(state.fp8_meta, observed, f.amax_algo, FP8_DTYPES[f.fwd_dtype],
                                   FP8_DTYPES[f.bwd_dtype], f.margin)
    scaled = scaler.update(state.loss_scale, grads_finite)
    candidate = guarded_tree(grads32, new_params, new_opt, new_meta, scaled)
    state_finite = all_finite({k: v for k, v in candidate.items() if k != "grads"}) if ctx.guard \
        else jnp.bool_(True)
    is_spike = (spike(state.guard.loss_window, loss, ctx.spike_sigma) if ctx.skip_spikes
                else jnp.bool_(False)) & loss_finite
    checks = Checks(loss_finite=loss_finite, grads_finite=grads_finite, state_finite=state_finite,
                    spike=is_spike, at_floor=state.loss_scale.scale <= scaler.min_scale)
    d = decide(ctx.guard_rules, state.guard, checks, loss, state.step, state.opt_step)

    new_scale = select_tree(d.keep_scale, state.loss_scale, scaled)
    new_state = TrainState(
        step=state.step + 1,
        opt_step=state.opt_step + d.apply,
        params=select_tree(d.apply, new_params, state.params),
        opt_state=select_tree(d.apply, new_opt, state.opt_state),
        loss_scale=new_scale,
        fp8_meta=select_tree(d.apply, new_meta, state.fp8_meta),
        guard=d.guard,
    )

    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads32),
        "lr": ctx.schedule(state.opt_step),
        "loss_scale": state.loss_scale.scale,
        "overflow": d.overflow,
        "nonfinite": d.nonfinite,
        "spike": d.spike,
        "applied": d.apply,
        "stalled": d.stalled,
        **{k: v for k, v in aux.items() if k != "loss"},
    }
    if scaler.mode == "dynamic":  # the scale the next step uses, min_scale floor included (the overflow event)
        metrics["loss_scale_after"] = new_scale.scale
    if ctx.guard:  # which tensors were non-finite, named on the host from guarded_tree's structure
        metrics["nonfinite_leaves"] = jnp.stack(jax.tree.leaves(nonfinite_leaf_mask(candidate)))
    if ctx.telemetry:
        metrics.update(_telemetry(ctx, updates, new_params, state.params, new_opt))
    if FP8_STATS in sown:
        metrics["fp8_stats"] = sown[FP8_STATS]
    if quant_stats:
        metrics["quant"], metrics["quant_hist"] = recipe_metrics(quant_stats)
    if new_meta:
        metrics["fp8"] = fp8_summary(new_meta)
    if STATS in sown:
        metrics["activations"] = sown[STATS]
    if ATTN in sown:  # {"block_i": {"stats": {...}}} -> attention/block_i/<stat>
        metrics["attention"] = {blk: v["stats"] for blk, v in sown[ATTN].items()}
    return new_state, metrics


def eval_step(params, fp8_meta, batch, frozen=None, *, ctx: StepContext):
    """Mean cross-entropy (nats), entropy, KL to the reference and precision drift of one val batch.

    Precision drift = KL(policy forward || fp32 forward of the same weights), the fp32
    twin run without fp8 meta: what the precision policy alone does to the prediction.
    """
    logits, _ = forward(ctx, params, fp8_meta, batch["inputs"])
    ref = ctx.kl.logits(frozen, batch["inputs"]) if ctx.kl else None
    _, out = kl_objective(logits, batch["targets"], ref, direction=ctx.kl.direction if ctx.kl else "")
    out = {k: v for k, v in out.items() if k not in ("kl", "beta")}
    if ctx.twin is not None:
        twin = frozen_logits(ctx.twin, ctx.twin.policy, {"params": params}, batch["inputs"])
        out["precision_drift"] = precision_drift(logits, twin)
    return out
