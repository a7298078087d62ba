"""Model FLOPs per token, the counting rule of hope-spec.md §8 (for MFU).

A FLOP is half a multiply-add. The forward count `F_fwd` of each block follows
§8 term by term; inner-loop work (reads, targets, inner gradients, closed-form
updates) is model work and is counted. A training step costs 3 F_fwd (the outer
backward taken as 2x the forward; rematerialisation is not counted). Under
`cms_signal="lm_grad"` the in-context CMS writes add one activation-gradient pass
over the model plus the CMS weight gradients, F_fwd + sum_layers F_cms; the paper
does not say how its CMS update ran, so `step_flops` reports the step both with
and without that term. The weight gradients count only for the levels whose writes a
later token reads: the loss's forward freezes a level with C_l at or past the (padded)
length and forms no gradient for it (`LanguageModel.forward_with_fast_state`).

Everything here is plain Python on a `ModelConfig`; nothing is traced.
"""

from __future__ import annotations

import dataclasses

from hope_jax.config import ModelConfig
from hope_jax.model.cms import has_fast_weights, level_widths
from hope_jax.model.titans import proj_memory_names
from hope_jax.ops.cms import frozen_levels


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs per token of one model (see module docstring)."""

  fwd_layer: float  # F_fwd of one block (mixer + feed-forward/CMS).
  fwd_model: float  # All blocks + the LM head (2 D V).
  cms_layer: float  # F_cms of one block (0 without CMS).
  train: float  # 3 fwd_model: forward, backward, no CMS-write term.
  train_with_cms_writes: float  # train + fwd_model + layers * cms_layer under lm_grad.


@dataclasses.dataclass(frozen=True)
class TitansFlops:
  """F_titans of §8 split by the kind of product that does the work."""

  static: float  # Projections, convolutions, gates: matmuls over all B x L tokens at once.
  phase_a: float  # The projection memories' inner loop (chunks of C_o), per-(sample, head).
  phase_b: float  # The main memory's inner loop (chunks of C_m), per-(sample, head).


def titans_fwd_parts(cfg: ModelConfig) -> TitansFlops:
  """F_titans of §8 by part (`titans_fwd` is their sum)."""
  d, h, e_p, e_m = cfg.hidden_size, cfg.num_heads, cfg.e_proj, cfg.e_mem
  names = proj_memory_names(cfg)
  p = len([n for n in names if n not in cfg.frozen_memories])
  p_frozen = len(names) - p
  upd = 18 if cfg.momentum else 10  # Closed-form update per D*E.
  cc = 6 if cfg.momentum else 4  # C x C terms of the update per H*C*E.
  cc_terms = lambda c: 2 * c * d + 5 * h * c * c  # A = K K^T, T, Gamma, (A*Gamma) T^T.
  n_static = (cfg.memory_input == "proj") + (not cfg.adaptive_q) + 2  # W_in, W_q, W_g, W_o.
  static = 2.0 * n_static * d * d
  # The convs the sublayer runs: on x~ and q before the memories (x~ alone with adaptive q),
  # or on the generated k, v and q after them.
  convs = 3 if cfg.conv_position == "post_memory" else 1 + (not cfg.adaptive_q)
  static += (2 * d * h if cfg.momentum else 0) + 2 * convs * cfg.conv_width * d  # beta, convs.
  if cfg.uses_static_projections:  # Titans-LMM: k, v, (q counted above) and eta/alpha maps.
    static += 2 * 2 * d * d + 2 * d * h * (1 + cfg.use_alpha)
  phase_a = p * (4 + 4 + 6 + upd) * d * e_p + 4 * d * p_frozen * e_p
  if p:
    phase_a += cc_terms(cfg.chunk_other) + cc * h * cfg.chunk_other * p * e_p
  v_hat = 4 if cfg.memory_target == "self" else 0
  phase_b = (4 + v_hat + 6 + upd) * d * e_m + cc_terms(cfg.chunk_mem)
  phase_b += cc * h * cfg.chunk_mem * e_m
  return TitansFlops(static=float(static), phase_a=float(phase_a), phase_b=float(phase_b))


def titans_fwd(cfg: ModelConfig) -> float:
  """F_titans of §8: the self-modifying Titans sublayer (or the Titans-LMM mixer)."""
  parts = titans_fwd_parts(cfg)
  return parts.static + parts.phase_a + parts.phase_b


def attention_fwd(cfg: ModelConfig, seq_len: int) -> float:
  """Causal attention with four D x D projections; scores averaged over positions."""
  d = cfg.hidden_size
  return 8.0 * d * d + 2.0 * seq_len * d


def cms_fwd(cfg: ModelConfig) -> float:
  """F_cms: SwiGLU levels of total width `cms_width` (3 matrices, 6 D F)."""
  return 6.0 * cfg.hidden_size * cfg.cms_width


def step_flops(cfg: ModelConfig, seq_len: int) -> StepFlops:
  """FLOPs per token of the forward pass and the train step of `cfg` at `seq_len`."""
  d = cfg.hidden_size
  mixer = attention_fwd(cfg, seq_len) if cfg.block in ("transformer_pp", "hope_attention") \
      else titans_fwd(cfg)
  uses_cms = cfg.block in ("hope", "hope_attention")
  cms = cms_fwd(cfg) if uses_cms else 0.0
  ffn = cms if uses_cms else 6.0 * d * cfg.ffn_width
  layer = mixer + ffn
  model = cfg.num_layers * layer + 2.0 * d * cfg.vocab_size
  train = 3.0 * model
  writes = 0.0
  if uses_cms and has_fast_weights(cfg):
    c1 = cfg.cms_chunks[0]
    frozen = frozen_levels(cfg.cms_chunks, -(-seq_len // c1) * c1, cfg.cms_variant)
    written = sum(f for i, f in enumerate(level_widths(cfg)) if i not in frozen)
    writes = model + cfg.num_layers * 6.0 * d * written
  return StepFlops(fwd_layer=layer, fwd_model=model, cms_layer=cms, train=train,
                   train_with_cms_writes=train + writes)
