"""Evaluation: exact scoring functions, and the CLI picking the best of real checkpoints."""

import json
import math
import os

import jax
import numpy as np
import optax
import pytest

from hope_jax.config import ModelConfig
from hope_jax.data import load_corpus, tasks
from hope_jax.train import evaluation
from hope_jax.train.state import ModelDef

from tests.conftest import run_cli


def _task_config(cfg):
  d = cfg.data
  d.data_type, d.seq_len, d.mqar_pairs = "mqar", 24, 4
  d.task_train_examples, d.task_val_examples = 16, 7
  return cfg


def test_score_matches_a_plain_numpy_reference_and_ignores_batch_size(tiny_config):
  cfg = _task_config(tiny_config)
  model_def = ModelDef(ModelConfig.from_config(cfg.model))
  params = model_def.init_params(seed=1)
  corpus = load_corpus(cfg.data, cfg.model.vocab_size)
  got = [evaluation.score(model_def, params, corpus, cfg.data.seq_len, batch_size=b)
         for b in (3, 16)]
  window_NW = corpus.val.reshape(-1, cfg.data.seq_len + 1)
  answers_NW = corpus.val_answers.reshape(window_NW.shape)
  logits = np.asarray(jax.jit(model_def.apply)(params, window_NW[:, :-1]))
  loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, window_NW[:, 1:]).mean())
  acc, exact = tasks.answer_accuracy(logits, window_NW, answers_NW)
  for g in got:  # 7 windows: batches of 3 pad the last one; of 16, one padded batch.
    assert g["eval/loss"] == pytest.approx(loss, rel=1e-5)
    assert g["eval/bits_per_byte"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert g["eval/perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert g["task/accuracy"] == pytest.approx(acc) and g["task/exact_match"] == pytest.approx(exact)
    assert g["eval/tokens"] == window_NW.shape[0] * cfg.data.seq_len


def test_accuracy_counts_only_answer_positions():
  # A model that predicts every target right except one answer and all non-answers.
  window_NW = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
  answers_NW = np.array([[0, 0, 1, 1], [0, 1, 0, 0]], bool)
  logits = np.zeros((2, 3, 10))
  logits[0, 1, 7] = logits[0, 2, 0] = 1.0  # Answer 7 right, answer 8 wrong.
  logits[1, 0, 2] = 1.0  # Answer 2 right.
  acc, exact = tasks.answer_accuracy(logits, window_NW, answers_NW)
  assert acc == pytest.approx(2 / 3) and exact == pytest.approx(1 / 2)
  sums = {"nll": 0.0, "tokens": 1.0, "correct": 2.0, "answers": 3.0, "exact": 1.0,
          "examples": 2.0}
  out = evaluation.summarize(sums, "byte")
  assert out["task/accuracy"] == pytest.approx(2 / 3) and out["task/exact_match"] == 0.5


def test_best_index_skips_missing_and_nan():
  rows = [{"eval/loss": 2.0}, {}, {"eval/loss": float("nan")}, {"eval/loss": 1.5},
          {"eval/loss": 1.5}]
  assert evaluation.best_index(rows, "eval/loss") == 3
  assert evaluation.best_index(rows, "eval/loss", "max") == 0
  assert evaluation.best_index(rows, "task/accuracy") is None


@pytest.mark.parametrize("args,message", [
    ([], "--checkpoint_dir (or --checkpoint=MANIFEST) is required"),
    (["--checkpoint_dir=does/not/exist"], "no such directory: does/not/exist"),
    (["--checkpoint=missing.json"], "no such manifest: missing.json"),
    (["--checkpoint_dir=.", "--all", "--checkpoint=x.json"], "exclude each other"),
    (["--checkpoint_dir=.", "--data.seq_len"], "--data.KEY=VALUE"),
])
def test_cli_bad_inputs_are_one_line_errors(args, message):
  proc = run_cli(["-m", "hope_jax.evaluate", *args])
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
