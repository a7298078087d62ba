"""Titans (LMM only) in the comparison: static k/v/eta/alpha projections, target v, no DGD.

Run alone:
  python -m hope_jax.train --config=experiments/compare/titans_lmm.py
"""

from experiments import base, compare

# The Titans-LMM preset of spec §9 (Baselines).
OVERRIDES = {"static_projections": True, "memory_target": "v", "dgd_precond": "none",
             "momentum": True}


def get_config(tiny: bool = False):
  cfg = compare.make("titans_lmm", OVERRIDES, tiny)
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)  # compare.py sets its own.
  return cfg
