"""Train-step throughput, MFU, compile time and peak memory of the LM blocks (issue 7).

Run (from the repository root):
  python benchmarks/train_mfu.py                         # the five models at D=256, 4 layers,
                                                         # H=4, L=512, B=8, float32
  python benchmarks/train_mfu.py --models=hope,transformer_pp --lengths=512,2048,8192
                                                         # scaling with length
  options: --steps=N --tokens_per_step=N --batch=N --set key=value (model overrides,
           repeatable) --json=FILE --dtype=bfloat16 (compute dtype of the outer matmuls)
           --peak_sizes=1024 (matmul sizes of the peak; a GPU needs 4096 or 8192)
           --bandwidth_mib=128 (array size of the memory-bandwidth reading)
           --peak_seconds=1.0 (timing of each peak reading; the bandwidth's takes half)
           --timeout=SECONDS (per row)
           --devices=N (data parallel; on a CPU, N host devices: 2 suits a 2-core machine)
           --repeat=N (N rounds of all rows, alternated, then each row's median step and the
           first model's median step over every other model's, e.g. the issue's
           `--models=hope,transformer_pp --lengths=2048 --devices=2 --repeat=6`)

Every row runs in its own subprocess (so its peak RSS is its own) and times the real
train step (`hope_jax.train.step.make_train_step` with the AdamW chain of
`make_optimizer`, jitted with the state donated, as the train loop does) on random
tokens. In that same process, before and after the timed steps, it measures the dense
matmul peak (`benchmarks/peak.py`), so MFU is stated against this machine under this load;
the higher of the compute dtype's two readings is the denominator (a reading taken while a shared host was
slow would overstate the MFU), and the row names the CPU model and its matmul ISA features:

  MFU = tokens/s x FLOPs per token / peak,  FLOPs per token from `hope_jax.flops`
  (hope-spec.md §8). Two MFUs for in-context CMS writes: without and with the write term.
  The peak is that of the compute dtype (`--dtype`); the float32 MFU is kept as well.

Before and after the timed steps the row also reads the device's memory bandwidth
(`peak.memory_bandwidth`): on a shared host a step of many memory-bound operations (`hope`)
slows with it where one of large products (`transformer_pp`) does not, so a slow row can be
told from a slow machine.

Also per row: compile time of the step (lower + compile), and the number of backend
compiles seen while the timed steps ran (0 proves that steps never recompile).
The rows run as `python -m hope_jax.train` does: with glibc's huge-page tunable where the
training CLI restarts itself with it (`hope_jax.train.hugepages`; `HOPE_JAX_HUGE_PAGES=0`
turns it off for both); each row records whether it was on (`huge_pages`).
At length L the batch is max(1, tokens_per_step // L), so every length sees about the
same tokens per step. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.child import emit, run_row  # noqa: E402
from hope_jax.train import hugepages  # noqa: E402

COMMON = dict(hidden_size=256, num_layers=4, num_heads=4, vocab_size=256)
MODELS = {  # The spec's default config per block (hope-spec.md §9), at the size above.
    "hope": dict(block="hope"),
    "hope_static": dict(block="hope", cms_signal="static"),
    "titans_lmm": dict(block="titans_lmm", memory_target="v", dgd_precond="none"),
    "hope_attention": dict(block="hope_attention"),
    "transformer_pp": dict(block="transformer_pp"),
}


def _parse_set(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def _device_peak_bytes(jax) -> int | None:
  """Peak bytes the accelerator's allocator has held (None on CPU, which has no such stat)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def model_config(model: str, overrides: dict):
  """The validated `ModelConfig` of a preset in MODELS at the benchmark size, with overrides."""
  from hope_jax.config import ModelConfig

  kw = {**COMMON, **MODELS[model], **overrides}
  if "cms_chunks" in kw:
    kw["cms_chunks"] = tuple(kw["cms_chunks"])
  cfg = ModelConfig(**kw)
  cfg.validate()
  return cfg


def model_and_optimizer(cfg):
  """(model_def, tx): the model of `cfg` and the base run's AdamW chain and schedule."""
  from experiments import base
  from hope_jax.train.optimizer import make_optimizer
  from hope_jax.train.state import ModelDef

  return ModelDef(cfg), make_optimizer(base.get_config().training)


