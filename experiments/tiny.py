"""A seconds-fast variant for tests and smoke runs.

Run:
  python -m hope_jax.train --config=experiments/tiny.py
"""

from experiments import base


def get_config():
  cfg = base.get_config()
  # The loop, checkpoint and CLI tests exercise the machinery, so they use the fastest block;
  # HOPE, Titans and CMS have their own tests (override with --config.model.block=hope).
  cfg.model.block = "transformer_pp"
  cfg.model.hidden_size = 32
  cfg.model.num_layers = 1
  cfg.model.num_heads = 2
  cfg.model.chunk_other = 4
  cfg.model.chunk_mem = 8
  cfg.model.cms_chunks = (8, 16)
  cfg.training.batch_size = 4
  cfg.training.num_steps = 30
  cfg.training.warmup_steps = 5
  cfg.training.learning_rate = 1e-2
  cfg.training.log_every = 10
  cfg.training.eval_every = 15
  cfg.training.eval_batches = 2
  cfg.training.save_every = 10
  cfg.data.seq_len = 32
  cfg.training.checkpoint_dir = base.own_checkpoint_dir(__file__)
  return cfg
