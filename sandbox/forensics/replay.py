"""Replay a failure bundle: reproduce the bad step, then name its first bad op and cause.

Design
------
1. Rebuild. The bundle's resolved config rebuilds the StepContext exactly as
   the run did (the one builder, `train.setup.build`); `jax.eval_shape(initial_state)` gives the
   state's structure without computing anything, and the bundle's arrays fill
   it leaf by leaf (paths, dtypes and shapes must all match).
2. Reproduce. The jitted `train_step` runs on the bundle's batch. It must flag
   the step non-finite (or stalled) again, with the same loss (NaN matches NaN) as the run
   recorded; the report says whether it did.
3. Localize. `localize` interprets the step's gradient computation
   (`microbatch_grads`: forward, objective, backward; the loss is returned
   first so ops the loss depends on read as forward) op by op. When the loss
   is non-finite the origin is the first non-finite value on the loss's own
   (forward) dependency path; a value that the backward pass made non-finite
   on its own is reported beside it as the "first backward overflow". With
   a finite loss the origin is the first op whose inputs were all finite and
   whose output was not. If the gradients are finite, the failure is in the
   update (non-finite new parameters or optimizer moments), so the optimizer
   update is localized next.
   Agreement. Op by op, each op rounds once; the compiled step fuses ops, and
   XLA:CPU contracts `a * b + c` into one fused multiply-add and sums in its
   own order, so the two differ in the last bits (for the shipped recipe's
   first step, 90% of the gradient entries). A failure on a knife edge can
   therefore go non-finite in one and not the other. The report compares
   what each made non-finite, by tensor name: the loss and the gradients
   (phase 'gradients'), the new parameters and moments ('update'), or
   everything ('none'), against the compiled step's guard flags, and says
   plainly when they differ: the origin is then where op-by-op evaluation
   failed, which need not be where the compiled step did. Not compared
   under gradient accumulation (the compiled step sums the microbatches; the
   localizer replays one).
4. Explain. The op's cause comes from `causes.classify`. The metrics history
   in the bundle goes through `classify_divergence`: when the gradient norm or
   loss was blowing up *and* the bad op is a plain fp32 range failure (fp32
   overflowing means values diverged, not that the format is too narrow) or
   the update itself, the headline cause is `exploding_update`. A low
   precision overflow stays a format problem even if the loss was rising.
5. Remedy. `remedies.suggest` turns the cause into config keys this run can
   change, from the run's own config and telemetry (policy, loss-scale mode
   and scale, lr, clipping, the step, the tensor that overflowed). For an
   fp16 overflow in the backward pass, the localizer runs once more at a
   256x smaller loss scale: if the overflow goes away the scale made it.
6. Logit growth. The same history is read for attention-logit growth and
   output log Z drift (`causes.logit_growth`, from the step's telemetry);
   each finding is reported and its fix (qk_norm / attn_softcap, z_loss /
   logit_softcap) is added to the remedies (`remedies.growth_remedies`).

Step numbering: a step is named by `state.step` after it, 1-based, as
metrics.jsonl, the progress bar and summary.json's `failed_step` name it
("step k" is the k-th update attempt). The bundle's meta.json keeps the
0-based index (`state.step` before the step, which seeds its RNG); every
line and JSON field replay prints is 1-based.

Works for runs compiled for several devices: the replay builds the step for a
one-device mesh, and the localizer drops placement and replays on one CPU
device. It does not need the training data (the bundle holds the batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sandbox import config as config_lib
from sandbox.errors import UserError
from sandbox.forensics.bundle import Bundle, leaf_key
from sandbox.forensics.causes import classify_divergence, logit_growth
from sandbox.forensics.localize import Localization, Origin, format_origin, localize
from sandbox.forensics.remedies import (RANGE_CAUSES, SCALE_PROBE_FACTOR, Remedy, RunFacts, growth_remedies,
                                        suggest)
from sandbox.precision import exact
from sandbox.train import step as step_lib
from sandbox.train.metrics import guard_leaf_names, leaf_paths, name_list
from sandbox.train.setup import build, initial_state


@dataclasses.dataclass
class Agreement:
    """What the compiled step and the op-by-op evaluation each made non-finite (module doc, step 3)."""

    compared: str  # 'gradients' (loss, gradients), 'update' (new params, moments), 'none' (all); '' = not
    same: bool | None
    compiled: list[str]  # non-finite tensors of the compared kind in the compiled step ('loss' first)
    op_by_op: list[str]  # the same, evaluated op by op
    note: str = ""


@dataclasses.dataclass
class ReplayReport:
    bundle: str
    failed_step: int  # the failed step, 1-based (`state.step` after it), as metrics.jsonl and summary.json
    recorded_loss: Any
    replayed_loss: float
    reproduced: bool
    phase: str  # 'gradients' | 'update' | 'none'
    origin: Origin | None
    first_backward: Origin | None  # a separate backward-pass event, when the origin is not one
    divergence: tuple[str, str, str] | None
    cause: str
    explanation: str
    remedy: str
    remedies: list[Remedy] = dataclasses.field(default_factory=list)
    growth: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # causes.logit_growth findings
    agreement: Agreement | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["origin"] = self.origin.to_dict() if self.origin else None
        d["first_backward"] = self.first_backward.to_dict() if self.first_backward else None
        d["remedies"] = [r.to_dict() for r in self.remedies]
        d["replayed_loss"] = _json_float(self.replayed_loss)
        d["divergence"] = list(self.divergence) if self.divergence else None
        if self.origin:
            d["module_path"] = self.origin.name_stack
            d["op"] = self.origin.primitive
        return d


def _json_float(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def _same(recorded, replayed: float) -> bool:
    try:
        r = float(recorded)
    except (TypeError, ValueError):
        return False
    return (math.isnan(r) and math.isnan(replayed)) or r == replayed


def rebuild_state(run, bundle: Bundle):
    """The bundle's arrays in the structure `initial_state(run)` would have."""
    abstract = jax.eval_shape(lambda: initial_state(run))
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = [leaf_key(p) for p, _ in paths]
    missing = sorted(set(keys) ^ set(bundle.arrays))
    if missing:
        raise UserError(f"{bundle.path}: state leaf {missing[0]} does not match the model its config builds")
    leaves = []
    for k, (_, a) in zip(keys, paths):
        arr = bundle.arrays[k]
        if arr.shape != a.shape or arr.dtype != a.dtype:
            raise UserError(f"{bundle.path}: {k} is {arr.dtype}{list(arr.shape)}, "
                            f"the config builds {a.dtype}{list(a.shape)}")
        leaves.append(arr)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _localize_grads(ctx, state, batch, step: int, frozen=None, scale=None) -> Localization:
    """The first microbatch's findings that has an origin (`step`: the 0-based index seeding the RNG).

    `scale`: the loss scale to replay at (default: the state's, as the step ran).
    """
    n = ctx.accum_steps
    beta = step_lib.kl_beta(ctx, state.step)
    ref_fn = exact.jit(ctx.kl.logits) if ctx.kl else None  # one compile for all microbatches
    scale = np.asarray(state.loss_scale.scale if scale is None else scale, np.float32)
    for i in range(n):  # microbatches in the order the step runs them, split and keyed by the step's code
        mb = step_lib.microbatch(batch, n, i)
        # The frozen reference is a constant of the step (no gradients): computed outside the localizer.
        ref_logits = ref_fn(frozen, mb["inputs"]) if ref_fn else None

        def grads_fn(params, fp8_meta, inputs, targets, scale, _i=i, _ref=ref_logits):
            # The loss comes first: the localizer calls the ops the first output depends on
            # (model forward, objective value) the forward pass, the rest backward.
            grads, observed, loss, *_ = step_lib.microbatch_grads(ctx, params, fp8_meta, inputs, targets, scale,
                                                                  step_lib.microbatch_key(ctx, step, _i), _ref, beta)
            return loss, grads, observed

        found = localize(grads_fn, state.params, state.fp8_meta, mb["inputs"], mb["targets"], scale)
        if found.origin is not None:
            return found
    return Localization(None, None)


