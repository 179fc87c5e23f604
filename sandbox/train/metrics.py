"""Host side of the step's metrics: scalars, events, hooks, and the run's summary.

The step returns arrays; the loop reads a batch of them to the host at log
intervals and hands them to `StepRecorder.record`, which turns each step's
row into logged scalars (derived ones added: perplexity, bits), events
(overflow, spike, non-finite, stalled) and hook calls, and says which step
stops the run. Nothing here dispatches device work; the only device read is
`state.opt_step`, once, when a stalled run stops (to say why).

Steps are named by `state.step` after them (1-based), as in metrics.jsonl.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from sandbox import config as config_lib
from sandbox.logger import RunLogger, flatten, read_metrics
from sandbox.precision.lowp_optim import state_bytes
from sandbox.precision.recipes.recipe import ROLES
from sandbox.precision.recipes.telemetry import hist_exponents
from sandbox.train.hooks import Hooks
from sandbox.train.state import TrainState
from sandbox.train.step import guarded_tree

LN2 = math.log(2.0)


def leaf_paths(tree) -> list[str]:
    def part(k):  # DictKey .key, SequenceKey .idx (optax's chain), GetAttrKey .name (NamedTuple fields)
        return str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))

    return ["/".join(part(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def guard_leaf_names(state: TrainState) -> list[str]:
    """Names of the step's `nonfinite_leaves` flags: 'grads/...', 'params/...', 'opt_state/...', ..."""
    return leaf_paths(guarded_tree(state.params, state.params, state.opt_state, state.fp8_meta, state.loss_scale))


def first_bad_stage(names: list[str]) -> list[str]:
    """The non-finite gradients if any (everything after them follows), else the non-finite new-state leaves."""
    grads = [n for n in names if n.startswith("grads/")]
    return grads or names


def name_list(names: list[str], shown: int = 6) -> str:
    """'3 tensors: a, b, c' (at most `shown` named, then '(+k more)')."""
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''}" + (": " + ", ".join(names[:shown]) + more if names else "")


def derived(ce: float, data_info: dict) -> dict:
    """ce and what follows from it: bits per token, perplexity, KL to the source, bits per byte."""
    out = {"ce": ce, "bits_per_token": ce / LN2, "perplexity": math.exp(min(ce, 700.0))}
    floor = data_info.get("source_floor")
    if floor is not None:
        out["kl_to_source"] = ce - floor
    bytes_per_token = data_info.get("bytes_per_token")  # text sources: of the val split
    if bytes_per_token:  # comparable across tokenizers, unlike perplexity
        out["bits_per_byte"] = ce / (LN2 * bytes_per_token)
    return out


