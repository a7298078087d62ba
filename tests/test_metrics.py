"""The log's throughput and time left count training steps only."""

import types

import pytest

from hope_jax.train import metrics


def test_progress_rate_leaves_out_the_first_steps_compile_and_paused_time(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
  progress = metrics.Progress(0, 100, tokens_per_step=10, enabled=False)
  now[0] += 30.0  # The first step, its compile included.
  progress.restart(1)
  now[0] += 9.0  # Steps 2..10 at 1 s each.
  with progress.paused():
    now[0] += 50.0  # An evaluation or a checkpoint save.
  # 90 steps left at 1 s, plus the pause's 50 s over 9 steps so far for each.
  tok_s, eta = progress.rate(10)
  assert tok_s == pytest.approx(10.0) and eta == pytest.approx(90 * (1 + 50 / 9))
  now[0] += 4.0  # Steps 11..12 at 2 s each: the earlier pause is out of this rate.
  assert progress.rate(12) == (pytest.approx(5.0), pytest.approx(88 * (2 + 50 / 11)))
  with pytest.raises(RuntimeError):  # A pause ended by an error still counts as paused.
    with progress.paused():
      now[0] += 7.0
      raise RuntimeError
  now[0] += 1.0
  assert progress.rate(13)[0] == pytest.approx(10.0)


def test_a_restart_drops_the_rows_of_steps_it_writes_again(tmp_path):
  # A run killed after its last checkpoint left rows of steps the resumed run redoes: the
  # notebook's loss plot drew them twice (561 duplicated steps in the review's case).
  import json

  from hope_jax.train.metrics import MetricWriter

  w = MetricWriter(str(tmp_path), tensorboard=False)
  for step in range(1, 8):
    w.write(step, {"train/loss": float(step)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "train/lo')  # Cut by the kill.
  w = MetricWriter(str(tmp_path), start_step=4)  # Resumed from step 4 (TensorBoard purges too).
  for step in range(5, 7):
    w.write(step, {"train/loss": 10.0 * step})
  w.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r["train/loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 50.0, 60.0]
  MetricWriter(str(tmp_path), tensorboard=True, start_step=6).close()  # Nothing to purge.
