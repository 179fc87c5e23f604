"""Token data: tokenizers, sources and deterministic batches.

The batch for step k is a pure function of (data, seed, k): every batch is
drawn from its own `numpy.random.default_rng([seed, k, stream])`, so a resumed
run sees exactly the batches an uninterrupted one would, with no iterator
state to checkpoint.
"""

from sandbox.data.batches import Batch, DataPipeline, make_pipeline, tokenizer_for
from sandbox.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, make_tokenizer

__all__ = ["BPETokenizer", "Batch", "ByteTokenizer", "DataPipeline", "Tokenizer", "make_pipeline",
           "make_tokenizer", "tokenizer_for"]
