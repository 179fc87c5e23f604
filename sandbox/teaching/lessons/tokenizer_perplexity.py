"""Lesson: perplexity depends on the tokenizer; bits per byte does not.

Perplexity is exp(total nats / number of tokens), so the same model and text
give a different perplexity for every way of cutting the text into tokens.
Two comparisons on held-out Shakespeare:

1. Same model, two tokenizations. The trained byte-level model's log-probs of
   the text are summed into word-level tokens (a word's probability is the
   product of its bytes' conditional probabilities: regex tokens of letters,
   whitespace runs, single punctuation marks). Total nats are identical, so
   bits per byte match exactly, but perplexity per word-level token is far
   larger than per byte, only because there are fewer tokens.
2. Two different models. A byte unigram model and a word unigram model (unseen
   words spelt out by the byte unigram after an <unk> token, so every string
   has a probability), both counted on the training split. The word model has
   the larger perplexity per token yet needs fewer bits per byte: it is the
   better model. Only a per-byte (or per-character) unit compares models with
   different tokenizers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from sandbox.teaching.lessons import LessonResult, new_figure, save_figure
from sandbox.teaching.lessons._shakespeare import heldout_text, logprobs, trained_model

NAME = "tokenizer_perplexity"
TITLE = "Perplexity depends on the tokenizer: the same text per byte and per word-level token"
NARRATIVE = """\
Perplexity = exp(nats per token). Change what a token is and the number changes, even for the same
model and text. We score held-out Shakespeare with a byte-level model, then regroup the same
log-probabilities into word-level tokens; and we compare a byte unigram with a word unigram model.
Look at perplexity per token next to bits per byte: only the second compares across tokenizers."""

WORD_RE = re.compile(rb"[A-Za-z']+|\s+|[^A-Za-z'\s]")
LN2 = math.log(2)


def word_tokens(text: bytes) -> list[bytes]:
    return WORD_RE.findall(text)


def unigram_bits(train: bytes, test: bytes) -> dict:
    """Total bits of `test` under add-one byte and word unigram models counted on `train`."""
    byte_counts = np.bincount(np.frombuffer(train, np.uint8), minlength=256) + 1.0
    logp_byte = np.log(byte_counts / byte_counts.sum())
    test_ids = np.frombuffer(test, np.uint8)
    byte_nats = -float(logp_byte[test_ids].sum())

    words = Counter(word_tokens(train))
    total = sum(words.values())
    p_unk = sum(1 for c in words.values() if c == 1) / total  # Good-Turing mass of unseen words
    word_nats = 0.0
    for w in word_tokens(test):
        if w in words:
            word_nats -= math.log((1 - p_unk) * words[w] / total)
        else:  # <unk>, then the word spelt out by the byte unigram
            word_nats -= math.log(p_unk) + float(logp_byte[np.frombuffer(w, np.uint8)].sum())
    return {"byte": (byte_nats, len(test_ids)), "word": (word_nats, len(word_tokens(test)))}


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    out_dir = Path(out_dir)
    res = LessonResult(NAME)
    result, cfg, model = trained_model(out_dir, quick)
    res.runs = [result.run_dir]
    text = heldout_text(cfg, 32 * cfg.model.context)
    logp, targets = logprobs(model, result.state.params, cfg, text)
    scored = text[1:len(targets) + 1]  # the bytes that were predicted
    nats = float(-logp[np.arange(len(targets)), targets].sum())
    n_bytes, n_words = len(scored), len(word_tokens(scored))
    ppl_byte, ppl_word = math.exp(nats / n_bytes), math.exp(nats / n_words)
    bpb_byte = nats / LN2 / n_bytes
    bpb_word = (nats / n_words) / LN2 * n_words / n_bytes  # per-token bits times tokens per byte
    res.check("same model: perplexity per word-level token >= 3x perplexity per byte",
              f"{ppl_word:.1f} per word-token vs {ppl_byte:.2f} per byte ({n_words} vs {n_bytes} tokens)",
              ppl_word >= 3 * ppl_byte)
    res.check("same model: bits per byte identical under both tokenizations",
              f"{bpb_word:.4f} vs {bpb_byte:.4f} bits/byte", abs(bpb_word - bpb_byte) < 1e-9 * max(bpb_byte, 1))

    data = Path(cfg.data.paths[0]).read_bytes()
    train = data[: int(len(data) * (1 - cfg.data.val_fraction))]
    uni = unigram_bits(train, scored)
    ppl = {k: math.exp(n / c) for k, (n, c) in uni.items()}
    bpb = {k: n / LN2 / n_bytes for k, (n, _) in uni.items()}
    res.check("unigrams: the word model has the larger perplexity per token but fewer bits per byte",
              f"ppl/token word {ppl['word']:.1f} vs byte {ppl['byte']:.1f}; bits/byte word {bpb['word']:.3f} "
              f"vs byte {bpb['byte']:.3f}", ppl["word"] > ppl["byte"] and bpb["word"] < bpb["byte"])

    fig, (ax_ppl, ax_bpb) = new_figure(2)
    labels = ["trained, per byte", "trained, per word", "unigram bytes", "unigram words"]
    ax_ppl.bar(labels, [ppl_byte, ppl_word, ppl["byte"], ppl["word"]], color=["C0", "C0", "C1", "C2"])
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("perplexity per token")
    ax_bpb.bar(labels, [bpb_byte, bpb_word, bpb["byte"], bpb["word"]], color=["C0", "C0", "C1", "C2"])
    ax_bpb.set_ylabel("bits per byte of text")
    for ax in (ax_ppl, ax_bpb):
        ax.tick_params(axis="x", rotation=20)
    res.plots.append(save_figure(fig, out_dir / "tokenizer_perplexity.png"))
    return res
