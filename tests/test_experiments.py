"""Every experiments/**/*.py loads and builds its model shapes with jax.eval_shape."""

import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest

from hope_jax.config import ConfigError, ModelConfig, validate_run_config
from hope_jax.train.state import ModelDef
from tests.conftest import REPO

FILES = sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "experiments", "**", "*.py"),
                                                 recursive=True)
    if not p.endswith("__init__.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", FILES)
def test_experiment_builds(path):
  module = load(path)
  assert "python -m hope_jax." in (module.__doc__ or ""), f"{path}: docstring lacks its run command"
  cfg = module.get_config()
  assert set(cfg.keys()) >= {"model", "training", "data"}
  model_cfg = validate_run_config(cfg)
  model_def = ModelDef(model_cfg)
  tokens = jax.ShapeDtypeStruct((2, cfg.data.seq_len), jnp.int32)
  out = jax.eval_shape(model_def.apply, model_def.abstract_params(), tokens)
  assert out.shape == (2, cfg.data.seq_len, model_cfg.vocab_size)


def test_every_experiment_has_a_checkpoint_dir_of_its_own():
  # In a shared one, a run of another model would stop on the model mismatch.
  dirs = {path: load(path).get_config().training.checkpoint_dir for path in FILES}
  assert len(set(dirs.values())) == len(dirs), dirs
  assert dirs["experiments/base.py"] == "./checkpoints"
  assert dirs["experiments/ablations/no_dgd.py"] == "./checkpoints/ablations/no_dgd"


def test_model_section_mirrors_model_config():
  from experiments import base

  assert set(base.get_config().model.keys()) == set(ModelConfig().to_dict().keys())


def test_configuration_doc_is_current():
  """docs/configuration.md is generated from the code; regenerate it when keys change."""
  from hope_jax import configdoc

  assert configdoc.undocumented() == [], "add a comment beside these keys"
  with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as f:
    committed = f.read()
  assert committed == configdoc.render(), (
      "docs/configuration.md is stale: python -m hope_jax.configdoc > docs/configuration.md")


@pytest.mark.parametrize("key,value", [("inner_scan_unroll", 2.5), ("inner_scan_unroll", True),
                                       ("lm_grad_remat_every", 1.5)])
def test_count_keys_refuse_non_integers(key, value):
  # A float or a bool would pass a plain `< 0` check and fail later, inside the compiled scan.
  with pytest.raises(ConfigError, match=f"model.{key} must be an int >= 0.*got {value!r}"):
    ModelConfig(**{key: value}).validate()


@pytest.mark.parametrize("value", [0.0, -0.02, float("inf"), True, "0.02"])
def test_memory_input_std_must_be_a_positive_number(value):
  with pytest.raises(ConfigError, match=f"model.memory_input_std must be a positive number, "
                                        f"got {re.escape(repr(value))}"):
    ModelConfig(memory_input_std=value).validate()
  ModelConfig(memory_input_std=0.01).validate()


@pytest.mark.parametrize("key,value,wanted", [
    ("ffn_hidden", -5, "an int >= 0"), ("cms_hidden", -64, "an int >= 0"),
    ("mem_hidden_proj", 1.5, "an int >= 0"), ("mem_hidden_mem", -3, "an int >= 0"),
    ("eta_max", -1.0, "a positive number"), ("rope_theta", -1.0, "a positive number"),
    ("cms_lr", 0.0, "a positive number"), ("inner_grad_clip", -1.0, "a number >= 0"),
    ("cms_grad_clip", float("nan"), "a number >= 0")])
def test_widths_rates_and_clips_name_the_key(key, value, wanted):
  # Each of these used to pass and fail later: a negative width inside the first compile
  # (broadcast_in_dim), a negative rate or theta as a NaN loss or a silent sign flip.
  with pytest.raises(ConfigError, match=f"model.{key} must be {wanted}"):
    ModelConfig(**{key: value}).validate()


@pytest.mark.parametrize("section,key,value,match", [
    ("training", "seed", -1, "training.seed must be >= 0, got -1"),
    ("training", "warmup_steps", -5, "training.warmup_steps must be >= 0"),
    ("training", "b1", 2.0, r"training.b1 must be in \[0, 1\), got 2.0"),
    ("training", "b2", 1.0, r"training.b2 must be in \[0, 1\)"),
    ("training", "grad_clip", 0.0, "training.grad_clip must be a positive number"),
    ("training", "weight_decay", -0.1, "training.weight_decay must be >= 0"),
    ("training", "min_lr_ratio", -1.0, r"training.min_lr_ratio must be in \[0, 1\]"),
    ("training", "keep_best", "eval/nope", "training.keep_best='eval/nope' is not a metric"),
    # The loop records bits per token; per byte is hope_jax.evaluate's.
    ("training", "keep_best", "eval/bits_per_byte",
     "did you mean 'eval/bits_per_token'"),
    ("data", "memmap_min_mb", -1.0, "data.memmap_min_mb must be >= 0")])
def test_run_settings_name_the_key(section, key, value, match):
  from experiments import tiny

  cfg = tiny.get_config()
  validate_run_config(cfg)
  cfg[section][key] = value
  with pytest.raises(ConfigError, match=match):
    validate_run_config(cfg)


def test_keep_best_takes_every_metric_the_loop_records():
  from experiments import tiny
  from hope_jax.config import LOOP_EVAL_METRICS
  from hope_jax.train.loop import evaluate

  cfg = tiny.get_config()
  for name in LOOP_EVAL_METRICS:
    cfg.training.keep_best = name
    validate_run_config(cfg)
  # The names are what the loop's `evaluate` returns (here with a constant eval step).
  import numpy as np

  from hope_jax.train.sharding import Placement

  cfg.training.eval_batches = 1
  placement = Placement(cfg.training.mesh, cfg.training.batch_size, jax.devices()[:1])
  got = evaluate(lambda params, batch: jnp.float32(1.0), None, np.arange(400) % 256,
                 cfg.training, cfg.data.seq_len, placement)
  assert tuple(got) == LOOP_EVAL_METRICS


def test_build_model_takes_a_run_config_its_model_section_or_a_model_config():
  # As docs/checkpoints.md says restore(config=) does; a run config used to fail with
  # "unknown config key 'model.data'".
  import hope_jax
  from experiments import tiny
  from hope_jax.config import ModelConfig

  cfg = tiny.get_config()
  built = [hope_jax.build_model(c).cfg for c in (cfg, cfg.model, cfg.model.to_dict(),
                                                 ModelConfig.from_config(cfg.model))]
  assert all(b == built[0] for b in built) and built[0].hidden_size == 32
  with pytest.raises(TypeError, match="must be a run config, its model section or a "
                     "ModelConfig, got NoneType"):
    hope_jax.build_model(None)
