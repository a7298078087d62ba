"""Time to create a fresh train state: jitted, as the train loop does it, and the alternatives.

Run (from the repository root):
  python benchmarks/init_time.py                      # hope at D=256, 4 layers (the CPU size)
  python benchmarks/init_time.py --set=hidden_size=1024 --set=num_layers=12 --set=num_heads=16
  options: --modes=jit,jit_kernel,eager --model=hope --set key=value (repeatable)
           --timeout=SECONDS (per row) --json=FILE

Modes, each in its own subprocess (a fresh JAX, so nothing is cached between them):
  jit         `jax.jit(init_fn)()`, what the train loop ran before it used `jit_kernel`
              (and still runs on a mesh of several devices);
  jit_kernel  the same inside `sharding.threefry_gpu_kernel()`, as `Placement.init_state`
              runs it on one device: on a GPU the threefry random bits come from one kernel
              instead of its rounds unrolled into the program (the option does nothing
              elsewhere);
  eager       `init_fn()` op by op (what `benchmarks/train_mfu.py` does).

Per row: the time to lower, compile and run (jit) or just run (eager), and a checksum of the
parameters (the float64 sum of squares of every leaf), so rows that create the same numbers
show the same value. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.child import emit, run_row  # noqa: E402
from benchmarks.train_mfu import _parse_set, model_and_optimizer, model_config  # noqa: E402

MODES = ("jit", "jit_kernel", "eager")


def measure(model: str, mode: str, overrides: dict) -> dict:
  """Runs in the child: creates the train state once in `mode` and times its stages."""
  import jax
  import numpy as np

  from hope_jax.train.sharding import threefry_gpu_kernel
  from hope_jax.train.state import make_init_fn, param_count

  init_fn = make_init_fn(*model_and_optimizer(model_config(model, overrides)), 0)
  row = {"model": model, "mode": mode, "backend": jax.default_backend()}
  t0 = time.perf_counter()
  if mode == "eager":
    state = jax.block_until_ready(init_fn())
  else:
    with threefry_gpu_kernel() if mode == "jit_kernel" else contextlib.nullcontext():
      lowered = jax.jit(init_fn).lower()
      t1 = time.perf_counter()
      compiled = lowered.compile()
    t2 = time.perf_counter()
    row.update(lower_s=t1 - t0, compile_s=t2 - t1)
    state = jax.block_until_ready(compiled())
  row["total_s"] = time.perf_counter() - t0
  row["params"] = param_count(state["params"])
  row["checksum"] = float(sum(np.sum(np.square(np.asarray(x, np.float64)))
                              for x in jax.tree.leaves(state["params"])))
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="hope")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--set", action="append", default=[], help="model override key=value")
  p.add_argument("--timeout", type=float, default=600.0)
  p.add_argument("--json", default=None)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  overrides = _parse_set(args.set)
  if args.child:
    emit(measure(args.model, args.child, overrides))
    return
  modes = args.modes.split(",")
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    p.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
  rows = []
  for mode in modes:
    cmd = [sys.executable, os.path.abspath(__file__), f"--model={args.model}", f"--child={mode}",
           *[f"--set={s}" for s in args.set]]
    rows.append({"model": args.model, "mode": mode, **run_row(cmd, args.timeout)})

  def fmt(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"

  print(f"\nFresh train state of `{args.model}` ({', '.join(args.set) or 'benchmark size'})\n")
  print("| mode | backend | lower (s) | compile (s) | total (s) | parameters | checksum |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['mode']} | error: {r['error']} |")
      continue
    print(f"| {r['mode']} | {r['backend']} | {fmt(r, 'lower_s')} | {fmt(r, 'compile_s')} | "
          f"{r['total_s']:.1f} | {r['params']:,} | {r['checksum']:.9g} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
