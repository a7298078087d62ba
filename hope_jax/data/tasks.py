"""Synthetic memory tasks: multi-query associative recall (MQAR) and passkey retrieval.

Each example is exactly one training window (`data.seq_len + 1` tokens), and the
examples are laid end to end, so the usual machinery applies unchanged: the
validation windows at `i * (seq_len + 1)` are whole examples, and the train
sampler runs in aligned mode (no random shift) so that its batches are whole
examples too, still a pure function of (seed, step).

Next to the tokens each generator returns a boolean mask of the same shape that
is True at every *answer* token. A model answers the token at position t from
the prefix `[0, t)`, so in target coordinates (`window[1:]`) the accuracy is
`argmax(logits[t - 1]) == window[t]` over the masked positions.

MQAR (after Zoology, Arora et al. 2023), token ids for a vocabulary of V:
  0 filler, keys in [2, 2 + K), values in [2 + K, V) with K = (V - 2) // 2;
  [k1 v1 k2 v2 ... kP vP] [gap x filler] [q1 a1 ... qQ aQ] [filler up to the window]
  Keys are distinct within an example, so every query has exactly one answer.

Passkey (after Mohtashami & Jaggi 2023), byte tokens:
  filler sentences with "The pass key is 48213. Remember it. " hidden at a chosen
  depth, then "\nWhat is the pass key? The pass key is 48213" ending the window;
  the answer tokens are the final digits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hope_jax.config import ConfigError

TASKS = ("mqar", "passkey")
MQAR_FILLER = 0
MQAR_FIRST_KEY = 2
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is {key}"
# The `data.*` task keys and their defaults (experiments/base.py documents each);
# evaluation fills them into configs saved before they existed.
TASK_DEFAULTS = {"task_train_examples": 16384, "task_val_examples": 256, "task_seed": 0,
                 "mqar_pairs": 8, "mqar_queries": None, "mqar_gap": None, "passkey_digits": 5,
                 "passkey_depth": None}
# Seed domains keep the train and validation examples disjoint draws.
_TRAIN, _VAL = 0, 1


@dataclasses.dataclass(frozen=True)
class TaskExamples:
  """`num` examples of one task, each exactly `window` tokens long.

  Attributes:
    tokens_NW: int32 token ids.
    answers_NW: bool, True at answer tokens.
    depth_N: for passkey, where the needle starts as a fraction of the haystack
      (0 = first token, 1 = right before the question); for MQAR, the distance in
      tokens from the last key-value pair to the first query.
  """

  tokens_NW: np.ndarray
  answers_NW: np.ndarray
  depth_N: np.ndarray


# ----------------------------------------------------------------------------- MQAR


def mqar_layout(window: int, vocab_size: int, pairs: int, queries: int | None,
                gap: int | None) -> tuple[int, int]:
  """Checks MQAR settings; returns (queries, gap) with the defaults filled in.

  Raises:
    ConfigError: the keys do not fit the vocabulary or the example the window.
  """
  num_keys = (vocab_size - MQAR_FIRST_KEY) // 2
  if pairs < 1:
    raise ConfigError(f"data.mqar_pairs must be >= 1, got {pairs}")
  if pairs > num_keys:
    raise ConfigError(f"data.mqar_pairs={pairs} needs that many distinct keys, but "
                      f"model.vocab_size={vocab_size} gives only {num_keys}")
  queries = pairs if queries is None else int(queries)
  if not 1 <= queries <= pairs:
    raise ConfigError(f"data.mqar_queries must be in [1, mqar_pairs={pairs}], got {queries}")
  free = window - 2 * pairs - 2 * queries
  if gap is not None and gap < 0:
    raise ConfigError(f"data.mqar_gap must be >= 0 or None (the longest gap that fits), got {gap}")
  if gap is None:
    gap = free  # The queries end the window: the longest distance that fits.
  if gap < 0 or free < gap:
    raise ConfigError(
        f"MQAR with {pairs} pairs, {queries} queries and gap {gap} needs "
        f"{2 * pairs + 2 * queries + max(gap, 0)} tokens, but a window holds data.seq_len + 1 = "
        f"{window}; lower data.mqar_pairs/mqar_gap or raise data.seq_len")
  return queries, gap


# Uniforms drawn at once when picking keys: bounds the memory at large vocabularies.
_KEY_BLOCK = 1 << 22


def _first_of_permutations(rng, num: int, n: int, k: int) -> np.ndarray:
  """The first `k` entries of `num` random permutations of range(n), [num, k].

  Each row is `argsort(uniforms)[:k]`, as `_first_of_permutations_reference` writes it,
  but drawn in blocks of rows (the generator's stream is the same) and with a partition
  before the sort: all of `rng.random((num, n))` at once took about 1 GiB and 3.6 s at
  a vocabulary of 8,192 and would not fit at 50k.
  """
  out = np.empty((num, k), np.int64)
  rows = max(1, _KEY_BLOCK // max(n, 1))
  for start in range(0, num, rows):
    u = rng.random((min(rows, num - start), n))
    part = np.argpartition(u, k - 1, axis=1)[:, :k] if k < n else np.argsort(u, axis=1)
    order = np.argsort(np.take_along_axis(u, part, axis=1), axis=1)
    out[start:start + len(u)] = np.take_along_axis(part, order, axis=1)
  return out


def _first_of_permutations_reference(rng, num: int, n: int, k: int) -> np.ndarray:
  """The plain twin of `_first_of_permutations`."""
  return np.argsort(rng.random((num, n)), axis=1)[:, :k]


def make_mqar(num: int, window: int, vocab_size: int, pairs: int, queries: int | None = None,
              gap: int | None = None, seed: Any = 0) -> TaskExamples:
  """`num` MQAR examples; a pure function of its arguments."""
  queries, gap = mqar_layout(window, vocab_size, pairs, queries, gap)
  rng = np.random.default_rng(seed)
  num_keys = (vocab_size - MQAR_FIRST_KEY) // 2
  first_value = MQAR_FIRST_KEY + num_keys
  num_values = vocab_size - first_value
  keys_NP = _first_of_permutations(rng, num, num_keys, pairs) + MQAR_FIRST_KEY
  values_NP = rng.integers(first_value, first_value + num_values, (num, pairs))
  asked_NQ = np.argsort(rng.random((num, pairs)), axis=1)[:, :queries]

  tokens = np.full((num, window), MQAR_FILLER, np.int32)
  answers = np.zeros((num, window), bool)
  tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2] = keys_NP, values_NP
  q0 = 2 * pairs + gap
  rows = np.arange(num)[:, None]
  tokens[:, q0:q0 + 2 * queries:2] = keys_NP[rows, asked_NQ]
  tokens[:, q0 + 1:q0 + 2 * queries:2] = values_NP[rows, asked_NQ]
  answers[:, q0 + 1:q0 + 2 * queries:2] = True
  return TaskExamples(tokens, answers, np.full((num,), gap, np.float64))


# -------------------------------------------------------------------------- passkey


def passkey_layout(window: int, digits: int, depth: float | None) -> int:
  """Checks passkey settings; returns the haystack length (window minus question).

  Raises:
    ConfigError: too few digits, a depth outside [0, 1], or a window too short.
  """
  if not 1 <= digits <= 18:
    raise ConfigError(f"data.passkey_digits must be in [1, 18], got {digits}")
  if depth is not None and not 0.0 <= depth <= 1.0:
    raise ConfigError(f"data.passkey_depth must be in [0, 1] or None, got {depth}")
  key = "9" * digits
  haystack = window - len(PASSKEY_QUESTION.format(key=key))
  needed = len(PASSKEY_NEEDLE.format(key=key))
  if haystack < needed:
    raise ConfigError(f"passkey with {digits} digits needs data.seq_len >= "
                      f"{window - 1 - haystack + needed}, got {window - 1}")
  return haystack


def make_passkey(num: int, window: int, digits: int = 5, depth: float | None = None,
                 seed: Any = 0) -> TaskExamples:
  """`num` passkey examples in bytes; `depth=None` draws a depth per example."""
  haystack = passkey_layout(window, digits, depth)
  rng = np.random.default_rng(seed)
  filler = PASSKEY_FILLER * (haystack // len(PASSKEY_FILLER) + 2)
  tokens = np.empty((num, window), np.int32)
  answers = np.zeros((num, window), bool)
  answers[:, window - digits:] = True
  depths = np.empty((num,), np.float64)
  for i in range(num):
    key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    needle = PASSKEY_NEEDLE.format(key=key)
    room = haystack - len(needle)  # Filler characters around the needle.
    d = float(rng.random()) if depth is None else float(depth)
    start = int(round(d * room))
    depths[i] = start / room if room else 0.0
    text = (filler[:start] + needle + filler[start:room] +
            PASSKEY_QUESTION.format(key=key))
    tokens[i] = np.frombuffer(text.encode("ascii"), np.uint8)
  return TaskExamples(tokens, answers, depths)


# ------------------------------------------------------------------------ config glue


def task_examples(data_cfg: Any, vocab_size: int, split: str) -> TaskExamples:
  """The train or validation examples that `data_cfg` describes.

  Raises:
    ConfigError: bad task settings (naming the key) or an unknown split.
  """
  kind = data_cfg.data_type
  window = int(data_cfg.seq_len) + 1
  num = int(data_cfg.task_train_examples if split == "train" else data_cfg.task_val_examples)
  if num < 1:
    raise ConfigError(f"data.task_{split}_examples must be >= 1, got {num}")
  seed = (int(data_cfg.task_seed), _TRAIN if split == "train" else _VAL)
  if kind == "mqar":
    return make_mqar(num, window, vocab_size, int(data_cfg.mqar_pairs), data_cfg.mqar_queries,
                     data_cfg.mqar_gap, seed)
  if kind == "passkey":
    if vocab_size != 256:
      raise ConfigError(f"data.data_type='passkey' is written in bytes: it needs "
                        f"model.vocab_size=256, got {vocab_size}")
    depth = data_cfg.passkey_depth
    return make_passkey(num, window, int(data_cfg.passkey_digits),
                        None if depth is None else float(depth), seed)
  raise ConfigError(f"data.data_type={kind!r} is not a task; tasks are {TASKS}")


def answer_accuracy(logits_NLV: np.ndarray, window_NW: np.ndarray,
                    answers_NW: np.ndarray) -> tuple[float, float]:
  """Reference accuracy in NumPy: per answer token, and per example (all answers right)."""
  pred_NL = np.argmax(logits_NLV, axis=-1)
  hit_NL = pred_NL == window_NW[:, 1:]
  mask_NL = answers_NW[:, 1:]
  token_acc = float(hit_NL[mask_NL].mean())
  has = mask_NL.any(axis=1)
  exact = float(np.all(hit_NL | ~mask_NL, axis=1)[has].mean())
  return token_acc, exact
