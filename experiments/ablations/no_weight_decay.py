"""Table 6 ablation: HOPE w/o weight decay: alpha = 1, M_alpha dropped (spec §2.5).

Run:
  python -m hope_jax.train --config=experiments/ablations/no_weight_decay.py
"""

from experiments import base, hope


def get_config():
  cfg = hope.get_config()
  cfg.model.use_alpha = False
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
