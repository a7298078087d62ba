"""Table 6 ablation: HOPE w/o inner-q: q from an adaptive memory M_q that is never written in context.

HOPE's default (adaptive_q=False, spec §0) already has a static q, i.e. it is Table 6's
"w/o inner-q" row in spirit; this file instead keeps the q memory (adaptive_q=True) and
freezes it, the literal reading of the row.

Run:
  python -m hope_jax.train --config=experiments/ablations/no_inner_q.py
"""

from experiments import base, hope


def get_config():
  cfg = hope.get_config()
  cfg.model.adaptive_q = True
  cfg.model.frozen_memories = ("q",)
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
