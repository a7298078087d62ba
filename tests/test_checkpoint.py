"""The checkpoint adapter on real Orbax and a real disk: format, listing, errors, retention."""

import json
import logging as py_logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import logging

from hope_jax import checkpoint as ck
from hope_jax.checkpoint import CheckpointError, CheckpointManager
from tests.ckpt_worker import config as worker_config
from tests.ckpt_worker import make_state
from tests.conftest import REPO


def _config(directory, **training):
  cfg = worker_config(str(directory))
  for k, v in training.items():
    cfg.training[k] = v
  return cfg


def _state(step=0, mb=0.05, seed=0):
  return dict(make_state(mb, seed), step=jnp.int32(step))


def _save(directory, steps, metrics=None, mb=0.05, **training):
  mgr = CheckpointManager(_config(directory, **training))
  for i, step in enumerate(steps):
    mgr.save(step, _state(step, mb, seed=step), {"step": step},
             metrics=None if metrics is None else {"eval/loss": metrics[i]})
  mgr.close()


def _equal(a, b):
  def raw(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(raw(x), raw(y))),
                                          a, b)))


class _Capture(py_logging.Handler):
  def __init__(self):
    super().__init__()
    self.records = []

  def emit(self, record):
    self.records.append((record.levelno, record.getMessage()))


@pytest.fixture
def absl_log():
  handler = _Capture()
  logger = logging.get_absl_logger()
  old = logger.level
  logger.addHandler(handler)
  logger.setLevel(py_logging.INFO)
  yield handler.records
  logger.removeHandler(handler)
  logger.setLevel(old)


def test_layout_manifest_and_exact_roundtrip(tmp_path):
  _save(tmp_path, [10, 20])
  entries = ck.list_checkpoints(str(tmp_path))
  assert [(e.step, e.valid) for e in entries] == [(10, True), (20, True)]
  names = sorted(n for n in os.listdir(tmp_path) if n != ".lock")
  assert names == ["checkpoint_step_10", os.path.basename(entries[0].manifest_path),
                   "checkpoint_step_20", os.path.basename(entries[1].manifest_path)]
  manifest = json.load(open(entries[1].manifest_path))
  assert manifest["step"] == 20 and manifest["model_file"] == "checkpoint_step_20"
  assert entries[1].manifest_path.endswith(f"checkpoint_step_20_ts_{manifest['timestamp']}.json")
  assert manifest["config"]["model"]["hidden_size"] == 32
  assert manifest["num_params"] > 0 and manifest["versions"]["orbax_checkpoint"]
  # docs/checkpoints.md names every field and every package in `versions`.
  doc = open(os.path.join(REPO, "docs", "checkpoints.md")).read()
  named = set(re.findall(r"`(\w+)`", doc[doc.index("The manifest has"):
                                        doc.index("The payload holds")]))
  assert set(manifest) | set(manifest["versions"]) <= named, named
  # Exact restore into the training structure (optax named tuples, typed key).
  want = _state(20, seed=20)
  mgr = CheckpointManager(_config(tmp_path))
  state, loader, _ = mgr.restore_for_training(jax.eval_shape(lambda: want))
  mgr.close()
  assert _equal(state, want) and loader == {"step": 20}
  assert type(state["opt_state"][0]) is type(want["opt_state"][0])
  # The programmatic API, without a structure.
  r = ck.restore(entries[0].manifest_path, with_opt_state=True)
  assert r.step == 10 and _equal(r.params, _state(10, seed=10)["params"])
  assert jnp.issubdtype(r.rng.dtype, jax.dtypes.prng_key)
  assert r.config.model.hidden_size == 32
  # No pickles: every small non-array file is JSON or plain text.
  for root, _, files in os.walk(tmp_path):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        assert not fh.read(2).startswith(b"\x80"), f"pickle-like file {f}"


