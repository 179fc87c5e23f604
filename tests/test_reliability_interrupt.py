"""Interruption: SIGKILL loses at most one checkpoint interval; SIGTERM/SIGINT stop cleanly with exit 0.

Real `python -m sandbox train` subprocesses on a tiny config (a few seconds
of training). One run is killed the moment orbax starts writing a checkpoint
(its temporary directory appears), resumed and killed again after a seeded
random delay, then resumed to the end; its train losses must equal an
uninterrupted run's exactly.

Stop requests (sandbox/interrupts.py): runs with the prefetch thread on get
SIGINT or SIGTERM at seeded random moments, before and during training (5 in
the default run, 20 under `-m slow`); every one must exit 0 with no abort
("terminate called", "FATAL: exception not rethrown") and leave a run whose
checkpoint verifies and resumes. A pseudo-terminal test presses Ctrl-C on a
text-data run with the progress bar on. The cause of the aborts these tests
guard against is pinned down directly: a prefetch worker must be joined when
its consumer stops (data.batches.Prefetcher), and an interpreter that exits
right after stopping one mid device_put must exit 0.
"""

from __future__ import annotations

import json
import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from sandbox.checkpoint import Checkpointer
from sandbox.data import make_pipeline
from sandbox.logger import read_metrics
from tests.conftest import SHAKESPEARE

REPO = Path(__file__).resolve().parents[1]
EVERY = 20
CONFIG = {
    "seed": 0,
    "model": {"context": 16, "n_layer": 1, "n_head": 2, "d_model": 32},
    "data": {"synthetic": {"alphabet": 8}, "prefetch": 0},
    "optimizer": {"lr": 3e-3, "warmup_steps": 5},
    "training": {"steps": 300, "batch_size": 8, "eval_every": 0, "eval_batches": 1, "log_every": 5},
    "checkpoint": {"every": EVERY, "keep": 3},
    "logging": {"progress": False, "tensorboard": False},
}


def _write_config(tmp_path: Path, name: str, config: dict) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**config, "name": name, "run_root": str(tmp_path / "runs"),
                                   "data": {**config["data"], "cache_dir": str(tmp_path / "cache")}}))
    return cfg


def _start(tmp_path: Path, name: str, *extra, config: dict = CONFIG) -> subprocess.Popen:
    cfg = _write_config(tmp_path, name, config)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "sandbox", "train", str(cfg), *extra], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc, timeout=300.0, poll=0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out")


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


def _ckpts(run_dir):
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.stdout.read()


def _resumed_at(output: str) -> int:
    for line in output.splitlines():
        if "resumed at step" in line:
            return int(line.rsplit(" ", 1)[1])
    return 0


def test_sigkill_during_save_and_at_random_then_resume_reproduces_losses(tmp_path):
    ref = _start(tmp_path, "ref")
    run_dir = tmp_path / "runs" / "killed"
    # 1. killed the moment a checkpoint write begins (orbax's temp dir exists)
    p = _start(tmp_path, "killed")
    tmp_dirs = lambda: (run_dir / "checkpoints").exists() and any(  # noqa: E731
        "tmp" in q.name for q in (run_dir / "checkpoints").iterdir())
    assert _wait_for(lambda: _ckpts(run_dir) and tmp_dirs(), p), p.stdout.read()
    _kill(p)
    before = _losses(run_dir)
    # 2. resumed, killed after a seeded random delay
    p = _start(tmp_path, "killed", "--resume")
    first = max(s for s, _ in before) if before else 0
    assert _wait_for(lambda: max((s for s, _ in _losses(run_dir)), default=0) > first, p, poll=0.01)
    time.sleep(random.Random(9).uniform(0.5, 3.0))
    out = _kill(p)
    r1 = _resumed_at(out)
    last = max((s for s, _ in _losses(run_dir)), default=0)
    valid = _ckpts(run_dir)
    # 3. resumed to the end
    p = _start(tmp_path, "killed", "--resume")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    r2 = _resumed_at(out)
    assert r2 % EVERY == 0 and 0 <= last - r2 <= EVERY, (r2, last, valid, out)
    assert r1 % EVERY == 0
    ref_out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_out
    ref_losses = _losses(tmp_path / "runs" / "ref")
    got = _losses(run_dir)
    assert [s for s, _ in ref_losses] == list(range(1, CONFIG["training"]["steps"] + 1))
    assert got == ref_losses  # exact: every logged step, restored or recomputed
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == CONFIG["training"]["steps"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_exit_0_within_seconds(tmp_path, sig):
    p = _start(tmp_path, "stopme")
    run_dir = tmp_path / "runs" / "stopme"
    assert _wait_for(lambda: _losses(run_dir) or _ckpts(run_dir), p, poll=0.01), p.stdout.read()
    t0 = time.monotonic()
    p.send_signal(sig)
    out, _ = p.communicate(timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 0, out
    assert took < 15, took
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] < CONFIG["training"]["steps"]
    assert _ckpts(run_dir)[-1] == summary["steps"]  # a checkpoint at the stop step


# ------------------------------------------------------------------ stop requests and the prefetch thread
ABORTS = ("terminate called", "FATAL", "Traceback", "core dumped")


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "prefetch" and t.is_alive()]


