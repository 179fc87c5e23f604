"""Forensics reads the logit-growth telemetry: `causes.logit_growth` on recorded rows, its remedies, and a
real failure bundle whose history shows attention logits growing until an fp16 softmax overflows."""

from __future__ import annotations

from sandbox.config import load_run_config
from sandbox.forensics.bundle import load_bundle, save_bundle
from sandbox.forensics.causes import logit_growth
from sandbox.forensics.remedies import growth_remedies
from sandbox.forensics.replay import format_report, replay
from sandbox.train.loop import train


def _rows(attn, log_z):
    return [{"step": i + 1, "loss": 3.0, "attention/block_0/logit_max": a * 0.5, "attention/block_1/logit_max": a,
             "output/log_z_absmax": z} for i, (a, z) in enumerate(zip(attn, log_z))]


def test_growth_is_named_from_the_recorded_history():
    steady = _rows([4.0, 4.2, 4.1, 4.3], [5.5, 5.6, 5.5, 5.6])
    assert logit_growth(steady) == []
    kinds = [k for k, _ in logit_growth(_rows([0.1, 1.0, 8.0, 60.0], [5.5, 5.6, 5.5, 5.6]))]
    assert kinds == ["attention_logit_growth"]
    kinds = [k for k, _ in logit_growth(_rows([4.0, 4.2, 4.1, 4.3], [5.5, 8.0, 11.0, 14.0]))]
    assert kinds == ["output_logit_divergence"]
    assert logit_growth([{"step": 1, "loss": 3.0}] * 5) == []  # no telemetry logged: nothing claimed
    assert logit_growth(_rows([0.1, 60.0], [5.5, 20.0])) == []  # too short a history to say


def test_growth_remedies_name_the_fix_that_is_not_on_yet(tiny):
    both = ["attention_logit_growth", "output_logit_divergence"]
    keys = [(r.key, r.value) for r in growth_remedies(tiny(), both)]
    assert keys == [("model.qk_norm", "layernorm"), ("model.attn_softcap", 50.0), ("objective.z_loss", 1e-4),
                    ("model.logit_softcap", 30.0)]
    on = tiny(sets=["model.qk_norm=rmsnorm", "objective.z_loss=1e-4"])
    assert [r.key for r in growth_remedies(on, both)] == ["model.attn_softcap", "model.logit_softcap"]


def test_replay_of_an_fp16_softmax_overflow_says_the_attention_logits_had_been_growing(tiny, shakespeare_path):
    cfg = tiny(overrides={"data": {"source": "text", "paths": [str(shakespeare_path)]},
                          "training": {"steps": 40, "batch_size": 8, "log_every": 5}},
               sets=["precision.policy=fp16", "precision.naive_softmax=true", "optimizer.lr=0.02",
                     "optimizer.warmup_steps=10"])
    result = train(cfg, overwrite=True, quiet=True, capture=save_bundle)
    assert result.status == "failed" and result.bundle is not None
    report = replay(load_bundle(result.bundle))
    assert report.reproduced and "softmax" in report.origin.name_stack
    assert [k for k, _ in report.growth] == ["attention_logit_growth"]
    keys = [r.key for r in report.remedies]
    assert "model.qk_norm" in keys and "model.attn_softcap" in keys
    assert "history (attention_logit_growth)" in format_report(report)
    assert load_run_config(result.run_dir).model.qk_norm == "false"
