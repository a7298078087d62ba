"""Batches as a pure function of (seed, step): exact resume needs only the step.

Windows of `seq_len + 1` tokens start at `shift_e + i * (seq_len + 1)`; each
epoch e draws its own shift and permutation of window indices from
`np.random.default_rng((seed, e))`, so every step's batch can be recomputed
without replaying earlier ones.
"""

from __future__ import annotations

import numpy as np


class BatchSampler:
  """Deterministic batches of `[batch_size, seq_len + 1]` token windows.

  Args:
    tokens: 1-D token ids (in memory or memory-mapped).
    batch_size: sequences per batch.
    seq_len: tokens per training sequence (windows hold one more, the target).
    seed: the data seed.
    aligned: windows start exactly at multiples of `seq_len + 1` (no per-epoch
      shift): for streams of whole examples such as the memory tasks.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
               aligned: bool = False):
    self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
    self.window = seq_len + 1
    self.aligned = aligned
    if aligned:
      self.num_windows = max(len(tokens) // self.window, 1)
    else:
      # One window fewer than fits, so that every epoch's shift stays in bounds.
      self.num_windows = max((len(tokens) - 1) // self.window - 1, 1)
    self._epoch_cache: tuple[int, int, np.ndarray] | None = None

  def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      rng = np.random.default_rng((self.seed, epoch))
      shift = int(rng.integers(0, self.window)) if not self.aligned and len(self.tokens) > (
          self.num_windows + 1) * self.window else 0
      self._epoch_cache = (epoch, shift, rng.permutation(self.num_windows))
    return self._epoch_cache[1], self._epoch_cache[2]

  def batch(self, step: int) -> np.ndarray:
    """The batch consumed by training step `step` (0-based): int32 `[B, seq_len + 1]`."""
    return self.rows(step, 0, self.batch_size)

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    """Rows `[start, stop)` of `batch(step)`: what one process (or device) of a sharded run reads."""
    out = np.empty((stop - start, self.window), dtype=np.int32)
    for i, b in enumerate(range(start, stop)):
      flat = step * self.batch_size + b
      epoch, idx = divmod(flat, self.num_windows)
      shift, perm = self._epoch(epoch)
      begin = shift + int(perm[idx]) * self.window
      out[i] = self.tokens[begin: begin + self.window]
    return out

  def state(self, step: int) -> dict:
    """The loader position saved in checkpoints (JSON)."""
    return {"kind": "seed_step", "seed": self.seed, "step": int(step),
            "batch_size": self.batch_size, "seq_len": self.seq_len,
            "num_tokens": int(len(self.tokens))}


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int):
  """Fixed, evenly spaced validation windows (the same at every evaluation)."""
  window = seq_len + 1
  n_windows = len(tokens) // window  # A window holds its inputs and their next tokens.
  total = min(n_windows, batch_size * num_batches)
  idx = np.linspace(0, n_windows - 1, total).astype(np.int64)
  rows = np.stack([tokens[i * window:(i + 1) * window] for i in idx]).astype(np.int32)
  if 0 < total < batch_size:
    # A validation split shorter than one batch (small book corpora) would give no
    # batch and a NaN loss; repeat its windows to fill one batch instead.
    rows, total = np.resize(rows, (batch_size, window)), batch_size
  for i in range(0, total - batch_size + 1, batch_size):
    yield rows[i:i + batch_size]
