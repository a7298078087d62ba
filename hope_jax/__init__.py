"""hope_jax: HOPE (Nested Learning) language models in JAX/Flax NNX."""

from __future__ import annotations

__version__ = "0.1.0"


def build_model(model_config, seed: int = 0):
  """Builds a `LanguageModel` from a run config, its `model` section or a `ModelConfig`.

  The run config and the section may be ConfigDicts or mappings. `model(tokens_BL)` returns
  logits `[B, L, V]`.
  """
  from flax import nnx

  from hope_jax.config import ModelConfig, model_section
  from hope_jax.model import LanguageModel

  cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_config(
      model_section(model_config))
  return LanguageModel(cfg, rngs=nnx.Rngs(seed))
