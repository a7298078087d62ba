"""Run-to-run spread of the fresh parameters' gradient, per parameter.

Computes the gradient of the LM loss at a fresh `hope` state (train_mfu's preset and
`--set` overrides) `--repeats` times with one compiled program, once per matmul precision
in `--precisions`, and prints each parameter's gradient norm per repeat (largest first)
and the largest difference between the first and last repeat, relative to the largest
entry. Rows of train_mfu.py that only change how the step runs (XLA flags, unrolling)
should agree on the gradient; this shows how far one compiled program agrees with itself,
and running it in two processes shows how far two compilations do (docs/performance.md:
on an H100 at D=1024 and L=4096, three repeats agreed to 1e-8, while two train_mfu
processes of the same program gave fresh gradient norms of 75.8 and 164.7).

  python benchmarks/grad_spread.py --set=hidden_size=256 --length=512 --json=spread.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--set", action="append", default=[], help="model override key=value")
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--precisions", default="default,highest")
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.train_mfu import _parse_set, model_config, train_setup
  from hope_jax.train.step import make_eval_step

  t0 = time.perf_counter()
  cfg = model_config("hope", _parse_set(args.set))
  model_def, _, state = train_setup(cfg)
  params = state["params"]
  toks = jnp.asarray(np.random.default_rng(0).integers(
      0, cfg.vocab_size, (args.batch, args.length + 1), np.int32))
  print(f"{time.perf_counter() - t0:.1f} s init", flush=True)

  def norms(tree):  # Per parameter, in float32.
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32))))
            for k, v in leaves}

  loss_fn = make_eval_step(model_def)  # The train step's loss of (params, tokens_BL1).

  def grad_and_norms(p):
    loss, grads = jax.value_and_grad(loss_fn)(p, toks)
    return loss, norms(grads), grads

  out = {}
  for prec in args.precisions.split(","):
    start = time.perf_counter()
    # The precision applies where the dots are traced, so it must hold while lowering.
    with jax.default_matmul_precision(None if prec == "default" else prec):
      fn = jax.jit(grad_and_norms).lower(params).compile()
    print(f"{time.perf_counter() - t0:.1f} s: lowered and compiled ({prec}) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    runs, grads = [], []
    for _ in range(args.repeats):
      loss, n, g = fn(params)
      runs.append({"loss": float(loss), **{k: float(v) for k, v in n.items()}})
      grads.append(g)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)),
                        grads[0], grads[-1])
    diff = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(diff)[0]}
    total = [float(np.sqrt(sum(v * v for k, v in r.items() if k != "loss"))) for r in runs]
    print(f"\n{prec}: loss {[round(r['loss'], 6) for r in runs]}, gradient norm "
          f"{[round(t, 4) for t in total]}", flush=True)
    keys = sorted((k for k in runs[0] if k != "loss"), key=lambda k: -runs[0][k])
    print("| parameter | norm per repeat | max rel. diff first/last |\n|---|---|---|")
    for k in keys[:args.top]:
      print(f"| {k} | {', '.join(f'{r[k]:.4g}' for r in runs)} | {diff[k]:.2e} |", flush=True)
    out[prec] = {"runs": runs, "total": total, "max_rel_diff": diff}
    if args.json:  # After each precision: a run stopped by a time limit keeps what it has.
      with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
