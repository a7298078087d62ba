"""Transformer++ in the comparison (see experiments/compare/__init__.py).

Run alone:
  python -m hope_jax.train --config=experiments/compare/transformer_pp.py
"""

from experiments import base, compare

OVERRIDES = {}


def get_config(tiny: bool = False):
  cfg = compare.make("transformer_pp", OVERRIDES, tiny)
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)  # compare.py sets its own.
  return cfg