class StepRecorder:
    """Turns read-back step rows into logs, events and hook calls; remembers why a run stopped."""

    def __init__(self, cfg: config_lib.Config, log: RunLogger, hooks: Hooks, leaf_names: list[str],
                 data_info: dict, min_scale: float):
        self.cfg, self.log, self.hooks = cfg, log, hooks
        self.leaf_names, self.data_info, self.min_scale = leaf_names, data_info, min_scale
        self.history: list[dict] = []  # recent train rows, for bundles and summaries
        # tokens/s of each read-back interval but the process's first (compile), evaluation and
        # checkpoint time left out (the loop times from after them): the summary's median
        self.throughput: list[float] = []
        self.events: list[dict] = []
        self.cause: str | None = None  # why a failed run stopped
        self.stalled = False

    def record(self, rows: list[tuple[int, dict]], state: TrainState, tokens_per_s: float,
               step_time: float) -> int | None:
        """Handles a batch of per-step metrics; returns the 0-based index of a step that stops the run.

        Rows after that step are the held state ticking on (train/guard.py) and are not logged.
        `state` is the latest state the loop holds, given to hooks with the last row.
        """
        try:
            for i, (step, m) in enumerate(rows):
                if self._row(step, m, state, tokens_per_s, step_time, last=i == len(rows) - 1):
                    return step
            return None
        finally:
            self.history = self.history[-self.cfg.forensics.history:]

    def _row(self, step: int, m: dict, state, tokens_per_s: float, step_time: float, last: bool) -> bool:
        leaves = m.pop("nonfinite_leaves", None)
        scale_after = m.pop("loss_scale_after", None)
        hists = m.pop("quant_hist", None)  # once per read-back batch: the last row's (a log interval)
        if hists is not None and last:
            self.log.histograms(step + 1, {k: (hist_exponents(), np.asarray(v)) for k, v in hists.items()})
        bad = [self.leaf_names[j] for j in np.flatnonzero(leaves)] if leaves is not None else []
        scalars = flatten(m)
        # ppl/bits/kl_to_source describe the CE part (the loss may carry beta * KL too)
        scalars.update({k: v for k, v in derived(scalars.get("ce", scalars["loss"]), self.data_info).items()
                        if k != "ce"})
        scalars["tokens_per_s"] = tokens_per_s
        scalars["step_time"] = step_time
        done = step + 1
        failure = bool(scalars.get("nonfinite")) and self.cfg.forensics.nan_policy != "skip"
        stops = failure or bool(scalars.get("stalled"))
        if scalars.get("overflow"):
            event = {"loss_scale_before": scalars["loss_scale"], "loss_scale_after": float(scale_after),
                     "nonfinite_grads": name_list([n for n in bad if n.startswith("grads/")])}
            self.events.append({"step": done, "event": "overflow", **event})
            self.log.event(done, "overflow (step skipped)", event)
            self.hooks("on_overflow", step=done, metrics=event, state=None)
        if scalars.get("spike"):
            self.log.event(done, "loss spike (update skipped)", {"loss": scalars["loss"]})
        self.log.log(done, "train", scalars)
        self.history.append({"step": done, **scalars})
        self.hooks("on_step_end", step=done, metrics=scalars, state=state if last or stops else None)
        if scalars.get("nonfinite"):
            detail = {"loss": scalars["loss"], "nonfinite": name_list(first_bad_stage(bad))}
            self.events.append({"step": done, "event": "nonfinite", **detail})
            self.log.event(done, "non-finite loss/gradient/update", detail)
            self.hooks("on_nonfinite", step=done, metrics=scalars, state=state)
        if scalars.get("stalled"):
            self.cause, self.stalled = self._stall_cause(scalars, state, done), True
            self.events.append({"step": done, "event": "stalled", "cause": self.cause})
            self.log.event(done, "stalled", {"cause": self.cause})
        elif failure:
            self.cause = "non-finite loss, gradient or update"
        return stops

    def _stall_cause(self, scalars: dict, state: TrainState, done: int) -> str:
        """Why the step flagged `stalled` stopped the run (the rules: train/guard.py)."""
        if scalars.get("overflow") and scalars["loss_scale"] <= self.min_scale:
            return "gradients overflow even at the minimum loss scale"
        why = "overflow" if scalars.get("overflow") else "non-finite" if scalars.get("nonfinite") else "spike"
        if int(jax.device_get(state.opt_step)) == 0:  # one read, once, when the run stops
            return f"no update applied in any of the {done} steps (last skip: {why})"
        return f"no update applied in more than {self.cfg.forensics.max_skipped_steps} steps in a row " \
               f"(last skip: {why})"


# ----------------------------------------------------------------- summary


def run_rows(run_dir: Path, cfg: config_lib.Config, history: list[dict]) -> list[dict]:
    """The run's train rows, one per step in order.

    Read back from metrics.jsonl, the last row of each step winning (a resumed run re-logs the
    steps after its checkpoint), so a resumed run summarises the same steps as an uninterrupted
    one. Without a JSONL log: the recent history only (a resumed run then summarises less).
    """
    if cfg.logging.jsonl:
        by_step = {r["step"]: r for r in read_metrics(run_dir) if r.get("split") == "train"}
        if by_step:
            return [by_step[k] for k in sorted(by_step)]
    return history


