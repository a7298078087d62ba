"""Subprocess helper for checkpoint tests that must kill or starve a process.

  python tests/ckpt_worker.py save_big DIR MB     # commit step 1, start step 2, print SAVING, sleep
  python tests/ckpt_worker.py fsize_limit DIR     # commit a small step, then fail a big save
  python tests/ckpt_worker.py hold DIR            # hold the directory until killed
"""

import resource
import signal
import sys
import time

import jax
import jax.numpy as jnp
import optax

from experiments import tiny
from hope_jax.checkpoint import CheckpointError, CheckpointManager


def make_state(mb: float, seed: int = 0) -> dict:
  n = max(int(mb * 2**20 / 4 / 3 / 1024), 1)  # params + adam mu + nu, float32
  params = {"w": jax.random.normal(jax.random.key(seed), (n, 1024))}
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt_state)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(0),
          "rng": jax.random.key(seed)}


def config(directory: str):
  cfg = tiny.get_config()
  cfg.training.checkpoint_dir = directory
  cfg.training.save_every = 1
  cfg.training.resume_from = "latest"
  return cfg


def main(mode: str, directory: str, *rest: str) -> None:
  if mode == "save_big":
    mgr = CheckpointManager(config(directory))
    state = make_state(float(rest[0]))
    mgr.save(1, dict(state, step=jnp.int32(1)), {"step": 1})
    mgr.wait()
    mgr.save(2, dict(state, step=jnp.int32(2)), {"step": 2})
    print("SAVING", flush=True)
    time.sleep(60)
  elif mode == "fsize_limit":
    mgr = CheckpointManager(config(directory))
    mgr.save(1, make_state(0.01), {"step": 1})
    mgr.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes past the limit fail with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    try:
      mgr.save(2, dict(make_state(8.0), step=jnp.int32(2)), {"step": 2})
      mgr.close()
    except CheckpointError as e:
      print("ERROR", e, flush=True)
      sys.exit(3)
    print("NO ERROR", flush=True)
  elif mode == "hold":
    CheckpointManager(config(directory))
    print("HOLDING", flush=True)
    time.sleep(60)


if __name__ == "__main__":
  main(*sys.argv[1:])
