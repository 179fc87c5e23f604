"""Training objectives on fp32 logits: cross-entropy, optionally + beta * KL.

Probabilities are only ever formed in log space (see `infotheory`). The
objective returns the scalar loss and its named parts, so the CE and KL
terms are logged separately.

z-loss (PaLM; Wortsman et al. 2023): z_loss * mean((log Z)^2), log Z the fp32
logsumexp of each position's logits. Softmax cross-entropy is invariant to a
shift of the logits, so nothing holds log Z in place and it can drift until
the logits lose precision; the penalty pulls it to 0. Its gradient with
respect to a logit is 2 * z_loss * log Z * softmax(z) / N. Off (0) by
default, and then not even traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sandbox import infotheory


def lm_objective(logits_BTV, targets_BT, *, label_smoothing: float = 0.0, naive_log_softmax: bool = False):
    """Mean next-token cross-entropy in nats (fp32), and its parts.

    `naive_log_softmax` is a teaching ablation that fails on purpose: log(softmax(x))
    instead of log_softmax(x), so a target probability that underflows to 0 gives
    log(0) = -inf (see experiments/failures/log_softmax_underflow.yaml).
    """
    if naive_log_softmax:
        with jax.named_scope("naive_log_softmax"):
            probs_BTV = jax.nn.softmax(logits_BTV, axis=-1)
            logp_BT = jnp.log(jnp.take_along_axis(probs_BTV, targets_BT[..., None], axis=-1)[..., 0])
        loss = -jnp.mean(logp_BT)
        return loss, {"ce": loss}
    ce_BT = infotheory.cross_entropy(logits_BTV, targets_BT, label_smoothing=label_smoothing)
    loss = jnp.mean(ce_BT)
    return loss, {"ce": loss}


def z_loss_term(logits_BTV, coef: float):
    """coef * mean((log Z)^2), log Z = logsumexp of each position's logits in fp32."""
    log_z_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
    return coef * jnp.mean(jnp.square(log_z_BT))


def kl_objective(logits_BTV, targets_BT, ref_logits_BTV=None, *, beta=0.0, direction: str = "reverse",
                 z_loss: float = 0.0, **ce_kwargs):
    """CE + beta * KL to a frozen reference, with every part logged.

    Both distributions are log-softmaxed in fp32 and the KL is computed from
    log-probabilities, per token over the full vocabulary, then averaged.
    `ref_logits_BTV` must already be under stop_gradient (the step does it).
    reverse = KL(model || reference): mode-seeking, penalises mass the
    reference lacks; forward = KL(reference || model): mass-covering.
    Both directions are returned as metrics whichever one is optimised.
    Without a reference the loss is `lm_objective`'s, plus the entropy of
    the model's predictive distribution (cheap, and worth watching).
    """
    ce, parts = lm_objective(logits_BTV, targets_BT, **ce_kwargs)
    parts = dict(parts, entropy=jnp.mean(infotheory.entropy(logits_BTV)))
    if z_loss:  # a Python float: off means no extra op in the traced loss
        parts["z_loss"] = z_loss_term(logits_BTV, z_loss)
        ce = ce + parts["z_loss"]  # the loss; parts["ce"] stays the cross-entropy alone
    if ref_logits_BTV is None:
        return ce, parts
    reverse = jnp.mean(infotheory.kl_divergence(logits_BTV, ref_logits_BTV))
    forward = jnp.mean(infotheory.kl_divergence(ref_logits_BTV, logits_BTV))
    kl = reverse if direction == "reverse" else forward
    loss = ce + beta * kl
    parts.update(kl=kl, beta=jnp.asarray(beta, jnp.float32), kl_to_reference_reverse=reverse,
                 kl_to_reference_forward=forward)
    return loss, parts
