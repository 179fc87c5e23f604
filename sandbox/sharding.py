"""Device mesh and placement rules: data parallel, optionally FSDP.

The mesh has two named axes, `('data', 'fsdp')`, built from `MeshConfig`
(`data: -1` means every local device not used by `fsdp`). The rules are
GSPMD-style annotations, not a hand-written collective schedule: the step
stays the same pure function, jitted once with explicit `in_shardings` and
`out_shardings`, and XLA inserts the collectives.

* Batch: the leading (batch) axis is split over both axes together,
  `P(('data', 'fsdp'))`: every device holds `batch / n_devices` sequences.
  Gradients of replicated parameters become an all-reduce over all devices.
* State: with `fsdp > 1` every leaf of at least two dimensions and at least
  `MIN_SHARD_SIZE` elements (weight matrices, embeddings, and the Adam
  moments that mirror them) is split along its largest axis divisible by
  `fsdp`; XLA all-gathers a weight where it is used and reduce-scatters its
  gradient. Everything else (biases, norms, counters, loss scale, fp8 amax
  histories, guard state) is replicated: it is small, and replicated scalars
  mean every device takes the same decision.
* One skip decision: `all_finite(grads)` and the fp8 `jnp.max` of an amax
  are reductions over the *global* (logical) arrays, so under SPMD they
  compile to all-reduces and every device sees the same boolean and the same
  amax. No `pmax`/`psum` is written by hand (tests/test_sharding.py checks
  that a single poisoned shard skips the step everywhere).

Multi-host: after `jax.distributed.initialize()` `jax.devices()` is the
global device list, and each process builds the same global batch (it is a
pure function of seed and step) and hands over only its own shards
(`make_array_from_callback`), so no host ever ships data to another.
Process 0 owns the run directory (lock, marker, logs); the others wait for
it to be ready (`sync_processes`) and write only their checkpoint shards.
See docs/scaling.md.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sandbox.errors import UserError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
MIN_SHARD_SIZE = 1024  # elements; smaller leaves are replicated (sharding them costs more than it saves)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The ('data', 'fsdp') mesh a `mesh:` config section describes."""
    devices = list(devices if devices is not None else jax.devices())
    n, fsdp = len(devices), mesh_cfg.fsdp
    if fsdp > n:
        raise UserError(f"mesh.fsdp: {fsdp} is more than the {n} available devices")
    if mesh_cfg.data == -1:
        if n % fsdp:
            raise UserError(f"mesh.fsdp: {fsdp} does not divide the {n} available devices")
        data = n // fsdp
    elif mesh_cfg.data >= 1:
        data = mesh_cfg.data
    else:
        raise UserError(f"mesh.data: expected -1 or >= 1, got {mesh_cfg.data}")
    if data * fsdp > n:
        raise UserError(f"mesh: data={data} x fsdp={fsdp} needs {data * fsdp} devices, {n} available")
    return Mesh(np.array(devices[: data * fsdp]).reshape(data, fsdp), (DATA, FSDP))


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """FSDP rule: split the largest axis divisible by `fsdp`; replicate small or 1-D leaves."""
    if fsdp <= 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):  # largest first; ties: earliest
        if shape[axis] % fsdp == 0:
            return P(*[FSDP if a == axis else None for a in range(len(shape))])
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of the state (anything with .shape), by `leaf_spec`."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, accum_steps: int, mesh: Mesh) -> None:
    n = mesh.size
    if (batch_size // accum_steps) % n:
        raise UserError(f"training.batch_size: {batch_size} (per microbatch {batch_size // accum_steps}) "
                        f"is not divisible by the {n} devices of the mesh")


def place_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host arrays of the global batch -> global jax.Arrays split over the batch axes."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: from_host(v, sharding) for k, v in batch.items()}


def place(tree: Any, shardings: Any) -> Any:
    """`tree` (the same on every process) as global arrays with `shardings` (a tree of them, or one).

    Multi-process: each process hands over only its own shards. Not `jax.device_put`, which there
    first checks that every process passes the same value, and NaN != NaN (the spike detector's
    history starts as NaN) fails that check.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: from_host(x, shardings), tree)
    return jax.tree.map(from_host, tree, shardings)


def from_host(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value every process holds whole; each process builds its own shards."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def is_primary_process() -> bool:
    """True in a single-process run and in process 0 of a multi-process one (the run directory's owner).

    Asks `jax.distributed` first, so a single-process caller never starts JAX's backend here.
    """
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def sync_processes(name: str) -> None:
    """A barrier across all processes of a multi-process run (a tiny all-reduce); a no-op otherwise."""
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
