"""The trained BPE tokenizer (data.tokenizer=bpe) and bits per byte across tokenizers.

References are independent of the code under test: UTF-8 lengths from Python's own encoder, the
validation tail cut from the corpus file directly, token counts from the `tokenizers` library itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.data import make_pipeline
from sandbox.data.tokenizer import BPETokenizer
from sandbox.errors import UserError
from sandbox.train.loop import train

from conftest import SHAKESPEARE

TEXT = SHAKESPEARE.read_text(encoding="utf-8")


def bpe_cfg(tiny, corpus, vocab=300, **data):
    return tiny(overrides={"model": {"vocab_size": vocab}, "training": {"steps": 6},
                           "data": {"source": "text", "paths": [str(corpus)], "tokenizer": "bpe",
                                    "bpe_vocab_size": vocab, **data}})


@pytest.fixture(scope="module")
def small_bpe():
    return BPETokenizer.train(TEXT[:100_000], vocab_size=300)


UNICODE_SAMPLES = ["", "a", "\x00\x01\x7f", "héllo wörld", "日本語のテキスト", "🦀🚀 e\u0301 \u200d",
                   "tabs\tand\r\nCRLF  double  spaces\n\n\n", "\ufeffBOM", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " * 3]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_bpe_round_trips_unicode_and_control_bytes(small_bpe, text):
    ids = small_bpe.encode(text)
    assert small_bpe.decode(ids) == text
    assert int(small_bpe.byte_lengths[ids].sum()) == len(text.encode("utf-8"))
    assert b"".join(small_bpe.token_bytes[i] for i in ids) == text.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trips_arbitrary_text(small_bpe, text):
    ids = small_bpe.encode(text)
    assert ids.max(initial=0) < small_bpe.vocab_size
    assert small_bpe.decode(ids) == text
    assert int(small_bpe.byte_lengths[ids].sum()) == len(text.encode("utf-8"))


def test_bpe_is_loaded_from_the_tokenizers_json_format(small_bpe):
    spec = json.loads(small_bpe.to_json())
    assert spec["model"]["type"] == "BPE"
    again = BPETokenizer.from_json(small_bpe.to_json())
    reference = tokenizers.Tokenizer.from_str(small_bpe.to_json())  # the library's own reader
    assert again.encode(TEXT[:2000]).tolist() == reference.encode(TEXT[:2000]).ids
    assert again.key == small_bpe.key


def test_bpe_is_trained_on_the_training_split_only(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    train_text = TEXT[:60_000]
    corpus.write_text(train_text + "zqxv " * 2000, encoding="utf-8")  # only in the validation tail
    vf = 10_000 / len(corpus.read_bytes())
    p = make_pipeline(bpe_cfg(tiny, corpus, val_fraction=vf))
    vocab = [p.tokenizer.decode([i]) for i in range(p.tokenizer.vocab_size)]
    assert not any("zq" in v or "qx" in v for v in vocab)
    assert p.info["val_bytes"] == 10_000


def test_bpe_split_inside_a_character_moves_to_the_next_character(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT[:20_000].replace("e", "é").replace("o", "日"), encoding="utf-8")
    data = corpus.read_bytes()
    n = len(data)
    inside = [b for b in range(int(n * 0.9), n) if data[b] & 0xC0 == 0x80]  # UTF-8 continuation bytes
    cuts = [inside[0], next(b for b in inside if data[b - 2] >= 0xE0), int(n * 0.9) - 1]  # é, 日's 3rd, other
    assert data[cuts[2]] & 0xC0 != 0x80
    for cut in cuts:
        val_fraction = (n - cut + 0.5) / n  # the nominal split falls at byte `cut`
        assert n - int(n * val_fraction) == cut
        b = cut
        while data[b] & 0xC0 == 0x80:  # the reference: continuation bytes skipped by hand
            b += 1
        p = make_pipeline(bpe_cfg(tiny, corpus, val_fraction=val_fraction))
        assert p.tokenizer.decode(p.train_tokens) == data[:b].decode("utf-8")
        assert p.tokenizer.decode(p.val_tokens) == data[b:].decode("utf-8")
        assert p.info["val_bytes"] == len(data) - b


def test_damaged_bpe_cache_is_retrained_with_one_warning(tiny, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT[:30_000], encoding="utf-8")
    first = make_pipeline(bpe_cfg(tiny, corpus))
    (saved,) = (tmp_path / "cache").glob("bpe-*.json")
    saved.write_text('{"not": "a tokenizer"}')
    again = make_pipeline(bpe_cfg(tiny, corpus))
    assert again.tokenizer.key == first.tokenizer.key  # retrained to the same tokenizer
    err = capsys.readouterr().err
    assert "tokenizer cache" in err and "retrained" in err and err.count("\n") == 1, err


def test_bpe_cache_is_reused_and_keyed_by_corpus_and_vocab(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT[:50_000], encoding="utf-8")
    cache = tmp_path / "cache"
    p1 = make_pipeline(bpe_cfg(tiny, corpus))
    (saved,) = cache.glob("bpe-*.json")
    before = saved.stat().st_mtime_ns
    p2 = make_pipeline(bpe_cfg(tiny, corpus))
    assert saved.stat().st_mtime_ns == before and len(list(cache.glob("bpe-*.json"))) == 1
    assert p2.tokenizer.key == p1.tokenizer.key
    assert np.array_equal(p1.train_tokens, p2.train_tokens)
    p3 = make_pipeline(bpe_cfg(tiny, corpus, vocab=320))  # another vocab size: another tokenizer
    assert len(list(cache.glob("bpe-*.json"))) == 2 and p3.tokenizer.vocab_size == 320
    corpus.write_text(TEXT[50_000:100_000], encoding="utf-8")  # another corpus: another tokenizer
    p4 = make_pipeline(bpe_cfg(tiny, corpus))
    assert len(list(cache.glob("bpe-*.json"))) == 3 and p4.tokenizer.key != p1.tokenizer.key
    assert json.loads(saved.read_text())["model"]["type"] == "BPE"  # the tokenizers JSON, no pickle


def test_bpe_vocab_larger_than_the_model_is_one_clear_error(tiny, tmp_path):
    with pytest.raises(UserError, match=r"model.vocab_size: 256 .*data.bpe_vocab_size=512"):
        make_pipeline(tiny(overrides={"data": {"source": "text", "paths": [str(SHAKESPEARE)],
                                               "tokenizer": "bpe", "bpe_vocab_size": 512}}))


def test_val_split_bytes_and_tokens_match_a_direct_count(tiny):
    cfg = bpe_cfg(tiny, SHAKESPEARE, vocab=400)
    p = make_pipeline(cfg)
    data = SHAKESPEARE.read_bytes()  # ASCII: the byte split needs no character-boundary shift
    val_text = data[len(data) - int(len(data) * cfg.data.val_fraction):].decode("utf-8")
    reference = tokenizers.Tokenizer.from_str(p.tokenizer.to_json())
    assert p.info["val_bytes"] == len(val_text.encode("utf-8"))
    assert p.info["val_tokens"] == len(reference.encode(val_text).ids) == len(p.val_tokens)
    assert p.info["bytes_per_token"] == pytest.approx(len(val_text) / len(p.val_tokens), rel=1e-12)
    assert p.tokenizer.decode(p.val_tokens) == val_text
    byte = make_pipeline(tiny(overrides={"data": {"source": "text", "paths": [str(SHAKESPEARE)]}}))
    assert byte.info["bytes_per_token"] == 1.0 and byte.info["val_bytes"] == len(val_text)


def test_bpe_run_reports_bits_per_byte_and_samples_text(tiny, tmp_path):
    """summary.json's val_bits_per_byte = val CE * val tokens / (val bytes * ln 2), all counted here."""
    from sandbox.sample import sample_from_run

    cfg = bpe_cfg(tiny, SHAKESPEARE, vocab=300)
    r = train(cfg)
    data = SHAKESPEARE.read_bytes()
    val_text = data[len(data) - int(len(data) * cfg.data.val_fraction):].decode("utf-8")
    (saved,) = (tmp_path / "cache").glob("bpe-*.json")
    n_tokens = len(tokenizers.Tokenizer.from_str(saved.read_text()).encode(val_text).ids)
    s = r.summary
    expected = s["val_ce"] * n_tokens / (len(val_text.encode("utf-8")) * math.log(2))
    assert s["val_bits_per_byte"] == pytest.approx(expected, rel=1e-9)
    assert s["val_bits_per_byte"] < s["val_bits_per_token"]  # a BPE token holds more than one byte
    out = sample_from_run(r.run_dir, "ROMEO:", max_tokens=8, temperature=1.0, seed=0)
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:")


def test_unknown_tokenizer_choice_is_refused(tiny):
    with pytest.raises(UserError, match="data.tokenizer"):
        tiny(overrides={"data": {"tokenizer": "wordpiece"}})
