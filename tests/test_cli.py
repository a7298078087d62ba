"""Every bad input ends the CLI with one stderr line, exit status 2, no traceback."""

import re

import pytest

from tests.conftest import run_cli

TINY = "--config=experiments/tiny.py"


# Every run of this module shares one XLA compilation cache: most compile the tiny step.
pytestmark = pytest.mark.usefixtures("xla_compile_cache")


CASES = [
    ([TINY, "--config.training.num_stepz=3"],
     "unknown config key 'training.num_stepz' (did you mean 'training.num_steps'?)"),
    ([TINY, "--config.trainin.num_steps=3"], "unknown config key 'trainin'"),
    ([TINY, "--config.training.num_steps=1.5"], "config key 'training.num_steps': '1.5' (expected int)"),
    ([TINY, "--config.model.use_alpha=maybe"], "'model.use_alpha'"),
    ([TINY, "--config.model.num_heads=3"], "model.hidden_size (32) must be divisible by model.num_heads (3)"),
    ([TINY, "--config.model.chunk_mem=6"], "model.chunk_mem (6) and model.chunk_other (4)"),
    ([TINY, "--config.model.block=hope", "--config.model.cms_chunks=(4,16)"],
     "model.cms_chunks[0] (4) must be a multiple of model.chunk_other"),
    ([TINY, "--config.model.eta_max=0.5"], "model.eta_max (0.5) must not exceed model.alpha_min"),
    ([TINY, "--config.model.block=mamba"], "model.block='mamba' is not one of"),
    ([TINY, "--config.model.lm_grad_remat_every=-2"],
     "model.lm_grad_remat_every must be an int >= 0 (0 or 1 keeps every chunk), got -2"),
    ([TINY, "--config.model.inner_scan_unroll=-2"],
     "model.inner_scan_unroll must be an int >= 0 (0 unrolls the whole chunk scan) or -1 "
     "(chosen for the devices), got -2"),
    ([TINY, "--config.training.cpu_devices=0"],
     "training.cpu_devices must be a positive integer or -1 (one per core that divides the "
     "batch), got 0"),
    ([TINY, "--config.data.data_type=text"], "data.data_path is required"),
    ([TINY, "--config.data.data_type=text", "--config.data.data_path=does/not/exist.txt"],
     "data.data_path: no such file or directory: does/not/exist.txt"),
    ([TINY, "--config.data.data_type=csv"], "data.data_type='csv' is not one of"),
    ([TINY, "--config.model.vocab_size=100"], "vocab size mismatch: the tokenizer has 256 tokens"),
    # A byte tokenizer never reads a vocabulary: training on bytes instead would be silent.
    ([TINY, "--config.data.tokenizer_path=README.md"],
     "data.tokenizer_path=README.md is set, but data.tokenizer='byte' does not read it"),
    (["--config=experiments/missing.py"], "cannot load config file 'experiments/missing.py'"),
    ([], "--config is required"),
]


