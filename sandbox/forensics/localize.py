"""Find the operation that made a NaN or an inf, and say why.

Design
------
A failed jitted step leaves a non-finite loss or gradient and nothing else.
XLA has fused hundreds of ops into a few kernels, so neither a traceback nor a
profile names the op that produced the first bad value. `jax_debug_nans` and
`checkify` help only partly: they report NaNs and division by zero, but an
overflow is an *inf* first (fp16 tops out at 65504, fp8 e4m3 at 448) and
becomes a NaN only a few ops later (inf/inf in a softmax normalisation,
inf * 0 in the backward pass). The NaN op is the symptom; the op that made the
inf is the cause. So infinities count here exactly as much as NaNs.

Method: trace `fn` with `jax.make_jaxpr` on the concrete inputs that failed
and interpret the jaxpr on the host (the CPU backend), one equation at a
time in execution order, binding each primitive on concrete arrays. That is
the jaxpr's own semantics, one rounding per op, nothing fused or reordered.
With `jax.value_and_grad` the forward equations come first and the backward
ones after them. Call-like equations (jit, custom_jvp/custom_vjp, remat, the
cond branch that was taken) are interpreted recursively. scan and while run
whole, and are unrolled iteration by iteration only when they return
non-finite values. `sharding_constraint`, `reshard` and `device_put` are
identities and sharding params are dropped, so a step written for many
devices replays on one CPU (call it inside the step's mesh, so it traces).

Every non-finite value carries its provenance: the set of events whose values
reached it. An op with all-finite inputs and a non-finite output starts a new
event. An op fed with non-finite values inherits the events of its inputs.
The function's own non-finite inputs are events too (`nonfinite_input`).

The origin. When `fn` differentiates (its first output is then the loss) and
the loss is non-finite, the origin is the earliest event behind the loss
itself: the first non-finite value on the loss's own dependency path, a
forward op. Execution order alone would mislead here: linearisation computes
derivative pieces (x**2 inside gelu's derivative) during the forward pass,
before later forward ops, so a backward overflow can come first in time
although the forward overflow is what made the loss NaN. That backward event
is reported separately, as `first_backward`, whenever one exists. Otherwise
(a finite loss, or no differentiation) the origin is the earliest event
behind any non-finite output, which is the first finite -> non-finite op
unless that op's result never reached the output. For example, a -inf that exp turns back into 0, or a log(0) that
`jnp.where` selects away, is not reported (but the 0/0 it leaves in the
backward pass is). Infinities written as constants (an attention mask of
-inf) are not causes by themselves. A NaN made from them (inf - inf in a
fully masked row) starts a new event.

The module path comes from the name stack. Flax linen pushes every module's
name as a `jax.named_scope` (flax.config.flax_profile, on by default), so
paths read `GPT/block_1/attention/...`. A `jax.named_scope("softmax")` around
the softmax adds the last part. `jvp(...)` and `transpose(...)` wrappers are
dropped. `transpose` marks the backward pass, and so does an equation of the
top-level jaxpr that the primal output (outvars[0], the loss under
`value_and_grad`) does not depend on, such as the 1/(2 sqrt x) that
linearisation computes for sqrt's derivative.

Limits: each distinct op signature is compiled once for the CPU (about ten
seconds for a 2-layer GPT). A failure that only a fused kernel produces
(different accumulation or rounding on the accelerator; on CPU too, where
XLA contracts `a * b + c` into a fused multiply-add) may not reproduce op
by op; then the origin is None. `Localization.nonfinite` says which outputs
went non-finite op by op, so a caller can compare them with the compiled
program's (the replay does: forensics/replay.py, "Agreement"). shard_map
and pmap bodies run whole and are not entered, and a while loop whose
predicate is batched is not unrolled. In a scan, the provenance of a sliced
input is its whole array's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util  # user-frame lookup; jax has no public equivalent
from jax.extend import core as jcore

from sandbox.forensics.causes import classify

# Equations whose value is their input: placement only.
_IDENTITY = frozenset({"sharding_constraint", "device_put", "mesh_cast", "reshard", "optimization_barrier"})
# Params that place a result on a mesh; on one device they are dropped.
_PLACEMENT_PARAMS = frozenset({"sharding", "out_sharding"})
# Call-like primitives, and the param holding the jaxpr they run.
_CALLS = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
}
# Ops that pass a softmax's values along without changing what they mean.
_PASS_THROUGH = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "squeeze",
                           "expand_dims", "transpose", "copy", "reduce_sum", "select_n",
                           "stop_gradient", "sharding_constraint", "device_put"})


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """Summary of one input of the origin op (max_abs and min over its finite entries)."""

    dtype: str
    shape: tuple[int, ...]
    max_abs: float | None
    min: float | None
    zeros: int
    negatives: int
    finite: bool


@dataclasses.dataclass(frozen=True)
class NonFiniteCounts:
    nan: int
    posinf: int
    neginf: int


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where the first non-finite value came from, and why."""

    primitive: str  # e.g. 'exp'; '<input>' or '<constant>' when the value came in bad
    name_stack: str  # module path, e.g. 'GPT/block_1/attention/softmax'; the argument path for '<input>'
    phase: str  # 'forward' or 'backward'
    source_line: str  # 'file:line (function)' of the user code that emitted the op
    dtype: str  # of the (first) non-finite output
    shape: tuple[int, ...]
    inputs: tuple[TensorStats, ...]
    output_stats: NonFiniteCounts
    cause: str  # a class from sandbox.forensics.causes
    explanation: str
    remedy: str
    op_index: int  # position in execution order among the interpreted equations

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Localization:
    """What `localize` found: the origin, and a separate backward event when there is one."""

    origin: Origin | None  # the loss's own origin when the loss is non-finite, else the earliest event
    first_backward: Origin | None  # the earliest value made non-finite in the backward pass, if not the origin
    nonfinite: Any = None  # fn's outputs as evaluated op by op, each leaf a bool: it holds inf/NaN


