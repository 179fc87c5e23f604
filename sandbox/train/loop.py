"""The training loop: dispatch steps, hand their metrics on, checkpoint, stop.

Everything else lives beside it: the builder (`setup.py`), the pure step
(`step.py`) and its guard (`guard.py`), host-side metrics, events and the
summary (`metrics.py`), validation (`evaluate.py`), the step and eval
executables compiled on a worker thread while the state is built (`ahead.py`).

The device never waits on the host: at a log interval after step k the loop
first dispatches step k+1, then reads the metrics of steps <= k (a batch of
per-step dicts pulled at once), so the host formats and logs while the
device computes. Only evaluation, checkpoints, a stop request and the last
step read everything, since they need the state itself. Batches are
prepared ahead on a background thread. SIGINT/SIGTERM finish the current
step, save a checkpoint and return.

Failure capture is not the loop's business: a caller that wants a bundle
passes `capture` (the CLI passes `forensics.bundle.save_bundle`), called as
`capture(run_dir / "failure", cfg, state, batch, failed_step, history)`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

from sandbox import config as config_lib
from sandbox import interrupts, rundir, sharding
from sandbox.checkpoint import Checkpointer
from sandbox.errors import UserError
from sandbox.logger import RunLogger
from sandbox.memory import check_fits
from sandbox.model import count_params
from sandbox.reference import describe as describe_kl
from sandbox.runs import write_run_config
from sandbox.train.ahead import COMPILE_THREAD, compile_ahead
from sandbox.train.evaluate import evaluate
from sandbox.train.hooks import Hooks
from sandbox.train.metrics import StepRecorder, guard_leaf_names, leaf_paths, name_list, summary
from sandbox.train.setup import Run, abstract_state, build, initial_state, place_batch
from sandbox.train.state import TrainState

# Re-exported for callers of the pre-split loop (tests, scripts): the builder and host-side helpers.
__all__ = ["COMPILE_THREAD", "EXIT_FAILURE", "Run", "RunResult", "Trainer", "apply_deterministic", "build",
           "guard_leaf_names", "initial_state", "leaf_paths", "name_list", "place_batch", "train"]

EXIT_FAILURE = 3  # a run that stopped on a non-finite value or stalled (summary.json: cause)
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def apply_deterministic(cfg: config_lib.Config) -> None:
    """`deterministic: true` for every caller of the library (CLI, ablation cells, lessons, notebooks).

    XLA reads XLA_FLAGS once, when JAX initialises its backend, so the flag goes into the environment
    before the run builds anything. If the backend is already up without it, the flag cannot take
    effect: on a GPU that is an error (the run would silently be what its config says it is not; set
    XLA_FLAGS before JAX starts), elsewhere a warning (XLA's CPU and TPU ops are deterministic anyway).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if not cfg.deterministic or DETERMINISTIC_FLAG in flags.split():
        return
    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
        return
    why = (f"deterministic: true cannot be applied: JAX's backend was initialised before this run without "
           f"XLA_FLAGS={DETERMINISTIC_FLAG}")
    if jax.default_backend() == "gpu":
        raise UserError(f"{why}; set it in the environment before JAX starts, or run `sandbox train`")
    warnings.warn(f"{why}; {jax.default_backend()} ops are deterministic without it", RuntimeWarning, stacklevel=3)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    status: str  # finished | interrupted | failed
    bundle: Path | None = None
    state: Any = None


def prepare_run_dir(cfg: config_lib.Config, resume: bool, overwrite: bool) -> rundir.DirLock:
    """Creates, adopts or clears cfg.run_dir and locks it for this run (rules: sandbox/rundir.py)."""
    return rundir.open_dir(cfg.run_dir, "run", resume=resume, overwrite=overwrite)


class Trainer:
    def __init__(self, cfg: config_lib.Config, hooks: list[Any] = (), *, resume: bool = False,
                 overwrite: bool = False, tb_dir: Path | None = None, quiet: bool = False,
                 capture: Callable[..., Path | None] | None = None):
        self.cfg = cfg
        self.log: RunLogger | None = None  # from train() on; _print goes to stdout before
        apply_deterministic(cfg)  # before build(), which starts JAX's backend
        check_fits(cfg)  # a config too big for this machine is refused before anything is allocated
        self.run: Run = build(cfg)  # data and policy errors surface before anything is written
        self.resume = resume
        self.quiet = quiet
        self.capture = capture
        self.run_lock = prepare_run_dir(cfg, resume, overwrite)  # held until train() ends
        self.run_dir = cfg.run_dir
        try:  # a resume's new config is checked against the checkpoint before config.yaml changes
            write_run_config(self.run_dir, cfg, resume, report=self._print, state_shapes=abstract_state)
        except BaseException:
            self.run_lock.release()
            raise
        self.ckpt = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep)
        self.hooks = Hooks(list(hooks), report=self._print)
        self.tb_dir = tb_dir
        self.stop_requested = False
        self.recorder: StepRecorder | None = None

    # ------------------------------------------------------------ helpers
    def _print(self, text: str) -> None:
        if self.log is not None:
            self.log.print(text)
        elif not self.quiet:
            print(text)

    def _record(self, state: TrainState) -> dict:
        return {"step": int(state.step), "policy": self.run.policy.name,
                "config": config_lib.to_dict(self.cfg)}

    def save_checkpoint(self, state: TrainState) -> Path:
        step = int(state.step)
        path = self.ckpt.save(step, state, self._record(state))
        self.hooks("on_checkpoint", step=step, path=path, state=state)
        return path

    def restore_or_init(self) -> TrainState:
        # --resume walks back past truncated/bit-flipped checkpoints (moved aside, not deleted).
        step = self.ckpt.newest_valid(report=self._print) if self.resume else None
        if step is None:
            if self.resume and self.ckpt.directory.exists() and any(self.ckpt.directory.iterdir()):
                self._print("no valid checkpoint to resume from; starting at step 0")
            return initial_state(self.run)
        # Restore onto this run's mesh, whatever mesh wrote it (4 devices -> 1 works).
        state, _ = self.ckpt.restore(step, self.run.abstract_state)
        return state

    def evaluate(self, state: TrainState, batches: int | None = None) -> dict:
        """Means over val batches (train/evaluate.py); `batches` defaults to training.eval_batches."""
        return evaluate(self.run, state, self.cfg.training.eval_batches if batches is None else batches)

    def _announce(self, state: TrainState, start: int) -> None:
        run, cfg = self.run, self.cfg
        if start == 0:
            naive = ", naive_softmax" if cfg.precision.naive_softmax else ""
            self.log.print(f"run {self.run_dir}: {count_params(state.params):,} parameters, "
                           f"policy {run.policy.name} ({run.policy.describe()}{naive})")
        else:
            self.log.print(f"run {self.run_dir}: resumed at step {start}")
        self.log.print(f"config: {self.run_dir / 'config.yaml'} (the resolved config; `sandbox config show` "
                       f"prints any config resolved the same way)")
        if run.ctx.kl is not None:
            self.log.print(f"objective: CE + {describe_kl(cfg)}")

    # ------------------------------------------------------------ main loop
    def train(self) -> RunResult:
        with self.run_lock:  # released whatever the way out: finished, stopped, failed, or raised
            # The step and eval compiles start here, on a worker thread, and overlap building the
            # initial state (train/ahead.py). Not in __init__: a trainer built only to restore or
            # evaluate must not leave seconds of compiles running behind it. With
            # precision.telemetry_every > 1 most steps, the first included, are lean ones.
            join_compiles = compile_ahead(self.run, lean_first=self.run.lean_step_fn is not None)
            try:
                return self._train()
            finally:
                join_compiles()  # no compile thread outlives train(), whatever the way out

    def _train(self) -> RunResult:
        cfg, run = self.cfg, self.run
        state = self.restore_or_init()
        start = int(state.step)
        total = cfg.training.steps
        self.log = RunLogger(self.run_dir, cfg.logging, total, start, tb_dir=self.tb_dir)
        self.recorder = StepRecorder(cfg, self.log, self.hooks, guard_leaf_names(state),
                                     run.pipeline.info, run.ctx.scaler.min_scale)
        self._announce(state, start)
        old_handlers = self._install_signal_handlers()
        t_start = time.perf_counter()
        self.pending: list[tuple[int, dict]] = []  # dispatched steps whose metrics are not read yet
        status, bundle, failed_step = "finished", None, None
        self._t_last, self._steps_since, self._compile_time = time.perf_counter(), 0, None
        last_val = None
        read_due = False  # a log interval passed: read it back once the next step is dispatched
        batches = None
        try:
            # Host-to-device copies happen on the prefetch thread, off the step's critical path. The
            # finally below joins that thread on every path (finish, stop, failure, exception) before
            # anything else is torn down: data.batches.Prefetcher says why a live one aborts the exit.
            batches = run.pipeline.prefetch_train(start, total, cfg.data.prefetch,
                                                  functools.partial(place_batch, run))
            for step, batch in zip(range(start, total), batches):
                if self.stop_requested and step == start:  # stopped before the first step: nothing to save
                    status = "interrupted"
                    break
                state, metrics = self._step_fn(step)(state, batch, *run.frozen)
                self.pending.append((step, metrics))
                self._steps_since += 1
                done = step + 1
                at_log = done % cfg.training.log_every == 0 or done == total or self.stop_requested
                at_eval = cfg.training.eval_every and done % cfg.training.eval_every == 0
                at_ckpt = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
                drift_every = cfg.objective.drift_every
                at_drift = drift_every and done % drift_every == 0 and not at_eval and done != total
                needs_state = at_eval or at_ckpt or at_drift or done == total or self.stop_requested
                if needs_state or read_due:
                    # keep the step just dispatched in flight unless this step's state is needed now
                    failed_step = self._read(state, keep=0 if needs_state else 1)
                    if failed_step is not None:
                        status = "failed"
                        break
                read_due = at_log and not needs_state
                if at_drift:
                    drift = self.evaluate(state, batches=1)["precision_drift"]
                    self.log.log(done, "val", {"precision_drift": drift})
                if at_eval and done != total:
                    last_val = self.evaluate(state)
                    self.log.log(done, "val", last_val)
                    self.hooks("on_eval", step=done, metrics=last_val, state=state)
                if at_ckpt and done != total:
                    self.log.flush()
                    self.save_checkpoint(state)
                if at_drift or at_eval or at_ckpt:
                    # nothing is in flight here (the state was read): time the next steps from now, so
                    # no step_time or tokens/s absorbs the evaluation or the checkpoint write
                    self._t_last = time.perf_counter()
                if self.stop_requested:
                    status = "interrupted"
                    break
            if status != "failed" and self.pending:  # a loop left early (exhausted batches): read the rest
                failed_step = self._read(state, keep=0)
                status = "failed" if failed_step is not None else status
            if status == "failed":
                bundle = self._on_failure(state, failed_step)
            else:
                if status == "finished":
                    last_val = self.evaluate(state)
                    self.log.log(int(state.step), "val", last_val)
                    self.hooks("on_eval", step=int(state.step), metrics=last_val, state=state)
                self.log.flush()
                if int(state.step) > start or status == "finished":
                    self.save_checkpoint(state)
            if status == "interrupted":
                self._print(f"stopped on request at step {int(state.step)}; continue with --resume")
        finally:
            if batches is not None:
                batches.close()
            self._restore_signal_handlers(old_handlers)
            self.log.close()
            self.ckpt.close()
        wall = time.perf_counter() - t_start
        s = summary(self.run_dir, cfg, self.recorder, state, policy=run.policy.name, last_val=last_val, wall=wall,
                    compile_time=self._compile_time, status=status, failed_step=failed_step, bundle=bundle,
                    data_info=run.pipeline.info, compute_dtype=run.policy.compute_dtype)
        if sharding.is_primary_process():  # multi-host: one writer (the others hold no lock either)
            rundir.atomic_write(self.run_dir / "summary.json", json.dumps(s, indent=2))
        return RunResult(self.run_dir, s, status, bundle, state)

    def _read(self, state: TrainState, keep: int) -> int | None:
        """Reads back every pending step but the last `keep` (still in flight) and hands them on.

        Returns the 0-based index of a step that stops the run, else None.
        """
        split = len(self.pending) - keep
        ready, self.pending = self.pending[:split], self.pending[split:]
        if not ready:
            return None
        rows = jax.device_get(ready)
        now = time.perf_counter()
        first = self._compile_time is None  # this process's first read: its interval holds the compile
        if first:
            self._compile_time = now - self._t_last
        read = len(ready)
        dt = (now - self._t_last) / max(self._steps_since, 1)
        self._t_last, self._steps_since = now, self._steps_since - read
        tokens_per_s = self.cfg.training.batch_size * self.cfg.model.context / dt
        if not first:
            self.recorder.throughput.append(tokens_per_s)
        failed_step = self.recorder.record(rows, state, tokens_per_s, dt)
        loss = rows[-1][1]["loss"]
        self.log.update_progress(rows[-1][0] + 1, f"loss {loss:.3f} ppl {math.exp(min(loss, 700)):.2f} "
                                                 f"{tokens_per_s:,.0f} tok/s")
        return failed_step

    def _step_fn(self, step: int):
        """The full step on every telemetry_every-th step and the last; the lean one between."""
        done, every = step + 1, self.cfg.precision.telemetry_every
        if self.run.lean_step_fn is None or done % every == 0 or done == self.cfg.training.steps:
            return self.run.step_fn
        return self.run.lean_step_fn

    def _on_failure(self, state: TrainState, failed_step: int) -> Path | None:
        """The failure bundle of the step that stopped the run: nan_policy capture, or any stall but under halt."""
        self.log.flush()
        policy = self.cfg.forensics.nan_policy
        if self.capture is None or not (policy == "capture" or (self.recorder.stalled and policy != "halt")):
            return None
        # The held state is the state before the stopping step; clear the stall mark as the bundle clears
        # the failure mark, so replaying the step runs it again.
        state = state._replace(guard=state.guard._replace(stalled_step=np.int32(-1)))
        batch = self.run.pipeline.train_batch(failed_step).as_dict()
        return self.capture(self.run_dir / "failure", self.cfg, state, batch, failed_step, self.recorder.history)

    # ------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM set stop_requested (graceful stop); a second one aborts (sandbox/interrupts.py)."""
        def handler(signum, frame):
            interrupts.note(signum)
            self.stop_requested = True

        # a request noted before training (sandbox train's CLI handler) stops the run before its first step
        self.stop_requested = self.stop_requested or interrupts.requested()
        old = {}
        for sig in interrupts.STOP_SIGNALS:
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        interrupts.restore(old)
        if old:  # this run handled the signals (main thread), and has honoured its stop request
            interrupts.reset()


def train(cfg: config_lib.Config, hooks: list[Any] = (), **kwargs) -> RunResult:
    return Trainer(cfg, hooks, **kwargs).train()

