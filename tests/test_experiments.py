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