def localize_nonfinite(fn, *args, **kwargs) -> Origin | None:
    """The origin of the non-finite values `fn(*args, **kwargs)` returns, or None if it returns none.

    Array leaves of args/kwargs are traced; other leaves are static. Typically
    `fn = jax.value_and_grad(loss_fn)` (or a whole jitted step) and the args
    are the failing step's parameters and batch.
    """
    return localize(fn, *args, **kwargs).origin


def localize(fn, *args, **kwargs) -> Localization:
    """`localize_nonfinite`, with the first backward event reported separately (see the module notes)."""
    cpu = jax.devices("cpu")[0]
    leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    values = [leaf for _, leaf in leaves]
    dynamic = [i for i, leaf in enumerate(values) if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]

    def flat_fn(*arrays):
        filled = list(values)
        for i, a in zip(dynamic, arrays):
            filled[i] = a
        a, k = jax.tree_util.tree_unflatten(treedef, filled)
        return fn(*a, **k)

    with jax.default_device(cpu):
        arrays = [jax.device_put(_unsharded(values[i]), cpu) for i in dynamic]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)  # under the caller's mesh, if any
    with jax.default_device(cpu), jax.set_mesh(None):  # evaluate op by op on one device
        interp = _Interpreter(closed.jaxpr)
        taints = [interp.input_event(a, _arg_path(leaves[i][0])) for i, a in zip(dynamic, arrays)]
        outs, out_taints = interp.run(closed.jaxpr, closed.consts, arrays, taints, (), False)
    nonfinite = jax.tree.unflatten(jax.tree.structure(out_shape), [not _finite(o) for o in outs])
    events = _union(out_taints)
    loss_taint = out_taints[0] if interp.differentiated and out_taints else None
    origin = _earliest(loss_taint or events)  # a non-finite loss: only what reached the loss
    backward = _earliest(e for e in events if e.kind == "op" and e.backward)
    return Localization(origin.origin() if origin else None,
                        backward.origin() if backward is not None and backward is not origin else None,
                        nonfinite)


