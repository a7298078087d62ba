"""XLA compiler options against the unchanged train step, in one process (issue 7).

Run (from the repository root):
  python benchmarks/xla_options.py --option=xla_cpu_multi_thread_eigen=false
  python benchmarks/xla_options.py --devices=2 --calls=8 \\
      --option=xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME --option=a=1,b=2
  options: --model=NAME (a preset of train_mfu.py, default hope) --set key=value (model
           overrides) --length=N --batch=N --devices=N --calls=N --json=FILE
           --option=name=value[,name=value...] (repeatable; each one variant)

Why not one benchmark row per setting: on the 2-core development machine the step time
moves by about ±1 s of 8.5 s from call to call, and `train_mfu.py` rows run one after the
other came out faster second in 4 of 4 pairs even when both compiled the same program
(docs/performance.md, "XLA:CPU options"). Here the train step (`make_train_step`, jitted
as the train loop does) is lowered once and compiled once per variant, the first with no
options, the rest with `Lowered.compile(compiler_options=...)`. Then each round calls every
variant once, rotating their order from round to round (with --calls a multiple of the
number of variants, each takes every place equally often).

Per variant it reports:
- the compile time;
- whether its optimised HLO is the baseline's (an option that leaves the program unchanged
  can only matter in code generation or at run time);
- the fresh state's loss and gradient norm (an option may change rounding, never more);
- the median and fastest step, and in how many rounds it beat the baseline.

A bad option or value is that variant's error and does not stop the others (a baseline that
fails to compile stops the run: there is nothing to compare with). Prints a
markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.train_mfu import MODELS, _parse_set, model_config, placed_train_step  # noqa: E402


def parse_option(text: str) -> dict:
  """`name=value[,name=value...]` as compiler options, typed as `--set` values are.

  Raises:
    ValueError: an item without `=` or with an empty name.
  """
  items = text.split(",")
  for item in items:
    name, sep, _ = item.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"--option={text!r}: each item must be name=value, got {item!r}")
  return _parse_set(items)


def measure(model: str, overrides: dict, length: int, batch: int, devices: int, calls: int,
            variants: list[dict]) -> list[dict]:
  """The rows: the baseline (no options) first, then one per entry of `variants`."""
  import jax

  jax.config.update("jax_num_cpu_devices", devices)  # Host devices; other platforms ignore it.
  state, step, (batch_data,) = placed_train_step(model_config(model, overrides), batch, length,
                                                 devices)
  lowered = step.lower(state, batch_data)

  rows, live = [], []  # live: [row, compiled, its own state (the step donates it)]
  for options in [{}, *variants]:
    row = {"options": options}
    rows.append(row)
    start = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 - XLA names the bad option; keep the other rows.
      if not options:  # Without the baseline there is nothing to compare with.
        raise
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      continue
    row["compile_s"] = time.perf_counter() - start
    if options:
      row["same_hlo"] = compiled.as_text() == live[0][1].as_text()
    own = jax.tree.map(lambda a: a.copy(), state)
    own, metrics = compiled(own, batch_data)
    row["first_loss"] = float(metrics["loss"])
    row["first_grad_norm"] = float(metrics["grad_norm"])
    row["step_s"] = []
    live.append([row, compiled, own])
    print(f"{options or 'baseline'}: compiled in {row['compile_s']:.1f} s, first loss "
          f"{row['first_loss']:.6f}", file=sys.stderr, flush=True)

  for r in range(calls):
    k = r % len(live)
    for entry in live[k:] + live[:k]:
      row, compiled, own = entry
      start = time.perf_counter()
      own, metrics = compiled(own, batch_data)
      jax.block_until_ready(metrics)
      row["step_s"].append(time.perf_counter() - start)
      entry[2] = own
  base = live[0][0]["step_s"]
  for row, _, _ in live:
    row["median_step_s"] = statistics.median(row["step_s"])
    row["fastest_step_s"] = min(row["step_s"])
    row["tokens_per_s"] = batch * length / row["median_step_s"]
    row["faster_than_baseline"] = sum(t < b for t, b in zip(row["step_s"], base, strict=True))
  return rows


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="hope", help="a preset of benchmarks/train_mfu.py")
  ap.add_argument("--set", action="append", default=[], help="model override key=value")
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--devices", type=int, default=1,
                  help="data-parallel devices (on a CPU: host devices, one per core)")
  ap.add_argument("--calls", type=int, default=8, help="timed calls of each variant")
  ap.add_argument("--option", action="append", default=[],
                  help="name=value[,name=value...]: one variant's compiler options")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  if args.model not in MODELS:
    raise SystemExit(f"--model: unknown model {args.model!r}; choose from {sorted(MODELS)}")
  if args.calls < 1:
    raise SystemExit(f"--calls must be at least 1, got {args.calls}")
  try:
    variants = [parse_option(o) for o in args.option]
  except ValueError as e:
    raise SystemExit(str(e)) from None
  rows = measure(args.model, _parse_set(args.set), args.length, args.batch, args.devices,
                 args.calls, variants)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "L": args.length, "B": args.batch,
                 "devices": args.devices, "calls": args.calls, "rows": rows}, f, indent=2)

  print(f"\n{args.model}, L={args.length}, B={args.batch}, {args.devices} device(s), "
        f"{args.calls} calls per variant in rotating order\n")
  head = ["options", "same HLO", "compile (s)", "first loss", "gradient norm",
          "median step (s)", "fastest (s)", "tokens/s", "faster than baseline"]
  print("| " + " | ".join(head) + " |")
  print("|---" * len(head) + "|")
  for r in rows:
    name = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "baseline"
    if "error" in r:
      print(f"| {name} | failed: {r['error'][:200]} |")
      continue
    same = {None: "–", True: "yes", False: "no"}[r.get("same_hlo")]
    print(f"| {name} | {same} | {r['compile_s']:.1f} | {r['first_loss']:.6f} | "
          f"{r['first_grad_norm']:.6g} | {r['median_step_s']:.4g} | {r['fastest_step_s']:.4g} | "
          f"{r['tokens_per_s']:.0f} | {r['faster_than_baseline']} of {args.calls} |")


if __name__ == "__main__":
  main()
