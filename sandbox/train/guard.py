"""The step's guard: a pure decision table from this step's checks to "apply or skip" and the new guard state.

`decide(rules, guard, checks, ...)` sees only booleans and counters, never
parameters, so every row of the table is testable on its own
(tests/test_guard.py runs the whole table). The rules, in order:

* overflow: with a dynamic loss scaler a non-finite gradient under a finite
  loss is the scaler's business (skip, back off), not a failure;
* failure: a non-finite loss, or finite gradients that made a non-finite new
  state (params, optimizer moments, fp8 meta, loss scale); without a dynamic
  scaler any non-finite gradient too. The first one is recorded in
  `failed_step`; under nan_policy halt/capture the state is then held (every
  later step keeps it), so the host reads the state from before the bad step;
* spike: a finite loss far above the recent window (`spike`) skips the update
  when forensics.skip_spikes is on;
* stall: `consecutive_skips` counts steps in a row that applied no update,
  `floor_overflows` the overflows in a row that began at the scaler's
  min_scale. Past either limit (0 = never), or at the run's last step when no
  step applied an update, the step is a stall: recorded in `stalled_step`,
  and the state is held whatever the nan_policy;
* a held state changes no counter and applies nothing.

`rules.enabled = False` (only to measure the guard's cost, scripts/bench_step.py)
applies every update: the selects around it fold away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sandbox.train.state import GuardState


@dataclass(frozen=True)
class GuardRules:
    """The static half of the guard (StepContext.guard_rules): policy, limits, scaler mode."""

    nan_policy: str = "capture"  # skip | halt | capture
    dynamic: bool = False  # a dynamic loss scaler: non-finite grads are overflows, not failures
    max_skipped_steps: int = 100  # stall after more consecutive steps without an update (0 = never)
    min_scale_overflows: int = 3  # stall after this many overflows in a row at min_scale (0 = never)
    total_steps: int = 0  # the run's last step stalls if no step applied an update (0 = no such check)
    enabled: bool = True  # False only to measure the guard's cost: updates always applied


class Checks(NamedTuple):
    """This step's observations (bool [] arrays)."""

    loss_finite: jax.Array
    grads_finite: jax.Array
    state_finite: jax.Array  # the candidate new state, gradients excluded
    spike: jax.Array  # the loss is a spike (already False for a non-finite loss)
    at_floor: jax.Array  # the loss scale this step used is at the scaler's min_scale


class Decision(NamedTuple):
    apply: jax.Array  # bool: the update enters the state
    keep_scale: jax.Array  # bool: the loss scale keeps its old value (held, failed or stalled)
    overflow: jax.Array  # bool: a loss-scaler overflow (skip), not counted while held
    nonfinite: jax.Array  # bool: a failure (or a nan_policy=skip skip), not counted while held
    spike: jax.Array  # bool: a skipped spike, not counted while held
    stalled: jax.Array  # bool: this step stalls the run
    guard: GuardState  # the new guard state


def spike(window, loss, sigma: float):
    """bool []: `loss` above mean + sigma * std of the finite entries of `window` (at least half full)."""
    valid = jnp.isfinite(window)
    n = jnp.sum(valid)
    mean = jnp.sum(jnp.where(valid, window, 0)) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(valid, (window - mean) ** 2, 0)) / jnp.maximum(n - 1, 1)
    return (n >= window.shape[0] // 2) & (loss > mean + sigma * jnp.sqrt(var))


def _run_length(count, hit, held):
    """A counter of consecutive hits: +1 on a hit, 0 otherwise, unchanged while the state is held."""
    return jnp.where(held, count, jnp.where(hit, count + 1, 0)).astype(count.dtype)


def _stall(rules: GuardRules, consecutive_skips, floor_overflows, step, opt_step):
    """bool []: the run can no longer update. `opt_step`: updates applied after this step."""
    stall = jnp.bool_(False)
    if rules.total_steps > 0:  # a run shorter than the limits still never ends `finished` without an update
        stall = stall | ((step + 1 >= rules.total_steps) & (opt_step == 0))
    if rules.max_skipped_steps > 0:
        stall = stall | (consecutive_skips > rules.max_skipped_steps)
    if rules.min_scale_overflows > 0:
        stall = stall | (floor_overflows >= rules.min_scale_overflows)
    return stall


def decide(rules: GuardRules, guard: GuardState, checks: Checks, loss, step, opt_step) -> Decision:
    """The guard's table (module doc). `step`/`opt_step`: the state's counters before this step."""
    c = checks
    overflow = (c.loss_finite & ~c.grads_finite) if rules.dynamic else jnp.bool_(False)
    failure = ~c.loss_finite | (c.grads_finite & ~c.state_finite)
    if not rules.dynamic:
        failure = failure | ~c.grads_finite
    halted = (guard.failed_step >= 0) & (rules.nan_policy != "skip")  # halt/capture: keep pre-failure state
    held = halted | (guard.stalled_step >= 0)
    apply = c.grads_finite & c.loss_finite & c.state_finite & ~c.spike & ~held
    if not rules.enabled:  # constant: XLA folds the selects away
        apply = jnp.bool_(True)
    consecutive_skips = _run_length(guard.consecutive_skips, ~apply, held)
    floor_overflows = _run_length(guard.floor_overflows, overflow & c.at_floor, held)
    stall = _stall(rules, consecutive_skips, floor_overflows, step, opt_step + apply) & ~held
    first_failure = failure & ~held & (guard.failed_step < 0)
    new_guard = GuardState(
        failed_step=jnp.where(first_failure, step, guard.failed_step),
        skipped_nonfinite=guard.skipped_nonfinite + (failure & ~held),
        skipped_overflow=guard.skipped_overflow + (overflow & ~held),
        skipped_spikes=guard.skipped_spikes + (c.spike & ~held),
        loss_window=jnp.where(apply, jnp.roll(guard.loss_window, 1).at[0].set(loss), guard.loss_window),
        consecutive_skips=consecutive_skips,
        floor_overflows=floor_overflows,
        stalled_step=jnp.where(stall, step, guard.stalled_step),
    )
    return Decision(apply=apply, keep_scale=held | failure | stall, overflow=overflow & ~held,
                    nonfinite=failure & ~held, spike=c.spike & ~held, stalled=stall, guard=new_guard)
