"""XLA compiler options against the unchanged train step, in one process (issue 7).

Run (from the repository root):
  python benchmarks/xla_options.py --option=xla_cpu_multi_thread_eigen=false
  python benchmarks/xla_options.py --devices=2 --calls=8 \\
      --option=xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME --option=a=1,b=2
  options: --model=NAME (a preset of train_mfu.py, default hope) --set key=value (model
           overrides) --length=N --batch=N --devices=N --calls=N --json=FILE --no-control
           --option=name=value[,name=value...] (repeatable; each one variant)

Why not one benchmark row per setting: on the 2-core development machine the step time
moves by about ±1 s of 8.5 s from call to call, and `train_mfu.py` rows run one after the
other came out faster second in 4 of 4 pairs even when both compiled the same program
(docs/performance.md, "XLA:CPU options"). Here the train step (`make_train_step`, jitted
as the train loop does) is lowered once and compiled once per variant, the first with no
options, the rest with `Lowered.compile(compiler_options=...)`. Then each round calls every
variant once, rotating their order from round to round (with --calls a multiple of the
number of variants, each takes every place equally often).

A control comes second (`--no-control` leaves it out): the baseline's program again (JAX
hands back the executable it compiled for the same module and options), timed in its own
slot with its own copy of the state. On the 2-core machine an in-process variant beat the baseline in most
rounds even when its program was the baseline's (session 42: an option that left the HLO
unchanged ran 4.6% faster in 5 of 8 rounds, and `xla_cpu_copy_insertion_use_region_analysis`
won 8 of 12 rounds both as the variant and, turned off, as the baseline's challenger), so a
variant's gain counts only where it clearly exceeds the control's; in the run that added
the control (L=2048, B=2, two host devices, 12 rounds) the control itself came out 6.6%
faster than the baseline, in 8 of 12 rounds.

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
            variants: list[dict], control: bool = True) -> list[dict]:
  """The rows: the baseline (no options) first, with `control` the baseline's program again
  in a slot of its own (`"control": True`), then one per entry of `variants`."""
  import jax

  jax.config.update("jax_num_cpu_devices", devices)  # Host devices; other platforms ignore it.
  state, step, (batch_data,) = placed_train_step(model_config(model, overrides), batch, length,
                                                 devices)
  lowered = step.lower(state, batch_data)

  rows, live = [], []  # live: [row, compiled, its own state (the step donates it)]
  base_hlo = None  # The baseline's optimised HLO, printed once for every comparison.
  for i, options in enumerate([{}, *([{}] if control else []), *variants]):
    row = {"options": options, **({"control": True} if control and i == 1 else {})}
    rows.append(row)
    start = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 - XLA names the bad option; keep the other rows.
      if i == 0:  # Without the baseline there is nothing to compare with.
        raise
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      continue
    row["compile_s"] = time.perf_counter() - start
    if base_hlo is None:
      base_hlo = compiled.as_text()
    else:
      row["same_hlo"] = compiled.as_text() == base_hlo
    own = jax.tree.map(lambda a: a.copy(), state)
    own, metrics = compiled(own, batch_data)
    row["first_loss"] = float(metrics["loss"])
    row["first_grad_norm"] = float(metrics["grad_norm"])
    row["step_s"] = []
    live.append([row, compiled, own])
    print(f"{_name(row)}: compiled in {row['compile_s']:.1f} s, first loss "
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


def _name(row: dict) -> str:
  """A row's label: its options, or what the row without options is."""
  if row.get("control"):
    return "baseline again (control)"
  return ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "baseline"


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
  ap.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                  help="also time the baseline's program in a slot of its own (default: on)")
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
                 args.calls, variants, args.control)
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
    name = _name(r)
    if "error" in r:
      print(f"| {name} | failed: {r['error'][:200]} |")
      continue
    same = {None: "–", True: "yes", False: "no"}[r.get("same_hlo")]
    print(f"| {name} | {same} | {r['compile_s']:.1f} | {r['first_loss']:.6f} | "
          f"{r['first_grad_norm']:.6g} | {r['median_step_s']:.4g} | {r['fastest_step_s']:.4g} | "
          f"{r['tokens_per_s']:.0f} | {r['faster_than_baseline']} of {args.calls} |")
  ctrl = next((r for r in rows if r.get("control") and "error" not in r), None)
  if ctrl is not None:
    base = rows[0]["median_step_s"]
    print(f"\nThe control (the same program) ran {100 * (ctrl['median_step_s'] / base - 1):+.1f}% "
          f"against the baseline and beat it in {ctrl['faster_than_baseline']} of {args.calls} "
          "rounds: differences of that size are this run's noise.")


if __name__ == "__main__":
  main()
