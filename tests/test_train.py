"""The training loop learns, is deterministic, and the LM is causal."""

import json
import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hope_jax import diagnostics
from hope_jax.config import ModelConfig
from hope_jax.train.loop import train


def _tiny(tmp_path, tiny_config, **training):
  cfg = tiny_config
  cfg.training.checkpoint_dir = str(tmp_path / "ckpt")
  cfg.training.progress_bar = False
  for k, v in training.items():
    cfg.training[k] = v
  return cfg


def test_tiny_run_reduces_loss_on_default_corpus(tmp_path, tiny_config):
  out = train(_tiny(tmp_path, tiny_config))
  losses = [l for _, l in out["losses"]]
  assert out["step"] == 30 and len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  assert out["eval"]["eval/loss"] < np.log(256) - 1.0
  assert (tmp_path / "ckpt" / "logs" / "metrics.jsonl").exists()
  assert list((tmp_path / "ckpt" / "logs" / "tensorboard").iterdir())


def test_same_seed_same_losses(tmp_path, tiny_config):
  a = train(_tiny(tmp_path / "a", tiny_config, num_steps=8))
  b = train(_tiny(tmp_path / "b", tiny_config, num_steps=8))
  assert a["losses"] == b["losses"]
  c = train(_tiny(tmp_path / "c", tiny_config, num_steps=8, seed=1))
  assert a["losses"] != c["losses"]


@pytest.mark.parametrize("block", ["transformer_pp"])
def test_lm_is_causal(block):
  import hope_jax

  cfg = ModelConfig(block=block, hidden_size=32, num_layers=2, num_heads=2)
  model = hope_jax.build_model(cfg, seed=0)
  L, t = 12, 5
  x = jax.random.normal(jax.random.key(0), (1, L, 32))

  def out_t(x_BLD):
    h = x_BLD
    for blk in model.blocks:
      h = blk(h)
    return h[0, t].sum()

  g = jax.jit(jax.grad(out_t))(x)  # (One compile instead of an eager dispatch per op.)
  assert jnp.all(g[0, t + 1:] == 0.0)
  assert jnp.any(g[0, : t + 1] != 0.0)


def test_hope_run_logs_memory_health_after_each_eval(tmp_path, tiny_config, caplog):
  cfg = _tiny(tmp_path, tiny_config, num_steps=4, eval_every=2, save_every=100)
  cfg.model.block = "hope"
  cfg.model.cms_signal = "static"  # The health lines come from the Titans mixers; compiles faster.
  cfg.model.inner_scan_unroll = 1
  with caplog.at_level("INFO"):
    train(cfg)
  rows = [json.loads(line) for line in
          (tmp_path / "ckpt" / "logs" / "metrics.jsonl").read_text().splitlines()]
  health = [r for r in rows if "health/layer0/drift_w1" in r]
  assert [r["step"] for r in health] == [2, 4]
  for r in health:
    assert r["health/layer0/drift_w1"] > 0 and r["health/layer0/drift_w2"] > 0
    assert 0 < r["health/layer0/eta_mean"] <= r["health/layer0/eta_max"] <= cfg.model.eta_max
    assert cfg.model.alpha_min <= r["health/layer0/alpha_min"] <= 1
  logged = [m for m in caplog.messages if m.startswith("health at step ")]
  assert len(logged) == 2 and logged[0].startswith("health at step 2 | layer 0: drift W1 ")


def test_failing_health_metrics_never_cost_the_run(tmp_path, tiny_config, caplog, monkeypatch):
  def broken(model, tokens):
    raise RuntimeError("replay failed")

  monkeypatch.setattr(diagnostics, "health", broken)
  with caplog.at_level("WARNING"):
    out = train(_tiny(tmp_path, tiny_config, num_steps=4, eval_every=2, save_every=100))
  assert out["step"] == 4 and not out["interrupted"]
  warned = [m for m in caplog.messages if m.startswith("health metrics failed")]
  assert warned == ["health metrics failed at step 2 and are off for this run: "
                    "RuntimeError('replay failed')"]
  assert (tmp_path / "ckpt" / "checkpoint_step_4").is_dir()  # The final save still ran.


