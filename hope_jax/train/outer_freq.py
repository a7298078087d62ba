"""`cms_mode="outer_freq"`: CMS level l takes an outer optimizer step only every f_l steps.

Spec §3.3's "simpler reading" of the CMS update frequencies. Level l's parameters collect
their gradients for f_l = C_l / C_1 outer steps [choice: the ratio of the level's chunk to
the fastest level's], then the optimizer sees their mean once; on the steps in between their
update is exactly zero, so neither momentum nor weight decay moves them. Other parameters
(and level 1) step every time. AdamW's moments still decay on the skipped steps (their input
gradient is zero there), which only rescales the level's effective step size.

Use `wrap_outer_frequency(tx, params, model_cfg)`: it returns `tx` unchanged for other modes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hope_jax.config import ModelConfig


def _key(entry) -> Any:
  return getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", None)))


def level_frequencies(params: Any, model_cfg: ModelConfig) -> Any:
  """A pytree like `params` holding f_l for CMS level l's leaves and 1 elsewhere."""
  chunks = tuple(model_cfg.cms_chunks)

  def freq(path, _):
    keys = [_key(p) for p in path]
    for a, b in zip(keys, keys[1:], strict=False):
      if a == "levels" and isinstance(b, int) and model_cfg.cms_ablate != "single_static":
        return chunks[b] // chunks[0]
    return 1

  return jax.tree_util.tree_map_with_path(freq, params)


class OuterFreqState(NamedTuple):
  count: jax.Array  # Outer steps seen so far.
  acc: Any  # Gradients summed since each leaf's last step.


def outer_frequency_transform(params: Any, model_cfg: ModelConfig):
  """(accumulate, gate) transforms to put before and after the optimizer, or None.

  `accumulate` emits a level's mean accumulated gradient on its step and zeros otherwise;
  `gate` zeroes the optimizer's updates of the levels that are not stepping.
  """
  if model_cfg.cms_mode != "outer_freq" or model_cfg.block not in ("hope", "hope_attention"):
    return None
  freqs = level_frequencies(params, model_cfg)
  fires = lambda count: jax.tree.map(lambda f: jnp.equal(jnp.mod(count + 1, f), 0), freqs)

  def acc_init(params):
    return OuterFreqState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def acc_update(grads, state, params=None):
    del params
    acc = jax.tree.map(jnp.add, state.acc, grads)
    fire = fires(state.count)
    out = jax.tree.map(lambda a, f, z: jnp.where(z, a / f, jnp.zeros_like(a)), acc, freqs, fire)
    acc = jax.tree.map(lambda a, z: jnp.where(z, jnp.zeros_like(a), a), acc, fire)
    return out, OuterFreqState(state.count + 1, acc)

  def gate_init(params):
    del params
    return OuterFreqState(jnp.zeros((), jnp.int32), None)

  def gate_update(updates, state, params=None):
    del params
    fire = fires(state.count)
    out = jax.tree.map(lambda u, z: jnp.where(z, u, jnp.zeros_like(u)), updates, fire)
    return out, OuterFreqState(state.count + 1, None)

  return (optax.GradientTransformation(acc_init, acc_update),
          optax.GradientTransformation(gate_init, gate_update))


def wrap_outer_frequency(tx: optax.GradientTransformation, params: Any,
                         model_cfg: ModelConfig) -> optax.GradientTransformation:
  """`tx` with the outer-frequency schedule around it (or `tx` itself for other modes)."""
  pair = outer_frequency_transform(params, model_cfg)
  if pair is None:
    return tx
  accumulate, gate = pair
  return optax.chain(accumulate, tx, gate)
