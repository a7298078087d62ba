"""Titans (LMM only) baseline: static k/v/eta/alpha projections, one MLP memory (spec §4).

Run:
  python -m hope_jax.train --config=experiments/titans_lmm.py

The block is x += SelfModTitans(norm x) with `static_projections` (implied by
block="titans_lmm"), memory_target="v", no DGD, momentum and forgetting on;
then x += SwiGLU(norm x). CPU-sized like experiments/base.py.
"""

from experiments import base


def get_config():
  cfg = base.get_config()
  m = cfg.model
  m.block = "titans_lmm"
  m.static_projections = True
  m.memory_target = "v"
  m.dgd_precond = "none"
  m.momentum = True
  m.use_alpha = True
  m.adaptive_q = False
  m.frozen_memories = ()
  m.chunk_other = 16
  m.chunk_mem = 32
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
