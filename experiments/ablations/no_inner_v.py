"""Table 6 ablation: HOPE w/o inner-v: M_v is never written in context, stays at its meta-init (spec §2.3).

Run:
  python -m hope_jax.train --config=experiments/ablations/no_inner_v.py
"""

from experiments import base, hope


def get_config():
  cfg = hope.get_config()
  cfg.model.frozen_memories = ("v",)
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
