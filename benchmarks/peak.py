"""The machine's dense matmul throughput through JAX: the denominator of every MFU here.

Run:
  python benchmarks/peak.py [--sizes=1024,2048,4096] [--dtypes=float32,bfloat16]

`matmul_peak` is imported by the other benchmarks, so each states its results as a
fraction of a peak measured in the same process, minutes apart, under the same load;
`memory_bandwidth` reads how fast the device streams memory the same way.
The peak is the best of several square matmul sizes (a jitted chain of matmuls, so
dispatch and transfers are amortised), each timed for at least `min_seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

CHAIN = 8  # Matmuls per call: dispatch overhead is amortised over these.


def flops_rate(call, flops_per_call: float, min_seconds: float, group: int = 1) -> float:
  """FLOP/s of `call()` after one warm-up call, timed for at least `min_seconds`.

  Calls are dispatched `group` at a time and waited for at the end of each group, so with
  group > 1 JAX's asynchronous dispatch hides each call's overhead behind earlier work.
  """
  jax.block_until_ready(call())  # Compile and warm up.
  calls, start = 0, time.perf_counter()
  while True:
    for _ in range(group):
      out = call()
    jax.block_until_ready(out)
    calls += group
    secs = time.perf_counter() - start
    if secs >= min_seconds:
      return calls * flops_per_call / secs


def _time_one(n: int, dtype, min_seconds: float) -> float:
  """FLOP/s of an n x n x n matmul chain in `dtype` (float32 accumulation for bf16)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype) / n**0.5
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype) / n**0.5

  @jax.jit
  def chain(x):
    for _ in range(CHAIN):
      x = jnp.matmul(x, b, preferred_element_type=jnp.float32).astype(dtype)
    return x

  return flops_rate(lambda: chain(a), CHAIN * 2.0 * n**3, min_seconds)


def matmul_peak(dtype="float32", sizes=(1024, 2048), min_seconds: float = 1.0) -> dict:
  """{"flops_per_s", "best_size", "by_size"}: the best measured dense matmul rate."""
  dt = jnp.dtype(dtype)
  by_size = {n: _time_one(n, dt, min_seconds) for n in sizes}
  best = max(by_size, key=by_size.get)
  return {"dtype": str(dt), "flops_per_s": by_size[best], "best_size": best,
          "by_size": {str(n): v for n, v in by_size.items()}}


def memory_bandwidth(mib: int = 128, min_seconds: float = 1.0) -> float:
  """Bytes/s of a jitted elementwise add of two float32 arrays of `mib` MiB each.

  Each call reads both and writes the sum (3 x `mib` MiB), far more than any cache holds:
  the rate at which the device streams memory. A step made of many operations on arrays
  that the scans write and read back (a `hope` step on a CPU) slows with it where one made
  of large products (`transformer_pp`) keeps to the matmul peak.
  """
  n = mib * 2**20 // 4
  y = jnp.full((n,), 0.5, jnp.float32)
  # The sum overwrites its donated first operand, so no call allocates (and faults in) a
  # fresh output: the reading is the streaming rate, not the allocator's.
  add = jax.jit(lambda a, b: a + b, donate_argnums=0)
  x = [jnp.ones((n,), jnp.float32)]

  def call():
    x[0] = add(x[0], y)
    return x[0]

  return flops_rate(call, 3.0 * n * 4, min_seconds, group=4)


# Instruction-set features that set a CPU's matmul peak: the development machine has had bf16
# matrix units on some days and only AVX2 (an AMD EPYC) on others, and the float32 peak (and
# every MFU against it) differed by about 2x between them.
_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> str:
  """The host CPU's model name and matmul-relevant ISA features, e.g. 'AMD EPYC (avx2)'."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
          model = value.strip()
        elif key.strip() == "flags":  # After the model name; the first core says it all.
          flags = set(value.split())
          break
  except OSError:  # Not Linux: the model only.
    pass
  features = [f for f in _CPU_FEATURES if f in flags]
  return f"{model} ({', '.join(features)})" if features else model


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="512,1024,2048,4096")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--min_seconds", type=float, default=2.0)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  sizes = tuple(int(s) for s in args.sizes.split(","))
  rows = [matmul_peak(d, sizes, args.min_seconds) for d in args.dtypes.split(",")]
  print(f"Device: {jax.devices()[0]} ({os.cpu_count()} cores, {cpu_description()})\n")
  print("| dtype | " + " | ".join(f"n={n}" for n in sizes) + " | peak |")
  print("|---" * (len(sizes) + 2) + "|")
  for r in rows:
    cells = [f"{r['by_size'][str(n)] / 1e9:.1f}" for n in sizes]
    print(f"| {r['dtype']} | " + " | ".join(cells) + f" | **{r['flops_per_s'] / 1e9:.1f}** GFLOP/s |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
