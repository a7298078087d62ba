"""Speed and memory of one self-modifying Titans sublayer (issue 3's numbers).

Run:
  python benchmarks/titans_sublayer.py                # B=8, L=2048, D=256, H=4; memory at L=4096
  python benchmarks/titans_sublayer.py --repeats=1 --out=titans_sublayer.json
  python benchmarks/titans_sublayer.py --read_mode=dual --impls=chunked --mem-length=0

Measures (1) forward+backward wall time of `impl='chunked'` vs `impl='reference'`
(token-sequential inside each chunk) and (2) the peak memory XLA plans for the
forward+backward program at L=4096 with and without `remat` (from the compiled
program's memory_analysis: arguments + outputs + temporaries). Prints a markdown
table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from hope_jax.config import ModelConfig
from hope_jax.model.titans import SelfModTitans


def build(cfg: ModelConfig, batch: int, length: int):
  """A jitted loss-and-grad of one sublayer, its parameters and inputs."""
  model = SelfModTitans(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  u = jax.random.normal(jax.random.PRNGKey(1), (batch, length, cfg.hidden_size), jnp.float32)
  proj = jax.random.normal(jax.random.PRNGKey(2), u.shape, jnp.float32)

  def loss(p, u):
    return jnp.sum(nnx.merge(graphdef, p)(u) * proj)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, u


def time_fwd_bwd(cfg, batch, length, repeats):
  fn, params, u = build(cfg, batch, length)
  t0 = time.perf_counter()
  compiled = fn.lower(params, u).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(params, u))  # Warm-up run.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, u))
    times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "step_s": min(times), "tokens_per_s": batch * length / min(times)}


def peak_bytes(cfg, batch, length):
  fn, params, u = build(cfg, batch, length)
  mem = fn.lower(params, u).compile().memory_analysis()
  if mem is None:
    return None
  return {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
          "temp": mem.temp_size_in_bytes,
          "peak": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=2048)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--mem-length", type=int, default=4096, help="0 skips the memory analysis")
  ap.add_argument("--read_mode", default="chunk_start", choices=("chunk_start", "dual"))
  ap.add_argument("--impls", default="chunked,reference", help="comma-separated impls to time")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default="titans_sublayer.json")
  args = ap.parse_args()

  base = ModelConfig(block="hope", hidden_size=args.hidden, num_heads=args.heads, num_layers=1,
                     chunk_other=16, chunk_mem=64, read_mode=args.read_mode)
  impls = tuple(args.impls.split(","))
  result = {"config": {"batch": args.batch, "length": args.length, "hidden": args.hidden,
                       "read_mode": args.read_mode,
                       "heads": args.heads, "chunk_other": base.chunk_other,
                       "chunk_mem": base.chunk_mem, "e_proj": base.e_proj, "e_mem": base.e_mem},
            "device": f"{jax.devices()[0].device_kind} ({platform.processor() or 'cpu'}, "
                      f"{jax.device_count()} device)", "speed": {}, "memory": {}}
  for impl in impls:
    cfg = dataclasses.replace(base, impl=impl)
    result["speed"][impl] = time_fwd_bwd(cfg, args.batch, args.length, args.repeats)
    print(impl, result["speed"][impl], flush=True)
  speedup = None
  if {"chunked", "reference"} <= set(impls):
    speedup = result["speed"]["reference"]["step_s"] / result["speed"]["chunked"]["step_s"]
    result["speed"]["speedup"] = speedup
  for remat in (True, False) if args.mem_length else ():
    cfg = dataclasses.replace(base, remat=remat)
    result["memory"][f"remat={remat}"] = peak_bytes(cfg, args.batch, args.mem_length)
    print(f"remat={remat}", result["memory"][f"remat={remat}"], flush=True)

  print(f"\n### Self-modifying Titans sublayer, B={args.batch}, D={args.hidden}, H={args.heads}, "
        f"C_o={base.chunk_other}, C_m={base.chunk_mem}, read_mode={args.read_mode} "
        f"({result['device']})\n")
  print(f"| impl (L={args.length}) | fwd+bwd step [s] | tokens/s | compile [s] |")
  print("|---|---|---|---|")
  for impl in impls:
    r = result["speed"][impl]
    print(f"| {impl} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['compile_s']:.1f} |")
  if speedup is not None:
    print(f"\nchunked speed-up over reference: **{speedup:.1f}x**\n")
  if result["memory"]:
    print(f"| remat (L={args.mem_length}) | planned peak [MiB] | temporaries [MiB] |")
    print("|---|---|---|")
    for key, r in result["memory"].items():
      if r:
        print(f"| {key.split('=')[1]} | {r['peak'] / 2**20:.0f} | {r['temp'] / 2**20:.0f} |")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
