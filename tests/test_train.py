import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.logger import read_metrics
from sandbox.train import loop
from sandbox.train.loop import DETERMINISTIC_FLAG, Trainer, train


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


def order1_entropy_rate(alphabet: int, concentration: float, seed: int) -> float:
    """Entropy rate (nats) of the synthetic order-1 source, from its recipe, in float64.

    Independent of sandbox/data/synthetic.py's power iteration: the stationary
    distribution is the eigenvector of P^T for eigenvalue 1.
    """
    rng = np.random.default_rng([seed, alphabet, 1])
    p = np.maximum(rng.dirichlet(np.full(alphabet, concentration), size=alphabet), 1e-12)
    p /= p.sum(-1, keepdims=True)
    w, v = np.linalg.eig(p.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()
    return float(-np.sum(pi[:, None] * p * np.log(p)))


TIMINGS = ("wall_time_s", "compile_time_s", "tokens_per_s")


def test_loss_falls_toward_entropy_rate(tiny):
    result = train(tiny(sets=["training.steps=100", "training.eval_every=25", "training.batch_size=32"]))
    vals = [r for r in read_metrics(result.run_dir) if r["split"] == "val"]
    kls = [r["kl_to_source"] for r in vals]
    assert result.status == "finished"
    assert kls[-1] < 0.25 * kls[0], kls  # the model closes in on the source
    assert kls[-1] > -0.02  # and never beats the exact floor (up to sampling noise)
    losses = train_losses(result.run_dir)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    s = result.summary
    assert s["val_ce"] == pytest.approx(vals[-1]["ce"])
    # order 1: the window floor is the entropy rate, so kl_to_source = CE - H_rate
    h_rate = order1_entropy_rate(alphabet=8, concentration=0.3, seed=7)
    assert s["entropy_rate"] == pytest.approx(h_rate, rel=1e-9)
    assert s["val_kl_to_source"] == pytest.approx(s["val_ce"] - h_rate, abs=1e-6)


def test_same_seed_same_curve_and_run_dir_contents(tiny):
    a = train(tiny("a", overrides={"logging": {"tensorboard": True}}))
    b = train(tiny("b"))
    assert train_losses(a.run_dir) == train_losses(b.run_dir)
    files = {p.name for p in a.run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "summary.json", "tb"} <= files
    assert list((a.run_dir / "tb").glob("events.out.tfevents.*"))
    row = next(r for r in read_metrics(a.run_dir) if r["split"] == "train")
    for key in ("loss", "bits_per_token", "perplexity", "grad_norm", "update_ratio", "lr",
                "tokens_per_s", "step_time", "kl_to_source"):
        assert key in row, key
    c = train(tiny("c", sets=["seed=1"]))
    assert train_losses(c.run_dir) != train_losses(a.run_dir)


def test_resume_is_bitwise_identical_to_uninterrupted_summary_included(tiny):
    straight = train(tiny("straight", sets=["training.steps=20", "optimizer.warmup_steps=3"]))
    part = tiny("part", sets=["training.steps=20", "optimizer.warmup_steps=3"])
    # 10 steps, then interrupt via the stop flag, then resume for the rest
    class StopAt10:
        def on_step_end(self, step, metrics, state):
            if step == 10:
                trainer.stop_requested = True

    trainer = Trainer(part, [StopAt10()])
    first = trainer.train()
    # step 10's metrics reach the hook while step 11 is in flight (the loop reads back one step
    # behind), so the stop takes effect after step 11; its row is still logged before the checkpoint
    assert first.status == "interrupted" and first.summary["steps"] == 11
    assert train_losses(first.run_dir) == train_losses(straight.run_dir)[:11]
    second = train(part, resume=True)
    assert second.summary["steps"] == 20
    eq = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
                      (straight.state.params, straight.state.opt_state, straight.state.loss_scale),
                      (second.state.params, second.state.opt_state, second.state.loss_scale))
    assert all(jax.tree.leaves(eq))
    assert train_losses(straight.run_dir) == train_losses(second.run_dir)
    # the summary too, field for field but timings (train_ce was averaged over the resumed half only)
    untimed = [{k: v for k, v in r.summary.items() if k not in TIMINGS} for r in (straight, second)]
    assert untimed[1] == untimed[0] and untimed[0]["train_ce"] is not None
    third = train(part, resume=True)  # resuming a finished run: nothing to do, the same summary
    assert {k: v for k, v in third.summary.items() if k not in TIMINGS} == untimed[0]


