import numpy as np
import pytest

from sandbox.data import make_pipeline
from sandbox.data.synthetic import MarkovSource
from sandbox.errors import UserError


def empirical_conditional_entropy(seqs, order, alphabet):
    """Plug-in estimate of H(X_t | previous `order` symbols) from samples."""
    counts = np.zeros((alphabet**order, alphabet))
    for s in seqs:
        ctx = 0
        for i, x in enumerate(s):
            if i >= order:
                counts[ctx, x] += 1
            ctx = (ctx * alphabet + x) % alphabet**order
    p_ctx = counts.sum(1) / counts.sum()
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    return float(np.sum(p_ctx * h))


def test_markov_entropy_rate_matches_samples():
    src = MarkovSource.create(alphabet=4, order=2, concentration=0.5, seed=3)
    seqs = src.sample(np.random.default_rng(0), 400, 500)
    assert empirical_conditional_entropy(seqs, 2, 4) == pytest.approx(src.entropy_rate, abs=0.01)
    assert 0 < src.entropy_rate < np.log(4)
    # the window floor is above the rate (short contexts at the start) and tends to it
    assert src.window_floor(8) > src.window_floor(64) > src.entropy_rate


def test_batches_are_pure_functions_of_seed_and_step(tiny):
    p = make_pipeline(tiny())
    a, b = p.train_batch(5), p.train_batch(5)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.inputs, p.train_batch(6).inputs)
    assert np.array_equal(a.inputs[:, 1:], a.targets[:, :-1])
    other_seed = make_pipeline(tiny(sets=["seed=1"]))
    assert not np.array_equal(a.inputs, other_seed.train_batch(5).inputs)
    # validation batches do not depend on the training seed
    assert np.array_equal(p.val_batch(0).inputs, other_seed.val_batch(0).inputs)
    prefetched = list(p.prefetch_train(3, 7, depth=2))
    assert all(np.array_equal(x.inputs, p.train_batch(k).inputs) for x, k in zip(prefetched, range(3, 7)))


def test_text_source_caches_memmap(tiny, shakespeare_path, tmp_path):
    cfg = tiny(overrides={"data": {"source": "text", "paths": [str(shakespeare_path)]}})
    p = make_pipeline(cfg)
    assert isinstance(p.train_tokens.base, np.memmap) or isinstance(p.train_tokens, np.memmap)
    assert p.info["train_tokens"] + p.info["val_tokens"] == shakespeare_path.stat().st_size
    text = p.tokenizer.decode(p.train_batch(0).inputs[0])
    assert len(text) == 32 and text in shakespeare_path.read_text()  # a real window of the corpus
    cached = list((tmp_path / "cache").glob("tokens-*.npy"))
    assert len(cached) == 1
    p2 = make_pipeline(cfg)
    assert np.array_equal(p2.train_batch(3).inputs, p.train_batch(3).inputs)


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"too short", "too short for model.context"),
])
def test_bad_corpus_is_refused(tiny, tmp_path, content, message):
    f = tmp_path / "corpus.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        make_pipeline(tiny(overrides={"data": {"source": "text", "paths": [str(f)]}}))


def test_missing_corpus_and_binary_corpus(tiny, tmp_path):
    with pytest.raises(UserError, match="file not found"):
        make_pipeline(tiny(overrides={"data": {"source": "text", "paths": [str(tmp_path / "x.txt")]}}))
    f = tmp_path / "blob.bin"
    f.write_bytes(bytes(range(256)) * 40)  # not UTF-8: fine for the byte tokenizer
    p = make_pipeline(tiny(overrides={"data": {"source": "text", "paths": [str(f)]}}))
    assert p.train_batch(0).inputs.max() > 127
