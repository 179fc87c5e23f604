"""Text generation from a trained run: temperature, top-k and nucleus (top-p) sampling.

Filtering happens on log-probabilities (`infotheory.log_softmax` of the fp32
logits, max-shifted, so large logits keep their precision):
top-k and top-p mask tokens to -inf, and the draw is a categorical sample
over what is left. The whole context window is re-run each token (no KV
cache): the models here are small and this keeps one forward function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sandbox import infotheory
from sandbox.data import tokenizer_for
from sandbox.precision import exact
from sandbox.train.setup import load_run_state, parts


def filter_logprobs(logp_V, temperature: float, top_k: int, top_p: float):
    """Log-probabilities after temperature, top-k and top-p (renormalised)."""
    logp = infotheory.log_softmax(logp_V / max(temperature, 1e-6))
    if top_k and top_k < logp.shape[-1]:
        kth = jnp.sort(logp)[..., -top_k]
        logp = jnp.where(logp >= kth, logp, -jnp.inf)
    if top_p < 1.0:
        order = jnp.argsort(-logp)
        sorted_lp = logp[order]
        cum = jnp.cumsum(jnp.exp(sorted_lp))
        keep_sorted = (cum - jnp.exp(sorted_lp)) < top_p  # always keeps the top token
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        logp = jnp.where(keep, logp, -jnp.inf)
    return infotheory.log_softmax(logp)


def generate(model, params, fp8_meta, prompt_ids, *, max_tokens: int, context: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    policy = model.policy
    variables = {"params": policy.cast_to_compute(params)}
    if fp8_meta:
        variables["fp8_meta"] = fp8_meta

    @exact.jit
    def next_token(window, length, key):
        logits = jax.lax.dynamic_index_in_dim(model.apply(variables, window[None, :])[0], length - 1,
                                              keepdims=False)
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, filter_logprobs(logits.astype(jnp.float32), temperature, top_k, top_p))

    ids = list(int(i) for i in prompt_ids) or [ord("\n")]
    key = jax.random.key(seed)
    for i in range(max_tokens):
        window = ids[-context:]
        length = len(window)
        padded = np.zeros(context, np.int32)
        padded[:length] = window
        ids.append(int(next_token(jnp.asarray(padded), length, jax.random.fold_in(key, i))))
    return np.asarray(ids[len(prompt_ids) or 1:], np.int32)


def sample_run(run_dir, prompt: str, **kwargs) -> tuple[str, int]:
    """(prompt + generated text, the checkpoint step it was generated from)."""
    cfg, state, step = load_run_state(run_dir)
    tok = tokenizer_for(cfg)  # a BPE run's own tokenizer, from the cache keyed by its corpus
    # an empty prompt starts after a newline, in the tokenizer's own ids
    out = generate(parts(cfg).model, state.params, state.fp8_meta,
                   tok.encode(prompt or "\n"), context=cfg.model.context, **kwargs)
    return prompt + tok.decode(out), int(step)


def sample_from_run(run_dir, prompt: str, **kwargs) -> str:
    return sample_run(run_dir, prompt, **kwargs)[0]
