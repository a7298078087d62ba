"""Table 6 ablation: HOPE w/o DGD: plain gradient descent with weight decay (spec §2.5).

Run:
  python -m hope_jax.train --config=experiments/ablations/no_dgd.py
"""

from experiments import hope


def get_config():
  cfg = hope.get_config()
  cfg.model.dgd_precond = "none"
  return cfg