@pytest.mark.parametrize("kind", ["raw_uint32", "typed_rbg"])
def test_the_rng_comes_back_as_the_kind_of_key_it_was_saved_as(tmp_path, kind):
  # The manifest's "rng_impl" says how to rewrap a typed key's data; a raw uint32 key (the
  # old jax.random.PRNGKey) has no impl and must come back raw, not wrapped as threefry.
  rng = (jax.random.PRNGKey(7) if kind == "raw_uint32"
         else jax.random.key(7, impl="rbg"))
  want = dict(_state(3, seed=3), rng=rng)
  mgr = CheckpointManager(_config(tmp_path))
  mgr.save(3, want, {"step": 3})
  mgr.close()
  entry = ck.list_checkpoints(str(tmp_path))[0]
  impl = json.load(open(entry.manifest_path)).get("rng_impl")
  r = ck.restore(entry.manifest_path, with_opt_state=True)
  typed = jnp.issubdtype(r.rng.dtype, jax.dtypes.prng_key)
  if kind == "raw_uint32":
    assert impl is None and not typed and r.rng.dtype == jnp.uint32
    assert bool(jnp.array_equal(r.rng, rng))
  else:
    assert impl == str(jax.random.key_impl(rng)) and typed
    assert str(jax.random.key_impl(r.rng)) == impl
    assert bool(jnp.array_equal(jax.random.key_data(r.rng), jax.random.key_data(rng)))
  # Into the training structure too, where the target's own dtype decides.
  mgr = CheckpointManager(_config(tmp_path))
  state, _, _ = mgr.restore_for_training(jax.eval_shape(lambda: want))
  mgr.close()
  assert _equal(state, want) and state["rng"].dtype == rng.dtype


def test_a_state_donated_as_soon_as_save_returns_is_saved_as_it_was(tmp_path):
  # The train loop donates the state into its next step once save() returns, while Orbax
  # still writes. A save that read the device buffers after returning (orbax#626) would
  # write whatever the next steps put there, or read freed memory. On an accelerator the
  # donation is real; there the test checks that it happened.
  state = _state(7, mb=8)  # Large enough that the write is still going on below.

  def scribble(s):
    return jax.tree.map(
        lambda x: x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x * 0 - 3, s)

  step = jax.jit(scribble, donate_argnums=0)
  mgr = CheckpointManager(_config(tmp_path))
  assert mgr.save(7, state, {"step": 7})
  leaves = jax.tree.leaves(state["params"])
  for _ in range(3):
    state = jax.block_until_ready(step(state))
  if jax.default_backend() != "cpu":  # XLA:CPU may decline a buffer Orbax still views.
    assert all(x.is_deleted() for x in leaves)
  mgr.wait()
  mgr.close()
  got = ck.restore(ck.list_checkpoints(str(tmp_path))[0].manifest_path, with_opt_state=True)
  want = _state(7, mb=8)
  assert got.step == 7 and _equal(got.params, want["params"])
  assert _equal(jax.tree.leaves(got.opt_state), jax.tree.leaves(want["opt_state"]))


def test_startup_log_lines(tmp_path, absl_log, monkeypatch):
  # A relative checkpoint_dir is shown as given, as the contract's example shows it.
  monkeypatch.chdir(tmp_path)
  _save("run", [5, 10])
  mgr = CheckpointManager(_config("run"))
  mgr.restore_for_training(jax.eval_shape(lambda: _state(10)))
  mgr.close()
  msgs = [m for _, m in absl_log]
  manifest = os.path.join("run", os.path.basename(ck.list_checkpoints("run")[-1].manifest_path))
  for line in ('Found 2 existing checkpoint(s) in "run"', "Latest checkpoint at step: 10",
               f'Resuming training from checkpoint: "{manifest}"', "Resumed from step 10",
               "20 step(s) remain: training ends at step 30 (training.num_steps)"):
    assert line in msgs, (line, msgs)
  assert not any("orbax" in m.lower() and lvl < py_logging.WARNING for lvl, m in absl_log)


def test_model_config_mismatch_names_every_key(tmp_path):
  _save(tmp_path, [5])
  path = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  cfg = _config(tmp_path)
  cfg.model.cms_chunks = [8, 16]  # A list where a tuple was saved: equal, not a mismatch.
  ck.restore(path, cfg)
  cfg.model.hidden_size, cfg.model.num_heads = 64, 4
  with pytest.raises(ck.ConfigMismatchError) as err:
    ck.restore(path, cfg)
  msg = str(err.value)
  assert msg.startswith("Checkpoint model config doesn't match current config")
  assert "model.hidden_size: checkpoint=32 current=64" in msg
  assert "model.num_heads: checkpoint=2 current=4" in msg and "cms_chunks" not in msg
  cfg.training.resume_from = path  # The manager refuses too, and never falls back.
  mgr = CheckpointManager(cfg)
  with pytest.raises(ck.ConfigMismatchError):
    mgr.restore_for_training(jax.eval_shape(lambda: _state(5)))
  mgr.close()