def format_origin(origin: Origin, title: str = "First non-finite value") -> str:
    """A readable multi-line report."""
    o = origin.output_stats
    lines = [
        f"{title}: {origin.cause} ({origin.phase} pass)",
        f"  op:      {origin.primitive}  at {origin.name_stack or '<top level>'}",
        f"  source:  {origin.source_line}",
        f"  output:  {origin.dtype}{list(origin.shape)}  nan={o.nan} +inf={o.posinf} -inf={o.neginf}",
    ]
    if origin.inputs:
        lines.append("  inputs:")
    for i, s in enumerate(origin.inputs):
        rng = "" if s.max_abs is None else f"max|x|={s.max_abs:.4g} min={s.min:.4g} "
        lines.append(f"    #{i} {s.dtype}{list(s.shape)}  {rng}zeros={s.zeros} negative={s.negatives} "
                     f"{'finite' if s.finite else 'NON-FINITE'}")
    lines += [f"  why:     {origin.explanation}", f"  fix:     {origin.remedy}"]
    return "\n".join(lines)


# --- the interpreter -------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Event:
    """Something that made non-finite values: an op, an input or a constant."""

    index: int
    kind: str  # 'op' | 'input' | 'constant'
    primitive: str
    path: tuple[str, ...]
    backward: bool
    source_line: str
    invals: list
    outvals: list
    after_softmax: bool = False

    def origin(self) -> Origin:
        bad = next(np.asarray(o) for o in self.outvals if not _finite(o))
        path = "/".join(self.path)
        if self.kind == "op":
            numeric = [np.asarray(x) for x in self.invals if _numeric(x)]
            cause, why, fix = classify(self.primitive, numeric, bad, path, self.after_softmax)
        elif self.kind == "input":
            cause = "nonfinite_input"
            why = f"The function's input {path} already holds non-finite values before any op ran."
            fix = ("Find what wrote it: for parameters, the update of an earlier step "
                   "(restore the last good checkpoint); for a batch, the data pipeline.")
        else:
            cause = "nonfinite_constant"
            why = f"A constant used at {path or 'the top level'} is non-finite and reaches the output."
            fix = "Use a large finite value (jnp.finfo(dtype).min) instead of an infinite constant."
        return Origin(
            primitive=self.primitive, name_stack=path, phase="backward" if self.backward else "forward",
            source_line=self.source_line, dtype=str(bad.dtype), shape=tuple(bad.shape),
            inputs=tuple(_stats(x) for x in self.invals), output_stats=_counts(bad),
            cause=cause, explanation=why, remedy=fix, op_index=self.index)


# The events behind a non-finite value (every event whose values reached it); None where finite.
Taint = frozenset | None