def run_telemetry(rows: list[dict]) -> dict:
    """Means of the underflow/overflow/lost/recovered-update and second-moment underflow fractions,
    and the max fp8 saturation, over the run."""

    def values(match):
        return [v for r in rows for k, v in r.items() if match(k) and isinstance(v, (int, float))]

    out = {}
    for key in ("underflow_frac", "overflow_frac", "lost_update_frac", "recovered_update_frac", "nu_underflow_frac"):
        if vals := values(lambda k, key=key: k == key):
            out[key] = float(np.mean(vals))
    if sat := values(lambda k: k.startswith("fp8_stats/") and "saturated" in k):
        out["fp8_saturated_frac"] = float(np.max(sat))
    # Recipe telemetry (recipes/telemetry.py): per operand role, the mean over layers and steps
    for role in ROLES:
        if snr := values(lambda k, role=role: k.startswith("quant/") and k.endswith(f"/{role}_snr_db")):
            out[f"quant_snr_{role}_db"] = float(np.mean(snr))
    for stat in ("flushed_frac", "saturated_frac"):
        if vals := values(lambda k, stat=stat: k.startswith("quant/") and k.endswith(f"_{stat}")):
            out[f"quant_{stat}"] = float(np.mean(vals))
    return out


def _tokens_per_s(recorder: StepRecorder) -> float | None:
    """Median over the timed intervals; a run read back only once has just its last rows' value."""
    timed = recorder.throughput or [r["tokens_per_s"] for r in recorder.history[-20:]]
    return float(np.median(timed)) if timed else None


def summary(run_dir: Path, cfg: config_lib.Config, recorder: StepRecorder, state: TrainState, *, policy: str,
            last_val: dict | None, wall: float, compile_time: float | None, status: str,
            failed_step: int | None, bundle: Path | None, data_info: dict, compute_dtype=None) -> dict:
    """summary.json. Steps are named by state.step after them (1-based), as in metrics.jsonl.

    tokens_per_s: the median over this process's log intervals but the first (which holds the compile),
    or the last interval's when there is no other. Everything but timings (wall_time_s, compile_time_s,
    tokens_per_s) is a function of the run's metrics.jsonl and final state, so a resumed run's summary
    equals the uninterrupted run's.
    train_ce: mean CE over the last 10% (at least one) of the steps that applied an update.
    state_bytes: the train state's bytes per parameter by kind (params, fp32 master, Kahan buffer,
    Adam moments, fp8 meta, other), from its leaves' shapes and dtypes (no device read);
    state_bytes_per_param is their total.
    """
    rows = run_rows(run_dir, cfg, recorder.history)
    applied = [r for r in rows if r.get("applied", 1) and isinstance(r.get("ce", r.get("loss")), (int, float))]
    tail = applied[-max(1, len(applied) // 10):]
    g = jax.device_get(state.guard)
    s = {
        "status": status,
        "steps": failed_step + 1 if failed_step is not None else int(state.step),
        "policy": policy,
        "train_ce": float(np.mean([r.get("ce", r["loss"]) for r in tail])) if tail else None,
        "val_ce": last_val["ce"] if last_val else None,
        "val_bits_per_token": last_val["bits_per_token"] if last_val else None,
        "val_bits_per_byte": last_val.get("bits_per_byte") if last_val else None,
        "val_perplexity": last_val["perplexity"] if last_val else None,
        "tokens_per_s": _tokens_per_s(recorder),
        "wall_time_s": wall,
        "compile_time_s": compile_time,
        "overflow_skips": int(g.skipped_overflow),
        "nonfinite_skips": int(g.skipped_nonfinite),
        "spike_skips": int(g.skipped_spikes),
        "final_loss_scale": float(jax.device_get(state.loss_scale.scale)),
        "failed_step": failed_step + 1 if failed_step is not None else None,
        "cause": recorder.cause if status == "failed" else None,
        "bundle": str(bundle) if bundle else None,
    }
    s["state_bytes"] = state_bytes(state, compute_dtype)
    s["state_bytes_per_param"] = s["state_bytes"]["total"]
    s.update(run_telemetry(rows))
    for key in ("entropy", "precision_drift", "kl_to_reference_reverse", "kl_to_reference_forward"):
        if last_val and key in last_val:
            s[key if key == "precision_drift" else f"val_{key}"] = last_val[key]
    if last_val and "kl_to_source" in last_val:
        s["val_kl_to_source"] = last_val["kl_to_source"]
        s["entropy_rate"] = data_info["entropy_rate"]
    return s
