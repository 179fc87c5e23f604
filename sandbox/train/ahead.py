"""The run's step and eval executables, compiled ahead of time on a worker thread.

Why (issue 18). On a 2-core CPU the shipped recipe's train step takes ~4.5 s
to compile, and building its initial state takes ~1.5 s (one more compile).
The trainer used to do them one after the other: the step compiled at its
first call, after the initial state, and the eval step at the first
evaluation. Now `Trainer.train()` starts the compiles first thing: it traces
and lowers them from the arguments' shapes (`jit(...).lower(shapes)`), then
XLA compiles them on one worker thread while the main thread builds or
restores the state. Not in the constructor: a trainer built only to restore
or evaluate must leave no compile running behind it.

Same numbers: the executable comes from the same lowering of the same jitted
function; only when it is compiled changes.

Called directly: a jitted function called after `lower(...).compile()`
traces, lowers and compiles again (jax 0.10.2: its call cache does not hold
executables compiled ahead of time), so the run calls the executable itself.
An executable accepts exactly the shapes, dtypes and shardings it was
compiled for, which are those of the run's placed state and batches
(`Run.abstract_state`, `abstract_batch`).

Errors and threads: a compile error reaches the first call, as it did from
the jit. The worker is not a daemon, and `join` waits for it (the trainer
joins on every path out of `train()`): a daemon thread still inside XLA when
the interpreter exits aborts the process (see data/batches.py's Prefetcher).
So a run stopped before its first step returns once the compile under way
ends (seconds); a second stop request aborts at once (sandbox/interrupts.py).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sandbox.data.batches import Batch
from sandbox.train.setup import Run

COMPILE_THREAD = "sandbox-compile"


class Ahead:
    """A jitted function's executable for fixed argument shapes; a call waits for its compile.

    Traced and lowered here, on the calling thread, so JAX's thread-local settings (a caller's
    `with jax.default_matmul_precision(...)`, say) shape the program as they did when the jit
    traced at its first call; only XLA's compile, which reads none of them, runs on the worker.
    """

    def __init__(self, jitted: Callable, args: tuple, executor: ThreadPoolExecutor):
        self.future = executor.submit(jitted.lower(*args).compile)

    def __call__(self, *args) -> Any:
        return self.future.result()(*args)


def abstract_batch(run: Run) -> dict:
    """The shapes of a placed batch (train and validation alike): [B, T] int32 token ids, split over the mesh."""
    shape = (run.cfg.training.batch_size, run.cfg.model.context)
    return {f.name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding)
            for f in dataclasses.fields(Batch)}  # Batch.as_dict's keys


def compile_ahead(run: Run, lean_first: bool = False) -> Callable[[], None]:
    """Swaps run.step_fn, run.lean_step_fn and run.eval_fn for `Ahead`s; returns `join`.

    They compile in the order a run needs them: the step variant the first step uses
    (`lean_first`), the other variant, then the eval step. A function a caller has put in
    their place that is not a jitted one (a wrapper that counts calls, say) is left as it is.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=COMPILE_THREAD)
    state, batch, frozen = run.abstract_state, abstract_batch(run), run.frozen
    steps = ["step_fn", "lean_step_fn"] if run.lean_step_fn is not None else ["step_fn"]
    for name in reversed(steps) if lean_first else steps:
        if hasattr(getattr(run, name), "lower"):
            setattr(run, name, Ahead(getattr(run, name), (state, batch, *frozen), executor))
    if hasattr(run.eval_fn, "lower"):
        run.eval_fn = Ahead(run.eval_fn, (state.params, state.fp8_meta, batch, *frozen), executor)
    executor.shutdown(wait=False)  # the worker runs what was submitted, then ends

    def join() -> None:
        executor.shutdown(wait=True)

    return join
