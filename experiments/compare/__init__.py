"""HOPE vs Titans-LMM vs Transformer++ at equal parameters and equal training tokens.

Run (prints validation bits per byte and MQAR accuracy side by side):
  python benchmarks/compare.py                # the full setting (see docs/results.md)
  python benchmarks/compare.py --tiny         # seconds per model; what the tests run

Each model file here (`hope.py`, `titans_lmm.py`, `transformer_pp.py`) is also an
ordinary experiment config for `python -m hope_jax.train --config=...`. This
module holds what they share: one training budget, sizes matched by parameter
count. `make(block, overrides)` starts from experiments/base.py, applies the
model's own settings, then picks `model.hidden_size` (a multiple of 2 * num_heads)
so that the parameter count is as close as possible to `TARGET_PARAMS`. Every
model sees the same batches: same batch size, sequence length, steps and data seed.
"""


from __future__ import annotations

from ml_collections import config_dict

from experiments import base

TARGET_PARAMS = 2_000_000  # "A few million": what 2 CPU cores train in minutes.
TINY_TARGET_PARAMS = 40_000

# The memory task: 16 key-value pairs, then all 16 keys asked back 65 tokens later.
MQAR = {"data_type": "mqar", "mqar_pairs": 16, "mqar_queries": None, "mqar_gap": None,
        "task_train_examples": 8192, "task_val_examples": 256}
TINY_MQAR = {"data_type": "mqar", "mqar_pairs": 4, "mqar_queries": None, "mqar_gap": None,
             "task_train_examples": 64, "task_val_examples": 8}


def param_count(model_cfg) -> int:
  """Parameters of the model a config describes (shapes only, nothing is computed)."""
  import jax

  from hope_jax.config import ModelConfig
  from hope_jax.train.state import ModelDef

  params = ModelDef(ModelConfig.from_config(model_cfg)).abstract_params()
  return int(sum(x.size for x in jax.tree.leaves(params)))


def size_to(cfg: config_dict.ConfigDict, target: int) -> int:
  """Sets `cfg.model.hidden_size` to the multiple of 2*num_heads nearest `target` params.

  (2*num_heads keeps the head size even, as RoPE needs.)
  """
  unit = 2 * cfg.model.num_heads
  counts: dict[int, int] = {}

  def count(h: int) -> int:
    if h not in counts:
      cfg.model.hidden_size = h
      counts[h] = param_count(cfg.model)
    return counts[h]

  lo, hi = unit, unit
  while count(hi) < target:  # Parameters grow with the width: double, then bisect.
    lo, hi = hi, hi * 2
  while hi - lo > unit:
    mid = (lo + hi) // 2 // unit * unit
    lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
  best = min((lo, hi), key=lambda h: abs(count(h) - target))
  cfg.model.hidden_size = best
  return counts[best]


def make(block: str, overrides: dict, tiny: bool = False) -> config_dict.ConfigDict:
  """The comparison config of one model on the default corpus."""
  cfg = base.get_config()
  cfg.model.block = block
  for key, value in overrides.items():
    cfg.model[key] = value
  t, d = cfg.training, cfg.data
  cfg.model.num_layers = 4
  cfg.model.num_heads = 4
  d.seq_len = 128
  cfg.model.chunk_other, cfg.model.chunk_mem = 16, 16  # As experiments/base.py.
  cfg.model.cms_chunks = (32, 64, 128)
  t.batch_size = 8
  t.num_steps = 400  # 400 x 8 x 128 = 409,600 training tokens per model and data set.
  t.warmup_steps = 50
  t.eval_every = 10**9  # Scored once at the end, by the comparison itself.
  t.save_every = 10**9
  t.log_every = 50
  t.progress_bar = False
  target = TARGET_PARAMS
  if tiny:
    cfg.model.num_layers = 1
    cfg.model.num_heads = 2
    d.seq_len = 32
    cfg.model.chunk_other, cfg.model.chunk_mem = 4, 8
    cfg.model.cms_chunks = (8, 16)
    t.batch_size, t.num_steps, t.warmup_steps, t.log_every = 2, 3, 1, 1
    target = TINY_TARGET_PARAMS
  size_to(cfg, target)
  return cfg


def with_task(cfg: config_dict.ConfigDict, tiny: bool = False) -> config_dict.ConfigDict:
  """The same model and budget on the memory task."""
  cfg = config_dict.ConfigDict(cfg.to_dict())
  for key, value in (TINY_MQAR if tiny else MQAR).items():
    cfg.data[key] = value
  return cfg