class _Interpreter:
    def __init__(self, jaxpr: jcore.Jaxpr):
        self.count = 0  # equations evaluated so far
        self.producer: dict = {}  # Var -> (eqn, path) that made it, for "log of a softmax"
        self.main = jaxpr  # the level holding forward and backward, under any wrapping jit
        while len(self.main.eqns) == 1 and _sub_jaxpr(self.main.eqns[0]) is not None:
            self.main = _sub_jaxpr(self.main.eqns[0])[0]
        self.differentiated = any("transpose" in _split(e)[1] for e in self.main.eqns)
        self.primal_deps = _ancestors(self.main, self.main.outvars[0]) if self.main.outvars else set()

    def input_event(self, x, path: str) -> Taint:
        return None if _finite(x) else frozenset({_Event(self.count, "input", "<input>", (path,), False,
                                                         "function input", [], [x])})

    def _constant_event(self, x, path) -> Taint:
        return None if _finite(x) else frozenset({_Event(self.count, "constant", "<constant>", path, False,
                                                         "constant", [], [x])})

    def run(self, jaxpr, consts, args, taints, path, backward):
        """Evaluate `jaxpr`; returns (outputs, their taints: None where finite)."""
        env = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                val = jnp.asarray(v.val, dtype=v.aval.dtype)
                return val, self._constant_event(val, path)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = (c, self._constant_event(c, path))
        for v, a, t in zip(jaxpr.invars, args, taints):
            env[v] = (a, t)
        for eqn in jaxpr.eqns:
            invals, intaints = zip(*[read(v) for v in eqn.invars]) if eqn.invars else ((), ())
            scopes, transforms = _split(eqn)
            back = backward or "transpose" in transforms or (
                jaxpr is self.main and self.differentiated and id(eqn) not in self.primal_deps)
            outs, otaints = self._eval(eqn, list(invals), list(intaints), path + scopes, back)
            for v, o, t in zip(eqn.outvars, outs, otaints):
                if not isinstance(v, jcore.DropVar):
                    env[v] = (o, t)
        results = [read(v) for v in jaxpr.outvars]
        return [r[0] for r in results], [r[1] for r in results]

    def _eval(self, eqn, invals, intaints, path, backward):
        self.count += 1
        index = self.count
        name = eqn.primitive.name
        if name in _IDENTITY:
            for outer, inner in zip(eqn.outvars, eqn.invars):
                if isinstance(inner, jcore.Var) and inner in self.producer:
                    self.producer[outer] = self.producer[inner]
            return invals, intaints
        sub = _sub_jaxpr(eqn)
        if name == "cond":
            branch = eqn.params["branches"][int(np.clip(invals[0], 0, len(eqn.params["branches"]) - 1))]
            sub, invals, intaints = (branch.jaxpr, branch.consts), invals[1:], intaints[1:]
        if sub is not None and len(sub[0].invars) == len(invals):
            outs, taints = self.run(sub[0], sub[1], invals, intaints, path, backward)
            for outer, inner in zip(eqn.outvars, sub[0].outvars):
                if isinstance(inner, jcore.Var) and inner in self.producer:
                    self.producer[outer] = self.producer[inner]
            return outs, taints
        params = {k: None if k in _PLACEMENT_PARAMS else v for k, v in eqn.params.items()}
        outs = eqn.primitive.bind(*invals, **params)
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        if name in ("scan", "while") and not all(_finite(o) for o in outs):
            unroll = self._unroll_scan if name == "scan" else self._unroll_while
            return unroll(eqn, invals, intaints, path, backward)
        for v in eqn.outvars:
            self.producer[v] = (eqn, path)
        return outs, self._taint(eqn, index, invals, intaints, outs, path, backward)

    def _taint(self, eqn, index, invals, intaints, outs, path, backward):
        bad = [not _finite(o) for o in outs]
        if not any(bad):
            return [None] * len(outs)
        taint = _union(intaints)
        only_constants = all(e.kind == "constant" for e in taint)
        new_nan = any(_has_nan(o) for o in outs) and not any(_has_nan(i) for i in invals)
        if not taint or (only_constants and new_nan):
            name = eqn.primitive.name
            taint = frozenset({_Event(index, "op", name, path, backward, _source_line(eqn), invals, outs,
                                      after_softmax=name in ("log", "log1p")
                                      and self._fed_by_softmax(eqn.invars[0]))})
        return [taint if b else None for b in bad]

    def _unroll_scan(self, eqn, invals, intaints, path, backward):
        p = eqn.params
        body, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
        consts, carry, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        ctaints, ktaints, xtaints = intaints[:nc], intaints[nc:nc + nk], intaints[nc + nk:]
        ys, ytaints = [], [None] * (len(eqn.outvars) - nk)
        for i in (reversed(range(p["length"])) if p["reverse"] else range(p["length"])):
            x_i = [x[i] for x in xs]
            x_t = [None if _finite(v) else t for v, t in zip(x_i, xtaints)]
            outs, taints = self.run(body.jaxpr, body.consts, consts + carry + x_i, ctaints + ktaints + x_t,
                                    path, backward)
            carry, ktaints = outs[:nk], taints[:nk]
            ys.append(outs[nk:])
            ytaints = [_union([a, b]) or None for a, b in zip(ytaints, taints[nk:])]
        if p["reverse"]:
            ys.reverse()
        stacked = [jnp.stack([y[j] for y in ys]) for j in range(len(ytaints))]
        return carry + stacked, ktaints + ytaints

    def _unroll_while(self, eqn, invals, intaints, path, backward):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cond, body = p["cond_jaxpr"], p["body_jaxpr"]
        carry, ktaints = invals[cn + bn:], intaints[cn + bn:]
        while True:
            pred, _ = self.run(cond.jaxpr, cond.consts, invals[:cn] + carry, intaints[:cn] + ktaints,
                               path, backward)
            if not bool(pred[0]):
                return carry, ktaints
            carry, ktaints = self.run(body.jaxpr, body.consts, invals[cn:cn + bn] + carry,
                                      intaints[cn:cn + bn] + ktaints, path, backward)

    def _fed_by_softmax(self, var, depth: int = 0) -> bool:
        """Whether `var` is a softmax output: a 'softmax' scope, or a div of something exp made."""
        eqn, path = self.producer.get(var, (None, ())) if isinstance(var, jcore.Var) else (None, ())
        if eqn is None or depth > 8:
            return False
        if any("softmax" in s for s in path):
            return True
        if eqn.primitive.name == "div":
            return self._made_by(eqn.invars[0], "exp", depth + 1)
        return eqn.primitive.name in _PASS_THROUGH and any(
            self._fed_by_softmax(v, depth + 1) for v in eqn.invars)

    def _made_by(self, var, primitive: str, depth: int) -> bool:
        eqn, _ = self.producer.get(var, (None, ())) if isinstance(var, jcore.Var) else (None, ())
        if eqn is None or depth > 8:
            return False
        if eqn.primitive.name == primitive:
            return True
        return eqn.primitive.name in _PASS_THROUGH and any(
            self._made_by(v, primitive, depth + 1) for v in eqn.invars)