def test_prefetcher_joins_its_worker_on_close_exception_and_exhaustion(tiny):
    p = make_pipeline(tiny())
    early = p.prefetch_train(0, 1000, depth=2)
    assert [next(early).inputs.shape for _ in range(2)] == [(16, 32)] * 2
    early.close()  # a consumer that stops early (interrupt, failure): the worker is gone, not just told to go
    assert _prefetch_threads() == []
    with pytest.raises(RuntimeError, match="consumer failed"):
        with p.prefetch_train(0, 1000, depth=2) as batches:
            next(batches)
            raise RuntimeError("consumer failed")
    assert _prefetch_threads() == []
    with p.prefetch_train(3, 7, depth=2) as batches:
        got = [b.inputs for b in batches]
    assert _prefetch_threads() == []
    assert len(got) == 4 and all((g == p.train_batch(k).inputs).all() for g, k in zip(got, range(3, 7)))

    def broken(batch):
        raise ValueError("worker failed")

    with pytest.raises(ValueError, match="worker failed"):
        list(p.prefetch_train(0, 10, depth=2, transform=broken))
    assert _prefetch_threads() == []


def test_exit_right_after_stopping_a_prefetch_mid_device_put_exits_0(tmp_path):
    # The abort's mechanism, without a training run: the worker is inside jax.device_put (C++) when
    # the consumer stops and the interpreter exits. A worker left running is killed by pthread_exit
    # at finalisation and the process aborts (exit 134); a joined one cannot be.
    script = tmp_path / "stop_and_exit.py"
    script.write_text(textwrap.dedent("""
        import jax, numpy as np
        from sandbox.data.batches import DataPipeline
        from sandbox.data.synthetic import MarkovSource
        from sandbox.data.tokenizer import make_tokenizer

        big = np.ones((256, 1024), np.float32)

        def slow_place(batch):  # many device_puts: the worker spends its time in JAX's C++
            for _ in range(300):
                jax.device_put(big)
            return jax.device_put(batch.inputs)

        p = DataPipeline(tokenizer=make_tokenizer("byte"), seed=0, batch_size=4, context=8,
                         markov=MarkovSource.create(8, 1, 0.5, 0))
        batches = p.prefetch_train(0, 100, 2, slow_place)
        next(batches)
        batches.close()
    """))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    for _ in range(3):
        r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and not any(a in r.stderr for a in ABORTS), (r.returncode, r.stderr[-2000:])


STOP_CONFIG = {**CONFIG, "data": {**CONFIG["data"], "prefetch": 2},
               "training": {**CONFIG["training"], "steps": 100_000},  # only a signal ends these runs
               "checkpoint": {"every": 10, "keep": 2}}


def _signal_at(proc: subprocess.Popen, run_dir: Path, moment: str, delay: float, sig: int) -> str:
    """Sends sig `delay` s after start ("before": imports, build, compile) or after the first metrics row."""
    if moment == "during":
        _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size, proc)
    time.sleep(delay)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return out


def _check_stopped_run(run_dir: Path, rc: int, out: str, label: str) -> int | None:
    """Exit 0, no abort, and what is on disk is a resumable run; returns its checkpoint step (None: none)."""
    assert rc == 0 and not any(a in out for a in ABORTS), (label, rc, out[-3000:])
    if not (run_dir / "summary.json").exists():  # stopped before training: nothing trained, nothing saved
        assert not (run_dir / "checkpoints").exists() or _ckpts(run_dir) == [], (label, out[-2000:])
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", (label, summary)
    newest = Checkpointer(run_dir, read_only=True).newest_valid()  # every file's sha256 checked
    assert newest == (summary["steps"] or None), (label, newest, summary["steps"])
    return newest


