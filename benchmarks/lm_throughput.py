"""Training and generation throughput of the LM blocks (issue 4's numbers).

Run:
  python benchmarks/lm_throughput.py [--steps=3] [--gen=1024,16384] [--models=hope,hope_static,...]
      [--set=key=value ...] [--json=benchmarks/lm_throughput.json]

Training: tokens/s of the real train step (`benchmarks/train_mfu.py:measure`, which also
reports MFU) at D=256, 4 layers, H=4, L=512, B=8 (float32; `--set` overrides model keys),
after one warm-up step.
Generation: greedy `decode_step` for N tokens at batch 1 as one jitted `lax.scan` (compile
excluded), and the bytes held by the recurrent cache (what a sequence keeps between
tokens). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import hope_jax  # noqa: E402
from benchmarks.peak import cpu_description  # noqa: E402
from benchmarks.train_mfu import MODELS, _parse_set, measure, model_config  # noqa: E402
from hope_jax.config import ModelConfig  # noqa: E402


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def generation(cfg: ModelConfig, n: int):
  """(tokens/s, cache bytes) for n greedy tokens after a 1-token prompt, batch 1."""
  model = hope_jax.build_model(cfg, seed=0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tok):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(1, max_len=n + 1)

    def body(carry, _):
      tok, cache = carry
      logits, cache = m.decode_step(tok, cache)
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return (tok, cache), tok

    (_, cache), toks = jax.lax.scan(body, (tok, cache), None, length=n)
    return toks, cache

  tok = jnp.zeros((1,), jnp.int32)
  compiled = run.lower(state, tok).compile()
  start = time.perf_counter()
  toks, cache = jax.block_until_ready(compiled(state, tok))
  secs = time.perf_counter() - start
  return n / secs, nbytes(cache)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--gen", default="1024,16384")
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--set", action="append", default=[],
                  help="model override key=value (JSON values), e.g. --set=num_layers=1")
  ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "lm_throughput.json"))
  args = ap.parse_args()
  overrides = _parse_set(args.set)
  gens = [int(g) for g in args.gen.split(",") if g]
  rows = []
  for name in args.models.split(","):
    cfg = model_config(name, overrides)
    row = {"model": name, "block": cfg.block,
           "cms_signal": cfg.cms_signal if cfg.block in ("hope", "hope_attention") else None}
    if not args.skip_train:
      # The real train step, as benchmarks/train_mfu.py times it (same model presets).
      row["train_tokens_per_s"] = measure(name, args.seq, args.batch, args.steps, overrides)[
          "tokens_per_s"]
    for n in gens:
      row[f"gen{n}_tokens_per_s"], row[f"gen{n}_cache_bytes"] = generation(cfg, n)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  # The sizes of the last row's config: COMMON and the overrides, shared by every row.
  meta = {"device": str(jax.devices()[0]), "cpu": cpu_description(), "cores": os.cpu_count(),
          "D": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads, "L": args.seq,
          "B": args.batch, "train_steps_timed": args.steps, "dtype": "float32",
          "overrides": overrides}
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)
  cols = ["train_tokens_per_s"] * (not args.skip_train) + [
      c for n in gens for c in (f"gen{n}_tokens_per_s", f"gen{n}_cache_bytes")]
  print(f"Device: {meta['device']} ({meta['cores']} cores, {meta['cpu']}), float32\n")
  print("| model | " + " | ".join(cols) + " |")
  print("|---" * (len(cols) + 1) + "|")
  for r in rows:
    cells = [f"{r[c] / 2**20:.2f} MiB" if c.endswith("bytes") else f"{r[c]:.1f}" for c in cols]
    print(f"| {r['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