def test_a_runaway_in_the_health_metrics_is_warned_once(tmp_path, tiny_config, monkeypatch,
                                                         caplog):
  # The metrics are given: a real runaway needs D >= 256 (test_diagnostics pins that one).
  drifts = iter([{0: 0.9, 1: 683.4}, {0: 0.9, 1: 900.0}])

  def health(model, tokens):
    return {f"health/layer{j}/{k}": v for j, w1 in next(drifts).items()
            for k, v in (("drift_w1", w1), ("drift_w2", 16.0), ("eta_mean", 0.01),
                         ("eta_max", 0.1))}

  monkeypatch.setattr(diagnostics, "health", health)
  with caplog.at_level("INFO"):
    train(_tiny(tmp_path, tiny_config, num_steps=4, eval_every=2, save_every=100))
  warned = [m for m in caplog.messages if "ran away" in m]
  assert warned == ["health at step 2: the self-modifying memories of layer(s) 1 ran away "
                    "(W1 drift 683.4, over 10). Training goes on; see docs/architecture.md, "
                    "\"Runaway fast weights\", and check an init with "
                    "`python -m hope_jax.check_init`"]
  assert sum(m.startswith("health at step ") and "|" in m for m in caplog.messages) == 2
  assert diagnostics.runaway_layers({"health/layer0/drift_w1": 10.0,
                                     "health/layer3/drift_w1": 10.5,
                                     "health/layer3/eta_max": 99.0}) == {3: 10.5}


def test_health_off_is_never_measured(tmp_path, tiny_config, monkeypatch):
  calls = []
  monkeypatch.setattr(diagnostics, "health", lambda model, tokens: calls.append(1) or {})
  train(_tiny(tmp_path / "on", tiny_config, num_steps=4, eval_every=2, save_every=100))
  assert len(calls) == 2  # After the eval at step 2 and the final one.
  train(_tiny(tmp_path / "off", tiny_config, num_steps=4, eval_every=2, save_every=100,
              health=False))
  assert len(calls) == 2


def test_resume_on_data_whose_counted_vocabulary_changed_stops(tmp_path, tiny_config):
  # A character vocabulary counted at start-up orders ids by frequency: the edited text has
  # the same characters (the same vocabulary size) with other ids. Resuming on it used to
  # go on silently, training on ids that mean other characters.
  from hope_jax.config import ConfigError
  from hope_jax.data.tokenizers import CharTokenizer

  text = tmp_path / "corpus.txt"
  text.write_text("a" * 500 + "b" * 300 + "c" * 100)
  cfg = _tiny(tmp_path, tiny_config, num_steps=2, eval_every=2, health=False)
  cfg.model.vocab_size = 6  # <pad>, <unk>, a, b, c and the file separator's newline.
  cfg.data.update(data_type="text", data_path=str(text), tokenizer="char")
  train(cfg)
  kept = tmp_path / "ckpt" / "vocab.json"
  assert CharTokenizer.load(str(kept)).itos[2:5] == ["a", "b", "c"]
  text.write_text("a" * 500 + "b" * 300 + "c" * 1100)  # c now comes first.
  cfg.training.num_steps = 4
  with pytest.raises(ConfigError, match="vocabulary .* is not the one the checkpoint was "
                                        f"trained with .*tokenizer_path={kept} to keep"):
    train(cfg)
  # The kept file is the run's vocabulary: what the hint points at resumes with the same ids.
  from hope_jax.checkpoint import restore_latest

  saved = restore_latest(str(tmp_path / "ckpt")).loader_state["tokenizer_fingerprint"]
  assert CharTokenizer.load(str(kept)).fingerprint() == saved
  # hope_jax.evaluate: the changed data is no score (it would look like a normal one), the
  # kept vocabulary is.
  from hope_jax import checkpoint, evaluate

  entries = checkpoint.list_checkpoints(str(tmp_path / "ckpt"))
  rows, _ = evaluate.evaluate_checkpoints(entries, {}, 2, 1)
  assert "is not the one the checkpoint was trained with" in rows[0]["error"]
  assert f"--data.tokenizer_path={kept}" in rows[0]["error"] and "metrics" not in rows[0]
  rows, _ = evaluate.evaluate_checkpoints(entries, {"tokenizer_path": str(kept)}, 2, 1)
  assert "error" not in rows[0] and rows[0]["metrics"]["eval/loss"] > 0
  # Its data overrides pass the checks training applies (they used to be taken as given).
  with pytest.raises(ConfigError, match="data.seq_len must be at least 2, got 1"):
    evaluate.evaluate_checkpoints(entries, {"seq_len": "1"}, 2, 1)
  with pytest.raises(ConfigError, match="data.passkey_depth must be a number .*got 'abc'"):
    evaluate.evaluate_checkpoints(entries, {"data_type": "passkey", "passkey_depth": "abc"}, 2, 1)


