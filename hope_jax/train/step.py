"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from hope_jax.train.state import ModelDef

LN2 = math.log(2.0)


def lm_loss(logits_BLV, labels_BL):
  """Mean next-token cross-entropy in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BLV.astype(jnp.float32), labels_BL).mean()


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation):
  """Builds the pure step; the caller jits it with `donate_argnums=0`."""

  def loss_fn(params, tokens_BL1):
    logits = model_def.apply(params, tokens_BL1[:, :-1])
    return lm_loss(logits, tokens_BL1[:, 1:])

  def train_step(state, batch_BL1, value_and_grad=jax.value_and_grad):
    """One step.

    `value_and_grad` turns `loss_fn(params, batch)` into `(loss, grads)`: JAX's own on one
    device; a sharded run passes `Placement.value_and_grad`, which takes each device's
    gradient of its own sequences and averages them once, after the backward pass.
    """
    rng, _ = jax.random.split(state["rng"])
    loss, grads = value_and_grad(loss_fn)(state["params"], batch_BL1)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "bits_per_token": loss / LN2, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
            "rng": rng}, metrics

  return train_step


def make_eval_step(model_def: ModelDef):
  def eval_step(params, batch_BL1):
    logits = model_def.apply(params, batch_BL1[:, :-1])
    return lm_loss(logits, batch_BL1[:, 1:])

  return eval_step
