"""The train state: a plain dict pytree, split once from the NNX model.

  state = {"params": pure dict, "opt_state": optax state, "step": int32, "rng": key}

`orbax-notes.md` measured pure-dict params in a `jax.jit` step at half the
overhead of carrying `nnx.State`; the pure dict is also what checkpoints store.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hope_jax.config import ModelConfig
from hope_jax.model import LanguageModel


class ModelDef:
  """The static half of a split NNX model: rebuilds a module from pure params."""

  def __init__(self, cfg: ModelConfig, seed: int = 0):
    self.cfg = cfg
    abstract = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(seed)))
    self.graphdef, self._template = nnx.split(abstract)
    self.seed = seed

  def init_params(self, seed: int | jax.Array | None = None) -> dict:
    """Fresh parameters from `seed`: an int, a PRNG key (traced or not), or None (`self.seed`)."""
    model = LanguageModel(self.cfg, rngs=nnx.Rngs(self.seed if seed is None else seed))
    return nnx.to_pure_dict(nnx.split(model)[1])

  def abstract_params(self) -> dict:
    return nnx.to_pure_dict(self._template)

  def bind(self, params: dict) -> LanguageModel:
    """A module whose parameters are `params` (works inside jit)."""
    state = jax.tree.map(lambda x: x, self._template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def apply(self, params: dict, tokens_BL) -> jax.Array:
    return _apply(self, params, tokens_BL)

  # Equal configs build the same graph (the seed only draws the initial values), so every
  # ModelDef of one config shares `_apply`'s traces.
  def __eq__(self, other) -> bool:
    return isinstance(other, ModelDef) and other.cfg == self.cfg

  def __hash__(self) -> int:
    return hash(self.cfg)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model_def: ModelDef, params: dict, tokens_BL) -> jax.Array:
  """The forward pass, jitted for its trace cache: inside a traced step XLA inlines it, and
  the eval step and any later step of the same config and shapes (a second `train()` in a
  notebook) reuse its jaxpr and the linearised and transposed forms JAX keeps per jaxpr."""
  return model_def.bind(params)(tokens_BL)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """The PRNG keys of a run's fresh state: its parameters' and its `rng` entry's."""
  return jax.random.key(seed), jax.random.key(seed + 1)


def init_from_keys(model_def: ModelDef, tx: optax.GradientTransformation, params_key: jax.Array,
                   rng_key: jax.Array) -> dict:
  """A fresh state from `seed_keys`. Jitted with the keys as arguments, one program serves
  every seed (the train loop keeps it: hope_jax/train/programs.py)."""
  params = model_def.init_params(params_key)
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": rng_key}


def init_train_state(model_def: ModelDef, tx: optax.GradientTransformation, seed: int) -> dict:
  """A fresh state; jit it (or eval_shape it for an abstract restore target)."""
  return init_from_keys(model_def, tx, *seed_keys(seed))


def make_init_fn(model_def: ModelDef, tx, seed: int) -> Callable[[], dict]:
  return lambda: init_train_state(model_def, tx, seed)


def param_count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