def test_schedule_keys_may_change_on_resume(tmp_path, absl_log):
  # How the step is computed (remat, unrolling, the reference paths) is not the model: a run
  # may resume with other values, which are logged; a model key beside them still refuses.
  _save(tmp_path, [5])
  path = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  cfg = _config(tmp_path)
  cfg.model.remat, cfg.model.inner_scan_unroll, cfg.model.scan_layers = False, 0, True
  assert ck.restore(path, cfg).step == 5
  line = [m for _, m in absl_log if m.startswith("Model schedule settings differ")]
  assert len(line) == 1
  assert "model.inner_scan_unroll: checkpoint=-1 current=0" in line[0]
  assert "model.remat: checkpoint=true current=false" in line[0]
  assert "model.scan_layers: checkpoint=false current=true" in line[0]
  cfg.training.resume_from = path  # The train loop's path too.
  mgr = CheckpointManager(cfg)
  state, _, _ = mgr.restore_for_training(jax.eval_shape(lambda: _state(5)))
  assert int(state["step"]) == 5
  mgr.close()
  cfg.model.num_layers = 3
  with pytest.raises(ck.ConfigMismatchError) as err:
    ck.restore(path, cfg)
  assert "model.num_layers: checkpoint=" in str(err.value)
  assert "remat" not in str(err.value) and "unroll" not in str(err.value)


def test_restore_takes_the_model_section_or_a_model_config(tmp_path):
  # What build_model takes: the run config, its model section (as ConfigDict or dict) or a
  # ModelConfig. A model section alone used to report every key as different, a ModelConfig
  # a raw TypeError.
  from hope_jax.config import ModelConfig

  _save(tmp_path, [5])
  path = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  model = _config(tmp_path).model
  for config in (model, model.to_dict(), ModelConfig.from_config(model)):
    assert ck.restore(path, config).step == 5
  model.hidden_size = 64
  with pytest.raises(ck.ConfigMismatchError) as err:
    ck.restore(path, ModelConfig.from_config(model))
  assert "model.hidden_size: checkpoint=32 current=64" in str(err.value)
  assert "num_layers" not in str(err.value)
  with pytest.raises(TypeError, match="a run config, its model section or a ModelConfig"):
    ck.restore(path, 42)
  # A mapping that is neither (it used to report every model key as "<missing>").
  with pytest.raises(TypeError, match="keys that are not model keys: foo"):
    ck.restore(path, {"foo": 1})


def test_model_key_newer_than_the_checkpoint_matches_only_at_its_default(tmp_path):
  # A checkpoint written before `model.memory_input_std` existed resumes under the key's
  # default (which keeps the old behaviour), and is refused when the current run sets another
  # value.
  _save(tmp_path, [5])
  path = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  # The manifest and its copy inside the payload (Orbax's JSON item file), as an older
  # version of hope_jax wrote them.
  for file in (path, os.path.join(tmp_path, "checkpoint_step_5", "manifest", "metadata")):
    with open(file) as f:
      manifest = json.load(f)
    assert manifest["config"]["model"].pop("memory_input_std") == 0.02
    with open(file, "w") as f:
      json.dump(manifest, f)
  cfg = _config(tmp_path)
  ck.restore(path, cfg)
  cfg.model.memory_input_std = 0.01
  with pytest.raises(ck.ConfigMismatchError,
                     match='model.memory_input_std: checkpoint="<missing>"'):
    ck.restore(path, cfg)


def _data_file(payload):
  files = [os.path.join(r, f) for r, _, fs in os.walk(payload) for f in fs if "/d/" in r + "/"]
  return max(files, key=os.path.getsize)


