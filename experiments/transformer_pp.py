"""Transformer++ baseline (pre-RMSNorm, RoPE MHA, SwiGLU FFN of width 8D/3), CPU-sized.

Run:
  python -m hope_jax.train --config=experiments/transformer_pp.py
"""

from experiments import base


def get_config():
  cfg = base.get_config()
  cfg.model.block = "transformer_pp"
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
