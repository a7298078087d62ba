"""Where metrics go: absl INFO lines, a JSONL file and TensorBoard event files."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any

from absl import logging


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _drop_rows_after(path: str, step: int) -> bool:
  """Rewrites `path` without its rows of steps > `step` (atomically); True if any went."""
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      row_step = json.loads(line).get("step")
    except (ValueError, AttributeError):  # A line cut by a crash: drop it.
      continue
    if not isinstance(row_step, int) or row_step <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) == len(lines):
    return False
  tmp = f"{path}.{os.getpid()}.partial"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)
  return True


class MetricWriter:
  """Appends `{"step": n, ...}` rows to `metrics.jsonl` and scalars to TensorBoard.

  `start_step`: the step the run (re)starts from. Rows after it were written by an earlier
  process whose steps were lost (a crash after the last checkpoint): the resumed run writes
  those steps again, so they are dropped from `metrics.jsonl` and hidden in TensorBoard
  (`purge_step`), and every step appears once.
  """

  def __init__(self, log_dir: str, *, tensorboard: bool = True, start_step: int = 0):
    os.makedirs(log_dir, exist_ok=True)
    self.log_dir = log_dir
    path = os.path.join(log_dir, "metrics.jsonl")
    dropped = _drop_rows_after(path, start_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"),
                               purge_step=start_step + 1 if dropped else None)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    # NaN and inf as null: json.dumps would write NaN, which strict JSON readers reject.
    row = {"step": int(step), **{k: float(v) if math.isfinite(float(v)) else None
                                 for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def flush(self) -> None:
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Throughput and ETA between log lines; a tqdm bar on an interactive terminal.

  The rate counts training steps only: time spent in `paused()` (evaluations, checkpoint
  saves) is left out, and `restart()` after the first step drops its compile, so neither
  skews tokens/s. The time left adds the paused time per step seen so far, so evaluations
  and saves still to come are counted at their average cost.
  """

  def __init__(self, start_step: int, end_step: int, tokens_per_step: int, enabled: bool):
    self.end_step, self.tokens_per_step = end_step, tokens_per_step
    self._paused_total, self._steps_total = 0.0, 0
    self.restart(start_step)
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm

      self._bar = tqdm(total=end_step, initial=start_step, unit="step", dynamic_ncols=True,
                       leave=False)

  def restart(self, step: int) -> None:
    """Starts a new window at `step`, dropping the time since the last one began."""
    self._t, self._step, self._paused = time.perf_counter(), step, 0.0

  @contextlib.contextmanager
  def paused(self):
    """Leaves the time spent inside out of the rate."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t0

  def tick(self, step: int, postfix: dict[str, str] | None = None) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)

  def rate(self, step: int) -> tuple[float, float]:
    """(tokens/s since the last call, seconds remaining: that rate plus paused time)."""
    now = time.perf_counter()
    dt, ds = now - self._t - self._paused, step - self._step
    self._paused_total += self._paused
    self._steps_total += ds
    self._t, self._step, self._paused = now, step, 0.0
    steps_per_s = ds / dt if dt > 0 else 0.0
    if steps_per_s <= 0:
      return 0.0, float("inf")
    paused_per_step = self._paused_total / self._steps_total
    return (steps_per_s * self.tokens_per_step,
            (self.end_step - step) * (1 / steps_per_s + paused_per_step))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def log_line(step: int, end: int, loss: float, bits: float, lr: float, tok_s: float | None,
             eta: float | None, unit: str) -> None:
  """One progress line; `tok_s` None (a process's first step, its compile) prints no rate."""
  if tok_s is None:
    logging.info("step %d/%d | loss %.4f | %s %.4f | lr %.2e | first step, no rate yet", step,
                 end, loss, unit, bits, lr)
    return
  logging.info("step %d/%d | loss %.4f | %s %.4f | lr %.2e | %.0f tok/s | %s left", step, end,
               loss, unit, bits, lr, tok_s, format_duration(eta))
