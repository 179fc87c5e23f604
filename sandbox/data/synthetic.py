"""A seeded order-k Markov source whose entropy rate is known exactly.

Each of the A^k contexts (the last k symbols) has a next-symbol distribution
drawn from Dirichlet(concentration). The chain is ergodic (all rows strictly
positive), so it has one stationary distribution pi over contexts, found by
power iteration, and its entropy rate is

    H_rate = sum_s pi(s) * H(P(. | s))          [nats per symbol]

A model that sees the whole window can do no better than the window floor:
for targets x_1..x_T of a window started at stationarity, the first k-1
targets see a shorter context, so the best achievable mean cross-entropy is

    floor(T) = (H(B_k) - H(B_1) + (T - k + 1) * H_rate) / T

where H(B_j) is the entropy of a block of j consecutive symbols. The trainer
logs `kl_to_source = cross_entropy - floor(T)`: the exact expected KL between
the data distribution and the model, zero only for a perfect model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


@dataclass(frozen=True)
class MarkovSource:
    alphabet: int
    order: int
    transition: np.ndarray  # [A^k, A] next-symbol probabilities per context
    stationary: np.ndarray  # [A^k] stationary distribution over contexts

    @classmethod
    def create(cls, alphabet: int, order: int, concentration: float, seed: int) -> "MarkovSource":
        rng = np.random.default_rng([seed, alphabet, order])
        n_ctx = alphabet**order
        transition = rng.dirichlet(np.full(alphabet, concentration), size=n_ctx)
        transition = np.maximum(transition, 1e-12)  # keep rows strictly positive: ergodic
        transition /= transition.sum(-1, keepdims=True)
        nxt = cls._next_context(np.arange(n_ctx)[:, None], np.arange(alphabet)[None, :], alphabet, order)
        pi = np.full(n_ctx, 1.0 / n_ctx)
        for _ in range(10_000):
            new = np.bincount(nxt.ravel(), weights=(pi[:, None] * transition).ravel(), minlength=n_ctx)
            if np.abs(new - pi).sum() < 1e-14:
                pi = new
                break
            pi = new
        return cls(alphabet, order, transition, pi / pi.sum())

    @staticmethod
    def _next_context(ctx, symbol, alphabet, order):
        return (ctx % alphabet ** (order - 1)) * alphabet + symbol

    @property
    def entropy_rate(self) -> float:
        """Nats per symbol of the stationary chain."""
        return float(np.sum(self.stationary * _entropy(self.transition)))

    def window_floor(self, n_targets: int) -> float:
        """Lowest achievable mean cross-entropy over targets x_1..x_T (see module doc)."""
        a, k = self.alphabet, self.order
        block_k = _entropy(self.stationary)
        first = self.stationary.reshape(a, -1).sum(-1)  # marginal of the oldest symbol
        block_1 = _entropy(first)
        t = n_targets
        if t < k:
            raise ValueError("window shorter than the Markov order")
        return float((block_k - block_1 + (t - k + 1) * self.entropy_rate) / t)

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """[batch, length] int32 windows started at stationarity."""
        a, k = self.alphabet, self.order
        ctx = np.searchsorted(np.cumsum(self.stationary), rng.random(batch) * self.stationary.sum())
        ctx = np.minimum(ctx, a**k - 1)
        out = np.empty((batch, length), np.int32)
        digits = [(ctx // a ** (k - 1 - i)) % a for i in range(k)]
        for i in range(min(k, length)):
            out[:, i] = digits[i]
        cdf = np.cumsum(self.transition, -1)
        for i in range(k, length):
            u = rng.random(batch)[:, None]
            sym = np.minimum((u > cdf[ctx]).sum(-1), a - 1)
            out[:, i] = sym
            ctx = self._next_context(ctx, sym, a, k)
        return out
