"""Frozen reference models: an earlier run for the KL term, and the fp32 twin.

Two things in the sandbox compare the model's predictive distribution with
another model's on the same tokens, and both are "the same network, other
weights or other numerics, no gradients":

* the KL-to-reference objective (`objective.kl`): loss = CE + beta * KL, with
  the reference a checkpoint of an earlier run. `KLTerm` is the static half
  of it (the reference GPT with its own precision policy, beta and its
  schedule, the direction) and goes into the step's static context; the
  reference's weights travel as the step's third argument `frozen`
  ({"params", "fp8_meta"}), never as static context (jit would bake them
  into the HLO as constants) and never in the TrainState (checkpoints would
  carry a second model). The reference forward runs inside the same jitted
  step under `stop_gradient`.
* precision drift: KL(policy forward || fp32 forward of the same weights) on
  a validation batch. The "reference" is the model itself evaluated by its
  fp32 twin (same `ModelConfig`, the fp32 policy, no fp8 meta), so the
  number says how much the precision policy alone moves the output
  distribution: 0 for fp32, small for bf16, larger for fp8.

A reference must be the same architecture and vocabulary as the student
(every `ModelConfig` field but dropout and init); anything else is refused
with one line before training starts, not as a shape error inside jit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from sandbox import config as config_lib
from sandbox import infotheory
from sandbox.config import Config, ModelConfig, PrecisionConfig
from sandbox.errors import UserError
from sandbox.model import GPT
from sandbox.precision.policy import PRESETS, Policy, make_policy

ARCH_FIELDS = ("vocab_size", "context", "n_layer", "n_head", "d_model", "mlp_ratio", "positions")
FP32 = PRESETS["fp32"]


@dataclass(frozen=True)
class KLTerm:
    """Static description of the KL-to-reference term (lives in the StepContext)."""

    model: GPT  # the reference network under its own policy
    policy: Policy
    beta: float
    beta_end: float  # < 0: constant beta
    direction: str  # reverse = KL(model || reference), forward = KL(reference || model)
    total_steps: int

    def beta_at(self, step) -> jax.Array:
        """beta, moved linearly to beta_end over training when beta_end >= 0."""
        if self.beta_end < 0:
            return jnp.float32(self.beta)
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.total_steps, 1), 0.0, 1.0)
        return jnp.float32(self.beta) + (self.beta_end - self.beta) * frac

    def logits(self, frozen, inputs_BT) -> jax.Array:
        """fp32 reference logits, no gradients, no dropout."""
        return frozen_logits(self.model, self.policy, frozen, inputs_BT)


def frozen_logits(model: GPT, policy: Policy, frozen, inputs_BT) -> jax.Array:
    """Logits of a frozen model: {"params", "fp8_meta"} cast by its own policy, stop_gradient."""
    frozen = jax.lax.stop_gradient(frozen)
    variables = {"params": policy.cast_to_compute(frozen["params"])}
    if frozen.get("fp8_meta"):
        variables["fp8_meta"] = frozen["fp8_meta"]
    return model.apply(variables, inputs_BT, deterministic=True).astype(jnp.float32)


def precision_drift(policy_logits_BTV, twin_logits_BTV) -> jax.Array:
    """Mean per-token KL(policy forward || fp32 forward) in nats."""
    return jnp.mean(infotheory.kl_divergence(policy_logits_BTV, twin_logits_BTV))


def fp32_twin(model_cfg: ModelConfig) -> GPT:
    """The same network evaluated in fp32 (no fp8 meta): the drift baseline."""
    return GPT(model_cfg, FP32)


# ---------------------------------------------------------------- loading


def resolve(spec: str, run_root: str = "runs") -> tuple[Path, int | None]:
    """(run_dir, step) of 'runs/<name>', '<name>' (under run_root) or '<run>/checkpoints/<step>'."""
    path = Path(spec).expanduser()
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    if not path.exists() and (Path(run_root) / spec).is_dir():
        return Path(run_root) / spec, None
    if not path.is_dir():
        raise UserError(f"objective.kl.reference: {spec}: no such run directory or checkpoint")
    return path, None


def check_compatible(student: ModelConfig, reference: ModelConfig, where: str) -> None:
    bad = [f"{f} {getattr(reference, f)} != {getattr(student, f)}" for f in ARCH_FIELDS
           if getattr(reference, f) != getattr(student, f)]
    if bad:
        raise UserError(f"objective.kl.reference: {where} does not match the model "
                        f"(reference vs model: {', '.join(bad)})")


def reference_policy(kl_policy: str, ref_precision: PrecisionConfig) -> Policy:
    """kl.policy as a Policy; fp8 settings come from the reference run (its meta's shapes)."""
    return make_policy(config_lib.replace(ref_precision, policy=kl_policy))


def kl_term(cfg: Config, ref_cfg: Config, state, run_dir: Path, step: int) -> tuple[KLTerm, dict]:
    """(KLTerm, frozen) for cfg.objective.kl from the reference run's config and restored state.

    The caller loads the run (`train.setup.load_reference`): this module describes the term and
    never reads run directories, so it sits below the train layer. `run_dir`/`step` name it in errors.
    """
    kl = cfg.objective.kl
    check_compatible(cfg.model, ref_cfg.model, f"{run_dir} (step {step})")
    policy = reference_policy(kl.policy, ref_cfg.precision)
    meta = state.fp8_meta if policy.fp8 is not None else {}
    if policy.fp8 is not None and not meta:
        raise UserError(f"objective.kl.policy: {kl.policy!r} needs fp8 scales, but {run_dir} was not "
                        f"trained under fp8 (use a non-fp8 reference policy)")
    model = GPT(ref_cfg.model, policy)
    term = KLTerm(model, policy, kl.beta, kl.beta_end, kl.direction, cfg.training.steps)
    return term, {"params": state.params, "fp8_meta": meta}


def describe(cfg: Config) -> str:
    kl = cfg.objective.kl
    beta = f"{kl.beta:g}" + (f"->{kl.beta_end:g}" if kl.beta_end >= 0 else "")
    return f"KL({'model || ref' if kl.direction == 'reverse' else 'ref || model'}) beta {beta}, " \
           f"reference {kl.reference} ({kl.policy})"

