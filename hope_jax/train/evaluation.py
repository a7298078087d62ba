"""Scoring parameters on a validation split: loss, bits per byte/char, perplexity, task accuracy.

Every validation window is scored (or the first `max_windows`), and the sums are
exact: the last batch is padded with repeated rows of weight 0, so the numbers
do not depend on the batch size. For memory tasks (`Corpus.val_answers`), the
accuracy is argmax prediction == answer token at the answer positions, per
token and per example (every answer of the example right).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hope_jax.config import is_integer
from hope_jax.data.corpus import Corpus
from hope_jax.train.state import ModelDef
from hope_jax.train.step import LN2

BITS_NAME = {"byte": "bits_per_byte", "char": "bits_per_char"}


def make_score_step(model_def: ModelDef):
  """Pure sums over one batch; jit it. Rows with weight 0 count for nothing."""

  def score_step(params, window_BW, answers_BW, weight_B):
    logits_BLV = model_def.apply(params, window_BW[:, :-1]).astype(jnp.float32)
    target_BL, answer_BL = window_BW[:, 1:], answers_BW[:, 1:]
    nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, target_BL)
    hit_BL = jnp.argmax(logits_BLV, axis=-1) == target_BL
    w_B1 = weight_B[:, None]
    has_B = jnp.any(answer_BL, axis=1)
    exact_B = jnp.all(hit_BL | ~answer_BL, axis=1) & has_B
    return {
        "nll": jnp.sum(nll_BL * w_B1),
        "tokens": jnp.sum(jnp.broadcast_to(w_B1, nll_BL.shape)),
        "correct": jnp.sum(jnp.where(answer_BL, hit_BL, False) * w_B1),
        "answers": jnp.sum(answer_BL * w_B1),
        "exact": jnp.sum(exact_B * weight_B),
        "examples": jnp.sum(has_B * weight_B),
    }

  return score_step


def validation_windows(corpus: Corpus, seq_len: int,
                       max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The aligned validation windows `[N, seq_len + 1]` and their answer masks."""
  window = seq_len + 1
  n = len(corpus.val) // window
  if max_windows is not None:
    n = min(n, int(max_windows))
  tokens_NW = np.asarray(corpus.val[:n * window], np.int32).reshape(n, window)
  if corpus.val_answers is None:
    answers_NW = np.zeros_like(tokens_NW, dtype=bool)
  else:
    answers_NW = np.asarray(corpus.val_answers[:n * window], bool).reshape(n, window)
  return tokens_NW, answers_NW


def padded_batches(tokens_NW: np.ndarray, answers_NW: np.ndarray,
                   batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Fixed-size batches; the last is filled with copies of row 0 at weight 0."""
  n = len(tokens_NW)
  for i in range(0, n, batch_size):
    idx = np.arange(i, i + batch_size)
    weight = (idx < n).astype(np.float32)
    idx = np.where(idx < n, idx, 0)
    yield tokens_NW[idx], answers_NW[idx], weight


def summarize(sums: dict[str, float], tokenizer_name: str = "") -> dict[str, float]:
  """Turns summed counts into the reported metrics (`eval/...`, `task/...`)."""
  loss = sums["nll"] / max(sums["tokens"], 1.0)
  out = {"eval/loss": loss, "eval/bits_per_token": loss / LN2,
         "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums["tokens"]}
  if tokenizer_name in BITS_NAME:
    out[f"eval/{BITS_NAME[tokenizer_name]}"] = loss / LN2
  if sums["answers"] > 0:
    out["task/accuracy"] = sums["correct"] / sums["answers"]
    out["task/exact_match"] = sums["exact"] / max(sums["examples"], 1.0)
  return out


def check_batching(batch_size: Any, max_windows: Any) -> None:
  """ValueError unless batch_size >= 1 and max_windows is None or >= 1 (integers)."""
  if not is_integer(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  if max_windows is not None and (not is_integer(max_windows) or max_windows < 1):
    raise ValueError(f"max_windows must be None (every window) or an integer >= 1, got "
                     f"{max_windows!r}")


def score(model_def: ModelDef, params: Any, corpus: Corpus, seq_len: int, batch_size: int = 16,
          max_windows: int | None = None, score_step=None) -> dict[str, float]:
  """Scores `params` on the validation split of `corpus`.

  Args:
    model_def: the model structure.
    params: pure-dict parameters.
    corpus: a loaded corpus; its `val` is cut into aligned `seq_len + 1` windows.
    seq_len: tokens per scored sequence.
    batch_size: windows per device call (does not change the result).
    max_windows: score only the first N windows (None: all).
    score_step: a jitted `make_score_step(model_def)` to reuse across calls.

  Returns:
    `eval/loss` (nats per token), `eval/bits_per_token` (and `eval/bits_per_byte`
    or `eval/bits_per_char` by tokenizer), `eval/perplexity`, `eval/tokens`; for
    tasks `task/accuracy` and `task/exact_match`.
  """
  check_batching(batch_size, max_windows)
  tokens_NW, answers_NW = validation_windows(corpus, seq_len, max_windows)
  if len(tokens_NW) == 0:
    raise ValueError(f"the validation split ({len(corpus.val)} tokens) holds no window of "
                     f"{seq_len + 1} tokens")
  step = score_step or jax.jit(make_score_step(model_def))
  totals: dict[str, float] = {}
  for batch in padded_batches(tokens_NW, answers_NW, min(batch_size, len(tokens_NW))):
    for k, v in jax.device_get(step(params, *batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  # Task tokens are symbols, not text: report bits per token only.
  name = "" if corpus.val_answers is not None else getattr(corpus.tokenizer, "name", "")
  return summarize(totals, name)


def best_index(rows: list[dict[str, float]], metric: str, mode: str = "min") -> int | None:
  """Index of the best finite `metric` among `rows` (the earliest on ties), or None."""
  best = None
  for i, row in enumerate(rows):
    v = row.get(metric)
    if v is None or not math.isfinite(v):
      continue
    if best is None or (v < rows[best][metric] if mode == "min" else v > rows[best][metric]):
      best = i
  return best
