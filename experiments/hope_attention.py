"""HOPE-Attention (spec §4): softmax attention with RoPE, then a lm_grad CMS; CPU-sized.

Run:
  python -m hope_jax.train --config=experiments/hope_attention.py
"""

from experiments import base


def get_config():
  cfg = base.get_config()
  cfg.model.block = "hope_attention"
  cfg.model.cms_signal = "lm_grad"
  cfg.model.cms_chunks = (32, 64, 128)
  cfg.model.cms_lr = 1e-4
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
