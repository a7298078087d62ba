"""NNX module definitions of the HOPE family."""

from hope_jax.model.lm import LanguageModel

__all__ = ["LanguageModel"]
