"""Evaluation: exact scoring functions, and the CLI picking the best of real checkpoints."""

import json
import math

import jax
import numpy as np
import optax
import pytest

from hope_jax.config import ModelConfig
from hope_jax.data import load_corpus, tasks
from hope_jax.train import evaluation
from hope_jax.train.state import ModelDef
from tests.conftest import run_cli

# The CLI runs of this module share one XLA compilation cache: most score one checkpoint.
pytestmark = pytest.mark.usefixtures("xla_compile_cache")


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
    assert g["eval/bits_per_token"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert "eval/bits_per_byte" not in g  # Task tokens are symbols, not bytes of text.
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
    # Output paths are checked before the scoring or the export, not after it.
    (["--checkpoint_dir=.", "--output=no/such/dir/x.json"],
     "--output: folder no/such/dir does not exist"),
    (["export", "--checkpoint_dir=.", "--output=."], "--output: . is a folder; give a file path"),
])
def test_cli_bad_inputs_are_one_line_errors(args, message):
  tool = "export" if args[:1] == ["export"] else "evaluate"
  proc = run_cli(["-m", f"hope_jax.{tool}", *args[tool == "export":]])
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
  """Real Orbax checkpoints of known quality: step 1 untrained, 2 trained, 3 broken weights.

  Returns (directory, {step: expected validation loss}, config).
  """
  from experiments import tiny
  from hope_jax.checkpoint import CheckpointManager
  from hope_jax.train.loop import train

  root = tmp_path_factory.mktemp("evaluate")
  cfg = tiny.get_config()
  cfg.training.checkpoint_dir = str(root / "run")
  cfg.training.num_steps, cfg.training.save_every, cfg.training.eval_every = 12, 12, 12
  cfg.training.progress_bar = False
  state = train(cfg)["state"]
  model_def = ModelDef(ModelConfig.from_config(cfg.model))
  untrained = model_def.init_params(seed=5)
  broken = jax.tree.map(lambda x: 30.0 * x, state["params"])
  cfg.training.checkpoint_dir = str(root / "scored")
  manager = CheckpointManager(cfg)
  for step, params in ((1, untrained), (2, state["params"]), (3, broken)):
    manager.save(step, dict(state, params=params), {"kind": "test"}, force=True)
  manager.close()
  # Expected losses computed here, independently of hope_jax.train.evaluation.
  corpus = load_corpus(cfg.data, cfg.model.vocab_size)
  n = len(corpus.val) // (cfg.data.seq_len + 1)
  window_NW = corpus.val[:n * (cfg.data.seq_len + 1)].reshape(n, -1)
  losses = {}
  for step, params in ((1, untrained), (2, state["params"]), (3, broken)):
    logits = jax.jit(model_def.apply)(params, window_NW[:, :-1])
    losses[step] = float(optax.softmax_cross_entropy_with_integer_labels(
        logits, window_NW[:, 1:]).mean())
  assert losses[2] < losses[1] < losses[3]
  return str(root / "scored"), losses, cfg


def test_cli_scores_every_checkpoint_and_marks_the_best(three_checkpoints, tmp_path):
  from hope_jax import checkpoint

  directory, losses, _ = three_checkpoints
  out = tmp_path / "scores.json"
  proc = run_cli(["-m", "hope_jax.evaluate", f"--checkpoint_dir={directory}", "--all",
                  "--write_manifest", f"--output={out}"])
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out.read_text())
  got = {r["step"]: r["metrics"]["eval/loss"] for r in report["checkpoints"]}
  assert got == pytest.approx(losses, rel=1e-4)
  assert report["best"]["step"] == 2 and report["metric"] == "eval/loss"
  best_rows = [line for line in proc.stdout.splitlines() if line.startswith("| * |")]
  assert len(best_rows) == 1 and best_rows[0].startswith("| * | 2 |"), proc.stdout
  # The scores are in each manifest's metrics, and the checkpoints still restore.
  for info in checkpoint.list_checkpoints(directory):
    manifest = json.loads(open(info.manifest_path).read())
    assert manifest["metrics"]["eval/loss"] == pytest.approx(losses[info.step], rel=1e-4)
    assert manifest["evaluation"]["by"] == "hope_jax.evaluate"
    assert checkpoint.restore(info.manifest_path).step == info.step


