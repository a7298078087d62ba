"""HOPE at D=1024 for one GPU: the size where the spec's init runs the memories away.

At D=1024 the spec's W_in init (std 0.02) makes the self-modifying memories' fast weights
run away within a few hundred tokens (docs/architecture.md, "Runaway fast weights"); the
`health` lines after each evaluation show it. On the default corpus half that std runs away
too (it is calm only on random tokens); a quarter of it, 0.005, keeps the fresh model calm.
Check an init before a run, then compare:

Run:
  python -m hope_jax.check_init --config=experiments/gpu_d1024.py --stds=0.02,0.01,0.005
  python -m hope_jax.train --config=experiments/gpu_d1024.py
  python -m hope_jax.train --config=experiments/gpu_d1024.py \\
      --config.model.memory_input_std=0.005 --config.training.checkpoint_dir=./checkpoints/gpu_d1024_calm

The model follows the spec's defaults (hope-spec.md §6 and §9) rather than the CPU-sized
base run's choices: C_m=64 with chunk-start reads, CMS chunks (64, 256, 1024, 4096), the
outer loop's learning rate 4e-4, bf16 outer matmuls with float32 inner state, and the layer
scan (one block compiled, not four).
"""

from experiments import base


def get_config():
  cfg = base.get_config()
  m = cfg.model
  m.block = "hope"
  m.hidden_size = 1024
  m.num_heads = 16
  m.num_layers = 4
  m.chunk_mem = 64
  m.read_mode = "chunk_start"
  m.cms_chunks = (64, 256, 1024, 4096)
  m.dtype = "bfloat16"
  m.scan_layers = True
  t = cfg.training
  t.batch_size = 4
  t.learning_rate = 4e-4
  t.warmup_steps = 100
  t.num_steps = 2000
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 4
  t.save_every = 200
  t.checkpoint_dir = "./checkpoints/gpu_d1024"
  cfg.data.seq_len = 2048
  return cfg
