"""HOPE in the comparison: self-modifying Titans + CMS with in-context lm_grad writes.

Run alone:
  python -m hope_jax.train --config=experiments/compare/hope.py
"""

from experiments import compare

OVERRIDES = {"cms_signal": "lm_grad", "cms_lr": 1e-4}


def get_config(tiny: bool = False):
  return compare.make("hope", OVERRIDES, tiny)