def test_cli_one_checkpoint_with_data_override_prints_json(three_checkpoints):
  directory, losses, _ = three_checkpoints
  from hope_jax import checkpoint

  manifest = [i.manifest_path for i in checkpoint.list_checkpoints(directory) if i.step == 1][0]
  proc = run_cli(["-m", "hope_jax.evaluate", f"--checkpoint={manifest}", "--data.seq_len=16",
                  "--metric=eval/bits_per_byte"])
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  (row,) = report["checkpoints"]
  assert row["step"] == 1 and report["best"]["step"] == 1
  # Shorter windows than in training: a different number, measured on 16-token windows.
  assert row["metrics"]["eval/tokens"] % 16 == 0
  assert row["metrics"]["eval/loss"] != pytest.approx(losses[1], rel=1e-6)
  bad = run_cli(["-m", "hope_jax.evaluate", f"--checkpoint={manifest}", "--data.seq_lenn=3"])
  assert bad.returncode == 2 and "unknown data key 'data.seq_lenn'" in bad.stderr, bad.stderr


def test_export_cli_reproduces_checkpoint_logits(three_checkpoints, tmp_path):
  from hope_jax import checkpoint
  from hope_jax.export import load_exported

  directory, _, cfg = three_checkpoints
  path = tmp_path / "model.jax_export"
  proc = run_cli(["-m", "hope_jax.export", f"--checkpoint_dir={directory}", f"--output={path}"])
  assert proc.returncode == 0, proc.stderr
  restored = checkpoint.restore_latest(directory)
  model_def = ModelDef(ModelConfig.from_config(restored.config.model))
  tokens = np.arange(2 * cfg.data.seq_len, dtype=np.int32).reshape(2, -1) % 256
  want = jax.jit(model_def.apply)(restored.params, tokens)
  np.testing.assert_allclose(np.asarray(load_exported(str(path))(tokens)), np.asarray(want),
                             rtol=1e-5, atol=1e-5)
  missing = run_cli(["-m", "hope_jax.export", f"--checkpoint_dir={tmp_path}/none",
                     f"--output={path}"])
  assert missing.returncode == 2 and "Failed to load checkpoint" in missing.stderr


def test_scoring_again_in_one_process_compiles_nothing(three_checkpoints, caplog):
  # A notebook scoring a run's checkpoints twice reuses the compiled score step.
  import logging

  from hope_jax import checkpoint
  from hope_jax.evaluate import _score_program, evaluate_checkpoints

  directory, losses, _ = three_checkpoints
  entries = checkpoint.list_checkpoints(directory)
  _score_program.cache_clear()  # Not compiled by another test in this worker.
  scores = []
  for _ in range(2):
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
      rows, _ = evaluate_checkpoints(entries, {}, batch_size=4, max_windows=None)
    scores.append({r["step"]: r["metrics"]["eval/loss"] for r in rows})
    if len(scores) == 1:
      assert "Compiling jit(" in caplog.text  # The check below can see a compile.
  assert "Compiling jit(" not in caplog.text, caplog.text[-2000:]
  assert scores[0] == scores[1] == pytest.approx(losses, rel=1e-4)
  assert _score_program.cache_info().currsize == 1


def test_python_entry_points_name_bad_arguments():
  # From Python these failed as "range() arg 3 must not be zero", a false "holds no window",
  # "cannot reshape", "'int' object has no attribute 'strip'" or "'str' has no attribute 'step'".
  from hope_jax import evaluate
  from hope_jax.train.evaluation import check_batching

  for batch_size, max_windows, message in ((0, None, "batch_size must be an integer >= 1, got 0"),
                                           (2, 0, "max_windows must be None .* got 0"),
                                           (2, -1, "max_windows must be None .* got -1"),
                                           (2.5, None, "batch_size must be an integer")):
    with pytest.raises(ValueError, match=message):
      evaluate.evaluate_checkpoints([], {}, batch_size, max_windows)
  check_batching(16, None)
  with pytest.raises(ValueError, match="entries must be CheckpointInfo .* got str"):
    evaluate.evaluate_checkpoints(["checkpoint_step_1_ts_1.json"], {}, 2, None)
  from experiments import tiny

  assert evaluate.data_config(tiny.get_config().data, {"seq_len": 16}).seq_len == 16
