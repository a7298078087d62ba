"""Checkpoint I/O on this machine: loop blocked by an async save, commit, restore, disk bytes.

  python benchmarks/checkpoint_io.py [--sizes 10,100] [--repeats 2] [--json out.json]

A state is random float32 params plus AdamW moments (so 3x the params), saved
through `hope_jax.checkpoint.CheckpointManager` exactly as training does
(checksums included). Prints a markdown table and writes JSON.
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from experiments import tiny
from hope_jax import checkpoint as ck


def make_state(millions: float) -> dict:
  n_rows = int(millions * 1e6 / 1024)
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(keys[0], (n_rows, 1024))}
  opt_state = optax.adamw(1e-3).init(params)
  # Random moments: constant ones compress ~3x and would flatter the disk numbers.
  opt_state = jax.tree.map(lambda x: jax.random.normal(keys[1], x.shape, x.dtype)
                           if x.dtype == jnp.float32 and x.ndim else x, opt_state)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(0), "rng": keys[2]}


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench(millions: float, repeats: int, root: str) -> dict:
  state = jax.block_until_ready(make_state(millions))
  n_params = ck.manager.store.count_params(state["params"])
  cfg = tiny.get_config()
  cfg.training.checkpoint_dir = os.path.join(root, f"{millions}M")
  cfg.training.resume_from = "latest"
  blocked, commit, restore, disk = [], [], [], 0
  mgr = ck.CheckpointManager(cfg)
  abstract = jax.eval_shape(lambda: state)
  for i in range(1, repeats + 1):
    t0 = time.perf_counter()
    mgr.save(i, dict(state, step=jnp.int32(i)), {"step": i}, force=True)
    t1 = time.perf_counter()
    mgr.wait()
    t2 = time.perf_counter()
    blocked.append(t1 - t0)
    commit.append(t2 - t0)
    disk = du(os.path.join(cfg.training.checkpoint_dir, f"checkpoint_step_{i}"))
  mgr.close()
  for _ in range(repeats):
    path = ck.list_checkpoints(cfg.training.checkpoint_dir)[-1].manifest_path
    t0 = time.perf_counter()
    r = ck.restore(path, abstract_state=abstract)
    jax.block_until_ready(r.params)
    restore.append(time.perf_counter() - t0)
  shutil.rmtree(cfg.training.checkpoint_dir)
  return {"params_millions": n_params / 1e6, "state_bytes": 3 * n_params * 4,
          "save_blocks_s": statistics.median(blocked), "save_to_commit_s": statistics.median(commit),
          "restore_s": statistics.median(restore), "disk_bytes": disk,
          "disk_over_params_x4": disk / (n_params * 4), "repeats": repeats}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="10,100", help="parameter counts, in millions")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--json", default="benchmarks/checkpoint_io.json")
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix="ckpt_bench_", dir=".")
  try:
    rows = [bench(float(s), args.repeats, root) for s in args.sizes.split(",")]
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"device: {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; median of "
        f"{args.repeats}\n")
  print("| params | state (params+AdamW) | loop blocked by save | save to commit | restore "
        "| on disk | disk / (params x 4) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['params_millions']:.1f}M | {r['state_bytes'] / 2**20:.0f} MiB | "
          f"{r['save_blocks_s']:.2f} s | {r['save_to_commit_s']:.2f} s | {r['restore_s']:.2f} s | "
          f"{r['disk_bytes'] / 2**20:.0f} MiB | {r['disk_over_params_x4']:.2f} |")
  with open(args.json, "w") as f:
    json.dump({"device": jax.devices()[0].platform, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
