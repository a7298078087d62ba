"""Transformer++ in the comparison (see experiments/compare/__init__.py).

Run alone:
  python -m hope_jax.train --config=experiments/compare/transformer_pp.py
"""

from experiments import compare

OVERRIDES = {}


def get_config(tiny: bool = False):
  return compare.make("transformer_pp", OVERRIDES, tiny)
