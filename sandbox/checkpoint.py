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

What counts as intact is strict, because a run directory is user-writable:
- links are never followed: a step directory that is a symbolic link (say, to
  an older step), or that holds one, is damaged, whatever its checksums say;
- the manifest must be a mapping that covers every file present, and at least
  one: an empty or partial manifest vouches for nothing;
- the JSON record must name the step of its directory (a copied older step
  carries a matching manifest but another state).
Saving a step that already exists keeps it only if it holds exactly the state
being saved (restored and compared bit for bit); otherwise the old one is moved
aside like damage and the new state is written, so a run never "finishes"
with some other state under its final step number.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from sandbox import sharding
from sandbox.errors import UserError
from sandbox.rundir import file_sha256

# orbax logs its failures at ERROR (a damaged metadata file is echoed whole) and then raises or
# carries on; every failure that matters reaches the user as one line from this module instead.
logging.getLogger("absl").setLevel(logging.CRITICAL)
logging.getLogger("orbax").setLevel(logging.CRITICAL)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int = 3, read_only: bool = False):
        self.directory = checkpoint_dir(run_dir)
        if self.directory.is_symlink():
            raise UserError(f"{self.directory}: is a symbolic link; links inside a run directory are "
                            f"never followed")
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
            reason = self.verify(step) or self._differs(step, state)
            if reason is None:
                return where
            self.quarantine(step, reason)
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                record=ocp.args.JsonSave(record)))
        self.manager.wait_until_finished()
        if not saved:
            raise UserError(f"{where}: not saved: a newer checkpoint ({self.latest_step()}) exists in "
                            f"{self.directory}")
        if sharding.is_primary_process():  # multi-host: orbax wrote every process's shards; one manifest
            write_manifest(where)
        sharding.sync_processes(f"manifest {step}")
        return where

    def _differs(self, step: int, state: Any) -> str | None:
        """Why the intact checkpoint at `step` is not exactly `state`, or None if it is."""
        try:
            saved, _ = self.restore(step, abstract_of(state))
        except UserError as e:
            return str(e).rsplit("(", 1)[-1].rstrip(")")
        ours, theirs = jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(saved))
        if len(ours) != len(theirs) or not all(_same_bits(a, b) for a, b in zip(ours, theirs)):
            return "holds another state than the one being saved"
        return None

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
        if sharding.is_primary_process():
            os.replace(src, dst)
        sharding.sync_processes(f"quarantine {step}")
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


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _walk(step_dir: Path) -> tuple[list[str], list[str]]:
    """(files, symbolic links) under a step directory, relative paths; links are not followed."""
    files, links = [], []
    for root, dirs, names in os.walk(step_dir, followlinks=False):
        for name in dirs + names:
            path = Path(root) / name
            rel = path.relative_to(step_dir).as_posix()
            if path.is_symlink():
                links.append(rel)
            elif name in names and not name.startswith(MANIFEST):
                files.append(rel)
    return sorted(files), sorted(links)


def _files(step_dir: Path) -> list[str]:
    return _walk(step_dir)[0]


def write_manifest(step_dir: Path) -> None:
    """sha256 of every file under a committed step, written to a temp file, fsynced, renamed."""
    files = {rel: file_sha256(step_dir / rel) for rel in _files(step_dir)}
    tmp = step_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def _read_manifest(step_dir: Path) -> dict[str, str] | str:
    """The manifest's {relative path: sha256}, or why it cannot be used."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no checksum manifest (interrupted while saving?)"
    except (OSError, ValueError):
        return "unreadable checksum manifest"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "malformed checksum manifest (expected a mapping of files to sha256 digests)"
    if not files:
        return "checksum manifest covers no files"
    return files


def _recorded_step_mismatch(step_dir: Path) -> str | None:
    """Says so when the JSON record names another step than its directory.

    An unreadable record is left to orbax's restore, which refuses it in its own words.
    """
    try:
        recorded = json.loads((step_dir / "record" / "metadata").read_text(encoding="utf-8")).get("step")
        expected = int(step_dir.name)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(recorded, int) and recorded != expected:
        return f"directory {expected} records step {recorded}"
    return None


def verify_manifest(step_dir: Path) -> str | None:
    """None if the step directory is intact (see the module doc), else one line saying what is wrong."""
    if step_dir.is_symlink():
        return "is a symbolic link (links inside a run directory are never followed)"
    if not step_dir.is_dir():
        return "missing"
    present, links = _walk(step_dir)
    if links:
        return f"holds a symbolic link ({links[0]}); links inside a run directory are never followed"
    files = _read_manifest(step_dir)
    if isinstance(files, str):
        return files
    if missing := sorted(set(files) - set(present)):
        return f"missing file {missing[0]}"
    if extra := sorted(set(present) - set(files)):
        return f"file {extra[0]} is not in the checksum manifest"
    for rel, digest in files.items():
        if file_sha256(step_dir / rel) != digest:
            return f"checksum mismatch in {rel}"
    return _recorded_step_mismatch(step_dir)


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