def train_setup(cfg):
  """(model_def, tx, state): `model_and_optimizer` and a fresh train state.

  The init is eager: each layer's initialisers then reuse the per-shape op cache. A jitted
  init compiles every layer's RNG ops anew: for D=1024 and 12 layers 23 s against 5 s on the
  2-core CPU, and on an H100 18.6 s against 6.0 s even with the threefry kernel the train
  loop uses (`benchmarks/init_time.py`).
  """
  from hope_jax.train.state import init_train_state

  model_def, tx = model_and_optimizer(cfg)
  return model_def, tx, init_train_state(model_def, tx, 0)


def placed_train_step(cfg, batch: int, length: int, devices: int = 1, n_batches: int = 1):
  """(state, step, batches) as the train loop places them on the first `devices` devices.

  A fresh state (`train_setup`), sharded over a data-parallel mesh when `devices` > 1; the
  train step jitted with the state donated (`Placement.jit_train_step`); and `n_batches`
  batches of random tokens `[batch, length + 1]` (a fixed seed), placed as the loop's are.
  """
  import jax
  import numpy as np

  from hope_jax.train.sharding import Placement
  from hope_jax.train.step import make_train_step

  placement = Placement({"data": devices, "fsdp": 1}, batch, jax.devices()[:devices])
  # The Titans scans' unroll as training picks it for these devices.
  model_def, tx, state = train_setup(placement.resolve_schedule(cfg))
  abstract = jax.eval_shape(lambda: state)
  if not placement.single:
    state = jax.device_put(state, placement.shardings(abstract))
  step = placement.jit_train_step(make_train_step(model_def, tx), abstract)
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, cfg.vocab_size, (batch, length + 1), np.int32)
          for _ in range(n_batches)]
  batches = [jax.device_put(placement.put_batch(lambda a, z, r=r: r[a:z], r.shape))
             for r in rows]
  return state, step, batches


