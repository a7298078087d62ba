"""Memory tasks: the generators produce what they claim, and the data pipeline keeps examples whole."""

import numpy as np
import pytest

from hope_jax.config import ConfigError
from hope_jax.data import load_corpus, tasks
from hope_jax.data.sampler import BatchSampler

V = 256


@pytest.mark.parametrize("pairs,queries,gap", [(4, None, None), (8, 3, 5), (1, 1, 0)])
def test_mqar_every_query_has_exactly_one_answer_at_the_stated_distance(pairs, queries, gap):
  window = 48
  ex = tasks.make_mqar(64, window, V, pairs, queries, gap, seed=7)
  q, g = tasks.mqar_layout(window, V, pairs, queries, gap)
  first_value = tasks.MQAR_FIRST_KEY + (V - tasks.MQAR_FIRST_KEY) // 2
  assert ex.tokens_NW.shape == ex.answers_NW.shape == (64, window)
  for toks, ans, depth in zip(ex.tokens_NW, ex.answers_NW, ex.depth_N, strict=True):
    keys, values = toks[0:2 * pairs:2], toks[1:2 * pairs:2]
    assert len(set(keys.tolist())) == pairs  # Distinct keys: one answer per query.
    assert np.all((keys >= tasks.MQAR_FIRST_KEY) & (keys < first_value))
    assert np.all(values >= first_value) and np.all(values < V)
    q0 = 2 * pairs + g
    assert depth == g and np.all(toks[2 * pairs:q0] == tasks.MQAR_FILLER)
    np.testing.assert_array_equal(np.flatnonzero(ans), q0 + 1 + 2 * np.arange(q))
    for pos in np.flatnonzero(ans):
      asked, answer = toks[pos - 1], toks[pos]
      (where,) = np.nonzero(keys == asked)
      assert len(where) == 1 and values[where[0]] == answer
      # The key occurs once in the context, once as the query.
      assert np.count_nonzero(toks[:pos] == asked) == 2


def test_mqar_is_a_pure_function_of_its_seed():
  a, b = tasks.make_mqar(8, 40, V, 6, seed=(3, 0)), tasks.make_mqar(8, 40, V, 6, seed=(3, 0))
  c = tasks.make_mqar(8, 40, V, 6, seed=(3, 1))
  np.testing.assert_array_equal(a.tokens_NW, b.tokens_NW)
  assert not np.array_equal(a.tokens_NW, c.tokens_NW)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_needle_appears_once_at_the_stated_depth(depth):
  window, digits = 160, 5
  ex = tasks.make_passkey(16, window, digits, depth, seed=1)
  room = tasks.passkey_layout(window, digits, depth) - len(
      tasks.PASSKEY_NEEDLE.format(key="0" * digits))
  for toks, ans, got_depth in zip(ex.tokens_NW, ex.answers_NW, ex.depth_N, strict=True):
    text = bytes(toks.astype(np.uint8)).decode("ascii")
    key = bytes(toks[ans].astype(np.uint8)).decode("ascii")
    assert len(key) == digits and key.isdigit()
    needle = tasks.PASSKEY_NEEDLE.format(key=key)
    assert text.count(needle) == 1 and text.find(needle) == round(depth * room)
    assert got_depth == pytest.approx(depth, abs=1 / room)
    # The number is in the haystack once and is the final answer; no other digits.
    assert text.count(key) == 2 and text.endswith("The pass key is " + key)
    assert sum(ch.isdigit() for ch in text) == 2 * digits
    np.testing.assert_array_equal(np.flatnonzero(ans), np.arange(window - digits, window))


def test_passkey_random_depths_cover_the_haystack():
  ex = tasks.make_passkey(200, 128, 4, None, seed=0)
  assert ex.depth_N.min() < 0.1 and ex.depth_N.max() > 0.9


def test_task_corpus_windows_are_whole_examples(tiny_config):
  d = tiny_config.data
  d.data_type, d.seq_len, d.task_train_examples, d.task_val_examples = "mqar", 40, 64, 8
  d.mqar_pairs = 6
  corpus = load_corpus(d, V)
  window = d.seq_len + 1
  assert corpus.aligned and corpus.val_answers.shape == corpus.val.shape
  train_NW = corpus.train.reshape(-1, window)
  sampler = BatchSampler(corpus.train, 5, d.seq_len, seed=2, aligned=corpus.aligned)
  rows = {r.tobytes() for r in train_NW}
  for step in (0, 1, 13, 40):  # Crosses epochs (64 examples, 5 per step).
    batch = sampler.batch(step)
    assert all(r.tobytes() in rows for r in batch)
    np.testing.assert_array_equal(batch, sampler.batch(step))
  # Validation examples come from another seed domain than training.
  val_NW = corpus.val.reshape(-1, window)
  assert not any(r.tobytes() in rows for r in val_NW)


@pytest.mark.parametrize("change,match", [
    ({"mqar_pairs": 200}, "distinct keys"),
    ({"mqar_pairs": 12, "mqar_gap": 30}, "mqar_pairs/mqar_gap"),
    ({"mqar_gap": -3}, r"data.mqar_gap must be >= 0 or None \(the longest gap that fits\), got -3"),
    ({"mqar_queries": 9}, "mqar_queries"),
    ({"data_type": "passkey", "seq_len": 20}, "passkey with 5 digits needs data.seq_len"),
    ({"data_type": "passkey", "passkey_depth": 1.5}, "passkey_depth"),
])
def test_bad_task_settings_name_the_key(tiny_config, change, match):
  d = tiny_config.data
  d.data_type, d.seq_len = "mqar", 40
  for k, v in change.items():
    d[k] = v
  with pytest.raises(ConfigError, match=match):
    load_corpus(d, V)


def test_base_config_declares_every_task_key():
  from experiments import base

  d = base.get_config().data
  assert {k: d[k] for k in tasks.TASK_DEFAULTS} == tasks.TASK_DEFAULTS


@pytest.mark.parametrize("block", [1, 7, 1 << 22])
@pytest.mark.parametrize("n,k", [(30, 4), (30, 30), (5, 1)])
def test_blocked_key_picks_equal_the_plain_permutations(monkeypatch, block, n, k):
  # Blocks of rows draw the same uniforms in the same order, and a partition before the
  # sort keeps the first k of each permutation: the examples do not change with the block.
  monkeypatch.setattr(tasks, "_KEY_BLOCK", block)
  got = tasks._first_of_permutations(np.random.default_rng(3), 11, n, k)
  want = tasks._first_of_permutations_reference(np.random.default_rng(3), 11, n, k)
  np.testing.assert_array_equal(got, want)
