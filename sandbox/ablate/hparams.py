"""TensorBoard's HParams tab for an experiment: one session per cell.

Each cell gets `tb/<cell>/hparams/`, an event file holding what tensorboardX's
`SummaryWriter.add_hparams` writes (the same protos, from
`tensorboardX.summary.hparams`): the experiment's hparam and metric lists,
the session's start (its hparams) and end, and one scalar per metric. The
HParams tab then shows a table and parallel-coordinates view of every cell,
beside the training curves each cell's worker wrote to `tb/<cell>/`.

* hparams: the keys the spec varies (its axes and cells' settings, dotted,
  e.g. `precision.policy`, `seed`), each cell filled in from its resolved
  config (configs/<cell>.yaml) where the spec left a key unset for it, so
  every session has every column; plus `variant`, the table's row label.
* metrics (`hparams/...`): final val CE, final train CE, skipped steps
  (overflow + non-finite + spike skips), tokens/s, from summary.json. A
  cell without a value (failed, crashed) leaves that metric out.

Why not `SummaryWriter.add_hparams` itself: it writes through a background
thread into a new, timestamped file each call, so `sandbox report` run twice
would leave two sessions per cell. Here the records are framed in memory
(TFRecord: length, masked CRC32C of it, data, masked CRC32C of it) and the
file is written with `rundir.atomic_write` under a fixed name: a re-run
replaces it. Called from `report.write_report`, so it reflects what the
cells left on disk, like the table.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import hparams, scalar

from sandbox import config as config_lib
from sandbox.errors import UserError
from sandbox.rundir import atomic_write, real_subdir

EVENT_FILE = "events.out.tfevents.0.sandbox-hparams"  # "tfevents" in the name: TensorBoard reads it
SUBDIR = "hparams"
METRICS = {"hparams/val_ce": "val_ce", "hparams/train_ce": "train_ce", "hparams/skipped_steps": "skipped_steps",
           "hparams/tokens_per_s": "tokens_per_s"}  # metric tag -> report.MEAN_COLUMNS column


def _record(data: bytes) -> bytes:
    header = struct.pack("Q", len(data))
    return header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data))


def _event(wall_time: float, summary=None, step: int = 0) -> bytes:
    if summary is None:
        return _record(Event(wall_time=wall_time, file_version="brain.Event:2").SerializeToString())
    return _record(Event(wall_time=wall_time, step=step, summary=summary).SerializeToString())


def _hparam_value(v):
    """What the HParams tab can show: strings, bools and numbers; anything else as its text."""
    return v if isinstance(v, (str, bool, int, float)) else str(v)


def _config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def cell_hparams(exp, cell, keys: list[str]) -> dict:
    """The cell's value of every varied key (its spec setting, else its resolved config's), plus its variant."""
    try:
        config = config_lib.read_yaml(exp.dir / "configs" / f"{cell.name}.yaml")
    except UserError:  # an experiment from before configs/ existed, or a damaged file: spec values only
        config = {}
    out = {"variant": cell.variant}
    for key in keys:
        value = cell.settings[key] if key in cell.settings else _config_value(config, key)
        if value is not None:
            out[key] = _hparam_value(value)
    return out


def write_hparams(exp, cell_value) -> list[Path]:
    """Writes tb/<cell>/hparams/ for every cell that ran; `cell_value(cell, column)` gives a metric or None."""
    keys = list(dict.fromkeys(k for c in exp.cells for k in c.settings))
    written = []
    now = time.time()
    for cell in exp.cells:
        if cell.status == "pending":
            continue
        metrics = {tag: float(v) for tag, column in METRICS.items() if (v := cell_value(cell, column)) is not None}
        exp_summary, start, end = hparams(cell_hparams(exp, cell, keys), dict.fromkeys(METRICS, 0.0))
        events = [_event(now), _event(now, exp_summary), _event(now, start), _event(now, end)]
        events += [_event(now, scalar(tag, value), step=0) for tag, value in metrics.items()]
        folder = real_subdir(real_subdir(real_subdir(exp.dir, "tb"), cell.name), SUBDIR)
        written.append(atomic_write(folder / EVENT_FILE, b"".join(events)))
    return written