def _localize_update(ctx, state, batch, step: int, frozen=None) -> Localization:
    """Finite gradients but a non-finite new state: localize the optimizer update itself.

    The gradients are the step's own (`step.accumulate` at this step's index, `step.unscaled`).
    """
    state = state._replace(step=np.int32(step))  # the index seeds the step's dropout keys

    def grads_of(s, b, f):
        grads, *_ = step_lib.accumulate(ctx, s, b, f)
        return step_lib.unscaled(ctx, grads, s.loss_scale)

    grads32 = jax.device_get(exact.jit(grads_of)(state, batch, frozen))

    def update(g, opt_state, params):
        _, new_params, new_opt = step_lib.optimizer_update(ctx, g, opt_state, params)
        return new_params, new_opt  # Adam's moments can overflow too

    return localize(update, grads32, state.opt_state, state.params)


def localize_step(ctx, state, batch, step: int, frozen=None) -> tuple[str, Localization]:
    """(phase, findings) of the step at 0-based index `step`: the gradients first, then the update."""
    found = _localize_grads(ctx, state, batch, step, frozen)
    if found.origin is not None:
        return "gradients", found
    found = _localize_update(ctx, state, batch, step, frozen)
    return ("update" if found.origin is not None else "none"), found


def _scale_sensitive(ctx, state, batch, step: int, frozen, event: Origin | None) -> bool | None:
    """Whether an fp16 backward overflow goes away at a SCALE_PROBE_FACTOR smaller loss scale (None: n/a)."""
    if event is None or event.phase != "backward" or event.dtype != "float16":
        return None
    smaller = float(state.loss_scale.scale) / SCALE_PROBE_FACTOR
    again = _localize_grads(ctx, state, batch, step, frozen, scale=smaller)
    same = [o for o in (again.origin, again.first_backward) if o is not None
            and (o.primitive, o.name_stack, o.phase) == (event.primitive, event.name_stack, event.phase)]
    return not same


