"""AdamW with warmup + cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(t: Any) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine to `learning_rate * min_lr_ratio`."""
  if t.lr_schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1)),
         optax.constant_schedule(t.learning_rate)], [max(t.warmup_steps, 1)])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=max(t.warmup_steps, 1),
      decay_steps=max(t.num_steps, t.warmup_steps + 1),
      end_value=t.learning_rate * t.min_lr_ratio)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: not on norm scales, biases or gate/rate biases (spec §6).

  By rank, except the Titans sublayer's per-head output RMSNorm scale (`out_scale`,
  [H, Dh]), a norm scale of rank 2.
  """
  def decays(path, x):
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    return x.ndim >= 2 and not name.endswith("scale")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: Any, params: Any = None,
                   model_cfg: Any = None) -> optax.GradientTransformation:
  """The outer optimizer for the `training` config section.

  With `params` (concrete or abstract) and a `model_cfg` whose `cms_mode` is "outer_freq",
  CMS level l only steps every f_l outer steps (`hope_jax.train.outer_freq`).
  """
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=decay_mask),
  )
  if params is not None and model_cfg is not None:
    from hope_jax.train.outer_freq import wrap_outer_frequency

    tx = wrap_outer_frequency(tx, params, model_cfg)
  return tx
