"""Data: corpora (default, random, text, books), tokenizers and the batch sampler."""

from hope_jax.data.corpus import Corpus, load_corpus
from hope_jax.data.sampler import BatchSampler

__all__ = ["Corpus", "load_corpus", "BatchSampler"]
