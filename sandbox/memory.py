"""Will this run fit? A memory estimate from the config alone, checked before anything is allocated.

A config that cannot fit used to fail deep inside XLA (RESOURCE_EXHAUSTED, a
traceback) or swap the host to a standstill, after the run directory had been
made. The estimate needs no tracing and no allocation, so an absurd config is
refused in one line before the model is even built.

The formula (bytes; L layers, D = d_model, F = mlp_ratio * D, V = vocab_size,
T = context, H = n_head, b = batch_size / accum_steps, one microbatch):

    params P      = V*D + T*D (learned positions) + L*(4*D^2 + 2*D*F + 9*D + F) + 2*D
                    (tied head; per block: two LayerNorms 2*2D, qkv 3D^2+3D,
                    proj D^2+D, fc D*F+F, out F*D+D; final LayerNorm 2D)
    train state   = 20 * P   fp32 master weights, gradients, Adam's two moments and
                             the compute-dtype copy of the weights (4 bytes each, an
                             upper bound for the 16-bit policies)
    activations   = 4 * b*T * (L*(10*D + 2*F + 2*H*T) + 3*V)
                             what the backward pass keeps per token: about ten
                             D-wide and two F-wide tensors per block, the attention
                             scores and probabilities (H*T each), and the logits,
                             log-probabilities and their gradient (3*V), all in fp32

It is an estimate, deliberately on the high side (fp32 everywhere, no
rematerialisation), and it ignores the KL reference and fp8 metadata, which
are small or a second copy of P. It is compared with the memory of all local
accelerators together (`memory_stats()['bytes_limit']`) or, on CPU, the host's
physical RAM: a run over that cannot fit however it is sharded, and is refused
with the figures; a run under it may still be too big for a busy machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax

from sandbox.errors import UserError

GIB = 2**30
STATE_BYTES_PER_PARAM = 20
ACTIVATION_BYTES = 4


@dataclass(frozen=True)
class Estimate:
    params: int
    state_bytes: int
    activation_bytes: int
    microbatch: int

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def param_count(model_cfg) -> int:
    """Parameters of `sandbox.model.GPT` for this model config (see the module doc)."""
    m = model_cfg
    d, f = m.d_model, m.mlp_ratio * m.d_model
    positions = m.context * d if m.positions == "learned" else 0
    per_block = 4 * d * d + 2 * d * f + 9 * d + f
    return m.vocab_size * d + positions + m.n_layer * per_block + 2 * d


def estimate(cfg) -> Estimate:
    """Train state and one microbatch's activations of a run config, in bytes."""
    m = cfg.model
    params = param_count(m)
    b = max(1, cfg.training.batch_size // cfg.optimizer.accum_steps)
    per_token = m.n_layer * (10 * m.d_model + 2 * m.mlp_ratio * m.d_model + 2 * m.n_head * m.context) \
        + 3 * m.vocab_size
    return Estimate(params, STATE_BYTES_PER_PARAM * params, ACTIVATION_BYTES * b * m.context * per_token, b)


def available_memory() -> tuple[int, str]:
    """(bytes, what) of the memory a run can use: all local accelerators together, else host RAM."""
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits):
            return int(sum(limits)), f"{len(devices)} x {devices[0].device_kind}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"


def check_fits(cfg) -> Estimate:
    """The estimate, or a one-line UserError when it exceeds the available memory."""
    est = estimate(cfg)
    limit, where = available_memory()
    if est.total_bytes > limit:
        raise UserError(
            f"model and batch do not fit: about {est.total_bytes / GIB:,.1f} GiB needed "
            f"(train state {est.state_bytes / GIB:,.1f} GiB for {est.params:,} parameters, activations "
            f"{est.activation_bytes / GIB:,.1f} GiB for a microbatch of {est.microbatch}) but {where} has "
            f"{limit / GIB:,.1f} GiB; reduce model.d_model, model.n_layer, model.vocab_size or "
            f"training.batch_size, or raise optimizer.accum_steps")
    return est
