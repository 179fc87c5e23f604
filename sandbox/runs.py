"""Reading finished runs back: their config and latest checkpointed state.

Used by `sandbox sample`, the KL reference and the ablation report. A run
directory is trusted only as data: the config goes through the same
validation as a user's YAML, the state through orbax with an explicit
target structure (no pickle).
"""

from __future__ import annotations

from pathlib import Path

from sandbox import config as config_lib
from sandbox.errors import UserError


def load_run_config(run_dir: str | Path) -> config_lib.Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory")
    path = run_dir / "config.yaml"
    if not path.exists():
        raise UserError(f"{run_dir}: no config.yaml (not a sandbox run directory?)")
    raw = config_lib.read_yaml(path)
    return config_lib.from_dict(raw, default_name=run_dir.name)


def load_run_state(run_dir: str | Path, step: int | None = None):
    """(config, state, step) of a run's latest (or given) checkpoint."""
    from sandbox.checkpoint import Checkpointer, abstract_of
    from sandbox.model import GPT
    from sandbox.precision.policy import make_loss_scaler, make_policy
    from sandbox.train.state import init_state, make_optimizer

    import jax

    cfg = load_run_config(run_dir)
    policy = make_policy(cfg.precision)
    model = GPT(cfg.model, policy)
    tx = make_optimizer(cfg.optimizer, cfg.training.steps)
    scaler = make_loss_scaler(policy, cfg.precision.loss_scale)
    abstract = jax.eval_shape(lambda: init_state(model, tx, scaler, cfg.seed, cfg.model.context,
                                                 cfg.forensics.spike_window))
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
