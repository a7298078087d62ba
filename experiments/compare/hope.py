"""HOPE in the comparison: self-modifying Titans + CMS with in-context lm_grad writes.

Run alone:
  python -m hope_jax.train --config=experiments/compare/hope.py
"""

from experiments import base, compare

OVERRIDES = {"cms_signal": "lm_grad", "cms_lr": 1e-4}


def get_config(tiny: bool = False):
  cfg = compare.make("hope", OVERRIDES, tiny)
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)  # compare.py sets its own.
  return cfg