# --- helpers ---------------------------------------------------------------


def _sub_jaxpr(eqn) -> tuple[jcore.Jaxpr, Sequence] | None:
    """(jaxpr, consts) that a call-like equation runs, else None."""
    j = eqn.params.get(_CALLS.get(eqn.primitive.name, ""))
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    if isinstance(j, jcore.Jaxpr) and not j.constvars:
        return j, ()
    return None


def _split(eqn) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(scope names, transform names) of an equation's name stack."""
    scopes, transforms = [], []
    for part in eqn.source_info.name_stack.stack:
        (transforms if type(part).__name__ == "Transform" else scopes).append(part.name)
    return tuple(scopes), tuple(transforms)


def _ancestors(jaxpr, var) -> set[int]:
    """ids of the equations of `jaxpr` that `var` depends on."""
    made_by = {v: e for e in jaxpr.eqns for v in e.outvars}
    seen, todo = set(), [var]
    while todo:
        v = todo.pop()
        e = made_by.get(v) if isinstance(v, jcore.Var) else None
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            todo.extend(e.invars)
    return seen


def _union(taints) -> frozenset:
    """All events behind any of `taints` (None = a finite value)."""
    return frozenset().union(*(t for t in taints if t))


def _earliest(events) -> _Event | None:
    """The earliest op or input event, else the earliest constant one."""
    events = list(events)
    causes = [e for e in events if e.kind != "constant"] or list(events)
    return min(causes, key=lambda e: e.index, default=None)


def _source_line(eqn) -> str:
    frame = source_info_util.user_frame(eqn.source_info.traceback)
    return f"{frame.file_name}:{frame.start_line} ({frame.function_name})" if frame else "unknown"


def _arg_path(path) -> str:
    head = "args" if path[0].idx == 0 else "kwargs"
    return head + jax.tree_util.keystr(tuple(path[1:]))


def _unsharded(x):
    """A host copy, so no sharding (explicit mesh axes included) reaches the trace."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.extended):
        return x  # PRNG keys: NumPy cannot hold them
    return np.asarray(x)


def _numeric(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and (jnp.issubdtype(dt, jnp.number) or jnp.issubdtype(dt, jnp.bool_))


def _inexact(x) -> bool:
    dt = getattr(x, "dtype", None)  # tokens have none
    return dt is not None and jnp.issubdtype(dt, jnp.inexact)


def _finite(x) -> bool:
    return not _inexact(x) or bool(np.isfinite(np.asarray(x)).all())


def _has_nan(x) -> bool:
    return _inexact(x) and bool(np.isnan(np.asarray(x)).any())


def _counts(a: np.ndarray) -> NonFiniteCounts:
    return NonFiniteCounts(int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum()))


def _stats(x) -> TensorStats:
    dtype, shape = str(getattr(x, "dtype", type(x).__name__)), tuple(getattr(x, "shape", ()))
    if not _numeric(x):
        return TensorStats(dtype, shape, None, None, 0, 0, True)
    a = np.asarray(x)
    a = (np.abs(a) if np.iscomplexobj(a) else a).astype(np.float64)
    finite = a[np.isfinite(a)]
    return TensorStats(
        dtype, shape,
        max_abs=float(np.abs(finite).max()) if finite.size else None,
        min=float(finite.min()) if finite.size else None,
        zeros=int((a == 0).sum()), negatives=int((a < 0).sum()), finite=bool(finite.size == a.size))
