"""Resume end to end through the train CLI: exact, after kill -9, with a changed learning rate."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hope_jax import checkpoint as ck
from tests.conftest import REPO, run_cli

COMMON = ["-m", "hope_jax.train", "--config=experiments/tiny.py",
          "--config.training.lr_schedule=constant", "--config.training.progress_bar=False",
          "--config.training.resume_from=latest", "--config.training.eval_every=1000",
          "--config.training.log_every=1", "--config.training.save_every=4"]


# Every subprocess of this module shares one XLA compilation cache.
pytestmark = pytest.mark.usefixtures("xla_compile_cache")




def _train(directory, num_steps, *extra):
  proc = run_cli([*COMMON, f"--config.training.checkpoint_dir={directory}",
                  f"--config.training.num_steps={num_steps}", *extra], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _losses(directory):
  rows = [json.loads(l) for l in open(os.path.join(directory, "logs", "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """12 steps in one process: the reference."""
  d = tmp_path_factory.mktemp("straight")
  _train(d, 12)
  return d, ck.restore_latest(str(d), with_opt_state=True)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """6 steps, the process ends, a new process resumes to 12 (the same command otherwise).

  Also returns what the resume added to the persistent compilation cache.
  """
  d = tmp_path_factory.mktemp("resumed")
  _train(d, 6)
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  before = set(os.listdir(cache))
  proc = _train(d, 12)
  return d, proc, sorted(set(os.listdir(cache)) - before)


def test_resume_in_a_new_process_is_bit_exact(straight, resumed):
  (ref_dir, ref), (d, proc, _) = straight, resumed
  assert "Resumed from step 6" in proc.stderr and "6 step(s) remain" in proc.stderr
  got = ck.restore_latest(str(d), with_opt_state=True)
  assert got.step == ref.step == 12
  assert _same(got.params, ref.params) and _same(got.opt_state, ref.opt_state)
  assert _same(jax.random.key_data(got.rng), jax.random.key_data(ref.rng))
  assert _losses(d) == _losses(ref_dir)  # Every per-step loss, bit for bit.
  assert [e.step for e in ck.list_checkpoints(str(d))] == [4, 6, 8, 12]


def test_a_resume_compiles_nothing_a_persistent_cache_holds(resumed):
  # The module's subprocesses share a persistent compilation cache, so the resumed process
  # finds the first process's programs there: a restored state lowers the train and eval
  # steps as a fresh one does. Before the single-device init committed its state, the resume
  # added jit_train_step, jit_eval_step and one more entry.
  assert resumed[2] == [], resumed[2]
  assert "First step done in" in resumed[1].stderr
  assert "JAX_COMPILATION_CACHE_DIR" not in resumed[1].stderr  # The hint: only without one.


def test_changed_learning_rate_takes_effect_on_resume(tmp_path, straight, resumed):
  d = tmp_path / "run"
  shutil.copytree(resumed[0], d)
  proc = _train(d, 16, "--config.training.learning_rate=1e-12")
  assert "Resumed from step 12" in proc.stderr
  after = ck.restore_latest(str(d))
  assert after.step == 16 and after.config.training.learning_rate == 1e-12
  at12 = straight[1].params
  moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in
              zip(jax.tree.leaves(after.params), jax.tree.leaves(at12), strict=True))
  assert 0 < moved < 1e-9  # Adam steps are ~lr in size: the new lr, not the old 1e-2.
  rows = [json.loads(l) for l in open(d / "logs" / "metrics.jsonl")]
  assert [r["train/learning_rate"] for r in rows if r["step"] > 12 and
          "train/learning_rate" in r] == [float(np.float32(1e-12))] * 4  # Schedules are f32.


def test_cli_reports_unreadable_checkpoint_and_mismatch_with_exit_2(tmp_path, resumed):
  shutil.copytree(resumed[0], tmp_path / "run")
  d = tmp_path / "run"
  manifest = ck.list_checkpoints(str(d))[-1].manifest_path
  proc = run_cli([*COMMON, f"--config.training.checkpoint_dir={d}",
                  "--config.model.hidden_size=64"])
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("hope_jax.train: error: Checkpoint model config doesn't match")
  assert "model.hidden_size: checkpoint=32 current=64" in last
  open(manifest, "w").write("{truncated")
  proc = run_cli([*COMMON, f"--config.training.checkpoint_dir={d}",
                  f"--config.training.resume_from={manifest}"])
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"hope_jax.train: error: Failed to load checkpoint: {manifest}: manifest is not valid JSON "
      "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))")


def test_rerunning_after_kill_9_finishes_the_same_job(tmp_path, straight):
  _, ref = straight
  rng = random.Random(0)
  for trial in range(2):
    d = tmp_path / f"t{trial}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, *COMMON, f"--config.training.checkpoint_dir={d}",
                             "--config.training.num_steps=12", "--config.training.save_every=2"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (d.exists() and any(n.endswith(".json") for n in os.listdir(d))):
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = ck.list_checkpoints(str(d))
    assert listed and all(e.valid for e in listed)
    for e in listed:  # Nothing listed is broken.
      ck.restore(e.manifest_path, with_opt_state=True)
    _train(d, 12, "--config.training.save_every=2")
    got = ck.restore_latest(str(d), with_opt_state=True)
    assert got.step == 12 and _same(got.params, ref.params), f"trial {trial}"


def test_kill_9_during_a_large_save_never_lists_a_broken_checkpoint(tmp_path):
  rng = random.Random(1)
  for trial in range(3):
    d = tmp_path / f"t{trial}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "ckpt_worker.py"), "save_big", str(d), "100"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "SAVING"
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = ck.list_checkpoints(str(d))
    assert [e.step for e in listed][:1] == [1] and all(e.valid for e in listed)
    for e in listed:
      assert ck.restore(e.manifest_path, with_opt_state=True).step == e.step
    # A new run cleans Orbax's temporary directory of the interrupted save.
    mgr = ck.CheckpointManager(ck_config(d))
    mgr.close()
    assert not [n for n in os.listdir(d) if "tmp" in n], os.listdir(d)


def ck_config(d):
  from tests.ckpt_worker import config

  return config(str(d))


def test_the_training_cli_runs_with_huge_pages_where_they_help(resumed):
  # `python -m hope_jax.train` restarts itself with glibc's huge-page tunable where the
  # kernel gives huge pages only on request (hope_jax/train/hugepages.py).
  from hope_jax.train import hugepages

  env = dict(os.environ, JAX_PLATFORMS="cpu")  # As `run_cli` runs it.
  expected = hugepages.active() or hugepages.tunables_here(env) is not None
  assert ("glibc.malloc.hugetlb=1: large buffers ask for transparent huge pages"
          in resumed[1].stderr) == expected
