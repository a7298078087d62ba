"""Table 6 ablation: HOPE w/o DGD: plain gradient descent with weight decay (spec §2.5).

Run:
  python -m hope_jax.train --config=experiments/ablations/no_dgd.py
"""

from experiments import base, hope


def get_config():
  cfg = hope.get_config()
  cfg.model.dgd_precond = "none"
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
