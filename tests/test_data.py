"""Corpora, split and the (seed, step) batch sampler."""

import numpy as np
import pytest

from hope_jax.config import ConfigError
from hope_jax.data.corpus import default_text, load_corpus, split
from hope_jax.data.sampler import BatchSampler, eval_batches
from hope_jax.data.tokenizers import ByteTokenizer


def test_default_corpus_is_python_docs(tiny_config):
  text = default_text()
  assert 300_000 < len(text.encode()) < 2_000_000 and "lambda" in text
  corpus = load_corpus(tiny_config.data, 256)
  assert corpus.train.dtype == np.int32 and corpus.train.max() < 256
  assert len(corpus.val) / (len(corpus.train) + len(corpus.val)) == pytest.approx(0.05, abs=0.01)
  again = load_corpus(tiny_config.data, 256)
  np.testing.assert_array_equal(corpus.val, again.val)


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = "HOPE — 嵌套学习 ✓"
  assert tok.decode(tok.encode(text)) == text


def test_sampler_is_a_pure_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.int32)
  a, b = BatchSampler(tokens, 4, 16, seed=3), BatchSampler(tokens, 4, 16, seed=3)
  for step in (0, 7, 500, 3):  # Any order, including epochs beyond the first.
    np.testing.assert_array_equal(a.batch(step), b.batch(step))
  batch = a.batch(0)
  assert batch.shape == (4, 17)
  assert np.all(np.diff(batch, axis=1) == 1)  # Contiguous windows.
  assert not np.array_equal(a.batch(0), BatchSampler(tokens, 4, 16, seed=4).batch(0))


def test_sampler_covers_each_window_once_per_epoch():
  tokens = np.arange(17 * 20 + 5, dtype=np.int32)
  s = BatchSampler(tokens, 1, 16, seed=0)
  starts = [int(s.batch(i)[0, 0]) for i in range(s.num_windows)]
  assert len(set(starts)) == s.num_windows


def test_eval_batches_are_fixed():
  tokens = np.arange(5_000, dtype=np.int32)
  a = list(eval_batches(tokens, 2, 16, 3))
  assert len(a) == 3 and all(x.shape == (2, 17) for x in a)
  np.testing.assert_array_equal(np.stack(a), np.stack(list(eval_batches(tokens, 2, 16, 3))))


def test_split_too_small_is_a_config_error():
  with pytest.raises(ConfigError, match="too few"):
    split(np.zeros(20, np.int32), 0.05, 16)


def test_text_corpus(tmp_path, tiny_config):
  (tmp_path / "a.txt").write_text("hello world\n" * 200, encoding="utf-8")
  (tmp_path / "b.txt").write_bytes(("café " * 200).encode("latin-1"))
  tiny_config.data.data_type = "text"
  tiny_config.data.data_path = str(tmp_path)
  corpus = load_corpus(tiny_config.data, 256)
  text = corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val]))
  assert "hello world" in text and "café" in text


def test_the_smallest_validation_split_gives_a_batch():
  # `split` keeps seq_len + 1 validation tokens for small corpora: exactly one window. The
  # loop's evaluation used to count (n - 1) // window = 0 windows there and crash at the
  # first evaluation, after the compile and the first steps.
  from hope_jax.data.corpus import split

  train_L, val_L = split(np.arange(40, dtype=np.uint16), 0.05, 16)
  assert len(val_L) == 17
  batches = list(eval_batches(val_L, 2, 16, 3))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0], np.stack([val_L, val_L]))


def test_split_names_the_true_minimum():
  with pytest.raises(ConfigError, match=r"has 100 tokens, .* \(need at least 101\)"):
    split(np.arange(100), 0.9, 10)
  train, val = split(np.arange(101), 0.9, 10)  # The minimum it names is enough.
  assert len(train) == 11 and len(val) == 90
  for n, f, seq in ((20, 0.05, 16), (50, 0.5, 30), (7, 0.3, 3)):
    with pytest.raises(ConfigError) as err:
      split(np.arange(n), f, seq)
    need = int(str(err.value).rsplit(" ", 1)[1].rstrip(")"))
    split(np.arange(need), f, seq)
    with pytest.raises(ConfigError):
      split(np.arange(need - 1), f, seq)
