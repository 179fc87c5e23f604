"""`sandbox demo NAME`: four small numeric experiments behind mixed precision.

Each demo is a pure function returning its numbers (a frozen dataclass the
tests check) with a `table()` method giving the rows and 2-4 lines of
explanation that `sandbox demo` prints. Arithmetic is numpy + ml_dtypes
scalars so every operation rounds to the named dtype, one step at a time,
exactly as the explanation says (numpy's own float16 sum would accumulate in
float32 and hide the effect).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from sandbox.errors import UserError

BF16 = ml_dtypes.bfloat16
Table = tuple[str, tuple[str, ...], list[tuple[str, ...]], list[str]]  # title, headers, rows, notes


@dataclass(frozen=True)
class UpdateRounding:
    start: float  # 0.1 as bf16 stores it (0.10009765625)
    update: float  # the per-step update (1e-7)
    half_ulp_bf16: float  # updates smaller than this round away in bf16
    steps: tuple[int, ...]
    exact: tuple[float, ...]  # float64 start + k * update
    pure_bf16: tuple[float, ...]  # a bf16 parameter updated in bf16
    master_fp32: tuple[float, ...]  # an fp32 master weight
    master_as_bf16: tuple[float, ...]  # the bf16 copy the model computes with

    def table(self) -> Table:
        rows = [
            (f"{k}", f"{e:.8f}", f"{b:.8f}", f"{m:.8f}", f"{c:.8f}")
            for k, e, b, m, c in zip(self.steps, self.exact, self.pure_bf16, self.master_fp32, self.master_as_bf16)
        ]
        notes = [
            f"bf16 spacing near 0.1 is {2 * self.half_ulp_bf16:.3g}: an update of {self.update:g} is below half of it "
            "and rounds away every step, so the pure bf16 parameter never moves.",
            "fp32 has 16 more mantissa bits: the master weight adds the updates up, and the bf16 copy "
            "picks them up once they amount to half a bf16 step.",
            "That is why mixed precision keeps fp32 master weights and casts to bf16 only for compute.",
        ]
        head = ("steps", "exact (fp64)", "bf16 param", "fp32 master", "bf16 copy of master")
        return f"w = 0.1, w += {self.update:g} per step", head, rows, notes


def update_rounding(update: float = 1e-7, steps: tuple[int, ...] = (1, 1000, 10000)) -> UpdateRounding:
    start = BF16(0.1)
    w16, w32, u16, u32 = start, np.float32(start), BF16(update), np.float32(update)
    history: dict[int, tuple[float, float]] = {}
    for k in range(1, max(steps) + 1):
        w16, w32 = BF16(w16 + u16), np.float32(w32 + u32)
        if k in steps:
            history[k] = (float(w16), float(w32))
    spacing = float(np.spacing(start))
    return UpdateRounding(
        start=float(start),
        update=update,
        half_ulp_bf16=spacing / 2,
        steps=steps,
        exact=tuple(float(start) + k * update for k in steps),
        pure_bf16=tuple(history[k][0] for k in steps),
        master_fp32=tuple(history[k][1] for k in steps),
        master_as_bf16=tuple(float(BF16(history[k][1])) for k in steps),
    )


@dataclass(frozen=True)
class Cancellation:
    tiny_fp32: float  # (1 + 1e-8) - 1 in fp32
    tiny_fp64: float  # the same in fp64
    true_variance: float  # float64 two-pass variance of the fp32 data
    naive_fp32: float  # E[x^2] - E[x]^2 in fp32
    naive_fp64: float  # the same formula in fp64: more digits to lose
    welford_fp32: float  # Welford's running update in fp32

    def table(self) -> Table:
        rows = [
            ("(1 + 1e-8) - 1", "1e-08", f"{self.tiny_fp32:.6g}", f"{self.tiny_fp64:.6g}"),
            ("var, E[x^2] - E[x]^2", f"{self.true_variance:.6f}", f"{self.naive_fp32:.6f}", f"{self.naive_fp64:.6f}"),
            ("var, Welford", f"{self.true_variance:.6f}", f"{self.welford_fp32:.6f}", "-"),
        ]
        notes = [
            "fp32's spacing at 1 is 2^-23 = 1.2e-7; 1e-8 is under half of it, so 1 + 1e-8 is exactly 1 and subtracting 1 leaves 0.",
            "With x = 1e4 + N(0,1), E[x^2] ~ 1e8 is stored to the nearest 8 in fp32; subtracting E[x]^2 "
            "cancels every correct digit and leaves rounding noise (it can even go negative).",
            "fp64 only postpones the problem (16 digits to lose instead of 7); Welford avoids it by updating the mean "
            "and the sum of squared deviations, which stay small: fp32 suffices.",
        ]
        return "Catastrophic cancellation", ("quantity", "exact", "fp32", "fp64"), rows, notes


def cancellation(n: int = 10_000, mean: float = 1e4, seed: int = 0) -> Cancellation:
    x = (mean + np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    one = np.float32(1)
    naive = np.mean(x * x, dtype=np.float32) - np.mean(x, dtype=np.float32) ** 2
    x64 = x.astype(np.float64)
    avg, m2 = np.float32(0), np.float32(0)
    for k, v in enumerate(x, start=1):
        delta = v - avg
        avg = np.float32(avg + delta / np.float32(k))
        m2 = np.float32(m2 + delta * (v - avg))
    return Cancellation(
        tiny_fp32=float((one + np.float32(1e-8)) - one),
        tiny_fp64=(1.0 + 1e-8) - 1.0,
        true_variance=float(np.var(x64)),
        naive_fp32=float(naive),
        naive_fp64=float(np.mean(x64 * x64) - np.mean(x64) ** 2),
        welford_fp32=float(m2 / np.float32(n)),
    )


@dataclass(frozen=True)
class Summation:
    n: int
    value: float  # each term as fp16 stores it (0.1 -> 0.0999755859375)
    exact: float  # float64 sum of the fp16 terms
    naive_fp16: float  # sequential accumulation in fp16
    kahan_fp16: float  # compensated accumulation in fp16
    pairwise_fp16: float  # tree of fp16 additions
    naive_fp32: float  # sequential accumulation in fp32

    def table(self) -> Table:
        rows = [
            (name, f"{s:.4f}", f"{abs(s - self.exact) / self.exact:.2%}")
            for name, s in (
                ("exact (fp64)", self.exact), ("naive fp16", self.naive_fp16), ("Kahan fp16", self.kahan_fp16),
                ("pairwise fp16", self.pairwise_fp16), ("naive fp32", self.naive_fp32),
            )
        ]
        notes = [
            f"Naive fp16 stalls at {self.naive_fp16:g}: there the fp16 spacing is "
            f"{float(np.spacing(np.float16(self.naive_fp16))):g}, and {self.value:.4g} is less than half of it.",
            "Kahan carries the rounded-away part in a second fp16 number; pairwise adds numbers of similar size.",
            "Accumulating in fp32 (what matmuls and reductions do in mixed precision) avoids the stall.",
        ]
        return f"Sum of {self.n} x 0.1", ("method", "sum", "rel. error"), rows, notes


def summation(n: int = 10_000, value: float = 0.1) -> Summation:
    terms = np.full(n, value, np.float16)
    naive, kahan, carry, naive32 = np.float16(0), np.float16(0), np.float16(0), np.float32(0)
    for t in terms:
        naive = np.float16(naive + t)
        naive32 = np.float32(naive32 + np.float32(t))
        y = np.float16(t - carry)
        total = np.float16(kahan + y)
        carry = np.float16(np.float16(total - kahan) - y)  # what the addition just lost, negated
        kahan = total
    level = terms
    while level.size > 1:  # each level adds neighbours in fp16
        level = np.concatenate([level, np.zeros(level.size % 2, np.float16)])
        level = (level[0::2] + level[1::2]).astype(np.float16)
    return Summation(
        n=n,
        value=float(terms[0]),
        exact=float(np.sum(terms.astype(np.float64))),
        naive_fp16=float(naive),
        kahan_fp16=float(kahan),
        pairwise_fp16=float(level[0]),
        naive_fp32=float(naive32),
    )


@dataclass(frozen=True)
class Underflow:
    loss_scale: float
    zero_fraction: float  # gradients that become 0 in fp16
    subnormal_fraction: float  # nonzero but subnormal in fp16
    scaled_zero_fraction: float  # same after multiplying by the loss scale
    scaled_subnormal_fraction: float
    max_rel_error: float  # direct fp16 cast, over the gradients that survive
    scaled_max_rel_error: float  # scale, cast, unscale in fp32

    def table(self) -> Table:
        rows = [
            ("cast to fp16", f"{self.zero_fraction:.1%}", f"{self.subnormal_fraction:.1%}", f"{self.max_rel_error:.2e}"),
            (f"x {self.loss_scale:g}, cast, / {self.loss_scale:g} in fp32", f"{self.scaled_zero_fraction:.1%}",
             f"{self.scaled_subnormal_fraction:.1%}", f"{self.scaled_max_rel_error:.2e}"),
        ]
        notes = [
            "fp16's smallest subnormal is 2^-24 = 5.96e-8; anything below half of it rounds to 0, and everything "
            "below 2^-14 = 6.1e-5 is subnormal with fewer significant bits.",
            f"Multiplying the loss (hence every gradient) by {self.loss_scale:g} = 2^{int(np.log2(self.loss_scale))} "
            "moves them into fp16's normal range; dividing again in fp32 restores their size, with fp16's usual "
            "relative error (at most 2^-11).",
        ]
        return "Gradients of size 1e-8..1e-5 in fp16", ("path", "zero", "subnormal", "max rel. error"), rows, notes


def underflow(n: int = 10_000, loss_scale: float = 2.0**16, seed: int = 0) -> Underflow:
    grads = 10.0 ** np.random.default_rng(seed).uniform(-8, -5, n)  # log-uniform magnitudes
    tiny = float(np.finfo(np.float16).smallest_normal)

    def stats(stored: np.ndarray) -> tuple[float, float]:
        return float(np.mean(stored == 0)), float(np.mean((stored != 0) & (np.abs(stored) < tiny)))

    direct = grads.astype(np.float16)
    scaled = (grads * loss_scale).astype(np.float16)
    unscaled = scaled.astype(np.float32) / np.float32(loss_scale)
    kept = direct != 0
    return Underflow(
        loss_scale,
        *stats(direct),
        *stats(scaled),
        max_rel_error=float(np.max(np.abs(direct[kept] - grads[kept]) / grads[kept])),
        scaled_max_rel_error=float(np.max(np.abs(unscaled - grads) / grads)),
    )


# name -> (one-line summary, demo function); `sandbox demo --list` prints these.
DEMOS: dict[str, tuple[str, Callable[[], object]]] = {
    "update-rounding": ("small updates vanish in a bf16 parameter; fp32 master weights keep them", update_rounding),
    "cancellation": ("subtracting nearly equal numbers; variance by E[x^2]-E[x]^2 vs Welford", cancellation),
    "summation": ("summing 10000 x 0.1 in fp16: naive stalls, Kahan and pairwise do not", summation),
    "underflow": ("small gradients flush to zero in fp16; loss scaling rescues them", underflow),
}


def run(name: str):
    """The named demo's result; UserError listing the names if unknown."""
    if name not in DEMOS:
        raise UserError(f"unknown demo {name!r}; choose from {', '.join(DEMOS)}")
    return DEMOS[name][1]()
