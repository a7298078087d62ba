"""HOPE (self-modifying Titans + CMS with in-context lm_grad writes), CPU-sized.

The base for the Table 6 ablations in experiments/ablations/.

Run:
  python -m hope_jax.train --config=experiments/hope.py
"""

from experiments import base


def get_config():
  cfg = base.get_config()
  cfg.model.block = "hope"
  cfg.model.cms_signal = "lm_grad"
  cfg.model.cms_chunks = (32, 64, 128)  # C_1 is a multiple of chunk_other and chunk_mem (16).
  cfg.model.cms_lr = 1e-4
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
