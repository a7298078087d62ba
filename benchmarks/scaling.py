"""Train tokens/s from 1 to N devices: data parallel and FSDP, through the real train step.

  python benchmarks/scaling.py [--devices 1,2,4,8] [--steps 20] [--config experiments/base.py]
                               [--set model.dtype=bfloat16] [--json benchmarks/scaling.json]

Each device count runs in its own subprocess. On CPU the devices are host devices
(`JAX_NUM_CPU_DEVICES=N`) that share the machine's
cores, so the numbers show the partitioning overhead, not a speed-up. On an
accelerator host (`--platform gpu` / `tpu`) the first N real devices are used.
The timed steps are the ones the train loop runs: `Placement.jit_train_step` on
batches placed by `Placement.put_batch`, the state donated step to step.
Prints a markdown table and writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config_path: str, overrides: list[str], mesh: str, steps: int, devices: int) -> dict:
  """Runs in the child process: compiles, warms up, times `steps` train steps."""
  import importlib.util

  import jax
  import numpy as np

  from hope_jax.config import validate_run_config
  from hope_jax.data import load_corpus
  from hope_jax.data.sampler import BatchSampler
  from hope_jax.train.optimizer import make_optimizer
  from hope_jax.train.sharding import Placement
  from hope_jax.train.state import ModelDef, make_init_fn, param_count
  from hope_jax.train.step import make_train_step

  spec = importlib.util.spec_from_file_location("exp", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = (value.lower() in ("1", "true") if isinstance(old, bool) else
                  value if old is None else type(old)(value))
  cfg.training.mesh.data, cfg.training.mesh.fsdp = (devices, 1) if mesh == "data" else (1, devices)
  t, d = cfg.training, cfg.data
  model_cfg = validate_run_config(cfg)
  placement = Placement(cfg.training.mesh, int(t.batch_size), jax.devices()[:devices])
  corpus = load_corpus(d, model_cfg.vocab_size)
  model_def, tx = ModelDef(model_cfg, seed=t.seed), make_optimizer(t)
  init_fn = make_init_fn(model_def, tx, t.seed)
  abstract = jax.eval_shape(init_fn)
  state = placement.init_state(init_fn)
  step = placement.jit_train_step(make_train_step(model_def, tx), abstract)
  sampler = BatchSampler(corpus.train, t.batch_size, d.seq_len, t.seed)
  shape = (int(t.batch_size), d.seq_len + 1)
  batch = lambda s: placement.put_batch(lambda a, z: sampler.rows(s, a, z), shape)
  t0 = time.perf_counter()
  state, m = step(state, batch(0))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for s in range(1, 3):  # Warm-up.
    state, m = step(state, batch(s))
  jax.block_until_ready(m)
  times = []
  for s in range(3, 3 + steps):
    t0 = time.perf_counter()
    state, m = step(state, batch(s))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  return {"devices": devices, "mesh": mesh, "platform": jax.devices()[0].platform,
          "device_kind": jax.devices()[0].device_kind, "params": param_count(state["params"]),
          "batch": int(t.batch_size), "seq_len": d.seq_len, "dtype": model_cfg.dtype,
          "block": model_cfg.block, "compile_s": round(compile_s, 2),
          "step_ms": round(median * 1e3, 2),
          "tokens_per_s": round(t.batch_size * d.seq_len / median, 1),
          "loss": float(m["loss"]), "cpu_cores": os.cpu_count(),
          "load_avg_1m": round(os.getloadavg()[0], 2)}  # Other processes sharing the cores.


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--meshes", default="data,fsdp", help="data and/or fsdp")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--config", default="experiments/base.py")
  p.add_argument("--set", action="append", default=[], help="key=value config override")
  p.add_argument("--platform", default="cpu", help="cpu (host devices), gpu or tpu")
  p.add_argument("--json", default="benchmarks/scaling.json")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    mesh, n = args.child.split(":")
    print("RESULT " + json.dumps(measure(args.config, args.set, mesh, args.steps, int(n))))
    return
  rows = []
  for mesh in args.meshes.split(","):
    for n in (int(x) for x in args.devices.split(",")):
      if mesh == "fsdp" and n == 1:
        continue  # Identical to data parallel on one device.
      env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS=args.platform)
      if args.platform == "cpu":
        env["JAX_NUM_CPU_DEVICES"] = str(n)
      cmd = [sys.executable, __file__, "--child", f"{mesh}:{n}", "--steps", str(args.steps),
             "--config", args.config, *[f"--set={s}" for s in args.set]]
      proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"{mesh}:{n} failed:\n{proc.stderr[-3000:]}")
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT ")))
      print(f"done {mesh} x {n}", file=sys.stderr)
  base = rows[0]["tokens_per_s"]
  print(f"\n{rows[0]['platform']} ({rows[0]['device_kind']}, {rows[0]['cpu_cores']} cores), "
        f"{rows[0]['block']}, {rows[0]['params']:,} params, batch {rows[0]['batch']} x "
        f"{rows[0]['seq_len']}, {rows[0]['dtype']}, median of {args.steps} steps\n")
  print("| mesh | devices | step ms | train tokens/s | vs 1 device | compile s | load avg |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['mesh']} | {r['devices']} | {r['step_ms']} | {r['tokens_per_s']:.0f} | "
          f"{r['tokens_per_s'] / base:.2f}x | {r['compile_s']} | {r['load_avg_1m']} |")
  with open(args.json, "w") as f:
    json.dump({"config": args.config, "overrides": args.set, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
