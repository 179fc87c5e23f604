"""Checkpoints with orbax: atomic, and never loaded with pickle.

A checkpoint is `run_dir/checkpoints/<step>/` holding the train state
(orbax's standard pytree format: tensorstore arrays plus JSON metadata) and
a small JSON record (step, config, policy). orbax writes into a temporary
directory and renames it when complete, so a process killed mid-write leaves
no half-checkpoint that looks valid. Restoring needs the state's abstract
structure (shapes and dtypes from `jax.eval_shape`), so a checkpoint from a
different model or policy is refused with a clear error instead of loading.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sandbox.errors import UserError

logging.getLogger("absl").setLevel(logging.ERROR)
logging.getLogger("orbax").setLevel(logging.ERROR)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int = 3, read_only: bool = False):
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               enable_async_checkpointing=False, read_only=read_only)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:
            raise UserError(f"{self.directory}: cannot open checkpoints ({e.__class__.__name__})") from None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, record: dict) -> Path:
        if step in self.manager.all_steps():
            return self.directory / str(step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        record=ocp.args.JsonSave(record)))
        self.manager.wait_until_finished()
        return self.directory / str(step)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        where = self.directory / str(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
        except Exception as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise UserError(f"{where}: corrupt or incompatible checkpoint ({e.__class__.__name__}: {first})") \
                from None
        return out.state, dict(out.record)

    def close(self) -> None:
        self.manager.close()


def abstract_of(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        state)
