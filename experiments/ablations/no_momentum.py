"""Table 6 ablation: HOPE w/o momentum: beta = 0, no momentum buffers (spec §2.6).

Run:
  python -m hope_jax.train --config=experiments/ablations/no_momentum.py
"""

from experiments import base, hope


def get_config():
  cfg = hope.get_config()
  cfg.model.momentum = False
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