def _stop_runs_at_random_moments(tmp_path: Path, n: int, seed: int, concurrent: int = 3) -> list[tuple]:
    rng = random.Random(seed)
    plan = [(f"s{i}", rng.choice(["before", "during"]), rng.choice([signal.SIGINT, signal.SIGTERM]))
            for i in range(n)]
    plan = [(name, moment, sig, rng.uniform(0.3, 6.0) if moment == "before" else rng.uniform(0.0, 0.8))
            for name, moment, sig in plan]
    results = []
    for first in range(0, n, concurrent):
        batch = plan[first:first + concurrent]
        procs = [_start(tmp_path, name, config=STOP_CONFIG) for name, *_ in batch]
        outs = [None] * len(batch)

        def stop(j, proc, name, moment, sig, delay):
            outs[j] = _signal_at(proc, tmp_path / "runs" / name, moment, delay, sig)

        threads = [threading.Thread(target=stop, args=(j, proc, *item)) for j, (proc, item) in enumerate(zip(procs, batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (name, moment, sig, delay), proc, out in zip(batch, procs, outs):
            label = f"{name}: {signal.Signals(sig).name} {moment} +{delay:.2f}s"
            step = _check_stopped_run(tmp_path / "runs" / name, proc.returncode, out, label)
            results.append((name, moment, sig, step))
    return results


def _resume_a_few_steps(tmp_path: Path, name: str, step: int | None) -> None:
    stop_at = (step or 0) + 3
    p = _start(tmp_path, name, "--resume", "--set", f"training.steps={stop_at}", config=STOP_CONFIG)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0 and not any(a in out for a in ABORTS), out[-3000:]
    if step:
        assert _resumed_at(out) == step, out[-2000:]
    summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == stop_at


def test_five_stop_requests_at_random_moments_exit_0_and_leave_a_resumable_run(tmp_path):
    results = _stop_runs_at_random_moments(tmp_path, 5, seed=14)
    name, _, _, step = max(results, key=lambda r: r[3] or 0)
    _resume_a_few_steps(tmp_path, name, step)


@pytest.mark.slow
def test_twenty_stop_requests_at_random_moments_exit_0_and_every_run_resumes(tmp_path):
    results = _stop_runs_at_random_moments(tmp_path, 20, seed=7)
    assert {m for _, m, _, _ in results} == {"before", "during"}
    assert sum(1 for r in results if r[3]) >= 5, results  # a fair share stopped mid-training with a checkpoint
    for name, _, _, step in results:
        _resume_a_few_steps(tmp_path, name, step)


def test_second_stop_request_aborts_at_once_with_one_line_and_exit_130(tmp_path):
    p = _start(tmp_path, "twice", config=STOP_CONFIG)
    run_dir = tmp_path / "runs" / "twice"
    manifests = lambda: list((run_dir / "checkpoints").glob("*/sha256sums.json"))  # noqa: E731
    _wait_for(lambda: (run_dir / "checkpoints").exists() and manifests(), p)  # one complete checkpoint
    # Two requests before the first is handled. Two SIGINTs sent this fast would merge into one
    # (the kernel and Python keep one pending flag per signal), so the second is a SIGTERM.
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-2000:]
    assert "SIGTERM again: aborting now without saving" in out and not any(a in out for a in ABORTS), out[-2000:]
    newest = Checkpointer(run_dir, read_only=True).newest_valid(report=lambda message: None)
    assert newest is not None and newest % 10 == 0  # what was saved before the abort is intact


def _read_pty(fd: int, until=None, timeout: float = 300.0) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        if select.select([fd], [], [], 0.05)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                return buf
            if not chunk:
                return buf
            buf += chunk
            if until is not None and until(buf):
                return buf
    return buf


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child execs at once: nothing to deadlock
def test_ctrl_c_in_a_terminal_with_the_progress_bar_on_text_data_exits_0(tmp_path):
    config = {**STOP_CONFIG, "model": {**STOP_CONFIG["model"], "vocab_size": 256},
              "data": {"source": "text", "paths": [str(SHAKESPEARE)], "prefetch": 2},
              "logging": {"progress": True, "tensorboard": True}}
    cfg = _write_config(tmp_path, "tty", config)
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session whose controlling terminal is the pty, as in a shell
        os.execve(sys.executable, [sys.executable, "-m", "sandbox", "train", str(cfg)],
                  {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "TERM": "xterm"})
    out = _read_pty(fd, until=lambda b: re.search(rb"\b[1-9][0-9]*/100000\b", b))  # the bar has moved
    os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground process group
    out += _read_pty(fd, timeout=120)
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    assert not any(a in text for a in ABORTS), text[-3000:]
    summary = json.loads((tmp_path / "runs" / "tty" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and _ckpts(tmp_path / "runs" / "tty")[-1] == summary["steps"]
