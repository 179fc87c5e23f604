"""Failure bundles: everything needed to re-run the step that went non-finite.

Design
------
The guard in the train step freezes the state at the first failure (nan_policy
halt/capture), so when the loop reads the flag, one log interval later, the
state it holds is exactly the state *before* the bad step: parameters,
optimizer state, loss-scale and fp8 state, guard counters. Only the step
counter kept ticking, so the bundle rewinds it (`step = failed_step`) and
clears the guard's failure mark; then `train_step(state, batch)` on the bad
step's batch is the failed call, bit for bit (the step's RNG key is
`fold_in(key(seed), state.step)`, microbatch i uses `fold_in(that, i)`).

Layout of a bundle directory (nothing in it is ever unpickled or executed):

  state.safetensors  every TrainState leaf, keyed by its pytree path
                     ('params/block_0/attention/qkv/kernel', 'opt_state/1/0/mu/...');
                     bf16/fp8 leaves are stored as same-width unsigned ints and
                     viewed back through the dtype recorded in meta.json
  batch.safetensors  the exact batch of the failed step ('inputs', 'targets')
  meta.json          format tag, resolved config, failed step, seed and the RNG
                     rule, policy, leaf dtypes and shapes, the failed step's
                     recorded metrics, the last N metric rows, sha256 of each file
  summary.txt        a few human lines: what failed, where, how to replay

`load_bundle` checks the format tag, that the directory holds exactly the
listed files, every sha256, and that each array has the recorded dtype and
shape. meta.json is not covered by a checksum, so every field read from it is
type- and range-checked before use (`_check_meta`: the failed step is a
0-based index inside the run, the seed and RNG rule match, the recorded
metrics and history rows are numbers, leaf tables name known dtypes and sane
shapes), and the batch must be token ids the config's model can embed.
Anything else is a one-line UserError naming the file and the field.

Step numbering: meta.json's `failed_step` is the 0-based index of the failed
step (`state.step` before it, which seeds its RNG); everything shown to a
user (summary.txt, `sandbox replay`) names it 1-based, `failed_step + 1`, as
metrics.jsonl and summary.json do.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from sandbox import config as config_lib
from sandbox.errors import UserError
from sandbox.floatio import NONFINITE_WORDS, json_float
from sandbox.precision.policy import make_policy
from sandbox.rundir import file_sha256

FORMAT = "sandbox-failure-bundle/1"
META, STATE, BATCH, SUMMARY = "meta.json", "state.safetensors", "batch.safetensors", "summary.txt"
RNG_RULE = "step key = fold_in(key(seed), step); microbatch i key = fold_in(step key, i)"
# Dtypes NumPy (and so safetensors.numpy) cannot name: stored bit-for-bit as same-width uints.
_EXOTIC = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
           "float8_e5m2": ml_dtypes.float8_e5m2}
_UINT = {1: np.uint8, 2: np.uint16}
# Dtypes a bundle may hold (train state and batch): nothing else is decoded.
_DTYPES = frozenset({"float64", "float32", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16",
                     "uint32", "uint64", "bool", *_EXOTIC})
MAX_STEP = 2**31 - 1  # state.step is an int32
MAX_ELEMENTS = 2**34  # of one array: far beyond any model this sandbox trains
MAX_HISTORY = 100_000  # metric rows
_RECORDED = ("loss", "grad_norm", "nonfinite", "loss_scale")


@dataclass
class Bundle:
    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]  # state leaves by path, in their true dtypes
    batch: dict[str, np.ndarray]

    @property
    def cfg(self) -> config_lib.Config:
        return config_lib.from_dict(self.meta["config"])

    @property
    def failed_step(self) -> int:
        return int(self.meta["failed_step"])


def leaf_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten_state(state) -> dict[str, np.ndarray]:
    """{pytree path: host array} for every leaf (a NamedTuple's fields by name)."""
    return {leaf_key(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _encode(arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    stored, info = {}, {}
    for k, a in arrays.items():
        a = np.array(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        name = a.dtype.name
        stored[k] = a.view(_UINT[a.dtype.itemsize]) if name in _EXOTIC else a
        info[k] = {"dtype": name, "shape": list(a.shape)}
    return stored, info


def _decode(stored: dict, info: dict, what: Path) -> dict[str, np.ndarray]:
    if set(stored) != set(info):
        raise UserError(f"{what}: arrays {sorted(set(stored) ^ set(info))[:3]} do not match meta.json")
    out = {}
    for k, a in stored.items():
        dtype, shape = info[k]["dtype"], tuple(info[k]["shape"])
        a = a.view(_EXOTIC[dtype]) if dtype in _EXOTIC else a
        if a.dtype.name != dtype or a.shape != shape:
            raise UserError(f"{what}: {k} is {a.dtype.name}{list(a.shape)}, meta.json says {dtype}{list(shape)}")
        out[k] = a
    return out


def pre_failure_state(state, failed_step: int):
    """The held (frozen) state as it was when the bad step started: counter rewound, guard cleared."""
    g = state.guard
    counted = int(jax.device_get(g.failed_step)) >= 0  # the failure itself was counted once
    guard = g._replace(failed_step=np.int32(-1),
                       skipped_nonfinite=np.int32(max(0, int(jax.device_get(g.skipped_nonfinite)) - counted)))
    return state._replace(step=np.int32(failed_step), guard=guard)


def save_bundle(path: Path, cfg: config_lib.Config, state, batch: dict, failed_step: int,
                history: list[dict]) -> Path:
    """Write the bundle of the failed step `failed_step` (0-based) to directory `path`."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    state = pre_failure_state(state, failed_step)
    stored, state_info = _encode(flatten_state(state))
    save_file(stored, str(path / STATE))
    batch_np = {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
    stored_b, batch_info = _encode(batch_np)
    save_file(stored_b, str(path / BATCH))

    done = failed_step + 1  # history rows are keyed by steps completed
    rows = [{k: json_float(v) for k, v in r.items()} for r in history if r["step"] <= done]
    failed_row = next((r for r in rows if r["step"] == done), {})
    recorded = {k: failed_row[k] for k in ("loss", "grad_norm", "nonfinite", "loss_scale") if k in failed_row}
    summary = _summary_text(cfg, failed_step, recorded, path)
    (path / SUMMARY).write_text(summary, encoding="utf-8")
    meta = {
        "format": FORMAT,
        "failed_step": failed_step,
        "seed": cfg.seed,
        "rng_rule": RNG_RULE,
        "policy": make_policy(cfg.precision).describe(),
        "config": config_lib.to_dict(cfg),
        "devices": [str(d) for d in jax.devices()],
        "recorded": recorded,
        "history": rows,
        "state_leaves": state_info,
        "batch_leaves": batch_info,
        "sha256": {name: file_sha256(path / name) for name in (STATE, BATCH, SUMMARY)},
    }
    (path / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path


def _summary_text(cfg, failed_step: int, recorded: dict, path: Path) -> str:
    loss = recorded.get("loss", "?")
    return (f"Run {cfg.name}: stopped at step {failed_step + 1} (numbered as in metrics.jsonl).\n"
            f"Policy {cfg.precision.policy}, seed {cfg.seed}, nan_policy {cfg.forensics.nan_policy}.\n"
            f"Recorded loss {loss}, grad norm {recorded.get('grad_norm', '?')}.\n"
            f"The state here is the state before that step; the batch is that step's batch.\n"
            f"Find the first bad operation with: sandbox replay {path}\n")


def _read_meta(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path}: no such bundle")
    if not path.is_dir():
        raise UserError(f"{path}: a bundle is a directory (the run's failure/ folder)")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not a failure bundle ({META} missing)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path / META}: damaged ({e.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path / META}: not a {FORMAT} bundle")
    return meta


def _bad(path: Path, field: str, why: str, value=None) -> UserError:
    shown = "" if value is None else f", got {_short(value)}"
    return UserError(f"{path / META}: field '{field}' {why}{shown}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require(meta: dict, path: Path, field: str, kind: type, what: str):
    if field not in meta:
        raise _bad(path, field, "is missing")
    value = meta[field]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _bad(path, field, f"must be {what}", value)
    return value


def _int_in(meta: dict, path: Path, field: str, lo: int, hi: int) -> int:
    value = _require(meta, path, field, int, "an integer")
    if not lo <= value <= hi:
        raise _bad(path, field, f"must be in [{lo}, {hi}]", value)
    return value


def _metric(value) -> bool:
    """A recorded metric: a number, a bool, or a non-finite number as json_float writes it."""
    if isinstance(value, str):
        return value in NONFINITE_WORDS
    return value is None or isinstance(value, (int, float))


def _check_leaves(meta: dict, path: Path, field: str) -> None:
    table = _require(meta, path, field, dict, "a mapping of array names to {dtype, shape}")
    for name, info in table.items():
        where = f"{field}/{name}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape"}:
            raise _bad(path, where, "must be {dtype, shape}", info)
        if info["dtype"] not in _DTYPES:
            raise _bad(path, f"{where}/dtype", "names no array dtype", info["dtype"])
        shape = info["shape"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_ELEMENTS for n in shape):
            raise _bad(path, f"{where}/shape", "must be a list of at most 8 sizes >= 0", shape)
        if math.prod(shape) > MAX_ELEMENTS:
            raise _bad(path, f"{where}/shape", f"has more than {MAX_ELEMENTS} elements", shape)


def _check_meta(meta: dict, path: Path) -> config_lib.Config:
    """Every field `load_bundle` and replay read, type- and range-checked; returns the config."""
    sums = _require(meta, path, "sha256", dict, "a mapping of file names to sha256 digests")
    if set(sums) != {STATE, BATCH, SUMMARY}:
        raise _bad(path, "sha256", f"must list exactly {STATE}, {BATCH}, {SUMMARY}", sorted(map(str, sums)))
    for name, digest in sums.items():
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise _bad(path, f"sha256/{name}", "must be a sha256 hex digest", digest)
    raw = _require(meta, path, "config", dict, "a mapping (the resolved config)")
    try:
        cfg = config_lib.from_dict(raw)
    except UserError as e:
        raise UserError(f"{path / META}: field 'config': {e}") from None
    _int_in(meta, path, "failed_step", 0, min(cfg.training.steps - 1, MAX_STEP))
    if _require(meta, path, "seed", int, "an integer") != cfg.seed:
        raise _bad(path, "seed", f"must equal the config's seed {cfg.seed}", meta["seed"])
    if _require(meta, path, "rng_rule", str, "a string") != RNG_RULE:
        raise _bad(path, "rng_rule", "is not this sandbox's RNG rule (the step would not reproduce)",
                   meta["rng_rule"])
    policy = make_policy(cfg.precision).describe()
    if _require(meta, path, "policy", str, "a string") != policy:
        raise _bad(path, "policy", f"must describe the config's policy ({policy})", meta["policy"])
    devices = _require(meta, path, "devices", list, "a list of device names")
    if not all(isinstance(d, str) for d in devices):
        raise _bad(path, "devices", "must be a list of device names", devices)
    recorded = _require(meta, path, "recorded", dict, "a mapping of metric names to values")
    for key, value in recorded.items():
        if key not in _RECORDED or not _metric(value):
            raise _bad(path, f"recorded/{key}", "must be one of the step's metrics, a number", value)
    _check_history(meta, path, meta["failed_step"])
    _check_leaves(meta, path, "state_leaves")
    _check_leaves(meta, path, "batch_leaves")
    return cfg


def _check_history(meta: dict, path: Path, failed_step: int) -> None:
    rows = _require(meta, path, "history", list, "a list of metric rows")
    if len(rows) > MAX_HISTORY:
        raise _bad(path, "history", f"has more than {MAX_HISTORY} rows", len(rows))
    for i, row in enumerate(rows):
        where = f"history[{i}]"
        if not isinstance(row, dict):
            raise _bad(path, where, "must be a mapping of metric names to values", row)
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= failed_step + 1:
            raise _bad(path, f"{where}/step", f"must be a step number in [1, {failed_step + 1}]", step)
        for key, value in row.items():
            if not (isinstance(key, str) and (_metric(value) or isinstance(value, str))):
                raise _bad(path, f"{where}/{key}", "must be a number", value)


def _check_batch(batch: dict, cfg: config_lib.Config, path: Path) -> None:
    """Token ids the config's model can embed, in the step's shape (an id out of range would embed as NaN)."""
    shape = (cfg.training.batch_size, cfg.model.context)
    for name in ("inputs", "targets"):
        a = batch.get(name)
        if a is None or a.dtype.kind not in "iu" or a.shape != shape:
            got = "missing" if a is None else f"{a.dtype.name}{list(a.shape)}"
            raise UserError(f"{path / BATCH}: '{name}' must be integer token ids of shape {list(shape)}, "
                            f"got {got}")
        if a.size and (a.min() < 0 or a.max() >= cfg.model.vocab_size):
            raise UserError(f"{path / BATCH}: '{name}' holds token ids outside [0, {cfg.model.vocab_size})")
    extra = sorted(set(batch) - {"inputs", "targets"})
    if extra:
        raise UserError(f"{path / BATCH}: unexpected array '{extra[0]}'")


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle; any damage or foreign file is a one-line UserError."""
    path = Path(path)
    meta = _read_meta(path)
    cfg = _check_meta(meta, path)
    sums = meta["sha256"]
    extra = sorted(p.name for p in path.iterdir() if p.name not in sums and p.name != META)
    if extra:
        raise UserError(f"{path}: unexpected file {extra[0]} in the bundle (refusing to load it)")
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise UserError(f"{f}: missing from the bundle")
        if file_sha256(f) != digest:
            kind = " (a pickle, refused)" if f.read_bytes()[:1] == b"\x80" else ""
            raise UserError(f"{f}: checksum mismatch, the bundle was modified or damaged{kind}")
    try:
        arrays = _decode(load_file(str(path / STATE)), meta["state_leaves"], path / STATE)
        batch = _decode(load_file(str(path / BATCH)), meta["batch_leaves"], path / BATCH)
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: damaged bundle ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    _check_batch(batch, cfg, path)
    step = arrays.get("step")
    if step is None or step.shape != () or step.dtype.kind not in "iu" or int(step) != meta["failed_step"]:
        raise UserError(f"{path / STATE}: 'step' must be the failed step's index {meta['failed_step']} "
                        f"(meta.json failed_step)")
    return Bundle(path, meta, arrays, batch)