def measure(model: str, length: int, batch: int, steps: int, overrides: dict,
            peak_sizes: tuple[int, ...] = (1024,), devices: int = 1,
            bandwidth_mib: int = 128, peak_seconds: float = 1.0) -> dict:
  """Runs in the child: peak, compile, warm-up, then `steps` timed train steps.

  With `devices` > 1 the step runs data parallel over that many devices (on a CPU, host
  devices: the parent sets `JAX_NUM_CPU_DEVICES`), as the train loop
  runs it under `training.mesh.data`.
  """
  sys.path.insert(0, REPO)
  import jax

  from benchmarks.peak import cpu_description, matmul_peak, memory_bandwidth
  from hope_jax import flops
  from hope_jax.train.state import param_count

  t0 = time.perf_counter()
  log = lambda what: print(f"[{model} L={length} B={batch}] {time.perf_counter() - t0:7.1f} s "
                           f"{what}", file=sys.stderr, flush=True)
  cfg = model_config(model, overrides)
  read_peak = lambda dtype: matmul_peak(dtype, sizes=peak_sizes,
                                       min_seconds=peak_seconds)["flops_per_s"]
  readings = {d: [read_peak(d)] for d in ("float32", "bfloat16")}
  read_bandwidth = lambda: memory_bandwidth(bandwidth_mib, min_seconds=peak_seconds / 2)
  bandwidth = [read_bandwidth()]
  log(f"peak f32 {readings['float32'][0] / 1e9:.0f}, bf16 {readings['bfloat16'][0] / 1e9:.0f} "
      f"GFLOP/s; memory {bandwidth[0] / 1e9:.1f} GB/s")

  state, step, batches = placed_train_step(cfg, batch, length, devices, n_batches=2)
  n_params = param_count(state["params"])
  log(f"initialised and placed {n_params:,} parameters")

  start = time.perf_counter()
  lowered = step.lower(state, batches[0])
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  log(f"lowered in {lower_s:.1f} s, compiled in {compile_s:.1f} s")
  mem = compiled.memory_analysis()
  temp_bytes = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  state, metrics = step(state, batches[0])  # Warm-up; `compile` above filled the jit cache.
  # The loss and gradient norm of the fresh state (a step's loss is taken before its update):
  # rows that change only how the step runs (XLA flags, unrolling, the layer scan) must agree
  # on them up to rounding. The last step's loss is no such check: Adam's first updates move
  # each parameter by about the learning rate for any gradient above its epsilon, so rounding
  # noise steers the path.
  first_loss, first_grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  warm_compiles = len(compiles)
  log(f"warm-up step done (loss {first_loss:.6f}, gradient norm {first_grad_norm:.6g})")
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  secs = time.perf_counter() - start
  recompiles = len(compiles) - warm_compiles
  # The machine's speed moves from minute to minute (a shared host): a peak read while it
  # was slow would overstate the MFU, so the compute dtype's peak, the MFU's denominator,
  # is read again after the timed steps and the higher reading counts.
  readings[cfg.dtype].append(read_peak(cfg.dtype))
  bandwidth.append(read_bandwidth())
  log(f"peak again {cfg.dtype} {readings[cfg.dtype][1] / 1e9:.0f} GFLOP/s; memory "
      f"{bandwidth[1] / 1e9:.1f} GB/s")
  peak32, peak16 = max(readings["float32"]), max(readings["bfloat16"])
  peak = peak16 if cfg.dtype == "bfloat16" else peak32

  tok_s = steps * batch * length / secs
  f = flops.step_flops(cfg, length)
  return {"model": model, "L": length, "B": batch, "params": n_params,
          "step_s": secs / steps, "tokens_per_s": tok_s,
          "flops_per_token": f.train, "flops_per_token_with_cms_writes": f.train_with_cms_writes,
          "peak_f32": peak32, "peak_bf16": peak16,
          "peak_f32_readings": readings["float32"], "peak_bf16_readings": readings["bfloat16"],
          "memory_bandwidth_readings": bandwidth,
          "cpu": cpu_description(), "huge_pages": hugepages.active(),
          "peak_dtype": cfg.dtype, "mfu": tok_s * f.train / peak,
          "mfu_with_cms_writes": tok_s * f.train_with_cms_writes / peak,
          "mfu_f32": tok_s * f.train / peak32,
          "mfu_f32_with_cms_writes": tok_s * f.train_with_cms_writes / peak32,
          "lower_s": lower_s, "compile_s": compile_s, "recompiles_in_timed_steps": recompiles,
          "xla_temp_bytes": temp_bytes,
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "device": jax.local_devices()[0].device_kind,
          "device_peak_bytes": _device_peak_bytes(jax),
          "first_loss": first_loss, "first_grad_norm": first_grad_norm,
          "loss": float(metrics["loss"]), "dtype": cfg.dtype, "devices": devices,
          "overrides": overrides}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--lengths", default="512")
  ap.add_argument("--tokens_per_step", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--batch", type=int, default=None, help="batch size (default: from tokens)")
  ap.add_argument("--peak_sizes", default="1024", help="square matmul sizes of the peak")
  ap.add_argument("--peak_seconds", type=float, default=1.0,
                  help="timing of each peak reading (the bandwidth's: half of it)")
  ap.add_argument("--bandwidth_mib", type=int, default=128,
                  help="MiB per array of the memory-bandwidth reading")
  ap.add_argument("--timeout", type=float, default=None, help="seconds per row")
  ap.add_argument("--devices", type=int, default=1,
                  help="data-parallel devices (on a CPU: host devices, one per core)")
  ap.add_argument("--set", action="append", default=[], help="model override key=value")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", default=None)
  ap.add_argument("--repeat", type=int, default=1,
                  help="rounds of all rows, alternated; >1 adds medians and step ratios")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  overrides = _parse_set(args.set)
  if args.dtype != "float32":
    overrides["dtype"] = args.dtype
  if args.child:
    model, length, batch = args.child.split(":")
    row = measure(model, int(length), int(batch), args.steps, overrides,
                  tuple(int(x) for x in args.peak_sizes.split(",")), args.devices,
                  args.bandwidth_mib, args.peak_seconds)
    emit(row)
    return

  if args.repeat < 1:
    raise SystemExit(f"--repeat must be at least 1, got {args.repeat}")
  for model in args.models.split(","):
    if model not in MODELS:
      raise SystemExit(f"--models: unknown model {model!r}; choose from {sorted(MODELS)}")
  rows = []
  rounds = [(length, model) for length in (int(x) for x in args.lengths.split(","))
            for model in args.models.split(",")]
  # Each round runs every row once, so slow and fast stretches of a shared machine fall
  # on every model alike.
  for length, model in rounds * args.repeat:
    batch = args.batch or max(1, args.tokens_per_step // length)
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={model}:{length}:{batch}",
           f"--steps={args.steps}", f"--dtype={args.dtype}",
           f"--peak_sizes={args.peak_sizes}", f"--devices={args.devices}",
           f"--bandwidth_mib={args.bandwidth_mib}", f"--peak_seconds={args.peak_seconds}"
           ] + [f"--set={s}" for s in args.set]
    # Host devices for a CPU run (other platforms ignore it); it wins over XLA_FLAGS.
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(args.devices))
    tunables = hugepages.tunables_here(env)
    if tunables:  # What the training CLI restarts itself with.
      env["GLIBC_TUNABLES"] = tunables
    row = run_row(cmd, args.timeout, env)
    if "error" in row:
      row = {"model": model, "L": length, "B": batch, **row}
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:  # After every row, so a later row's crash or timeout loses nothing.
      with open(args.json, "w") as f:
        json.dump({"cores": os.cpu_count(), "dtype": args.dtype, "rows": rows}, f, indent=2)

  devices = sorted({r["device"] for r in rows if "device" in r})
  cpus = sorted({r["cpu"] for r in rows if "cpu" in r})
  huge = sorted({str(r["huge_pages"]) for r in rows if "huge_pages" in r})
  print(f"\n{os.cpu_count()} cores ({'; '.join(cpus) or '?'}), device {', '.join(devices) or '?'}"
        f", huge pages {'/'.join(huge) or '?'}"
        f", {args.dtype} outer matmuls; MFU against the higher of two {args.dtype} matmul peak "
        "readings in each row's process, before and after its timed steps\n")
  head = ["model", "L", "B", "params", "step (s)", "tokens/s", "MFLOP/token",
          "MFU", "MFU incl. CMS writes", f"peak {args.dtype} GFLOP/s",
          "memory GB/s (before / after)", "compile (s)",
          "recompiles", "peak RSS (GiB)", "peak device memory (GiB)"]
  print("| " + " | ".join(head) + " |")
  print("|---" * len(head) + "|")
  for r in rows:
    if "error" in r:
      print(f"| {r['model']} | {r['L']} | {r['B']} | failed: {r['error'][-120:]} |")
      continue
    writes = r["flops_per_token_with_cms_writes"] != r["flops_per_token"]
    peak = r["peak_bf16"] if r["peak_dtype"] == "bfloat16" else r["peak_f32"]
    dev = r["device_peak_bytes"]
    print(f"| {r['model']} | {r['L']} | {r['B']} | {r['params']:,} | {r['step_s']:.2f} | "
          f"{r['tokens_per_s']:.0f} | {r['flops_per_token'] / 1e6:.1f}"
          + (f" ({r['flops_per_token_with_cms_writes'] / 1e6:.1f})" if writes else "")
          + f" | {100 * r['mfu']:.1f}% | "
          + (f"{100 * r['mfu_with_cms_writes']:.1f}%" if writes else "-")
          + f" | {peak / 1e9:.0f} | "
          + " / ".join(f"{b / 1e9:.0f}" for b in r["memory_bandwidth_readings"])
          + f" | {r['lower_s'] + r['compile_s']:.1f} | "
          f"{r['recompiles_in_timed_steps']} | {r['peak_rss_bytes'] / 2**30:.2f} | "
          + (f"{dev / 2**30:.2f} |" if dev is not None else "- |"))
  if args.repeat > 1:
    print("\n" + "\n".join(summarise_rounds(rows, args.models.split(","))))


def summarise_rounds(rows: list[dict], models: list[str]) -> list[str]:
  """Markdown: each (L, B, model)'s median step over the rounds, and at each (L, B) the
  ratio of the first model's median step to every other model's (failed rows left out)."""
  steps: dict[tuple, list[float]] = {}
  for r in rows:
    if "error" not in r:
      steps.setdefault((r["L"], r["B"], r["model"]), []).append(r["step_s"])
  med = {k: statistics.median(v) for k, v in steps.items()}
  out = ["| model | L | B | rows | median step (s) | range (s) | first model's median step / this one's |",
         "|---|---|---|---|---|---|---|"]
  for (length, batch, model), v in steps.items():
    first = med.get((length, batch, models[0]))
    mine = med[(length, batch, model)]
    ratio = f"{first / mine:.2f}x" if first is not None and mine and model != models[0] else "-"
    out.append(f"| {model} | {length} | {batch} | {len(v)} | {mine:.2f} | "
               f"{min(v):.2f}-{max(v):.2f} | {ratio} |")
  return out


if __name__ == "__main__":
  main()
