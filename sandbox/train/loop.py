"""The training loop around the jitted step.

The loop dispatches step k and only reads metrics at log intervals (a batch
of per-step metric dicts is pulled to the host at once), so the device never
waits on logging. Batches are prepared ahead on a background thread.
SIGINT/SIGTERM finish the current step, save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

from sandbox import config as config_lib
from sandbox import interrupts, rundir, sharding
from sandbox.checkpoint import Checkpointer, abstract_of
from sandbox.data import make_pipeline
from sandbox.errors import UserError
from sandbox.logger import RunLogger, flatten, read_metrics
from sandbox.memory import check_fits
from sandbox.model import GPT, count_params
from sandbox.precision.policy import make_loss_scaler, make_policy
from sandbox.reference import describe as describe_kl, fp32_twin, load_reference
from sandbox.runs import write_run_config
from sandbox.train.hooks import Hooks
from sandbox.train.state import TrainState, init_state, make_optimizer, make_schedule
from sandbox.train.step import StepContext, eval_step, guarded_tree, train_step

LN2 = math.log(2.0)
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


@dataclass
class Run:
    """Everything built from a config before the first step."""

    cfg: config_lib.Config
    pipeline: Any
    policy: Any
    ctx: StepContext
    step_fn: Any = None
    lean_step_fn: Any = None  # step_fn without telemetry, for precision.telemetry_every > 1
    eval_fn: Any = None
    extra: dict = field(default_factory=dict)


def build(cfg: config_lib.Config, with_data: bool = True) -> Run:
    """with_data=False: no data pipeline (run.pipeline is None), for replaying a bundle that holds its batch."""
    pipeline = make_pipeline(cfg) if with_data else None
    policy = make_policy(cfg.precision)
    model = GPT(cfg.model, policy)
    scaler = make_loss_scaler(policy, cfg.precision.loss_scale)
    total = cfg.training.steps
    reference = load_reference(cfg)  # a bad reference fails here, before anything is written
    ctx = StepContext(model=model, policy=policy, scaler=scaler, tx=make_optimizer(cfg.optimizer, total),
                      schedule=make_schedule(cfg.optimizer, total), seed=cfg.seed,
                      accum_steps=cfg.optimizer.accum_steps, label_smoothing=cfg.objective.label_smoothing,
                      nan_policy=cfg.forensics.nan_policy, skip_spikes=cfg.forensics.skip_spikes,
                      spike_sigma=cfg.forensics.spike_sigma, collect_stats=cfg.forensics.activations,
                      max_skipped_steps=cfg.forensics.max_skipped_steps,
                      min_scale_overflows=cfg.forensics.min_scale_overflows, total_steps=total,
                      naive_log_softmax=cfg.precision.naive_log_softmax)
    ctx = dataclasses.replace(ctx, kl=reference[0] if reference else None, twin=fp32_twin(cfg.model))
    run = Run(cfg, pipeline, policy, ctx)
    # Explicit shardings (sandbox/sharding.py): the state's layout is fixed at compile time, so a
    # step never reshards its input and the donated buffers are reused in place.
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.training.batch_size, cfg.optimizer.accum_steps, mesh)
    abstract = jax.eval_shape(lambda: _init(run))
    state_sh = sharding.state_shardings(abstract, mesh)
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    run.extra.update(mesh=mesh, state_shardings=state_sh, batch_sharding=batch_sh,
                     abstract_state=abstract_of(abstract, state_sh))
    # The KL reference's weights are a third, non-donated argument: call step_fn(state, batch,
    # *run.extra["frozen"]) and eval_fn(params, meta, batch, *run.extra["frozen"]).
    run.extra["frozen"] = (sharding.place(reference[1], repl),) if reference else ()
    if reference and cfg.objective.kl.init_from_reference:
        run.extra["init_params"] = reference[1]["params"]
    frozen_sh = (repl,) * len(run.extra["frozen"])

    def jit_step(c: StepContext):
        return jax.jit(functools.partial(train_step, ctx=c), in_shardings=(state_sh, batch_sh, *frozen_sh),
                       out_shardings=(state_sh, repl), donate_argnums=0)

    run.step_fn = jit_step(ctx)
    if policy.telemetry and cfg.precision.telemetry_every > 1:
        # Same state in and out, fewer metrics: the loop alternates the two (Trainer._step_fn).
        lean = dataclasses.replace(policy, telemetry=False)
        run.lean_step_fn = jit_step(dataclasses.replace(ctx, policy=lean, model=GPT(cfg.model, lean)))
    run.eval_fn = jax.jit(functools.partial(eval_step, ctx=ctx), out_shardings=repl,
                          in_shardings=(state_sh.params, state_sh.fp8_meta, batch_sh, *frozen_sh))
    return run


def _init(run: Run) -> TrainState:
    cfg = run.cfg
    return init_state(run.ctx.model, run.ctx.tx, run.ctx.scaler, cfg.seed, cfg.model.context,
                      cfg.forensics.spike_window)


def initial_state(run: Run) -> TrainState:
    """The step-0 state, placed on the run's mesh."""
    state = _init(run)
    if "init_params" in run.extra:  # a fine-tune starts at the KL reference (same architecture, checked)
        # copy=True: the state is donated each step, and must not alias the frozen reference buffers
        state = state._replace(params=jax.tree.map(lambda r, p: jnp.array(r, p.dtype, copy=True),
                                                   run.extra["init_params"], state.params))
    return sharding.place(state, run.extra["state_shardings"])