def test_damaged_metrics_lines_are_reported_and_resume_goes_on(tiny, capsys):
    """A line `5`, a 0xFF byte and a truncated row in metrics.jsonl: resume names them and finishes."""
    cfg = tiny(sets=["training.steps=10", "training.log_every=1"])

    class StopAt5:
        def on_step_end(self, step, metrics, state):
            if step == 5:
                trainer.stop_requested = True

    trainer = Trainer(cfg, [StopAt5()], quiet=True)
    assert trainer.train().status == "interrupted"
    path = cfg.run_dir / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")
    damaged = [*lines[:2], b"5", b"\xff", *lines[2:-1], lines[-2][:17]]  # lines 3, 4 and the last
    path.write_bytes(b"\n".join(damaged) + b"\n")
    capsys.readouterr()
    result = train(cfg, resume=True, quiet=True)
    assert result.status == "finished"
    err = capsys.readouterr().err
    report = [x for x in err.splitlines() if "damaged line" in x]
    assert len(report) == 1 and f"{path}: skipped 3 damaged lines (3, 4, {len(damaged)})" in report[0]
    assert (cfg.run_dir / "metrics.jsonl.damaged").read_bytes() == b"\n".join(damaged) + b"\n"
    assert [r["step"] for r in read_metrics(cfg.run_dir) if r["split"] == "train"] == list(range(1, 11))


def test_cli_train_writes_summary_and_refuses_to_clobber(tmp_path, capsys):
    args = ["train", "configs/quickstart.yaml", "--set", f"run_root={tmp_path}", "--set", "training.steps=6",
            "--set", "training.eval_every=0", "--set", "model.n_layer=1", "--set", "logging.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val_ce" in out and "finished" in out
    summary = json.loads((tmp_path / "quickstart" / "summary.json").read_text())
    assert summary["steps"] == 6
    assert main(args) == 2
    assert "run directory exists" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # nothing left to do, exits cleanly


def test_sample_is_deterministic(tiny):
    from sandbox.sample import sample_from_run

    r = train(tiny(sets=["training.steps=10"]))
    a = sample_from_run(r.run_dir, "ab", max_tokens=12, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    b = sample_from_run(r.run_dir, "ab", max_tokens=12, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    assert a == b and a.startswith("ab") and len(a.encode("utf-8", "replace")) >= 2


DETERMINISM_PROBE = """
import os, sys, warnings
from pathlib import Path
sys.path.insert(0, {tests!r})
from jax._src import xla_bridge
from conftest import tiny_config
from sandbox.train import loop
flags_at_init = []
xla_bridge.register_backend_initialization_hook(lambda b: flags_at_init.append(os.environ.get("XLA_FLAGS", "")))
cfg = tiny_config(Path({tmp!r}), sets=["deterministic=true", "training.steps=2"])
warnings.simplefilter("error", RuntimeWarning)
if {started}:
    import jax
    jax.devices()
    try:
        loop.apply_deterministic(cfg)
    except RuntimeWarning as w:
        print("WARNING", w)
else:
    loop.train(cfg, quiet=True)
print("FLAGS_AT_INIT", flags_at_init)
"""


@pytest.mark.parametrize("started", [False, True])
def test_library_train_applies_deterministic_before_the_backend_starts(tmp_path, started):
    """train() (so ablation cells and lessons too) sets XLA's flag before JAX starts its backend;
    a backend started earlier without it is reported (on CPU a warning: its ops are deterministic anyway)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = DETERMINISM_PROBE.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), started=started)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags = next(x for x in proc.stdout.splitlines() if x.startswith("FLAGS_AT_INIT"))
    if started:
        assert "FLAGS_AT_INIT ['']" == flags
        assert "WARNING deterministic: true cannot be applied: JAX's backend was initialised" in proc.stdout
    else:
        assert DETERMINISTIC_FLAG in flags and "WARNING" not in proc.stdout


def test_deterministic_on_a_started_gpu_backend_is_an_error(tiny, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(loop.xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.setattr(loop.jax, "default_backend", lambda: "gpu")
    with pytest.raises(UserError, match="deterministic: true cannot be applied"):
        loop.apply_deterministic(tiny(sets=["deterministic=true"]))
    loop.apply_deterministic(tiny())  # deterministic: false asks nothing
