"""Run logging: TensorBoard tags read back by TensorBoard itself, grouped, without flag noise."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sandbox.logger import tb_tag
from sandbox.train.loop import train


def test_tags_are_grouped_and_flags_are_not_curves():
    assert tb_tag("train", "ce") == "loss/train_ce" and tb_tag("val", "ce") == "loss/val_ce"
    assert tb_tag("train", "grad_norm") == "optim/train_grad_norm"
    assert tb_tag("train", "loss_scale") == "precision/train_loss_scale"
    assert tb_tag("train", "fp8/block_0/qkv/input_amax") == "fp8/train/block_0/qkv/input_amax"
    for flag in ("applied", "failed_step", "overflow", "nonfinite", "spike", "stalled"):
        assert tb_tag("train", flag) is None


def test_tensorboard_reads_the_run_event_files(tiny):
    cfg = tiny(overrides={"logging": {"tensorboard": True}, "precision": {"policy": "fp16"},
                          "training": {"steps": 10, "eval_every": 5}})
    result = train(cfg, quiet=True)
    acc = EventAccumulator(str(result.run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train_ce", "loss/val_ce", "optim/train_grad_norm", "optim/train_lr",
            "precision/train_loss_scale", "speed/train_tokens_per_s"} <= tags, tags
    assert not [t for t in tags if t.endswith(("_applied", "_failed_step", "_overflow", "_nonfinite", "_spike"))]
    steps = [e.step for e in acc.Scalars("loss/train_ce")]
    assert steps == list(range(1, 11))  # 1-based, as metrics.jsonl
    val = acc.Scalars("loss/val_ce")
    assert [e.step for e in val] == [5, 10] and all(0 < e.value < 10 for e in val)
