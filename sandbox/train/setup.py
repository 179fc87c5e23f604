"""The one builder: a validated Config in, the run's typed components out.

Every caller that needs "the model this config trains" goes through here:
training (`build`), resume and the KL reference (`load_run_state`), the
resume check's shape comparison (`abstract_state`), sampling, replay,
lessons and benchmarks (`parts`, `build`). So a new precision option or
remedy is threaded through one function, not five.

Two levels, because not every caller needs a mesh, data or a compiled step:

* `parts(cfg)`: policy, model, loss scaler, optimizer and schedule; nothing
  allocated. Enough to build or restore a state (`init_state_of`,
  `abstract_state`, `load_run_state`) or to sample from one.
* `build(cfg)`: everything a run needs before its first step, typed (`Run`):
  the parts, the data pipeline, the static `StepContext`, the KL reference's
  weights (`frozen`), the mesh and shardings, and the jitted train/eval steps.

The KL reference is loaded here (`load_reference`), from the run directory
the config names: `sandbox.reference` describes the KL term and never reads
runs itself (it sits below the train layer).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sandbox import config as config_lib
from sandbox import sharding
from sandbox.checkpoint import Checkpointer, abstract_of
from sandbox.data import make_pipeline
from sandbox.errors import UserError
from sandbox.model import GPT
from sandbox.precision import exact
from sandbox.precision.loss_scale import LossScaler
from sandbox.precision.lowp_optim import resolve_moments, rounding_stage, with_rounding
from sandbox.precision.policy import Policy, make_policy
from sandbox.reference import fp32_twin, kl_term, resolve
from sandbox.train.state import TrainState, init_state, make_optimizer, make_schedule
from sandbox.train.step import StepContext, eval_step, train_step


@dataclass(frozen=True)
class Parts:
    """What a config's state is made of; nothing allocated."""

    policy: Policy
    model: GPT
    scaler: LossScaler
    tx: optax.GradientTransformation  # clip + AdamW, up to the update before it lands on the weights
    schedule: optax.Schedule
    rounding: optax.GradientTransformation | None = None  # the policy's last stage (bf16_sr, bf16_kahan)

    @property
    def full_tx(self) -> optax.GradientTransformation:
        """The whole optimizer (tx, then the rounding stage): the train state holds its state."""
        return with_rounding(self.tx, self.rounding)


def parts(cfg: config_lib.Config) -> Parts:
    policy = make_policy(cfg.precision)
    total = cfg.training.steps
    moments = resolve_moments(cfg.precision.moments, policy.param_dtype, policy.update_rounding)
    return Parts(policy=policy, model=GPT(cfg.model, policy, naive_softmax=cfg.precision.naive_softmax),
                 scaler=LossScaler.from_config(cfg.precision.loss_scale, policy.loss_scaling),
                 tx=make_optimizer(cfg.optimizer, total, moments), schedule=make_schedule(cfg.optimizer, total),
                 rounding=rounding_stage(policy.update_rounding, cfg.seed))


def init_state_of(cfg: config_lib.Config, p: Parts) -> TrainState:
    """The step-0 state of `cfg` (unplaced)."""
    return init_state(p.model, p.full_tx, p.scaler, cfg.seed, cfg.model.context, cfg.forensics.spike_window)


def abstract_state(cfg: config_lib.Config):
    """The train state's structure, shapes and dtypes under `cfg` (jax.eval_shape: nothing allocated)."""
    p = parts(cfg)
    return jax.eval_shape(lambda: init_state_of(cfg, p))


