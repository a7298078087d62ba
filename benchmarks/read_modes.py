"""Main-memory reads at the chunk start vs in dual form, at C_m = 16 and 64 (issue 11).

Run (from the repository root):
  python benchmarks/read_modes.py [--steps=400] [--chunk_mems=16,64]
      [--read_modes=chunk_start,dual] [--workdir=DIR] [--json=FILE] [--tiny]

Every run is `experiments/base.py` (HOPE, D=128, 2 layers, AdamW 3e-3, default corpus)
with the same seed, data order and token budget, changed only in:
  data.seq_len=256, training.batch_size=4  (the base's 1,024 tokens per step), and
  model.cms_chunks=(64, 128, 256)          (C_1 must be a multiple of C_m = 64; every level
                                            then writes inside a 256-token sequence),
plus the two settings compared, `model.read_mode` and `model.chunk_mem`. The parameter
count does not depend on either. Each run is scored on every validation window
(`hope_jax.train.evaluation.score`). Prints a markdown table and writes JSON; the
tokens/s column is the training loop's own average, so runs sharing the machine
with other work read low (docs/results.md states the conditions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make(read_mode: str, chunk_mem: int, steps: int, tiny: bool = False):
  """The base config with one read mode and main-memory chunk (see the module docstring)."""
  from experiments import base

  cfg = base.get_config()
  m, d, t = cfg.model, cfg.data, cfg.training
  m.read_mode, m.chunk_mem = read_mode, chunk_mem
  m.cms_chunks = (64, 128, 256)
  d.seq_len, t.batch_size = 256, 4
  t.num_steps, t.warmup_steps = steps, min(t.warmup_steps, steps)
  t.eval_every = t.save_every = 10**9  # Scored once at the end, on every window.
  t.progress_bar = False
  t.resume_from = None
  if tiny:  # Seconds-fast plumbing check; the numbers mean nothing.
    m.hidden_size, m.num_layers, m.num_heads = 32, 1, 2
    m.chunk_other, m.cms_chunks = 4, (chunk_mem, 2 * chunk_mem)
    d.seq_len, t.batch_size, t.log_every = 2 * chunk_mem, 2, 1
  return cfg


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--chunk_mems", default="16,64")
  ap.add_argument("--read_modes", default="chunk_start,dual")
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--json", default=None)
  ap.add_argument("--max_windows", type=int, default=None)
  ap.add_argument("--tiny", action="store_true")
  args = ap.parse_args()
  from absl import logging

  from benchmarks.compare import run_one

  logging.set_verbosity(logging.INFO)
  workdir = args.workdir or tempfile.mkdtemp(prefix="hope_jax_read_modes_")
  rows = []
  for chunk_mem in (int(c) for c in args.chunk_mems.split(",")):
    for mode in args.read_modes.split(","):
      cfg = make(mode, chunk_mem, args.steps, args.tiny)
      start = time.perf_counter()
      res = run_one(cfg, os.path.join(workdir, f"{mode}_cm{chunk_mem}"), args.max_windows)
      res.update(read_mode=mode, chunk_mem=chunk_mem, wall_s=time.perf_counter() - start,
                 tokens_per_s=res["train_tokens"] / max(res["train_seconds"], 1e-9))
      rows.append(res)
      print(json.dumps(res), file=sys.stderr, flush=True)
  print("| read_mode | C_m | params | train tokens | val bits/byte | val loss | "
        "train tokens/s | wall (s) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    met = r["metrics"]
    print(f"| {r['read_mode']} | {r['chunk_mem']} | {r['params']:,} | {r['train_tokens']:,} | "
          f"{met['eval/bits_per_byte']:.3f} | {met['eval/loss']:.4f} | "
          f"{r['tokens_per_s']:.0f} | {r['wall_s']:.0f} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
