"""What a HOPE model does in context, token by token: for notebooks and debugging.

`trace(model, tokens_BL)` replays the model chunk by chunk (C_1 tokens, the grid the
`lm_grad` scan runs on) and records, per layer:

  * `eta_BLH`, `alpha_BLH`: the learning rate and retention each self-modifying memory
    chose for every token and head (`SelfModTitans.inspect`; None for attention mixers),
  * `drift`: how far each memory's fast weights are from their initial values after each
    chunk, {"<memory>/<W1|W2>": [B, N, H]} (Frobenius norm of W_run - W_0),
  * `cms_delta_norm` [K, B, N]: the norm of each CMS level's in-context delta after each
    chunk, and `cms_writes` [K, N]: whether the level's write boundary ended that chunk
    (None without in-context CMS).

The replay runs the model's own `lm_grad` computation one chunk at a time: each chunk's
forward reads the CMS deltas written so far, then the chunk's write gradients update them,
as in `forward_with_fast_state`. So it holds one chunk's deltas, never every chunk's;
`trace` also returns the replay's logits, which tests compare with `model(tokens_BL)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hope_jax.config import token_batch
from hope_jax.model import lm
from hope_jax.ops import cms as cms_ops

# A W1 drift no calm memory reaches: about 10x the norm of its initial W1 (~0.8).
RUNAWAY_DRIFT = 10.0


@nnx.jit
def _chunk_step(model, tokens_BC, targets_BC, mask_BC, states, fast, tokens_seen):
  """All layers on one aligned chunk, then its CMS writes (the `lm_grad` scan's body).

  Returns every block's input, the mixer states after the chunk, the logits and the fast
  CMS state after the chunk's writes (`fast` unchanged without in-context CMS).
  """
  deltas = [f["delta"] if f is not None else None for f in fast]
  x_BCD = model.embed_tokens(tokens_BC)
  inputs, new_states = [], []
  for block, state, delta in zip(model.blocks, states, deltas, strict=True):
    inputs.append(x_BCD)
    x_BCD, state = block.step(x_BCD, state, delta, aligned=True)
    new_states.append(state)
  if model.fast_cms and model._scan_layers():
    # As the model's own scan does: one block traced and compiled for the write gradients.
    grads = model.chunk_grads(tokens_BC, targets_BC, mask_BC, lm._stack(states),
                              lm._stack(deltas), stacked=True)
    fast = lm._unstack(model._write(lm._stack(fast), grads, tokens_seen, stacked=True),
                       len(model.blocks))
  elif model.fast_cms:
    grads = model.chunk_grads(tokens_BC, targets_BC, mask_BC, states, deltas)
    fast = model._write(fast, grads, tokens_seen)
  return inputs, new_states, model.logits(x_BCD), fast


@nnx.jit
def _inspect(mixer, u_BLD):
  return mixer.inspect(u_BLD)


def replay_chunk(model) -> int:
  """The chunk length of the replay: C_1 with in-context CMS, else the mixers' grid.

  `trace` and `health` replay whole chunks of it (`health` the longest prefix that fills them).
  """
  if model.fast_cms:
    return int(model.cfg.cms_chunks[0])
  return max(int(getattr(b.mixer, "align", 1)) for b in model.blocks)


def _like_the_params(model, tree):
  """`tree` placed as every parameter is, where they share one replicated placement.

  A chunk step's outputs land where its committed parameters are, so starting from
  uncommitted states would make the second call another program: compiled twice.
  """
  placements = {x.sharding for x in jax.tree.leaves(nnx.state(model))
                if isinstance(x, jax.Array) and x.committed}
  if len(placements) == 1 and (sharding := placements.pop()).is_fully_replicated:
    return jax.device_put(tree, sharding)
  return tree


def _replay(model, tokens_BL, c: int):
  """Re-runs the model's forward chunk by chunk from its initial state; yields, for every
  chunk of `c` tokens, (each block's input, the states after the chunk, the logits, the
  fast CMS state after the chunk's writes).

  The targets and loss mask are `forward_with_fast_state`'s for a sequence of this length
  (next tokens; the last position has none), so the writes are the model's own.
  """
  b, l = tokens_BL.shape
  states, fast = _like_the_params(model, model._init_states(b, l))
  targets_BL = jnp.pad(tokens_BL[:, 1:], ((0, 0), (0, 1)))
  mask_BL = jnp.broadcast_to(jnp.arange(l)[None] < l - 1, (b, l)).astype(jnp.float32)
  for i in range(l // c):
    piece = slice(i * c, (i + 1) * c)
    xs, states, logits, fast = _chunk_step(model, tokens_BL[:, piece], targets_BL[:, piece],
                                           mask_BL[:, piece], states, fast,
                                           jnp.asarray((i + 1) * c, jnp.int32))
    yield xs, states, logits, fast


def _inspect_layers(model, inputs) -> list[dict | None]:
  """`inspect` of every self-modifying mixer on its whole replayed input (None elsewhere)."""
  return [_inspect(b.mixer, b.norm_mixer(jnp.concatenate(x, axis=1)))
          if hasattr(b.mixer, "inspect") else None
          for b, x in zip(model.blocks, inputs, strict=True)]


def trace(model, tokens_BL) -> dict[str, Any]:
  """Runs `model` over `tokens_BL` and records what its memories do (module docstring).

  Args:
    model: a `LanguageModel` (any block; the Titans and CMS fields are filled where the
      block has them).
    tokens_BL: int tokens; L must be a multiple of the replay chunk (`chunk` in the result).

  Returns:
    {"chunk": C, "chunk_ends": [N] token counts, "logits_BLV": the replay's logits,
     "layers": [per layer {"eta_BLH", "alpha_BLH", "drift", "cms_delta_norm", "cms_writes"}]}
    with numpy arrays.

  Raises:
    ValueError: L is not a multiple of the chunk.
  """
  tokens_BL = jnp.asarray(token_batch(tokens_BL, "trace: tokens_BL"))
  b, l = tokens_BL.shape
  c = replay_chunk(model)
  if l % c:
    raise ValueError(f"trace: sequence length {l} must be a multiple of the chunk {c} "
                     "(cms_chunks[0], or the mixers' chunk grid)")
  n = l // c
  states0, _ = model._init_states(b, l)
  inputs, drifts, logits = [[] for _ in model.blocks], [[] for _ in model.blocks], []
  delta_norms = [[] for _ in model.blocks]  # Per layer and chunk: each level's norm [B].
  for xs, states, lg, fast in _replay(model, tokens_BL, c):
    logits.append(lg)
    for j, block in enumerate(model.blocks):
      inputs[j].append(xs[j])
      if hasattr(block.mixer, "inspect"):
        drifts[j].append(block.mixer.drift(states[j], states0[j]))
      if model.fast_cms and fast[j] is not None:
        delta_norms[j].append([jnp.sqrt(sum(jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))
                                            for a in lvl.values()))
                               for lvl in fast[j]["delta"]])

  chunk_ends = np.arange(1, n + 1) * c
  layers = []
  for j, got in enumerate(_inspect_layers(model, inputs)):
    layer = {"eta_BLH": None, "alpha_BLH": None, "drift": {}, "cms_delta_norm": None,
             "cms_writes": None}
    if got is not None:
      layer["eta_BLH"] = np.asarray(got["eta_BLH"])
      if model.blocks[j].mixer.cfg.use_alpha:
        layer["alpha_BLH"] = np.asarray(got["alpha_BLH"])
      layer["drift"] = {k: np.stack([np.asarray(d[k]) for d in drifts[j]], axis=1)
                        for k in drifts[j][0]}
    if delta_norms[j]:  # [chunk][level] -> [level, B, chunk]
      layer["cms_delta_norm"] = np.asarray(delta_norms[j]).transpose(1, 2, 0)
      hits = cms_ops.level_boundaries(jnp.asarray(chunk_ends), model.cfg.cms_chunks)
      layer["cms_writes"] = np.stack([np.asarray(h) for h in hits])
    layers.append(layer)
  return {"chunk": c, "chunk_ends": chunk_ends,
          "logits_BLV": np.asarray(jnp.concatenate(logits, axis=1)), "layers": layers}


def health(model, tokens_BL) -> dict[str, float]:
  """The health metrics of spec §6 for every self-modifying layer, as plain floats.

  Replays the model (as `trace` does) over the longest prefix of `tokens_BL` that fills
  whole chunks, keeping only each layer's input, and reads each layer once with `inspect`.
  Per layer j (keys `health/layer{j}/...`):

    * `drift_w1`, `drift_w2`: the largest |W_run - W_0| of the layer's W1 (resp. W2) over its
      memories, heads and sequences at the end of the prefix. A calm memory stays within
      about the norm of its initial weights, which the retention decays away: W1 about
      0.8 and W2 about sqrt(E) (8 for the projection memories, 16 for the main memory at
      head_dim 64). At D=1024 the spec's init runs W1 away to over 1,000
      (docs/architecture.md, "Runaway fast weights").
    * `eta_mean`, `eta_max`: the inner learning rates chosen over the prefix (at most
      eta_max of the config).
    * `alpha_mean`, `alpha_min`: the retentions (without `use_alpha`: absent).

  Layers without a self-modifying memory (attention mixers) are left out, and so is
  everything when the prefix is shorter than one chunk: the result is then empty.
  """
  if not any(hasattr(b.mixer, "inspect") for b in model.blocks):
    return {}
  c = replay_chunk(model)
  tokens_BL = token_batch(tokens_BL, "health: tokens_BL")
  tokens_BL = jnp.asarray(tokens_BL[:, :tokens_BL.shape[1] // c * c])
  if tokens_BL.shape[1] == 0:
    return {}
  inputs = [[] for _ in model.blocks]
  for xs, _, _, _ in _replay(model, tokens_BL, c):
    for j, x in enumerate(xs):
      inputs[j].append(x)
  out = {}
  for j, got in enumerate(_inspect_layers(model, inputs)):
    if got is None:
      continue
    key = f"health/layer{j}/"
    for w in ("W1", "W2"):  # drift names are "<memory>/<W1|W2>", each [B, H].
      out[key + f"drift_{w.lower()}"] = float(max(
          np.max(d) for name, d in got["drift"].items() if name.endswith("/" + w)))
    eta = np.asarray(got["eta_BLH"])
    out[key + "eta_mean"], out[key + "eta_max"] = float(eta.mean()), float(eta.max())
    if model.blocks[j].mixer.cfg.use_alpha:
      alpha = np.asarray(got["alpha_BLH"])
      out[key + "alpha_mean"], out[key + "alpha_min"] = float(alpha.mean()), float(alpha.min())
  return out


def health_window(val_tokens: np.ndarray, length: int) -> np.ndarray:
  """`[1, length]`: the validation window the train loop's health lines read (its first)."""
  from hope_jax.data.sampler import eval_batches

  return np.asarray(next(eval_batches(val_tokens, 1, length, 1))[:, :length])


def by_layer(metrics: dict[str, float]) -> dict[int, dict[str, float]]:
  """`health`'s flat metrics as {layer: {"drift_w1": ..., ...}}, in layer order."""
  layers: dict[int, dict[str, float]] = {}
  for key, value in metrics.items():
    _, layer, name = key.split("/")
    layers.setdefault(int(layer.removeprefix("layer")), {})[name] = value
  return dict(sorted(layers.items()))


def runaway_layers(metrics: dict[str, float]) -> dict[int, float]:
  """{layer: W1 drift} of the layers in `health`'s metrics whose drift passes RUNAWAY_DRIFT."""
  return {j: float(m["drift_w1"]) for j, m in by_layer(metrics).items()
          if m.get("drift_w1", 0.0) > RUNAWAY_DRIFT}


def format_health(metrics: dict[str, float]) -> str:
  """`health` as one log line, e.g. "layer 0: drift W1 2.102 W2 11.03, eta 0.00951 (max ...".

  Drifts keep four significant digits, so a runaway shows as 1113, not 1.11e+03.
  """
  parts = []
  for layer, m in by_layer(metrics).items():
    text = (f"layer {layer}: drift W1 {m['drift_w1']:.4g} "
            f"W2 {m['drift_w2']:.4g}, eta {m['eta_mean']:.3g} (max {m['eta_max']:.3g})")
    if "alpha_min" in m:
      text += f", alpha {m['alpha_mean']:.3g} (min {m['alpha_min']:.3g})"
    parts.append(text)
  return " | ".join(parts)
