"""Run logging: TensorBoard tags read back by TensorBoard itself, grouped, without flag noise."""

from __future__ import annotations

import glob
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import scalar

from sandbox.logger import RunLogger, read_metrics, tb_tag
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


def test_each_logged_row_is_one_tensorboard_event_with_the_jsonl_values(tiny):
    # One event per row, not one per scalar: tensorboardX's add_scalar builds and queues an event per
    # value (~0.2 ms each, some 30 per step), host time a 2-core machine takes from the step itself.
    cfg = tiny(overrides={"logging": {"tensorboard": True}, "training": {"steps": 6, "eval_every": 3}})
    result = train(cfg, quiet=True)
    (events_file,) = glob.glob(str(result.run_dir / "tb" / "events.out.tfevents.*"))
    events = [e for e in map(Event.FromString, RawEventFileLoader(events_file).Load()) if e.HasField("summary")]
    rows = [r for r in read_metrics(result.run_dir) if r["split"] in ("train", "val")]
    assert len(events) == len(rows)
    for event, row in zip(events, rows):
        assert event.step == row["step"]
        got = {v.tag: v.simple_value for v in event.summary.value}
        want = {tb_tag(row["split"], k): v for k, v in row.items()
                if k not in ("step", "split", "time") and tb_tag(row["split"], k) and isinstance(v, (int, float))}
        assert got.keys() == want.keys()
        bad = {t: (got[t], want[t]) for t in got if not (math.isclose(got[t], want[t], rel_tol=1e-6, abs_tol=1e-37)
                                                       or math.isnan(got[t]) and math.isnan(want[t]))}
        assert not bad


def test_tensorboard_values_are_the_ones_tensorboardx_scalar_builds(tiny, tmp_path):
    """The logger builds each value itself, once per tag (issue 18: tensorboardX's `scalar` costs ~7 us a
    value on the host, ~0.2 ms a step); the events must hold exactly what `scalar` would have built:
    its tag cleaning (spaces, colons), its float32 rounding, nan and inf as they are."""
    cfg = tiny(overrides={"logging": {"tensorboard": True}})
    rows = [("train", {"ce": 2.5, "grad_norm": 0.1, "lr": 3, "loss_scale": float("inf"),
                       "update_ratio": float("nan"), "activations/block 0/x:y": 1e-40, "my hook/:odd": -7.25,
                       "applied": 1.0}),
            ("val", {"ce": 2.4, "activations/block 0/x:y": 5.0})]
    (tmp_path / "run").mkdir()
    logger = RunLogger(tmp_path / "run", cfg.logging, total_steps=4)
    for step, (split, values) in enumerate(rows * 2, start=1):  # twice: tags looked up again
        logger.log(step, split, values)
    logger.close()
    (events_file,) = glob.glob(str(tmp_path / "run" / "tb" / "events.out.tfevents.*"))
    events = [e for e in map(Event.FromString, RawEventFileLoader(events_file).Load()) if e.HasField("summary")]
    assert [e.step for e in events] == [1, 2, 3, 4]
    for event, (split, values) in zip(events, rows * 2):
        want = Summary(value=[scalar(tag, v).value[0] for k, v in values.items()
                              if (tag := tb_tag(split, k)) is not None])
        assert event.summary.SerializeToString() == want.SerializeToString()