@pytest.mark.parametrize("args,expected", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_input_is_one_line_exit_2(args, expected):
  proc = run_cli(["-m", "hope_jax.train", *args])
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("hope_jax.train: error: ")
  assert expected in lines[0]


CONFIG_FILES = [
    ("from experiments import tiny\n\ndef get_config():\n  cfg = tiny.get_config()\n"
     "  del cfg.training['seed']\n  return cfg\n",
     "the run config has no training.seed: start from a copy of experiments/base.py, which "
     "defines every key"),
    ("def get_config():\n  return {'model': 1}\n",
     "the run config has no 'model' section (a ConfigDict of keys), got 1"),
]


@pytest.mark.parametrize("source,expected", CONFIG_FILES, ids=["missing_key", "no_section"])
def test_an_incomplete_config_file_is_one_line_exit_2(tmp_path, source, expected):
  path = tmp_path / "mine.py"
  path.write_text(source)
  proc = run_cli(["-m", "hope_jax.train", f"--config={path}"])
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert expected in lines[0], lines[0]


def test_unwritable_log_dir_is_one_line_exit_2(tmp_path):
  # Checked with the checkpoint folder, before the first compile (it used to be a traceback).
  (tmp_path / "a_file").write_text("")
  proc = run_cli(["-m", "hope_jax.train", TINY, f"--config.training.checkpoint_dir={tmp_path}/ck",
                  f"--config.training.log_dir={tmp_path}/a_file/logs"])
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert lines[0].startswith("hope_jax.train: error: training.log_dir: cannot write the logs to ")
  assert "Not a directory" in lines[0]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_and_exits_cleanly(tmp_path, signame):
  """Ctrl-C or a scheduler's SIGTERM mid-training: a checkpoint, no traceback, 128 + signal."""
  import os
  import signal
  import subprocess
  import sys
  import time

  from tests.conftest import REPO

  signum = getattr(signal, signame)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen(
      [sys.executable, "-m", "hope_jax.train", TINY, "--config.training.num_steps=100000",
       "--config.training.log_every=1", f"--config.training.checkpoint_dir={tmp_path}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  seen = ""
  while time.time() < deadline:
    line = proc.stdout.readline()
    seen += line
    if "step 3/" in line:
      break
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=120)
  seen += out
  assert proc.returncode == 128 + signum, seen[-2000:]
  assert ("Ctrl-C: stopping" if signame == "SIGINT" else "SIGTERM: stopping") in seen
  assert "Traceback" not in seen
  assert "Interrupted at step" in seen
  assert "First step done in" in seen  # The compile's time, left out of tokens/s.
  from hope_jax.checkpoint import list_checkpoints

  saved = [e for e in list_checkpoints(str(tmp_path)) if e.valid]
  assert saved and saved[-1].step >= 3, f"{signame} must save a checkpoint before stopping"


SIGNAL_AT_THE_END = """
import os, signal, sys
from hope_jax.checkpoint import CheckpointManager
from hope_jax.train import loop
from experiments import tiny

where, directory = sys.argv[1:]
# The final save's commit: the first wait for a pending save (save_every > num_steps).
owner, name = {"last_log_line": (loop, "log_line"), "final_eval": (loop, "evaluate"),
               "final_save": (CheckpointManager, "_flush")}[where]
real, fired = getattr(owner, name), []
def due(args):  # Step 3's log line, the eval, the commit of a pending save.
  if where == "last_log_line":
    return args[0] == 3
  return where == "final_eval" or args[0]._pending is not None
def with_sigterm(*args, **kwargs):
  if not fired and due(args):
    fired.append(True)
    os.kill(os.getpid(), signal.SIGTERM)
  return real(*args, **kwargs)
setattr(owner, name, with_sigterm)
cfg = tiny.get_config()
cfg.training.update(num_steps=3, eval_every=1000, save_every=1000, checkpoint_dir=directory)
summary = loop.train(cfg)
print("interrupted", summary["interrupted"], "step", summary["step"], "eval", bool(summary["eval"]))
"""


@pytest.mark.parametrize("where,interrupted", [
    ("last_log_line", True), ("final_eval", False), ("final_save", False)])
def test_a_sigterm_at_the_end_of_a_run_still_saves_it(tmp_path, where, interrupted):
  """Before the final eval: saved at once, eval skipped; during the eval or save: finished."""
  proc = run_cli(["-c", SIGNAL_AT_THE_END, where, str(tmp_path)])
  assert proc.returncode == 0, proc.stderr[-2000:]  # -15: killed before the final save.
  assert f"interrupted {interrupted} step 3 eval {not interrupted}" in proc.stdout
  assert ("without its final evaluation" in proc.stderr) == interrupted
  from hope_jax.checkpoint import list_checkpoints

  assert [e.step for e in list_checkpoints(str(tmp_path)) if e.valid] == [3]


def test_a_diverged_run_is_one_line_and_its_metrics_stay_json(tmp_path):
  # A NaN loss used to end in a 20-line traceback (rc 1), with NaN written to metrics.jsonl,
  # which strict JSON readers reject. The first step's line has no rate: its time is the
  # compile's (it used to report the compile as a throughput).
  import json

  proc = run_cli(["-m", "hope_jax.train", TINY, f"--config.training.checkpoint_dir={tmp_path}",
                  "--config.training.learning_rate=1e30", "--config.training.grad_clip=1e30",
                  "--config.training.log_every=1", "--config.training.num_steps=30",
                  "--config.training.save_every=1"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  # Whichever turns non-finite first, the loss or the gradient (the update, so its checkpoint).
  assert re.match(r"hope_jax\.train: error: (training loss is nan|the gradient norm is nan "
                  r"\(training loss [\d.]+\)) at step \d+: ", last), last
  assert "lower training.learning_rate" in last and "Traceback" not in proc.stderr
  from hope_jax.checkpoint import list_checkpoints

  saved = [e.step for e in list_checkpoints(str(tmp_path)) if e.valid]
  assert (f"resumes from the last checkpoint, step {saved[-1]}" in last if saved else
          "no checkpoint was saved yet, so a rerun starts afresh" in last), last
  # Saving every step, none of them holds the diverged parameters: the run stops first.
  import jax
  import numpy as np

  from hope_jax.checkpoint import restore

  for e in list_checkpoints(str(tmp_path)):
    params = restore(e.manifest_path).params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), e.step
  assert "step 1/30 | " in proc.stderr and "first step, no rate yet" in proc.stderr

  def strict(text):
    raise ValueError(f"not JSON: {text}")

  rows = [json.loads(line, parse_constant=strict)
          for line in open(tmp_path / "logs" / "metrics.jsonl")]
  assert any(r.get("train/loss") is None or r.get("train/grad_norm") is None for r in rows)
  assert "train/tokens_per_s" not in rows[0] and "train/tokens_per_s" in rows[1]


def test_a_full_disk_is_one_error_line_without_tracebacks(tmp_path):
  # A file-size limit stands in for a full disk: the save's writes fail. Orbax logged a
  # traceback from each of its background threads and TensorStore's late callbacks
  # printed more (about 500 lines, 14 tracebacks) around the one line that names the cause.
  import os
  import subprocess
  import sys

  from tests.conftest import REPO

  # 30 KiB per file (bash's ulimit, not a preexec_fn, which forks this threaded process):
  # the logs fit (they are pipes), the arrays do not.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      ["bash", "-c", 'ulimit -S -f 30 && exec "$@"', "bash", sys.executable, "-m",
       "hope_jax.train", TINY, f"--config.training.checkpoint_dir={tmp_path}",
       "--config.training.num_steps=20", "--config.training.save_every=10"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("hope_jax.train: error: ")]
  assert len(errors) == 1 and "Failed to save checkpoint for step 10" in errors[0]
  assert len(proc.stderr.splitlines()) < 40


def test_config_checks_in_process():
  # More cases like those above, in one process: a CLI process each would cost seconds, and
  # the CLI turns every ConfigError into one line alike.
  import numpy as np

  from experiments import tiny
  from hope_jax.config import ConfigError, validate_run_config
  from hope_jax.train import distributed

  for key, value, message in (
      ("training.learning_rate", float("inf"),
       "training.learning_rate must be a positive number, got inf"),
      ("data.task_seed", -1, "data.task_seed must be an integer >= 0, got -1"),
      ("training.coordinator_address", "nohostport",
       "training.coordinator_address must be host:port (e.g. 10.0.0.1:1234), got 'nohostport'")):
    cfg = tiny.get_config()
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    cfg.training.num_processes, cfg.training.process_id = 1, 0
    with pytest.raises(ConfigError) as err:
      validate_run_config(cfg)
      distributed.launch_settings(cfg.training)
    assert str(err.value) == message

  cfg = tiny.get_config()
  del cfg.training["keep_best"]  # ml_collections suggests keep_best_mode: not the message.
  with pytest.raises(ConfigError) as err:
    validate_run_config(cfg)
  assert str(err.value) == ("the run config has no training.keep_best: start from a copy of "
                            "experiments/base.py, which defines every key")
  cfg = tiny.get_config()
  del cfg.data["task_seed"]  # A config file that wrote it as a numpy integer.
  cfg.data.task_seed = np.int64(3)
  validate_run_config(cfg)
  cfg.data.tokenizer_path = "README.md"
  cfg.data.data_type = "mqar"
  with pytest.raises(ConfigError, match="data.data_type='mqar' reads no vocabulary file"):
    validate_run_config(cfg)