def _flip(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10  # One bit in the middle of a 1.5 MB array's data.
  open(path, "wb").write(data)


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _edit(manifest, **changes):
  m = json.load(open(manifest))
  for k, v in changes.items():
    if v is None:
      m.pop(k)
    else:
      m[k] = v
  json.dump(m, open(manifest, "w"))


CORRUPTIONS = {
    "missing manifest": (lambda m, p: os.remove(m), "manifest file does not exist"),
    "not JSON": (lambda m, p: open(m, "w").write("{not json"), "manifest is not valid JSON"),
    "missing field": (lambda m, p: _edit(m, timestamp=None), "missing field(s) timestamp"),
    "model section not an object": (lambda m, p: _edit(m, config={"model": 5}),
                                    "manifest field 'config.model' should be an object, got 5"),
    "missing payload": (lambda m, p: shutil.rmtree(p), "does not exist"),
    "escaping model_file": (lambda m, p: _edit(m, model_file="../elsewhere"),
                            "points outside the checkpoint directory"),
    "absolute model_file": (lambda m, p: _edit(m, model_file=p), "must be a relative path"),
    "truncated array": (lambda m, p: _truncate(_data_file(os.path.join(p, "params"))), ""),
    "bit-flipped array": (lambda m, p: _flip(_data_file(os.path.join(p, "params"))),
                          "checksum mismatch"),
    "missing item": (lambda m, p: shutil.rmtree(os.path.join(p, "train")), "item 'train'"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_gives_failed_to_load(tmp_path, case):
  _save(tmp_path, [5], mb=6.0)  # Arrays above Orbax's 1 KiB inline limit, so files exist.
  manifest = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  damage, reason = CORRUPTIONS[case]
  damage(manifest, os.path.join(tmp_path, "checkpoint_step_5"))
  with pytest.raises(CheckpointError) as err:
    ck.restore(manifest, with_opt_state=True)
  assert str(err.value).startswith(f"Failed to load checkpoint: {manifest}: "), err.value
  assert reason in str(err.value)
  assert "\n" not in str(err.value)


def test_a_truncated_array_is_one_quiet_line(tmp_path):
  # One unreadable array fails Orbax's other reads too; those used to print, at no fixed
  # time, up to hundreds of lines of "Exception ignored" tracebacks and TensorStore spec
  # dumps around the error. In a fresh process, as a CLI sees it.
  _save(tmp_path, [5], mb=6.0)
  manifest = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  os.truncate(_data_file(os.path.join(tmp_path, "checkpoint_step_5", "params")), 100)
  code = ("import sys, time\nfrom hope_jax import checkpoint as ck\n"
          "try:\n  ck.restore(sys.argv[1])\nexcept ck.CheckpointError as e:\n  print(e)\n"
          "time.sleep(1)\n")  # Reads still in flight finish meanwhile.
  proc = subprocess.run([sys.executable, "-c", code, manifest], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.stderr == "", proc.stderr[:3000]
  assert proc.stdout.startswith(f"Failed to load checkpoint: {manifest}: ")
  assert "is not valid for value of size 100" in proc.stdout  # TensorStore's own cause.
  assert "See full TensorStore details" not in proc.stdout and proc.stdout.count("\n") == 1


@pytest.mark.parametrize("package", ["orbax", "elsewhere"])
def test_orbax_unretrieved_task_errors_are_dropped(caplog, package):
  # A failed save on a loaded machine left one asyncio "Task exception was never retrieved"
  # per array at exit (23 lines on 2 busy cores) after the one error line naming the cause.
  # Real asyncio reports them when a failed task is collected; the failing coroutine's file
  # says whose task it was.
  import asyncio
  import gc

  namespace = {}
  exec(compile("async def write():\n  raise OSError('File too large')\n",
               os.path.join(os.sep, "site", package, "handler.py"), "exec"), namespace)

  async def fail_unretrieved():
    task = asyncio.ensure_future(namespace["write"]())
    await asyncio.sleep(0)
    assert task.done()
    del task
    gc.collect()

  with caplog.at_level(py_logging.ERROR, logger="asyncio"):
    asyncio.run(fail_unretrieved())
  reported = [r for r in caplog.records if "never retrieved" in r.getMessage()]
  assert len(reported) == (package != "orbax"), caplog.text


def test_latest_says_why_there_is_nothing_to_restore(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "a_file.json").write_text("{}")
  for name, reason in (("empty", "no checkpoint found"), ("missing", "directory does not exist"),
                       ("a_file.json", "is a file, not a checkpoint directory")):
    with pytest.raises(CheckpointError, match=reason):
      ck.restore_latest(str(tmp_path / name))


def test_latest_skips_a_broken_newest_with_a_warning(tmp_path, absl_log):
  _save(tmp_path, [5, 10], mb=6.0)
  _flip(_data_file(os.path.join(tmp_path, "checkpoint_step_10", "params")))
  assert ck.restore_latest(str(tmp_path)).step == 5
  mgr = CheckpointManager(_config(tmp_path))
  state, _, manifest = mgr.restore_for_training(jax.eval_shape(lambda: _state(5, mb=6.0)))
  assert manifest["step"] == 5 and int(state["step"]) == 5
  # The broken one is set aside, so step 10 can be saved again by this run.
  assert mgr.save(10, _state(10, mb=6.0, seed=10), {"step": 10}, force=True)
  mgr.close()
  warnings = [m for lvl, m in absl_log if lvl == py_logging.WARNING]
  assert any("Skipping unreadable checkpoint" in m and "checksum mismatch" in m for m in warnings)
  assert os.listdir(tmp_path / "unreadable")
  assert [e.step for e in ck.list_checkpoints(str(tmp_path)) if e.valid] == [5, 10]
  assert ck.restore_latest(str(tmp_path)).step == 10


def _orphan(directory, step):
  """Step `step`'s payload without its manifest and with its inner copy unreadable (a crash
  right after Orbax's commit, then a damaged disk)."""
  for e in ck.list_checkpoints(str(directory)):
    if e.step == step:
      os.remove(e.manifest_path)
  with open(os.path.join(directory, f"checkpoint_step_{step}", "manifest", "metadata"), "w") as f:
    f.write("{cut sho")


def test_a_payload_without_any_manifest_counts_as_broken(tmp_path, absl_log):
  # It used to stay in Orbax's list unlisted: "latest" resumed from step 5 and then refused
  # over the "newer checkpoint" 10, and alone it gave a silent fresh start beside it.
  abstract = jax.eval_shape(lambda: _state(5))
  _save(tmp_path, [5, 10])
  for again in range(2):  # The same step breaking twice must not nest the moved folders.
    _orphan(tmp_path, 10)
    mgr = CheckpointManager(_config(tmp_path))
    state, _, manifest = mgr.restore_for_training(abstract)
    assert manifest["step"] == 5 and int(state["step"]) == 5
    assert mgr.save(10, _state(10, seed=10), {"step": 10}, force=True)
    mgr.close()
    moved = sorted(os.listdir(tmp_path / "unreadable"))
    assert moved == ["checkpoint_step_10", "checkpoint_step_10.1"][:again + 1], moved
  assert any("Skipping unreadable checkpoint" in m and "without a manifest" in m
             for _, m in absl_log)
  assert ck.restore_latest(str(tmp_path)).step == 10
  # Alone, it is an error that moves nothing, like any unreadable checkpoint.
  only = tmp_path / "only"
  _save(only, [10])
  _orphan(only, 10)
  for _ in range(2):
    mgr = CheckpointManager(_config(only))
    with pytest.raises(CheckpointError, match="none of its 1 checkpoint.s. is readable"):
      mgr.restore_for_training(abstract)
    mgr.close()
  assert (only / "checkpoint_step_10").is_dir() and not (only / "unreadable").exists()


def test_latest_with_nothing_readable_fails_every_time_and_moves_nothing(tmp_path):
  # Moving the only checkpoint aside would let the rerun that docs/checkpoints.md recommends
  # find an empty directory and start fresh: the contract's "never a silent fresh start".
  _save(tmp_path, [5], mb=6.0)
  _flip(_data_file(os.path.join(tmp_path, "checkpoint_step_5", "params")))
  before = sorted(os.listdir(tmp_path))
  abstract = jax.eval_shape(lambda: _state(5, mb=6.0))
  for _ in range(2):
    mgr = CheckpointManager(_config(tmp_path))
    with pytest.raises(CheckpointError, match="none of its 1 checkpoint.s. is readable.*nothing "
                                              "was moved"):
      mgr.restore_for_training(abstract)
    mgr.close()
    assert sorted(os.listdir(tmp_path)) == before
    assert not (tmp_path / "unreadable").exists()


@pytest.mark.parametrize("keep_best", [None, "eval/loss"])
def test_retention_keeps_last_n_and_best_and_always_the_newest(tmp_path, keep_best):
  losses = [5.0, 1.0, 4.0, 3.0, 2.5, 9.0]  # Best at step 2; the newest (6) is the worst.
  _save(tmp_path, [1, 2, 3, 4, 5, 6], metrics=losses, keep_last=2, keep_best=keep_best)
  want = [2, 5, 6] if keep_best else [5, 6]
  assert [e.step for e in ck.list_checkpoints(str(tmp_path))] == want
  assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".json") and
                n.startswith("checkpoint")) == [f"checkpoint_step_{s}" for s in want]
  assert all(e.valid for e in ck.list_checkpoints(str(tmp_path)))


def test_keep_best_without_keep_last_keeps_every_one_and_says_so(tmp_path, absl_log):
  _save(tmp_path, [1, 2, 3], metrics=[5.0, 1.0, 4.0], keep_best="eval/loss")
  assert [e.step for e in ck.list_checkpoints(str(tmp_path))] == [1, 2, 3]
  assert any(level == py_logging.WARNING and "deletes nothing without training.keep_last" in m
             for level, m in absl_log), absl_log


def test_max_mode_keeps_the_highest(tmp_path):
  _save(tmp_path, [1, 2, 3, 4], metrics=[0.1, 0.9, 0.2, 0.3], keep_last=1,
        keep_best="eval/acc", keep_best_mode="max")
  # Metrics named eval/loss here are missing for eval/acc: kept only by recency.
  assert [e.step for e in ck.list_checkpoints(str(tmp_path))] == [4]
  _save(tmp_path / "b", [1, 2, 3, 4], metrics=[0.1, 0.9, 0.2, 0.3], keep_last=1,
        keep_best="eval/loss", keep_best_mode="max")
  assert [e.step for e in ck.list_checkpoints(str(tmp_path / "b"))] == [2, 4]


def test_fresh_run_refuses_to_overwrite_and_older_resume_refuses_to_mix(tmp_path):
  _save(tmp_path, [5, 10])
  mgr = CheckpointManager(_config(tmp_path, resume_from=None))
  with pytest.raises(CheckpointError, match="already holds 2 checkpoint"):
    mgr.restore_for_training(jax.eval_shape(lambda: _state()))
  mgr.close()
  older = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  mgr = CheckpointManager(_config(tmp_path, resume_from=older))
  with pytest.raises(CheckpointError, match=r"newer than the resume point \(step 5\)"):
    mgr.restore_for_training(jax.eval_shape(lambda: _state()))
  mgr.close()


def test_lost_manifest_is_rebuilt_and_stray_temp_files_removed(tmp_path):
  _save(tmp_path, [5])
  manifest = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  text = open(manifest).read()
  os.remove(manifest)  # As if killed between Orbax's commit and the manifest write.
  open(str(tmp_path / "checkpoint_step_9_ts_1.json.tmp.123"), "w").write("{")
  CheckpointManager(_config(tmp_path)).close()
  assert open(manifest).read() == text
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def _worker(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "ckpt_worker.py"), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_second_process_on_the_same_directory_is_refused(tmp_path):
  holder = _worker("hold", str(tmp_path))
  try:
    assert holder.stdout.readline().strip() == "HOLDING"
    with pytest.raises(CheckpointError, match=rf"in use by another training process \(pid "
                       rf"{holder.pid} "):
      CheckpointManager(_config(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  CheckpointManager(_config(tmp_path)).close()  # A killed holder leaves no stale lock.


def test_failed_save_reports_directory_and_reason_and_keeps_earlier(tmp_path):
  proc = _worker("fsize_limit", str(tmp_path))
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, out + err
  assert f'Failed to save checkpoint for step 2 in "{tmp_path}"' in out
  assert "File too large" in out or "EFBIG" in out or "too large" in out.lower(), out
  assert [e.step for e in ck.list_checkpoints(str(tmp_path))] == [1]
  assert ck.restore_latest(str(tmp_path), with_opt_state=True).step == 1


def test_a_manifest_that_contradicts_its_file_name_is_unreadable(tmp_path):
  _save(tmp_path, [5])
  path = ck.list_checkpoints(str(tmp_path))[0].manifest_path
  _edit(path, timestamp=1)
  (info,) = ck.list_checkpoints(str(tmp_path))
  assert not info.valid and info.reason == "manifest timestamp 1 does not match its file name"


def test_a_leftover_that_cannot_be_removed_is_one_error_and_frees_the_lock(tmp_path):
  leftover = tmp_path / "checkpoint_step_3_ts_1795000000.json.tmp.99"
  leftover.mkdir()  # A folder where an interrupted manifest write's temporary file would be.
  with pytest.raises(CheckpointError, match=r'Cannot clean up checkpoint_dir ".*" \(left over '
                     r"by an interrupted save\): .*json\.tmp\.99"):
    CheckpointManager(_config(tmp_path))
  leftover.rmdir()
  CheckpointManager(_config(tmp_path)).close()  # The failed start released the lock.


def test_a_broken_newest_that_cannot_be_moved_aside_is_one_error(tmp_path):
  _save(tmp_path, [5, 10])
  _flip(_data_file(os.path.join(tmp_path, "checkpoint_step_10", "params")))
  (tmp_path / "unreadable").write_text("a file where the folder would go")
  mgr = CheckpointManager(_config(tmp_path))
  with pytest.raises(CheckpointError, match=r"Cannot move the unreadable checkpoint of step 10 "
                     r'to ".*unreadable" \(it would block saving that step again\): '):
    mgr.restore_for_training(jax.eval_shape(lambda: _state(5)))
  mgr.close()
  assert (tmp_path / "checkpoint_step_10").is_dir()  # Left where it was.


def test_a_lock_file_that_cannot_be_opened_is_one_error(tmp_path):
  from hope_jax.checkpoint.manager import LOCK_NAME

  (tmp_path / LOCK_NAME).mkdir()  # A folder where the lock file goes.
  with pytest.raises(CheckpointError, match=rf'checkpoint_dir ".*": cannot open its lock file '
                     rf"{LOCK_NAME}: "):
    CheckpointManager(_config(tmp_path))


def test_a_target_of_another_model_is_a_mismatch_not_a_broken_checkpoint(tmp_path):
  # restore_latest skipped every checkpoint as "unreadable" for the caller's wrong target.
  _save(tmp_path, [5, 10])
  wrong = jax.eval_shape(lambda: _state(10, mb=0.5))
  with pytest.raises(ck.ConfigMismatchError, match=r"parameter 'w' is float32\[4, 1024\] in the "
                     r"checkpoint and float32\[42, 1024\] in the target"):
    ck.restore_latest(str(tmp_path), abstract_state=wrong)
  assert ck.restore_latest(str(tmp_path), abstract_state=jax.eval_shape(_state)).step == 10


def test_when_no_checkpoint_is_readable_the_error_gives_the_newest_ones_reason(tmp_path):
  _save(tmp_path, [5, 10])
  _flip(_data_file(os.path.join(tmp_path, "checkpoint_step_10", "params")))
  os.remove(tmp_path / "checkpoint_step_5" / "params" / "_METADATA")
  with pytest.raises(CheckpointError, match=r"none of its 2 checkpoint\(s\) is readable; the "
                     r"newest: .*checkpoint_step_10_ts_\d+\.json: array 'params/w' is corrupt "
                     r"\(checksum mismatch\) \(warnings give the others\)"):
    ck.load_model(str(tmp_path))
  with pytest.raises(CheckpointError, match="payload item 'params' has no readable metadata"):
    ck.restore(ck.list_checkpoints(str(tmp_path))[0].manifest_path)


def test_restore_takes_a_path_and_reports_a_str(tmp_path):
  import pathlib

  _save(tmp_path, [5])
  manifest = pathlib.Path(ck.list_checkpoints(str(tmp_path))[0].manifest_path)
  got = ck.restore(manifest)
  assert got.step == 5 and got.manifest_path == str(manifest)
  assert ck.restore_latest(tmp_path).step == 5 and len(ck.list_checkpoints(tmp_path)) == 1


@pytest.mark.parametrize("call", ["list_checkpoints", "restore", "restore_latest",
                                  "load_model"])
def test_a_path_that_is_not_a_path_names_the_argument(call):
  arg = {"restore": "manifest_path", "load_model": "path"}.get(call, "directory")
  with pytest.raises(TypeError, match=rf"^{call}: {arg} must be a path .*not NoneType: None$"):
    getattr(ck, call)(None)


def test_restore_on_a_directory_points_to_restore_latest(tmp_path):
  with pytest.raises(CheckpointError, match=r"is a directory, not a manifest \(restore_latest\(\) "
                     r"and load_model\(\) take a run's checkpoint directory\)"):
    ck.restore(str(tmp_path))
