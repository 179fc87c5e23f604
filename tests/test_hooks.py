"""Trainer hooks (built-in events, user hooks, --hook) and per-block activation statistics."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from sandbox.errors import UserError
from sandbox.train.hooks import Hooks, load_hook
from sandbox.train.loop import train


class Recorder:
    def __init__(self):
        self.events = []

    def on_step_end(self, step, metrics, state):
        self.events.append(("on_step_end", step, metrics["loss"]))

    def on_eval(self, step, metrics, state):
        self.events.append(("on_eval", step, metrics["ce"]))

    def on_checkpoint(self, step, path, state):
        self.events.append(("on_checkpoint", step, str(path)))


def test_hooks_events_activations_and_a_raising_hook(tiny):
    cfg = tiny(overrides={"training": {"steps": 10, "log_every": 5},
                          "forensics": {"activations": True}})
    rec, calls = Recorder(), []

    def broken(event, **kw):
        calls.append(event)
        raise RuntimeError("boom")

    result = train(cfg, [rec, broken], quiet=True)
    assert result.status == "finished"
    steps = [s for e, s, _ in rec.events if e == "on_step_end"]
    assert steps == list(range(1, 11))  # one call per step, in order, despite batched reads
    assert [e for e, *_ in rec.events][-2:] == ["on_eval", "on_checkpoint"]
    assert calls == ["on_step_end"]  # disabled after raising once; the run went on
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 10
    amax = train_rows[-1]["activations/block_0/amax"]
    assert 0 < amax < 1e4 and train_rows[-1]["activations/block_0/nonfinite"] == 0


def test_raising_hook_is_reported_by_name():
    lines = []
    hooks = Hooks([], report=lines.append)

    def bad_hook(event, **kw):
        raise ValueError("nope")

    hooks.add(bad_hook)
    hooks("on_eval", step=1, metrics={}, state=None)
    hooks("on_eval", step=2, metrics={}, state=None)
    assert len(lines) == 1 and "bad_hook" in lines[0] and "ValueError: nope" in lines[0]


def test_nonfinite_hook_and_halt(tiny):
    """A naive fp16 softmax fails at step 1: on_nonfinite fires, with the frozen pre-failure state."""
    cfg = tiny(overrides={"model": {"init_std": 0.3, "n_layer": 1},
                          "precision": {"policy": "fp16", "naive_softmax": True},
                          "forensics": {"nan_policy": "halt"}})
    seen = []
    result = train(cfg, [lambda event, **kw: seen.append((event, kw.get("step")))], quiet=True)
    assert result.status == "failed" and result.bundle is None  # halt: no bundle
    assert ("on_nonfinite", 1) in seen


def test_load_hook_from_module(tmp_path, monkeypatch):
    (tmp_path / "my_hooks.py").write_text(textwrap.dedent("""
        class Counter:
            def __init__(self):
                self.n = 0
            def on_step_end(self, step, metrics, state):
                self.n += 1
        def fn(event, **kw):
            return event
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(load_hook("my_hooks:Counter")).__name__ == "Counter"  # classes are instantiated
    assert load_hook("my_hooks:fn")("on_eval") == "on_eval"
    for spec, msg in [("my_hooks", "expected package.module:name"), ("nosuchmod_x:f", "cannot import"),
                      ("my_hooks:missing", "no attribute")]:
        with pytest.raises(UserError, match=msg):
            load_hook(spec)
    sys.modules.pop("my_hooks", None)
