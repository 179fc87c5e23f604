"""The fast path: the loop never waits on the device between log intervals, and the step compiles once.

Timing is the benchmarks' business (scripts/bench_step.py); these tests check
the properties that make the loop fast, on CPU:
- no implicit device-to-host transfer anywhere in a run (an implicit one is a
  hidden host sync: `float(x)`, `bool(x)`, `np.asarray(x)` on a device array);
- metrics reach the host only at log/eval/checkpoint intervals, a batch at a time;
- one compilation of the step and of the eval step for the whole run (no
  retracing), the step's started on a worker thread before the initial state
  is built (train/ahead.py), and the state is donated (its buffers reused in
  place).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import pytest
from jax._src import dispatch  # BACKEND_COMPILE_EVENT: the event name has no public constant

from sandbox import rundir
from sandbox.logger import read_metrics
from sandbox.train import loop
from sandbox.train.ahead import Ahead


class CompileLog:
    """Backend compiles seen through jax.monitoring: (function name, thread) at start and at end."""

    def __init__(self):
        self.started: list[tuple[str, str]] = []
        self.finished: list[str] = []

    def on_start(self, event, value, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            self.started.append((kw.get("fun_name", ""), threading.current_thread().name))

    def on_end(self, event, duration, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            self.finished.append(kw.get("fun_name", ""))

    def count(self, name: str) -> int:
        return sum(name in n for n in self.finished)


@pytest.fixture
def compile_log(fresh_compiles):
    log = CompileLog()
    jax.monitoring.register_scalar_listener(log.on_start)
    jax.monitoring.register_event_duration_secs_listener(log.on_end)
    yield log
    jax.monitoring.unregister_scalar_listener(log.on_start)
    jax.monitoring.unregister_event_duration_listener(log.on_end)


@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_no_host_sync_between_intervals_and_one_compile(tiny, monkeypatch, policy, compile_log):
    # fp16 with a scale that overflows the first few steps (2**20 / 2**k until the grads fit, then
    # updates): the overflow events are processed from metrics too.
    sets = ["training.steps=12", "training.log_every=4", "training.eval_every=8", "checkpoint.every=8",
            f"precision.policy={policy}", "logging.progress=false"]
    if policy == "fp16":
        sets += ["precision.loss_scale.init_scale=1048576", "precision.loss_scale.max_scale=1048576"]
    trainer = loop.Trainer(tiny(sets=sets), quiet=True)

    metric_pulls = []
    device_get = jax.device_get

    def counting_get(x):
        if isinstance(x, list) and x and isinstance(x[0], tuple):  # the loop's pending (step, metrics) rows
            metric_pulls.append([step for step, _ in x])
        return device_get(x)

    monkeypatch.setattr(loop.jax, "device_get", counting_get)
    with jax.transfer_guard_device_to_host("disallow"):
        result = trainer.train()
    monkeypatch.undo()

    assert result.status == "finished"
    # steps 1-4, 5-8 (log + eval + checkpoint), 9-12: three pulls of four rows each
    assert metric_pulls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert compile_log.count("train_step") == 1 and compile_log.count("eval_step") == 1, compile_log.finished
    rows = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 13))  # every step's metrics still logged
    if policy == "fp16":
        assert 1 <= result.summary["overflow_skips"] < 12


def test_step_donates_the_state(tiny):
    run = loop.build(tiny(sets=["training.steps=2"]))
    state = loop.initial_state(run)
    batch = loop.place_batch(run, run.pipeline.train_batch(0))
    leaf = jax.tree.leaves(state.params)[0]
    new, _ = run.step_fn(state, batch)
    jax.block_until_ready(new)
    assert leaf.is_deleted()  # the input buffer was given to the output, not copied


def test_telemetry_every_n_steps_runs_a_lean_step_between(tiny, compile_log):
    """precision.telemetry_every=4: telemetry on steps 4, 8, 10 (the last); the same training otherwise."""
    base = ["training.steps=10", "training.log_every=5", "precision.policy=bf16", "logging.progress=false"]
    full = loop.train(tiny("full", sets=base), quiet=True)
    full_compiles = compile_log.count("train_step")
    lean_trainer = loop.Trainer(tiny("lean", sets=[*base, "precision.telemetry_every=4"]), quiet=True)
    lean = lean_trainer.train()
    rows = {n: [r for r in read_metrics(r.run_dir) if r["split"] == "train"] for n, r in
            (("full", full), ("lean", lean))}
    assert [r["step"] for r in rows["lean"] if "lost_update_frac" in r] == [4, 8, 10]
    assert [r["step"] for r in rows["lean"] if "underflow_frac" in r] == [4, 8, 10]
    assert all("lost_update_frac" in r and "update_ratio" in r for r in rows["full"])
    # telemetry only observes: losses and final parameters are identical
    assert [r["loss"] for r in rows["lean"]] == [r["loss"] for r in rows["full"]]
    same = jax.tree.map(lambda a, b: bool((a == b).all()), full.state.params, lean.state.params)
    assert all(jax.tree.leaves(same))
    # each variant compiled once; the summary's fraction is the mean over the telemetry steps
    assert full_compiles == 1 and compile_log.count("train_step") == 1 + 2, compile_log.finished
    tele = [r["lost_update_frac"] for r in rows["lean"] if "lost_update_frac" in r]
    assert lean.summary["lost_update_frac"] == pytest.approx(sum(tele) / len(tele))


def test_the_step_compiles_while_the_initial_state_is_built(tiny, monkeypatch, compile_log):
    """The step's compile (seconds on a CPU) overlaps the initial state's, and runs once for the whole run.

    The initial state is held back until the step's compile has started: a trainer that compiled
    the step at its first call, after the initial state, would wait here in vain (60 s) and fail.
    """
    trainer = loop.Trainer(tiny(sets=["training.steps=6", "training.log_every=2", "training.eval_every=3",
                                      "logging.progress=false"]), quiet=True)
    real_init, seen = loop.initial_state, []

    def init_once_the_step_compiles(run):
        deadline = time.monotonic() + 60
        while not any("train_step" in name for name, _ in compile_log.started) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.extend(compile_log.started)
        return real_init(run)

    monkeypatch.setattr(loop, "initial_state", init_once_the_step_compiles)
    result = trainer.train()
    assert result.status == "finished"
    step_compiles = [thread for name, thread in seen if "train_step" in name]
    assert step_compiles and step_compiles[0] != threading.main_thread().name, seen
    # compiled once each for the whole run: no compile again at the first call or the first evaluation
    assert compile_log.count("train_step") == 1 and compile_log.count("eval_step") == 1, compile_log.finished
    assert not any(t.name.startswith(loop.COMPILE_THREAD) for t in threading.enumerate())  # none outlives train()


def test_ahead_traces_on_the_calling_thread_and_compiles_on_the_worker():
    """JAX's thread-local settings (e.g. a caller's default_matmul_precision) shape the program as at a jit's
    first call: the function is traced where the trainer runs; the worker only compiles."""
    traced_on = []

    def f(x):
        traced_on.append(threading.current_thread().name)
        return x * 2

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=loop.COMPILE_THREAD) as executor:
        ahead = Ahead(jax.jit(f), (jax.ShapeDtypeStruct((3,), jnp.float32),), executor)
        assert traced_on == [threading.current_thread().name]
        assert ahead(jnp.arange(3.0)).tolist() == [0.0, 2.0, 4.0]
    assert traced_on == [threading.current_thread().name]  # the call ran the executable: no second trace


def test_a_trainer_that_never_trains_compiles_nothing_in_the_background(tiny, compile_log):
    """A Trainer built only to restore or evaluate (library use, several tests) starts no compile: the
    compiles ahead begin with train(). Started in the constructor, they ran on after it for seconds,
    burning CPU, holding the interpreter's exit, and landing in whatever ran next (another test's
    count of its own compiles)."""
    trainer = loop.Trainer(tiny(sets=["training.steps=2", "logging.progress=false"]), quiet=True)
    try:
        assert not any(t.name.startswith(loop.COMPILE_THREAD) for t in threading.enumerate())
        time.sleep(0.5)  # a compile handed to a worker would have started by now
        assert not [name for name, _ in compile_log.started if "train_step" in name or "eval_step" in name]
        state = trainer.restore_or_init()
        assert set(trainer.evaluate(state, batches=1)) >= {"ce"}  # evaluating compiles on this thread
        assert all(thread == threading.current_thread().name for _, thread in compile_log.started)
    finally:
        trainer.run_lock.release()


def test_no_compile_thread_outlives_a_train_that_fails_before_its_first_step(tiny, monkeypatch):
    trainer = loop.Trainer(tiny(sets=["training.steps=2", "logging.progress=false"]), quiet=True)

    def broken_init(run):
        raise RuntimeError("state could not be built")

    monkeypatch.setattr(loop, "initial_state", broken_init)
    with pytest.raises(RuntimeError, match="could not be built"):
        trainer.train()
    assert not any(t.name.startswith(loop.COMPILE_THREAD) for t in threading.enumerate())
    rundir.DirLock.acquire(trainer.run_dir).release()  # nor does the run directory's lock