@pytest.mark.parametrize("block", ["hope", "titans_lmm", "transformer_pp"])
def test_weight_decay_spares_norm_scales_and_biases(block):
  # Spec §6: no decay on norms, biases or the eta/alpha/beta biases. The Titans sublayer's
  # per-head output norm scale is [H, Dh]: a rule by rank alone decayed it.
  from hope_jax.train.optimizer import decay_mask
  from hope_jax.train.state import ModelDef

  params = ModelDef(ModelConfig(block=block, hidden_size=64, num_heads=2, num_layers=1)
                    ).abstract_params()
  flags = {"/".join(str(getattr(k, "key", k)) for k in path): v
           for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
  for name, decayed in flags.items():
    leaf = name.split("/")[-1]
    spared = leaf in ("scale", "out_scale") or leaf.startswith("b_") or leaf.endswith("_b")
    assert decayed == (not spared), name
  assert any(n.endswith("kernel") for n in flags)
  if block != "transformer_pp":
    assert flags["blocks/0/mixer/out_scale"] is False


def test_a_stop_during_an_evaluation_saves_its_metrics(tmp_path, tiny_config, monkeypatch):
  # SIGTERM while step 5 is evaluated: the loop stops after the evaluation and saves step 5,
  # which used to lose that evaluation's metrics (keep_best could not rank it).
  import os
  import signal

  from hope_jax import checkpoint
  from hope_jax.train import loop

  real = loop.evaluate

  def evaluate_then_sigterm(*args, **kwargs):
    out = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # The loop's handler only sets its stop flag.
    return out

  monkeypatch.setattr(loop, "evaluate", evaluate_then_sigterm)
  out = train(_tiny(tmp_path, tiny_config, num_steps=10, eval_every=5, save_every=100,
                    health=False))
  assert out["interrupted"] and out["step"] == 5 and out["eval_step"] == 5
  (entry,) = checkpoint.list_checkpoints(str(tmp_path / "ckpt"))
  manifest = json.load(open(entry.manifest_path))
  assert entry.step == 5 and manifest["metrics"]["eval/loss"] == out["eval"]["eval/loss"]


@pytest.fixture
def kept_steps_cleared():
  """No kept steps before or after the test, also when it fails (hope_jax/train/programs.py)."""
  from hope_jax.train import programs

  programs.clear()  # Another test in this process may have compiled these steps.
  yield programs
  programs.clear()  # Leaves none behind for the next test in this process.


def test_a_resumed_run_lowers_the_fresh_runs_train_step(tmp_path, tiny_config, caplog,
                                                        kept_steps_cleared):
  # A restored state is committed to the device (the checkpoint store reads into a
  # SingleDeviceSharding); a fresh one used to be uncommitted, which lowers to another
  # program: every resumed run compiled its steps anew, even from a persistent compilation
  # cache that held the fresh run's (the quickstart notebook's resume: 29 s -> 5 s).
  from hope_jax.checkpoint.manager import CheckpointManager
  from hope_jax.train.optimizer import make_optimizer
  from hope_jax.train.sharding import Placement
  from hope_jax.train.state import make_init_fn
  from hope_jax.train.step import make_eval_step, make_train_step

  # Both runs compile: the fixture leaves no earlier test's steps (the cosine keeps num_steps).
  cfg = _tiny(tmp_path, tiny_config, num_steps=2, save_every=2, eval_every=2, health=False)
  cfg.model.block = "transformer_pp"
  model_def = train(cfg)["model_def"]
  t = cfg.training
  tx = make_optimizer(t, model_def.abstract_params(), model_def.cfg)
  init_fn = make_init_fn(model_def, tx, t.seed)
  abstract = jax.eval_shape(init_fn)
  placement = Placement({"data": 1, "fsdp": 1}, t.batch_size, jax.devices()[:1])
  assert placement.single
  fresh = placement.init_state(init_fn)
  cfg.training.resume_from = "latest"
  with CheckpointManager(cfg) as ckpt:
    restored = ckpt.restore_for_training(placement.restore_target(abstract))[0]
  assert int(restored["step"]) == 2
  batch = np.zeros((t.batch_size, cfg.data.seq_len + 1), np.int32)
  step = placement.jit_train_step(make_train_step(model_def, tx), abstract)
  assert step.lower(fresh, batch).as_text() == step.lower(restored, batch).as_text()
  evaluate = placement.jit_eval_step(make_eval_step(model_def), abstract["params"])
  assert (evaluate.lower(fresh["params"], batch).as_text()
          == evaluate.lower(restored["params"], batch).as_text())
  # Without a persistent cache (none in this process), the resume says how to skip compiling.
  cfg.training.num_steps = 3
  with caplog.at_level(logging.INFO):
    train(cfg)
  assert ("First step done in" in caplog.text and "a resume reads the compiled steps from "
          "JAX's persistent compilation cache when JAX_COMPILATION_CACHE_DIR is set"
          in caplog.text), caplog.text[-2000:]


def _metrics(checkpoint_dir, key):
  with open(os.path.join(checkpoint_dir, "logs", "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_a_later_run_of_the_same_program_reuses_its_compiled_steps(tmp_path, tiny_config,
                                                                     caplog, kept_steps_cleared):
  # A notebook's resume, or a second run of the same settings, trains the same program: it
  # takes the first run's jitted steps instead of lowering and compiling them again. A
  # changed optimizer setting is another program. (The constant schedule leaves num_steps
  # out of the step; a cosine decays to it.)
  cfg = _tiny(tmp_path, tiny_config, num_steps=2, save_every=2, eval_every=2, health=False,
              lr_schedule="constant", warmup_steps=0)

  def run(checkpoint_dir, num_steps, **training):
    cfg.training.update(checkpoint_dir=str(checkpoint_dir), num_steps=num_steps, **training)
    caplog.clear()
    with caplog.at_level(logging.INFO), jax.log_compiles(True):
      out = train(cfg)
    return out, caplog.text

  first, log = run(tmp_path / "a", 2)
  assert "Compiling jit(train_step)" in log and "earlier run in this process" not in log
  resumed, log = run(tmp_path / "a", 4)
  assert "Resumed from step 2" in log, log[-2000:]
  assert "Compiling jit(train_step)" not in log and "Compiling jit(eval_step)" not in log
  assert ("Init, train and eval steps: those of an earlier run in this process" in log
          and "the train step compiled by an earlier run in this process" in log)
  # A fresh run compiles no init either, and gets the losses of an unbroken run.
  straight, log = run(tmp_path / "b", 4)
  assert "Compiling jit(" not in log, log[-2000:]
  assert dict(straight["losses"]) == {**dict(first["losses"]), **dict(resumed["losses"])}
  lr = cfg.training.learning_rate
  same_rate, _ = run(tmp_path / "b", 6)  # From the same step-4 state as "a", at the old rate.
  faster, log = run(tmp_path / "a", 6, learning_rate=lr * 10)
  assert "Compiling jit(train_step)" in log and "earlier run in this process" not in log
  assert _metrics(tmp_path / "a", "train/learning_rate")[6] == pytest.approx(lr * 10)
  # The step itself took the new rate: step 6's loss is the first after a step-5 update.
  assert dict(faster["losses"])[5] == dict(same_rate["losses"])[5]
  assert dict(faster["losses"])[6] != dict(same_rate["losses"])[6]


def test_the_kept_init_draws_each_seeds_own_state(tiny_config, caplog, monkeypatch,
                                                  kept_steps_cleared):
  # The kept init takes the seed as traced keys: one compiled program for every seed, and for
  # each the parameters the model draws from that int seed and the rng key seed + 1, as the
  # init closed over its seed did. On one device it is traced with the threefry kernel option.
  from hope_jax.config import validate_run_config
  from hope_jax.train.sharding import Placement
  from hope_jax.train.state import ModelDef, init_from_keys, seed_keys

  programs = kept_steps_cleared
  option = "jax_threefry_gpu_kernel_lowering"
  seen = []

  def init_from_keys_seen(*args):
    seen.append(getattr(jax.config, option))
    return init_from_keys(*args)

  monkeypatch.setattr(programs, "init_from_keys", init_from_keys_seen)
  model_def = ModelDef(validate_run_config(tiny_config))
  placement = Placement({"data": 1, "fsdp": 1}, 2, jax.devices()[:1])
  steps = programs.steps(model_def, tiny_config.training, placement)
  before = getattr(jax.config, option)
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    states = {seed: steps.init(*seed_keys(seed)) for seed in (0, 7)}
  # The two seeds share one program, traced with the option on, which is then restored.
  assert caplog.text.count("Compiling jit(init_from_keys_seen)") == 1, caplog.text[-2000:]
  assert seen == [True] and getattr(jax.config, option) == before
  for seed, state in states.items():
    chex.assert_trees_all_equal(state["params"],
                                jax.jit(lambda s=seed: model_def.init_params(s))())
    np.testing.assert_array_equal(jax.random.key_data(state["rng"]),
                                  jax.random.key_data(jax.random.key(seed + 1)))
    assert int(state["step"]) == 0
  embed = lambda state: next(iter(jax.tree.leaves(state["params"])))
  assert not np.array_equal(embed(states[0]), embed(states[7]))


def test_the_step_key_holds_the_mesh_rules_and_refuses_late_reads(monkeypatch, tiny_config):
  from hope_jax.config import validate_run_config
  from hope_jax.train import programs, sharding
  from hope_jax.train.state import ModelDef

  placement = sharding.Placement({"data": 1, "fsdp": 1}, 2, jax.devices()[:1])
  before = placement.key()
  monkeypatch.setattr(sharding, "OVERRIDES", [(r"embed$", sharding.P("fsdp", None))])
  assert placement.key() != before  # Other partition rules are another program.
  # An optimizer that read `training` lazily (after it was built) would escape the key.
  monkeypatch.setattr(programs, "make_optimizer", lambda t, *args: (lambda: t.b1))
  lazy, key = programs.optimizer_with_key(tiny_config.training,
                                          ModelDef(validate_run_config(tiny_config)))
  assert key == ()
  with pytest.raises(RuntimeError, match="training.b1 was read after the optimizer was built"):
    lazy()


def test_the_step_key_names_every_field_the_optimizer_reads(tiny_config):
  from hope_jax.config import validate_run_config
  from hope_jax.train.programs import optimizer_with_key
  from hope_jax.train.state import ModelDef

  model_def = ModelDef(validate_run_config(tiny_config))
  t = tiny_config.training
  cosine = dict(optimizer_with_key(t, model_def)[1])
  assert {"learning_rate", "warmup_steps", "num_steps", "min_lr_ratio", "grad_clip", "b1",
          "b2", "weight_decay"} <= set(cosine), cosine
  assert "checkpoint_dir" not in cosine and "seed" not in cosine
  t.lr_schedule = "constant"
  constant = dict(optimizer_with_key(t, model_def)[1])
  assert "num_steps" not in constant and "learning_rate" in constant
  t.b2 = 0.9
  assert dict(optimizer_with_key(t, model_def)[1])["b2"] == "0.9"


def test_steps_of_one_config_share_one_trace_of_the_model(monkeypatch, tiny_config):
  # `ModelDef.apply` is a jitted call keyed by the config: the eval step and the train step
  # of a second `train()` in the same process (a new ModelDef, optimizer and step function)
  # reuse the first trace of the model instead of tracing it again.
  from hope_jax.config import validate_run_config
  from hope_jax.model import LanguageModel
  from hope_jax.train.optimizer import make_optimizer
  from hope_jax.train.state import ModelDef, make_init_fn
  from hope_jax.train.step import make_eval_step, make_train_step

  tiny_config.model.hidden_size = 40  # A size no other test traces.
  model_cfg = validate_run_config(tiny_config)
  traced = []
  call = LanguageModel.__call__
  monkeypatch.setattr(LanguageModel, "__call__", lambda self, *a: traced.append(1) or call(self, *a))
  batch = jax.ShapeDtypeStruct((2, 17), jnp.int32)
  for seed in (0, 1):
    model_def = ModelDef(model_cfg, seed=seed)
    tx = make_optimizer(tiny_config.training, model_def.abstract_params(), model_cfg)
    abstract = jax.eval_shape(make_init_fn(model_def, tx, seed))
    jax.jit(make_train_step(model_def, tx)).trace(abstract, batch)
    jax.jit(make_eval_step(model_def)).trace(abstract["params"], batch)
  assert len(traced) == 1
  assert ModelDef(model_cfg, seed=0) == ModelDef(model_cfg, seed=1)
  tiny_config.model.hidden_size = 48
  other = ModelDef(validate_run_config(tiny_config))
  assert other != ModelDef(model_cfg)
  jax.jit(make_eval_step(other)).trace(other.abstract_params(), batch)
  assert len(traced) == 2  # Another config is another trace.


def test_a_stop_right_after_a_diverged_step_saves_nothing(tmp_path, monkeypatch):
  # The stop signal's save used to write the last step's state without reading its metrics:
  # after a diverged step, a checkpoint of non-finite parameters for the rerun to resume.
  from experiments import tiny
  from hope_jax.checkpoint import list_checkpoints
  from hope_jax.train import loop

  cfg = tiny.get_config()
  cfg.training.update(checkpoint_dir=str(tmp_path), num_steps=30, save_every=1000,
                      eval_every=1000, learning_rate=1e30, grad_clip=1e30, progress_bar=False)
  # Step 2's update of size ~1e30 leaves step 3's gradient non-finite (as in test_cli's
  # diverged run); the stop comes before step 4, with step 3's metrics still unread.
  monkeypatch.setattr(loop._StopRequest, "should_stop", lambda self, step: step == 3)
  with pytest.raises(FloatingPointError, match="at step 3: lower training.learning_rate"):
    train(cfg)
  assert list_checkpoints(str(tmp_path)) == []


def test_a_failed_run_closes_its_metric_files(tmp_path, tiny_config):
  # A diverged run left metrics.jsonl and its TensorBoard events file open (and the writer's
  # threads running): a notebook that retried leaked three descriptors per call.
  def open_logs():
    fds = os.listdir("/proc/self/fd")
    targets = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in fds
               if os.path.exists(f"/proc/self/fd/{fd}")]
    return [p for p in targets if p.startswith(str(tmp_path / "ckpt" / "logs"))]

  cfg = _tiny(tmp_path, tiny_config, num_steps=6, learning_rate=1e30, save_every=100,
              eval_every=100)
  with pytest.raises(FloatingPointError):
    train(cfg)
  assert (tmp_path / "ckpt" / "logs" / "metrics.jsonl").exists()
  assert open_logs() == []


def test_train_takes_a_plain_dict_config(tmp_path, tiny_config):
  # `cfg.to_dict()` edited as a dict failed with "'dict' object has no attribute 'model'".
  cfg = _tiny(tmp_path, tiny_config, num_steps=2, save_every=100, eval_every=100).to_dict()
  assert train(cfg)["step"] == 2
