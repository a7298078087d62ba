"""Export: the serialized jax.export artifact reproduces the model's logits without model code."""

import json
import os

import jax
import numpy as np
import pytest

from hope_jax import export
from hope_jax.config import ConfigError, ModelConfig
from hope_jax.train.state import ModelDef


@pytest.fixture
def model(tiny_config):
  model_def = ModelDef(ModelConfig.from_config(tiny_config.model))
  return model_def, model_def.init_params(seed=3)


def test_exported_artifact_reproduces_logits_for_any_batch(model, tmp_path):
  model_def, params = model
  path = str(tmp_path / "lm.jax_export")
  exp = export.export_forward(model_def, params, seq_len=16)
  export.save_exported(exp, path, {"step": 7})
  meta = json.loads(open(path + ".json").read())
  assert meta["tokens"] == "int32[b,16]" and meta["step"] == 7
  forward = export.load_exported(path)
  rng = np.random.default_rng(0)
  for batch in (1, 3):  # The batch is symbolic: one artifact serves both.
    tokens = rng.integers(0, 256, (batch, 16)).astype(np.int32)
    want = jax.jit(model_def.apply)(params, tokens)
    np.testing.assert_allclose(np.asarray(forward(tokens)), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(ValueError, match="do not fit the exported signature"):
    forward(np.zeros((2, 9), np.int32))


def test_fixed_batch_and_symbolic_length(model, tmp_path):
  model_def, params = model
  exp = export.export_forward(model_def, params, seq_len=None, batch_size=2)
  assert export.signature(exp)["tokens"] == "int32[2,l]"
  tokens = np.arange(2 * 11, dtype=np.int32).reshape(2, 11) % 256
  np.testing.assert_allclose(np.asarray(exp.call(tokens)),
                             np.asarray(jax.jit(model_def.apply)(params, tokens)), rtol=1e-5,
                             atol=1e-5)


def test_loading_something_else_is_a_clear_error(tmp_path):
  bad = tmp_path / "not_an_export"
  bad.write_bytes(b"hello")
  with pytest.raises(ConfigError, match="not a serialized jax.export artifact"):
    export.load_exported(str(bad))
  with pytest.raises(ConfigError, match="cannot read exported model"):
    export.load_exported(os.path.join(str(tmp_path), "missing"))


def test_an_output_whose_sidecar_path_is_a_folder_is_refused_before_the_export(tmp_path):
  import types

  flags = dict(checkpoint_dir=str(tmp_path), checkpoint=None, batch_size=None, seq_len=None,
               dynamic_length=False)
  (tmp_path / "model.bin.json").mkdir()
  with pytest.raises(ConfigError, match=r"--output: .*model\.bin\.json, where the artifact's "
                     r"JSON sidecar goes, is a folder"):
    export.check_flags(types.SimpleNamespace(output=str(tmp_path / "model.bin"), **flags))
  export.check_flags(types.SimpleNamespace(output=str(tmp_path / "other.bin"), **flags))
