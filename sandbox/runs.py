"""Reading runs back: their config and latest checkpointed state, and what a resume may change.

Used by the ablation report and `--resume`. A run's config is read by
`config.load_run_config`, its state restored by the one builder
(`train.setup.load_run_state`); this module sits below the train layer, so
the shape comparison gets the builder's `abstract_state` from its caller. A run directory is trusted only as data: the config goes through
the same validation as a user's YAML, the state through orbax with an
explicit target structure (no pickle).

Resuming with a changed config (`check_resume`): the new config is compared,
key by key, with the config the newest checkpoint was saved with (its JSON
record; `config.yaml` when no record is readable). Only `RESUME_MAY_CHANGE`
may differ: how long the run goes on, how often it evaluates, logs and
saves, where logs and caches go, and the device mesh. None of them touches
the saved state. The mesh only places it: orbax restores a checkpoint onto
any mesh, so a run moves to fewer or more devices by resuming; but a step's
sums over devices may then add in another order, so a note says the resumed
steps match the old mesh's to rounding, not bit for bit.
Any other change (a policy, a learning rate, a model shape) is refused with
the list of changed keys, before anything in the run directory changes; a
change of shapes says so, instead of orbax's tree-mismatch message at
restore time. `training.steps` is allowed, but the learning-rate schedule
spans it (unless `optimizer.decay_steps` fixes it), so the resumed steps
follow a different schedule: a note says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from typing import Any, Callable

from sandbox import config as config_lib
from sandbox.errors import UserError
from sandbox.rundir import atomic_write

# config -> the train state's abstract structure (train.setup.abstract_state): passed in by the loop,
# so this module stays below the train layer
StateShapes = Callable[[config_lib.Config], Any]

# Keys a resume may change (a trailing "." covers a section); the error message lists them.
RESUME_MAY_CHANGE = ("training.steps", "training.eval_every", "training.eval_batches", "training.log_every",
                     "checkpoint.every", "checkpoint.keep", "logging.", "data.prefetch", "data.cache_dir", "mesh.")
# Keys that name the directory, not the run (`runs` and `/abs/runs` are the same run): never compared.
IDENTITY_KEYS = ("name", "run_root")
SHOWN_VALUE_CHARS = 40
SHOWN_SHAPE_CHANGES = 2


# ----------------------------------------------------------------- resuming with a changed config


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: config_lib.Config, new: config_lib.Config) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every key that differs, identity keys left out."""
    a, b = _flat(config_lib.to_dict(old)), _flat(config_lib.to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b])
            if k not in IDENTITY_KEYS and a.get(k) != b.get(k)}


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS] + "..."


def _checkpoint_records(run_dir: Path) -> list[Path]:
    """Record files of the step directories, newest first; links are not followed."""
    root = Path(run_dir) / "checkpoints"
    if root.is_symlink() or not root.is_dir():
        return []
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and not p.is_symlink()), reverse=True)
    return [root / str(step) / "record" / "metadata" for step in steps]


def previous_config(run_dir: Path) -> tuple[config_lib.Config | None, str]:
    """The config the newest checkpoint was saved with, else config.yaml's; and where it came from."""
    for record in _checkpoint_records(run_dir):
        try:
            raw = json.loads(record.read_text(encoding="utf-8"))["config"]
            return config_lib.from_dict(raw, default_name=Path(run_dir).name), f"checkpoint {record.parent.parent.name}"
        except (OSError, ValueError, KeyError, TypeError, UserError):
            continue  # an unreadable record: the state's own checksum check deals with the step
    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        return config_lib.from_dict(config_lib.read_yaml(path), default_name=Path(run_dir).name), "config.yaml"
    return None, ""


def _shape_changes(old: config_lib.Config, new: config_lib.Config, state_shapes: StateShapes) -> list[str]:
    """'path: f32[256,32] -> f32[256,64]' for each state leaf whose shape or dtype differs (or exists in one only)."""
    def leaves(cfg):
        flat, _ = jax.tree_util.tree_flatten_with_path(state_shapes(cfg))
        return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
                f"{x.dtype}{list(x.shape)}" for path, x in flat}

    try:
        a, b = leaves(old), leaves(new)
    except UserError:
        return []
    return [f"{k}: {a.get(k, 'absent')} -> {b.get(k, 'absent')}" for k in dict.fromkeys([*a, *b])
            if a.get(k) != b.get(k)]


def check_resume(run_dir: Path, cfg: config_lib.Config, state_shapes: StateShapes | None = None) -> list[str]:
    """Refuses a resume whose config changes more than RESUME_MAY_CHANGE; returns notes on allowed changes.

    `state_shapes` (train.setup.abstract_state): lets the refusal name the arrays whose shapes change.
    """
    old, source = previous_config(run_dir)
    if old is None:
        return []
    changes = config_changes(old, cfg)
    refused = {k: v for k, v in changes.items() if not _may_change(k)}
    if refused:
        listed = ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in refused.items())
        shapes = _shape_changes(old, cfg, state_shapes) if state_shapes else []
        why = ""
        if shapes:
            why = (f"; the saved state has other shapes or dtypes under the new config ({len(shapes)} arrays, e.g. "
                   f"{'; '.join(shapes[:SHOWN_SHAPE_CHANGES])}), so it cannot be loaded into it")
        raise UserError(f"{run_dir}: --resume with a changed config (vs {source}): {listed}{why}; a resume may "
                        f"change only {', '.join(k + ('*' if k.endswith('.') else '') for k in RESUME_MAY_CHANGE)}"
                        f"; start a new run (another --name) for anything else")
    notes = []
    if changes:
        notes.append("resuming with changed " + ", ".join(f"{k} {_shown(a)} -> {_shown(b)}"
                                                           for k, (a, b) in changes.items()))
    if any(k.startswith("mesh.") for k in changes):
        notes.append("resuming on another mesh: the checkpoint is resharded onto it, and the steps' sums over "
                     "devices may add in another order, so the run goes on as it would have on the old mesh "
                     "to rounding, not bit for bit")
    if "training.steps" in changes:
        (a, b) = changes["training.steps"]
        if cfg.optimizer.decay_steps:
            notes.append(f"the learning-rate schedule is fixed by optimizer.decay_steps={cfg.optimizer.decay_steps}; "
                         f"training.steps {a} -> {b} only changes where the run stops")
        else:
            notes.append(f"the learning-rate schedule's cosine decay spans training.steps, so it changes with it "
                         f"({a} -> {b}): the resumed steps follow the new schedule, and the run will differ from "
                         f"one started with training.steps={b}")
    return notes


def write_run_config(run_dir: Path, cfg: config_lib.Config, resume: bool, report=print,
                     state_shapes: StateShapes | None = None) -> None:
    """config.yaml, written only after a resume's config has been checked against the checkpoint."""
    if resume:
        for note in check_resume(run_dir, cfg, state_shapes):
            report(note)
    atomic_write(Path(run_dir) / "config.yaml", config_lib.dump_yaml(cfg))