def _named(prefix: str, flags) -> list[str]:
    """The names (as guard_leaf_names spells them) of the True leaves of a tree of bools."""
    return [f"{prefix}/{p}" for p, bad in zip(leaf_paths(flags), jax.tree.leaves(flags)) if bad]


def agreement(ctx, state, metrics: dict, phase: str, found: Localization) -> Agreement:
    """Compares the compiled step's non-finite tensors (its guard flags) with the op-by-op ones.

    `found.nonfinite` has the localized function's output structure: (loss, grads, observed) for
    `_localize_grads`' grads_fn, (new params, new optimizer state) for `_localize_update`'s update.
    """
    flags = metrics.get("nonfinite_leaves")
    if flags is None:
        return Agreement("", None, [], [], "not compared: the step was built without its guard")
    bad = [n for n, f in zip(guard_leaf_names(state), np.asarray(flags)) if f]
    loss_bad = [] if math.isfinite(float(metrics["loss"])) else ["loss"]
    if phase == "update":
        new_params, new_opt = found.nonfinite
        compiled = [n for n in bad if n.startswith(("params/", "opt_state/"))]
        return _compared(phase, compiled, _named("params", new_params) + _named("opt_state", new_opt))
    if phase == "gradients" and ctx.accum_steps > 1:
        return Agreement("", None, [], [], f"not compared: the compiled step sums {ctx.accum_steps} microbatches' "
                                           "gradients, the op-by-op replay evaluates one")
    if phase == "gradients":
        loss, grads, _ = found.nonfinite
        return _compared(phase, loss_bad + [n for n in bad if n.startswith("grads/")],
                         ["loss"] * bool(loss) + _named("grads", grads))
    return _compared("none", loss_bad + bad, [])  # op by op, nothing went non-finite


def _compared(phase: str, compiled: list[str], op_by_op: list[str]) -> Agreement:
    return Agreement(phase, compiled == op_by_op, compiled, op_by_op)


def _run_facts(cfg, ctx, state, step: int) -> RunFacts:
    return RunFacts(cfg=cfg, compute_dtype=jnp.dtype(ctx.policy.compute_dtype).name,
                    scaler_mode=ctx.scaler.mode, scale=float(state.loss_scale.scale), step=step + 1)


def _with_remedies(origin: Origin | None, remedies: list[Remedy]) -> Origin | None:
    """The origin with this run's remedies in place of the op's generic one."""
    if origin is None or not remedies:
        return origin
    return dataclasses.replace(origin, remedy="; ".join(str(r) for r in remedies))


def replay(bundle: Bundle) -> ReplayReport:
    # One device, whatever mesh the run had (the step is the same function), and no data
    # pipeline: the bundle holds the batch.
    cfg = config_lib.replace(bundle.cfg, mesh={"data": 1, "fsdp": 1})
    run = build(cfg, with_data=False)
    ctx = run.ctx
    host_state = rebuild_state(run, bundle)
    batch = {k: np.asarray(v) for k, v in bundle.batch.items()}
    step = bundle.failed_step  # 0-based: it seeds the step's RNG
    # A KL run's reference is loaded again from the path in its config (build() checks it).
    frozen = run.frozen[0] if run.frozen else None
    _, metrics = exact.jit(lambda s, b, f: step_lib.train_step(s, b, f, ctx=ctx))(host_state, batch, frozen)
    metrics = jax.device_get(metrics)
    loss = float(metrics["loss"])
    recorded = bundle.meta.get("recorded", {})
    stopped = bool(metrics["nonfinite"]) or bool(metrics.get("stalled", False))  # a stall writes a bundle too
    reproduced = stopped and _same(recorded.get("loss"), loss)

    phase, found = localize_step(ctx, host_state, batch, step, frozen)
    origin, backward = found.origin, found.first_backward
    agrees = agreement(ctx, host_state, metrics, phase, found)
    facts = _run_facts(bundle.cfg, ctx, host_state, step)

    history = [r for r in bundle.meta.get("history", []) if r.get("step", 0) <= step]  # before the bad step
    sensitive = _scale_sensitive(ctx, host_state, batch, step, frozen, origin)
    divergence, cause, why, fix, remedies = diagnose(dataclasses.replace(facts, scale_sensitive=sensitive),
                                                     phase, origin, history)
    if backward is not None:
        sensitive = _scale_sensitive(ctx, host_state, batch, step, frozen, backward)
        backward = _with_remedies(backward, suggest(dataclasses.replace(facts, scale_sensitive=sensitive),
                                                    backward.cause, backward, phase))
    # the failed step's own row counts here: its telemetry measured the forward that failed
    growth = logit_growth([r for r in bundle.meta.get("history", []) if r.get("step", 0) <= step + 1])
    extra = growth_remedies(bundle.cfg, [kind for kind, _ in growth])
    remedies = list(remedies) + [r for r in extra if all(r.key != o.key for o in remedies)]
    if remedies:
        fix = "; ".join(str(r) for r in remedies)
    return ReplayReport(str(bundle.path), step + 1, recorded.get("loss"), loss, reproduced, phase,
                        _with_remedies(origin, remedies), backward, divergence, cause, why, fix, remedies,
                        growth, agrees)