def load_run_state(run_dir: str | Path, step: int | None = None):
    """(config, state, step) of a run's latest intact (or given) checkpoint."""
    cfg = config_lib.load_run_config(run_dir)
    abstract = abstract_state(cfg)
    ckpt = Checkpointer(Path(run_dir), read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise UserError(f"{run_dir}: no checkpoint found")
        if step is None:  # the newest intact one; corrupt ones are skipped with a warning
            step = ckpt.newest_valid()
            if step is None:
                raise UserError(f"{run_dir}: no intact checkpoint (all of {steps} fail their checksums)")
        if step not in steps:
            raise UserError(f"{run_dir}: no checkpoint at step {step} (have {steps})")
        state, _ = ckpt.restore(step, abstract_of(abstract))
    finally:
        ckpt.close()
    return cfg, state, step


def load_reference(cfg: config_lib.Config):
    """(KLTerm, frozen weights) of cfg.objective.kl's reference run, or None without a KL term."""
    kl = cfg.objective.kl
    if not kl.reference:
        return None
    run_dir, step = resolve(kl.reference, cfg.run_root)
    ref_cfg, state, step = load_run_state(run_dir, step)
    return kl_term(cfg, ref_cfg, state, run_dir, step)


@dataclass
class Run:
    """Everything built from a config before the first step.

    The KL reference's weights are the steps' third, non-donated argument:
    `step_fn(state, batch, *run.frozen)`, `eval_fn(params, meta, batch, *run.frozen)`.
    """

    cfg: config_lib.Config
    pipeline: Any  # data pipeline, None when built with_data=False (a bundle holds its batch)
    parts: Parts
    ctx: StepContext
    mesh: Any
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any  # the placed state's structure (checkpoint restore target)
    frozen: tuple = ()  # () or ({"params", "fp8_meta"} of the KL reference,)
    init_params: Any = None  # a fine-tune's starting weights (objective.kl.init_from_reference)
    step_fn: Callable | None = None
    lean_step_fn: Callable | None = None  # step_fn without telemetry, for precision.telemetry_every > 1
    eval_fn: Callable | None = None

    @property
    def policy(self) -> Policy:
        return self.parts.policy

    def jit_step(self, ctx: StepContext) -> Callable:
        """train_step compiled for this run's shardings under `ctx` (one compiled variant per context)."""
        repl = sharding.replicated(self.mesh)
        frozen_sh = (repl,) * len(self.frozen)
        return exact.jit(functools.partial(train_step, ctx=ctx), donate_argnums=0,
                       in_shardings=(self.state_shardings, self.batch_sharding, *frozen_sh),
                       out_shardings=(self.state_shardings, repl))


def step_context(cfg: config_lib.Config, p: Parts, kl=None) -> StepContext:
    f = cfg.forensics
    return StepContext(model=p.model, policy=p.policy, scaler=p.scaler, tx=p.tx, rounding=p.rounding,
                       schedule=p.schedule, seed=cfg.seed,
                       accum_steps=cfg.optimizer.accum_steps, label_smoothing=cfg.objective.label_smoothing,
                       nan_policy=f.nan_policy, skip_spikes=f.skip_spikes, spike_sigma=f.spike_sigma,
                       collect_stats=f.activations, max_skipped_steps=f.max_skipped_steps,
                       min_scale_overflows=f.min_scale_overflows, total_steps=cfg.training.steps,
                       telemetry=cfg.precision.telemetry, naive_log_softmax=cfg.precision.naive_log_softmax,
                       z_loss=cfg.objective.z_loss, kl=kl, twin=fp32_twin(cfg.model))


def build(cfg: config_lib.Config, with_data: bool = True) -> Run:
    """with_data=False: no data pipeline (run.pipeline is None), for replaying a bundle that holds its batch."""
    pipeline = make_pipeline(cfg) if with_data else None
    p = parts(cfg)
    reference = load_reference(cfg)  # a bad reference fails here, before anything is written
    ctx = step_context(cfg, p, reference[0] if reference else None)
    # Explicit shardings (sandbox/sharding.py): the state's layout is fixed at compile time, so a
    # step never reshards its input and the donated buffers are reused in place.
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.training.batch_size, cfg.optimizer.accum_steps, mesh)
    abstract = jax.eval_shape(lambda: init_state_of(cfg, p))
    state_sh = sharding.state_shardings(abstract, mesh)
    repl = sharding.replicated(mesh)
    run = Run(cfg, pipeline, p, ctx, mesh=mesh, state_shardings=state_sh, batch_sharding=sharding.batch_sharding(mesh),
              abstract_state=abstract_of(abstract, state_sh),
              frozen=(sharding.place(reference[1], repl),) if reference else (),
              init_params=reference[1]["params"] if reference and cfg.objective.kl.init_from_reference else None)
    run.step_fn = run.jit_step(ctx)
    if ctx.telemetry and cfg.precision.telemetry_every > 1:
        # Same state in and out, fewer metrics: the loop alternates the two.
        run.lean_step_fn = run.jit_step(dataclasses.replace(ctx, telemetry=False))
    run.eval_fn = exact.jit(functools.partial(eval_step, ctx=ctx), out_shardings=repl,
                          in_shardings=(state_sh.params, state_sh.fp8_meta, run.batch_sharding,
                                        *(repl,) * len(run.frozen)))
    return run


def initial_state(run: Run) -> TrainState:
    """The step-0 state, placed on the run's mesh."""
    state = init_state_of(run.cfg, run.parts)
    if run.init_params is not None:  # a fine-tune starts at the KL reference (same architecture, checked)
        # copy=True: the state is donated each step, and must not alias the frozen reference buffers
        state = state._replace(params=jax.tree.map(lambda r, p: jnp.array(r, p.dtype, copy=True),
                                                   run.init_params, state.params))
    return sharding.place(state, run.state_shardings)


def place_batch(run: Run, batch) -> dict:
    """A host batch (Batch or dict) as global arrays split over the mesh's batch axes."""
    return sharding.place_batch(batch if isinstance(batch, dict) else batch.as_dict(), run.batch_sharding)
