"""Trainer hooks: a small callback interface the built-in logging and forensics use too.

Events, each called with keyword arguments:

* `on_step_end(step, metrics, state)`: after every step. Metrics reach the
  host only at log intervals (no sync inside the step), so these calls come
  in batches then, one per step in order; `state` is the latest state the
  loop holds, given with the last call of a batch only (None otherwise). The
  loop reads a log interval back after dispatching the next step, so that
  state may be one step past `step` (and a stop a hook requests then takes
  effect after that step).
* `on_eval(step, metrics, state)`: after each validation pass.
* `on_overflow(step, metrics, state)`: the loss scaler skipped a step (metrics: the
  overflow event: the scale this step used and the one the next step uses, read
  from the state, and the count and names of the non-finite gradients).
* `on_nonfinite(step, metrics, state)`: a non-finite loss, gradient or new-state leaf
  (params, optimizer state, fp8 meta, loss scale): a failure, or a skip under nan_policy=skip.

`step` is always `state.step` after the step (1-based), as in metrics.jsonl.
* `on_checkpoint(step, path, state)`: a checkpoint was written.

A hook is an object with any of these methods, or a plain function
`fn(event, **kwargs)` called for every event. From the CLI:
`sandbox train CONFIG --hook package.module:name` (a class is instantiated
with no arguments). A hook that raises is reported with its name and
disabled; the run goes on unharmed (hooks get host copies of metrics, and
the state they see is not used again by the loop if they mutate it).
"""

from __future__ import annotations

import importlib
import traceback
from typing import Any, Callable

from sandbox.errors import UserError

EVENTS = ("on_step_end", "on_eval", "on_overflow", "on_nonfinite", "on_checkpoint")


class Hooks:
    def __init__(self, hooks: list[Any], report: Callable[[str], None] = print):
        self.hooks = list(hooks)
        self.report = report

    def add(self, hook: Any) -> None:
        self.hooks.append(hook)

    def __call__(self, event: str, /, **kwargs) -> None:
        for hook in list(self.hooks):
            fn = getattr(hook, event, None)
            if fn is None and callable(hook) and not hasattr(hook, "on_step_end"):
                fn = lambda _h=hook, **kw: _h(event, **kw)  # noqa: E731
            if fn is None:
                continue
            try:
                fn(**kwargs)
            except Exception as e:  # a user's hook must not take the run down
                name = getattr(hook, "__qualname__", type(hook).__qualname__)
                last = traceback.extract_tb(e.__traceback__)[-1]
                self.report(f"hook {name} raised {e.__class__.__name__}: {e} "
                            f"({last.filename}:{last.lineno}); hook disabled, run continues")
                self.hooks.remove(hook)


def load_hook(spec: str) -> Any:
    """'package.module:name' -> a hook object (classes are instantiated)."""
    if ":" not in spec:
        raise UserError(f"--hook {spec!r}: expected package.module:name")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--hook {spec!r}: cannot import {module_name} ({e})") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise UserError(f"--hook {spec!r}: {module_name} has no attribute {attr!r}") from None
    return obj() if isinstance(obj, type) else obj