def diagnose(facts: RunFacts, phase: str, origin: Origin | None, history: list[dict]):
    """(divergence, cause, explanation, generic fix, remedies) from the origin and the metrics before it."""
    divergence = classify_divergence([_num(r.get("grad_norm")) for r in history],
                                     [_num(r.get("loss")) for r in history])
    fp32_range = origin is not None and origin.cause in RANGE_CAUSES and jnp.dtype(origin.dtype) == jnp.float32
    if divergence and (origin is None or phase == "update" or fp32_range):
        cause, why, fix = divergence
        if origin is not None:
            why += f" The first non-finite value then appeared at {origin.primitive} in {origin.name_stack}."
        return divergence, cause, why, fix, suggest(facts, cause, origin, phase, diverging=True)
    if origin is not None:
        return divergence, origin.cause, origin.explanation, origin.remedy, suggest(facts, origin.cause, origin, phase)
    return (divergence, "not_reproduced", "Replaying the step op by op on the CPU gave no non-finite value. Op by op "
            "each operation rounds once; the compiled step fuses operations (fused multiply-adds, its own summation "
            "order; on a GPU or TPU, its own kernels), so a failure that needs the compiled program's rounding does "
            "not show op by op.", "Replay on the device the run used.", [])


def format_agreement(a: Agreement | None) -> list[str]:
    """The report's lines on whether op-by-op evaluation failed where the compiled step did."""
    if a is None:
        return []
    if not a.compared:
        return [f"op by op vs compiled step: {a.note}"]
    what = {"gradients": "loss and gradients", "update": "new parameters and optimizer moments",
            "none": "tensors"}[a.compared]
    if a.same and not a.compiled:  # a stall: nothing went non-finite
        return [f"op by op vs compiled step: neither made any of the {what} non-finite"]
    if a.same:
        return [f"op by op vs compiled step: the same non-finite {what} ({name_list(a.compiled)})"]
    return [f"op by op vs compiled step: DIFFERENT non-finite {what}. Compiled: {name_list(a.compiled)}; "
            f"op by op: {name_list(a.op_by_op)}.",
            "  The compiled step fuses ops (fused multiply-adds, its own summation order), so it rounds "
            "differently from op-by-op evaluation; the origin below is where op-by-op evaluation first went "
            "non-finite, which need not be where the compiled step did."]


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def format_report(r: ReplayReport) -> str:
    lines = [f"bundle {r.bundle}: step {r.failed_step} (numbered as in metrics.jsonl)",
             f"reproduced: {'yes' if r.reproduced else 'NO'} (recorded loss {r.recorded_loss}, "
             f"replayed loss {r.replayed_loss})",
             f"cause: {r.cause}", f"  {r.explanation}"]
    lines += [f"  remedy: {x}" for x in (r.remedies or [r.remedy])]
    lines += format_agreement(r.agreement)
    if r.origin is not None:
        lines += ["", f"origin (in the {r.phase} computation):", format_origin(r.origin)]
    if r.first_backward is not None:
        lines += ["", "first backward overflow (a separate event: the backward pass made this value "
                      "non-finite on its own; the origin above is what the loss depends on):",
                  format_origin(r.first_backward, "First backward overflow")]
    if r.divergence and r.divergence[0] != r.cause:
        lines += ["", f"also: {r.divergence[1]}"]
    for kind, why in r.growth:
        lines += ["", f"history ({kind}): {why}"]
    return "\n".join(lines)
