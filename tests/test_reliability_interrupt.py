"""Interruption: SIGKILL loses at most one checkpoint interval; SIGTERM/SIGINT save and exit 0.

Real `python -m sandbox train` subprocesses on a tiny config (a few seconds
of training). One run is killed the moment orbax starts writing a checkpoint
(its temporary directory appears), resumed and killed again after a seeded
random delay, then resumed to the end; its train losses must equal an
uninterrupted run's exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sandbox.logger import read_metrics

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


def _start(tmp_path: Path, name: str, *extra) -> subprocess.Popen:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "name": name, "run_root": str(tmp_path / "runs"),
                                   "data": {**CONFIG["data"], "cache_dir": str(tmp_path / "cache")}}))
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
