"""Checkpoints with orbax: atomic, and never loaded with pickle.

A checkpoint is `run_dir/checkpoints/<step>/` holding the train state
(orbax's standard pytree format: tensorstore arrays plus JSON metadata) and
a small JSON record (step, config, policy). orbax writes into a temporary
directory and renames it when complete, so a process killed mid-write leaves
no half-checkpoint that looks valid. Restoring needs the state's abstract
structure (shapes and dtypes from `jax.eval_shape`), so a checkpoint from a
different model or policy is refused with a clear error instead of loading.

Integrity: after orbax commits a step, `sha256sums.json` (the sha256 of every
file in the step directory) is written next to it atomically. A step without
it was interrupted between orbax's commit and the manifest; a step whose files
no longer match it is truncated or bit-flipped. Either is invalid: `restore`
refuses it, `newest_valid` walks back past it, and it is moved aside to
`<step>.corrupt` (never deleted, never silently overwritten), which also lets
orbax save that step again, since orbax skips steps at or below its latest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

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
        self.read_only = read_only
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
        where = self.directory / str(step)
        if step in self.manager.all_steps():
            reason = self.verify(step)
            if reason is None:
                return where
            self.quarantine(step, reason)
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                record=ocp.args.JsonSave(record)))
        self.manager.wait_until_finished()
        if not saved:
            raise UserError(f"{where}: not saved: a newer checkpoint ({self.latest_step()}) exists in "
                            f"{self.directory}")
        write_manifest(where)
        return where

    def verify(self, step: int) -> str | None:
        """Why the checkpoint at `step` is not intact, or None if it is."""
        return verify_manifest(self.directory / str(step))

    def quarantine(self, step: int, reason: str, report: Callable[[str], None] | None = None) -> Path:
        """Moves a bad step aside to `<step>.corrupt[.N]`, keeping it for inspection."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt"
        n = 0
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}.corrupt.{n}"
        os.replace(src, dst)
        self.manager.reload()
        (report or _warn)(f"checkpoint {src}: {reason}; moved aside to {dst.name}")
        return dst

    def newest_valid(self, report: Callable[[str], None] | None = None) -> int | None:
        """The newest intact step; newer bad ones are reported and (unless read-only) moved aside."""
        report = report or _warn
        for step in reversed(self.steps()):
            reason = self.verify(step)
            if reason is None:
                return step
            if self.read_only:
                report(f"checkpoint {self.directory / str(step)}: {reason}; skipped")
            else:
                self.quarantine(step, reason, report)
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        where = self.directory / str(step)
        reason = self.verify(step)
        if reason is not None:
            raise UserError(f"{where}: corrupt checkpoint ({reason})")
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


MANIFEST = "sha256sums.json"


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(MANIFEST))


def write_manifest(step_dir: Path) -> None:
    """sha256 of every file under a committed step, written to a temp file, fsynced, renamed."""
    files = {rel: _sha256(step_dir / rel) for rel in _files(step_dir)}
    tmp = step_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def verify_manifest(step_dir: Path) -> str | None:
    """None if every file matches the manifest, else one line saying what is wrong."""
    if not step_dir.is_dir():
        return "missing"
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        return "no checksum manifest (interrupted while saving?)"
    except Exception:
        return "unreadable checksum manifest"
    for rel, digest in files.items():
        path = step_dir / rel
        if not path.is_file():
            return f"missing file {rel}"
        if _sha256(path) != digest:
            return f"checksum mismatch in {rel}"
    return None


def abstract_of(state: Any, shardings: Any = None) -> Any:
    """Shapes, dtypes and target shardings to restore into.

    The target sharding decides where restored arrays live, independent of the
    mesh that wrote them (orbax reshards on read), so a checkpoint written on 4
    devices restores onto 1. Leaves without a sharding (from `jax.eval_shape`)
    go to the first local device rather than to the writer's device layout.
    """
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or one, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