def place_batch(run: Run, batch) -> dict:
    """A host batch (Batch or dict) as global arrays split over the mesh's batch axes."""
    return sharding.place_batch(batch if isinstance(batch, dict) else batch.as_dict(), run.extra["batch_sharding"])


def leaf_paths(tree) -> list[str]:
    def part(k):  # DictKey .key, SequenceKey .idx (optax's chain), GetAttrKey .name (NamedTuple fields)
        return str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))

    return ["/".join(part(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def guard_leaf_names(state: TrainState) -> list[str]:
    """Names of the step's `nonfinite_leaves` flags: 'grads/...', 'params/...', 'opt_state/...', ..."""
    return leaf_paths(guarded_tree(state.params, state.params, state.opt_state, state.fp8_meta, state.loss_scale))


def first_bad_stage(names: list[str]) -> list[str]:
    """The non-finite gradients if any (everything after them follows), else the non-finite new-state leaves."""
    grads = [n for n in names if n.startswith("grads/")]
    return grads or names


def name_list(names: list[str], shown: int = 6) -> str:
    """'3 tensors: a, b, c' (at most `shown` named, then '(+k more)')."""
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''}" + (": " + ", ".join(names[:shown]) + more if names else "")


def prepare_run_dir(cfg: config_lib.Config, resume: bool, overwrite: bool) -> rundir.DirLock:
    """Creates, adopts or clears cfg.run_dir and locks it for this run (rules: sandbox/rundir.py)."""
    return rundir.open_dir(cfg.run_dir, "run", resume=resume, overwrite=overwrite)


class Trainer:
    def __init__(self, cfg: config_lib.Config, hooks: list[Any] = (), *, resume: bool = False,
                 overwrite: bool = False, tb_dir: Path | None = None, quiet: bool = False):
        self.cfg = cfg
        apply_deterministic(cfg)  # before build(), which starts JAX's backend
        check_fits(cfg)  # a config too big for this machine is refused before anything is allocated
        self.run = build(cfg)  # data and policy errors surface before anything is written
        self.resume = resume
        self.quiet = quiet
        self.run_lock = prepare_run_dir(cfg, resume, overwrite)  # held until train() returns
        self.run_dir = cfg.run_dir
        try:  # a resume's new config is checked against the checkpoint before config.yaml changes
            write_run_config(self.run_dir, cfg, resume, report=self._print)
        except BaseException:
            self.run_lock.release()
            raise
        self.ckpt = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep)
        self.hooks = Hooks(list(hooks), report=self._print)
        self.tb_dir = tb_dir
        self.stop_requested = False
        self.history: list[dict] = []  # recent train rows, for bundles and summaries
        self.events: list[dict] = []

    # ------------------------------------------------------------ helpers
    def _print(self, text: str) -> None:
        if getattr(self, "log", None):
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
        state, _ = self.ckpt.restore(step, self.run.extra["abstract_state"])
        return state

    def evaluate(self, state: TrainState, batches: int | None = None) -> dict:
        """Means over val batches: ce (+ derived), entropy, precision_drift, kl_to_reference_*."""
        p, frozen = self.run.pipeline, self.run.extra.get("frozen", ())
        n = self.cfg.training.eval_batches if batches is None else batches
        rows = jax.device_get([self.run.eval_fn(state.params, state.fp8_meta,
                                                place_batch(self.run, p.val_batch(i)), *frozen) for i in range(n)])
        means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        return {**self._derived(means["ce"]), **means}

    def _derived(self, ce: float) -> dict:
        out = {"ce": ce, "bits_per_token": ce / LN2, "perplexity": math.exp(min(ce, 700.0))}
        floor = self.run.pipeline.info.get("source_floor")
        if floor is not None:
            out["kl_to_source"] = ce - floor
        bytes_per_token = self.run.pipeline.info.get("bytes_per_token")  # text sources: of the val split
        if bytes_per_token:  # comparable across tokenizers, unlike perplexity
            out["bits_per_byte"] = ce / (LN2 * bytes_per_token)
        return out

    # ------------------------------------------------------------ metrics
    def _process(self, rows: list[tuple[int, dict]], state: TrainState, tokens_per_s: float,
                 step_time: float) -> int | None:
        """Host-side handling of a batch of per-step metrics; returns the index of a step that stops the run.

        Rows after that step are the held state ticking on (module doc of train/step.py) and are not logged.
        """
        for i, (step, m) in enumerate(rows):
            leaves = m.pop("nonfinite_leaves", None)
            scale_after = m.pop("loss_scale_after", None)
            bad = [self.leaf_names[j] for j in np.flatnonzero(leaves)] if leaves is not None else []
            scalars = flatten(m)
            # ppl/bits/kl_to_source describe the CE part (the loss may carry beta * KL too)
            scalars.update({k: v for k, v in self._derived(scalars.get("ce", scalars["loss"])).items() if k != "ce"})
            scalars["tokens_per_s"] = tokens_per_s
            scalars["step_time"] = step_time
            done = step + 1
            failure = bool(scalars.get("nonfinite")) and self.cfg.forensics.nan_policy != "skip"
            stops = failure or bool(scalars.get("stalled"))
            if scalars.get("overflow"):
                event = {"loss_scale_before": scalars["loss_scale"], "loss_scale_after": float(scale_after),
                         "nonfinite_grads": name_list([n for n in bad if n.startswith("grads/")])}
                self.events.append({"step": done, "event": "overflow", **event})
                self.log.event(done, "overflow (step skipped)", event)
                self.hooks("on_overflow", step=done, metrics=event, state=None)
            if scalars.get("spike"):
                self.log.event(done, "loss spike (update skipped)", {"loss": scalars["loss"]})
            self.log.log(done, "train", scalars)
            self.history.append({"step": done, **scalars})
            last = i == len(rows) - 1 or stops
            self.hooks("on_step_end", step=done, metrics=scalars, state=state if last else None)
            if scalars.get("nonfinite"):
                detail = {"loss": scalars["loss"], "nonfinite": name_list(first_bad_stage(bad))}
                self.events.append({"step": done, "event": "nonfinite", **detail})
                self.log.event(done, "non-finite loss/gradient/update", detail)
                self.hooks("on_nonfinite", step=done, metrics=scalars, state=state)
            if scalars.get("stalled"):
                self.cause, self.stalled = self._stall_cause(scalars, state, done), True
                self.events.append({"step": done, "event": "stalled", "cause": self.cause})
                self.log.event(done, "stalled", {"cause": self.cause})
            elif failure:
                self.cause = "non-finite loss, gradient or update"
            if stops:
                self.history = self.history[-self.cfg.forensics.history:]
                return step
        self.history = self.history[-self.cfg.forensics.history:]
        return None

    def _stall_cause(self, scalars: dict, state: TrainState, done: int) -> str:
        """Why the step flagged `stalled` stopped the run (the rules: train/step.py, module doc 6.)."""
        if scalars.get("overflow") and scalars["loss_scale"] <= self.run.ctx.scaler.min_scale:
            return "gradients overflow even at the minimum loss scale"
        why = "overflow" if scalars.get("overflow") else "non-finite" if scalars.get("nonfinite") else "spike"
        if int(jax.device_get(state.opt_step)) == 0:  # one read, once, when the run stops
            return f"no update applied in any of the {done} steps (last skip: {why})"
        return f"no update applied in more than {self.cfg.forensics.max_skipped_steps} steps in a row " \
               f"(last skip: {why})"

    # ------------------------------------------------------------ main loop
    def train(self) -> RunResult:
        cfg, run = self.cfg, self.run
        state = self.restore_or_init()
        start = int(state.step)
        self.leaf_names = guard_leaf_names(state)
        total = cfg.training.steps
        self.log = RunLogger(self.run_dir, cfg.logging, total, start, tb_dir=self.tb_dir)
        if start == 0:
            self.log.print(f"run {self.run_dir}: {count_params(state.params):,} parameters, "
                           f"policy {run.policy.name} ({run.policy.describe()})")
        else:
            self.log.print(f"run {self.run_dir}: resumed at step {start}")
        if run.ctx.kl is not None:
            self.log.print(f"objective: CE + {describe_kl(cfg)}")
        old_handlers = self._install_signal_handlers()
        t_start = time.perf_counter()
        pending: list[tuple[int, dict]] = []
        status, bundle, failed_step = "finished", None, None
        self.cause, self.stalled = None, False  # why a failed run stopped, and whether it stalled (_process)
        t_last, steps_since, compile_time = time.perf_counter(), 0, None
        last_val = None
        tokens_per_step = cfg.training.batch_size * cfg.model.context
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
                state, metrics = self._step_fn(step)(state, batch, *run.extra.get("frozen", ()))
                pending.append((step, metrics))
                steps_since += 1
                done = step + 1
                at_log = done % cfg.training.log_every == 0 or done == total or self.stop_requested
                at_eval = cfg.training.eval_every and done % cfg.training.eval_every == 0
                at_ckpt = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
                if at_log or at_eval or at_ckpt:
                    rows = jax.device_get(pending)
                    now = time.perf_counter()
                    if compile_time is None:
                        compile_time = now - t_start
                    dt = (now - t_last) / steps_since
                    t_last, steps_since, pending = now, 0, []
                    failed_step = self._process(rows, state, tokens_per_step / dt, dt)
                    loss = rows[-1][1]["loss"]
                    self.log.update_progress(done, f"loss {loss:.3f} ppl {math.exp(min(loss, 700)):.2f} "
                                             f"{tokens_per_step / dt:,.0f} tok/s")
                    if failed_step is not None:
                        status = "failed"
                        break
                drift_every = cfg.objective.drift_every
                if drift_every and done % drift_every == 0 and not at_eval and done != total:
                    drift = self.evaluate(state, batches=1)["precision_drift"]
                    self.log.log(done, "val", {"precision_drift": drift})
                if at_eval and done != total:
                    last_val = self.evaluate(state)
                    self.log.log(done, "val", last_val)
                    self.hooks("on_eval", step=done, metrics=last_val, state=state)
                if at_ckpt and done != total:
                    self.log.flush()
                    self.save_checkpoint(state)
                if self.stop_requested:
                    status = "interrupted"
                    break
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
        summary = self._summary(state, last_val, wall, compile_time, status, failed_step, bundle)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        self.run_lock.release()
        return RunResult(self.run_dir, summary, status, bundle, state)

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
        if not (policy == "capture" or (self.stalled and policy != "halt")):
            return None
        from sandbox.forensics.bundle import save_bundle

        # The held state is the state before the stopping step; clear the stall mark as the bundle clears
        # the failure mark, so replaying the step runs it again.
        state = state._replace(guard=state.guard._replace(stalled_step=np.int32(-1)))
        batch = self.run.pipeline.train_batch(failed_step).as_dict()
        return save_bundle(self.run_dir / "failure", self.cfg, state, batch, failed_step, self.history)

    def _summary(self, state, last_val, wall, compile_time, status, failed_step, bundle) -> dict:
        """summary.json. Steps are named by state.step after them (1-based), as in metrics.jsonl.

        Everything but timings (wall_time_s, compile_time_s, tokens_per_s) is a function of the run's
        metrics.jsonl and final state, so a resumed run's summary equals the uninterrupted run's.
        train_ce: mean CE over the last 10% (at least one) of the steps that applied an update.
        """
        rows = self._run_rows()
        applied = [r for r in rows if r.get("applied", 1) and isinstance(r.get("ce", r.get("loss")), (int, float))]
        tail = applied[-max(1, len(applied) // 10):]
        g = jax.device_get(state.guard)
        s = {
            "status": status,
            "steps": failed_step + 1 if failed_step is not None else int(state.step),
            "policy": self.run.policy.name,
            "train_ce": float(np.mean([r.get("ce", r["loss"]) for r in tail])) if tail else None,
            "val_ce": last_val["ce"] if last_val else None,
            "val_bits_per_token": last_val["bits_per_token"] if last_val else None,
            "val_bits_per_byte": last_val.get("bits_per_byte") if last_val else None,
            "val_perplexity": last_val["perplexity"] if last_val else None,
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in self.history[-20:]]))
            if self.history else None,
            "wall_time_s": wall,
            "compile_time_s": compile_time,
            "overflow_skips": int(g.skipped_overflow),
            "nonfinite_skips": int(g.skipped_nonfinite),
            "spike_skips": int(g.skipped_spikes),
            "final_loss_scale": float(jax.device_get(state.loss_scale.scale)),
            "failed_step": failed_step + 1 if failed_step is not None else None,
            "cause": self.cause if status == "failed" else None,
            "bundle": str(bundle) if bundle else None,
        }
        s.update(self._run_telemetry(rows))
        for key in ("entropy", "precision_drift", "kl_to_reference_reverse", "kl_to_reference_forward"):
            if last_val and key in last_val:
                s[key if key == "precision_drift" else f"val_{key}"] = last_val[key]
        if last_val and "kl_to_source" in last_val:
            s["val_kl_to_source"] = last_val["kl_to_source"]
            s["entropy_rate"] = self.run.pipeline.info["entropy_rate"]
        return s

    def _run_rows(self) -> list[dict]:
        """The run's train rows, one per step in order.

        Read back from metrics.jsonl, the last row of each step winning (a resumed run re-logs the
        steps after its checkpoint), so a resumed run summarises the same steps as an uninterrupted
        one. Without a JSONL log: the recent history only (a resumed run then summarises less).
        """
        if self.cfg.logging.jsonl:
            by_step = {r["step"]: r for r in read_metrics(self.run_dir) if r.get("split") == "train"}
            if by_step:
                return [by_step[k] for k in sorted(by_step)]
        return self.history

    @staticmethod
    def _run_telemetry(rows: list[dict]) -> dict:
        """Means of the underflow/overflow/lost-update fractions and the max fp8 saturation, over the run."""

        def values(match):
            return [v for r in rows for k, v in r.items() if match(k) and isinstance(v, (int, float))]

        out = {}
        for key in ("underflow_frac", "overflow_frac", "lost_update_frac"):
            if vals := values(lambda k, key=key: k == key):
                out[key] = float(np.mean(vals))
        if sat := values(lambda k: k.startswith("fp8_stats/") and "saturated" in k):
            out["fp8_saturated_frac"] = float(np.max(sat))
        return out

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

