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
2. Three different models. A byte unigram model, a word unigram model (unseen
   words spelt out by the byte unigram after an <unk> token, so every string
   has a probability) and a unigram over the sandbox's trained BPE tokenizer
   (`data.tokenizer: bpe`, 512 tokens), all counted on the training split. The
   word and BPE models have the larger perplexity per token yet need fewer
   bits per byte: they are the better models. Only a per-byte (or
   per-character) unit compares models with different tokenizers, which is
   why runs report `val_bits_per_byte`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from sandbox.data.tokenizer import BPETokenizer
from sandbox.teaching.lessons import LessonResult, new_figure, save_figure
from sandbox.teaching.lessons._shakespeare import corpus_bytes, heldout_text, logprobs, trained_model

NAME = "tokenizer_perplexity"
TITLE = "Perplexity depends on the tokenizer: the same text per byte and per word-level token"
NARRATIVE = """\
Perplexity = exp(nats per token). Change what a token is and the number changes, even for the same
model and text. We score held-out Shakespeare with a byte-level model, then regroup the same
log-probabilities into word-level tokens; and we compare byte, word and BPE unigram models.
Look at perplexity per token next to bits per byte: only the second compares across tokenizers."""

WORD_RE = re.compile(rb"[A-Za-z']+|\s+|[^A-Za-z'\s]")
LN2 = math.log(2)
BPE_VOCAB = 512


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
    return {"byte": (byte_nats, len(test_ids)), "word": (word_nats, len(word_tokens(test))),
            "bpe": bpe_unigram_nats(train, test)}


def bpe_unigram_nats(train: bytes, test: bytes) -> tuple[float, int]:
    """(total nats, tokens) of `test` under an add-one unigram over a BPE trained on `train`."""
    tok = BPETokenizer.train(train.decode("utf-8"), BPE_VOCAB)
    counts = np.bincount(tok.encode(train.decode("utf-8")), minlength=tok.vocab_size) + 1.0
    test_ids = tok.encode(test.decode("utf-8"))
    return -float(np.log(counts / counts.sum())[test_ids].sum()), len(test_ids)


def run(out_dir: Path, quick: bool = False) -> LessonResult:
    out_dir = Path(out_dir)
    res = LessonResult(NAME)
    result, cfg, model = trained_model(out_dir, quick)
    res.runs = [result.run_dir]
    text = heldout_text(cfg, 32 * cfg.model.context)
    logp, targets = logprobs(model, result.state.params, cfg, text)
    scored = text[1:len(targets) + 1]  # the bytes that were predicted
    byte_nats = -logp[np.arange(len(targets)), targets].astype(np.float64)
    # A word-level token's nats: the sum over its bytes (chain rule), so a tokenization
    # that skipped or repeated bytes would show up as a bits-per-byte mismatch below.
    word_nats = np.array([byte_nats[a:b].sum() for a, b in (m.span() for m in WORD_RE.finditer(scored))])
    nats = float(byte_nats.sum())
    n_bytes, n_words = len(scored), len(word_nats)
    ppl_byte, ppl_word = math.exp(nats / n_bytes), math.exp(float(word_nats.mean()))
    bpb_byte = nats / LN2 / n_bytes
    bpb_word = float(word_nats.sum()) / LN2 / n_bytes
    res.check("same model: perplexity per word-level token >= 3x perplexity per byte",
              f"{ppl_word:.1f} per word-token vs {ppl_byte:.2f} per byte ({n_words} vs {n_bytes} tokens)",
              ppl_word >= 3 * ppl_byte)
    res.check("same model: bits per byte identical under both tokenizations",
              f"{bpb_word:.4f} vs {bpb_byte:.4f} bits/byte", abs(bpb_word - bpb_byte) < 1e-9 * max(bpb_byte, 1))

    data = corpus_bytes(cfg)
    train = data[: int(len(data) * (1 - cfg.data.val_fraction))]
    uni = unigram_bits(train, scored)
    ppl = {k: math.exp(n / c) for k, (n, c) in uni.items()}
    bpb = {k: n / LN2 / n_bytes for k, (n, _) in uni.items()}
    res.check("unigrams: the word and BPE models have the larger perplexity per token but fewer bits per byte",
              f"ppl/token word {ppl['word']:.1f}, BPE {ppl['bpe']:.1f} vs byte {ppl['byte']:.1f}; bits/byte "
              f"word {bpb['word']:.3f}, BPE {bpb['bpe']:.3f} vs byte {bpb['byte']:.3f}",
              all(ppl[k] > ppl["byte"] and bpb[k] < bpb["byte"] for k in ("word", "bpe")))

    fig, (ax_ppl, ax_bpb) = new_figure(2)
    labels = ["trained, per byte", "trained, per word", "unigram bytes", "unigram words", f"unigram BPE-{BPE_VOCAB}"]
    colors = ["C0", "C0", "C1", "C2", "C3"]
    ax_ppl.bar(labels, [ppl_byte, ppl_word, ppl["byte"], ppl["word"], ppl["bpe"]], color=colors)
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("perplexity per token")
    ax_bpb.bar(labels, [bpb_byte, bpb_word, bpb["byte"], bpb["word"], bpb["bpe"]], color=colors)
    ax_bpb.set_ylabel("bits per byte of text")
    ax_ppl.set_title("perplexity per token: depends on the tokenizer")
    ax_bpb.set_title("bits per byte: comparable across tokenizers")
    for ax in (ax_ppl, ax_bpb):
        ax.tick_params(axis="x", rotation=20)
    res.plots.append(save_figure(fig, out_dir / "tokenizer_perplexity.png"))
    return res
