"""Table 6 ablation: HOPE w/o CMS: one static SwiGLU of the summed CMS width, parameter-matched (spec §4).

Run:
  python -m hope_jax.train --config=experiments/ablations/no_cms.py
"""

from experiments import base, hope


def get_config():
  cfg = hope.get_config()
  cfg.model.cms_ablate = "single_static"
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
