"""Where a train step's time goes: a JAX profiler trace, summed by pass and model part.

Run (from the repository root):
  python benchmarks/profile_step.py                      # hope, D=256, 4 layers, L=512, B=8
  python benchmarks/profile_step.py --model=hope_attention --top=20
  options: --model=NAME (a preset of train_mfu.py) --set key=value (model overrides)
           --batch=N --length=N --out=DIR --top=N
  python benchmarks/profile_step.py --summarise=DIR      # the tables of a trace taken before

Times one jitted train step (the train loop's own `make_train_step`) under
`jax.profiler.trace`, writes the trace to `--out` (open it with TensorBoard's profile
plugin, xprof or Perfetto) and prints the busy time of the compute threads (on a GPU or
TPU: of the device's kernels) summed by

  pass:   forward, the in-context CMS write's backward pass (`cms_write_grads`), or the
          outer backward pass, each with the rematerialised recomputation apart;
  part:   the named scopes of the model (`phase_a`, `phase_b` of the Titans sublayer,
          `ffn` for the CMS or MLP) or "other" (scans, embeddings, head, optimizer);

then by kind of work (products, YNNPACK reductions, the scans' slices and updates, copies and
transposes, broadcasts, other elementwise work: `category`), and the costliest XLA
operations. The tables are read from the trace file JAX writes
(`*.trace.json.gz`) with the standard library; `--summarise` needs neither jax nor xprof.
Each operation is attributed by the `op_name` XLA keeps for it (for a fusion, that of its
root); one without any (XLA:CPU's YNNPACK fusions, some dots and copies) by that of its first
operand that has one, own or inherited. The split is close, not exact; the first line says how much time the second
rule attributed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PARTS = ("phase_a", "phase_b", "ffn")


def classify(op_name: str) -> tuple[str, str]:
  """(pass, part) of one XLA operation from its `op_name` metadata."""
  part = next((p for p in PARTS if p in op_name), "other")
  if "cms_write_grads" in op_name:
    kind = "CMS-write backward"
  elif op_name.startswith("jit(train_step)/transpose("):
    kind = "outer backward"
  else:
    kind = "forward"
  if "rematted_computation" in op_name:
    kind += " (remat)"
  return kind, part


def category(hlo_name: str, op_name: str) -> str:
  """The kind of work of one operation, from its HLO name and the last part of its `op_name`.

  XLA:CPU names a YNNPACK fusion `ynn_fusion.N` whether it wraps a product or a reduction;
  the `op_name` (of its root, or of the operand it was attributed through) tells them apart.
  """
  last = op_name.rsplit("/", 1)[-1]
  name = re.sub(r"[._]\d+$", "", hlo_name)
  if name.startswith("ynn_fusion") and last == "reduce_sum":
    return "YNNPACK reductions"
  if name.startswith("ynn_fusion") or name in ("dot", "dot_general") or "gemm" in name:
    return "products (and what YNNPACK fuses into them)"
  if "dynamic-slice" in name or "dynamic-update-slice" in name or last in (
      "dynamic_slice", "dynamic_update_slice"):
    return "the scans' slices and updates"
  if "copy" in name or "transpose" in name:
    return "copies and transposes"
  if "broadcast" in name:
    return "broadcasts"
  return "other elementwise and reduce operations"


def exclusive_times(events: list[dict]) -> list[tuple[dict, float]]:
  """Each complete event with its own time: its duration less that of events nested in it.

  An event nests in an earlier one on its line only if it also ends inside it; one that
  starts inside and ends after (device timestamps can overlap slightly) is its successor.
  """
  ops = sorted((e for e in events if e.get("ph") == "X"),
               key=lambda e: (e["pid"], e["tid"], e["ts"], -e.get("dur", 0)))
  own = {}
  stack: list[dict] = []
  for e in ops:
    end = e["ts"] + e["dur"]
    while stack and ((stack[-1]["pid"], stack[-1]["tid"]) != (e["pid"], e["tid"])
                     or stack[-1]["ts"] + stack[-1]["dur"] < end):
      stack.pop()
    own[id(e)] = e["dur"]
    if stack:
      own[id(stack[-1])] -= e["dur"]
    stack.append(e)
  return [(e, own[id(e)]) for e in ops]


def _union_us(events: list[dict]) -> float:
  """Microseconds covered by at least one of the events (overlaps counted once)."""
  total, reach = 0.0, float("-inf")
  for e in sorted(events, key=lambda e: e["ts"]):
    start, end = max(e["ts"], reach), e["ts"] + e["dur"]
    if end > start:
      total += end - start
      reach = end
  return total


def _device_pids(events: list[dict]) -> set[int] | None:
  """The trace's accelerator processes (None on a CPU-only trace: count the host threads)."""
  pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
          and "/device:" in e.get("args", {}).get("name", "")}
  return pids or None


def _hlo_name(event: dict, op_names: dict) -> str | None:
  """The HLO operation of a trace event: its name, `args.hlo_op`, or a kernel name that
  spells the operation's dots as underscores (`fusion_1` for `fusion.1`)."""
  for name in (event["name"], event.get("args", {}).get("hlo_op")):
    if name in op_names:
      return name
  m = re.fullmatch(r"(.+)_(\d+)", event["name"])
  if m and f"{m.group(1)}.{m.group(2)}" in op_names:
    return f"{m.group(1)}.{m.group(2)}"
  return None


def _device_lines(events: list[dict]) -> list[str]:
  """Per line of the device's trace (a stream, or a line the profiler derives), its kernels.

  For each: how many, their mean length, and how busy they keep the line between the first
  one's start and the last one's end (time covered by at least one kernel, so overlapping
  events count once). Many short kernels with little idle time between them mean a step
  bound by its kernel count rather than by launches or compute.
  """
  names = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "")
           for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
  lines = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X":
      lines[(e["pid"], e["tid"])].append(e)
  out = []
  for key, ks in sorted(lines.items(), key=lambda kv: -sum(e["dur"] for e in kv[1]))[:4]:
    summed, busy = sum(e["dur"] for e in ks), _union_us(ks)
    span = max(e["ts"] + e["dur"] for e in ks) - min(e["ts"] for e in ks)
    out.append(f"device line {names.get(key) or key[1]}: {len(ks)} kernels, mean "
               f"{summed / len(ks):.1f} us; busy {busy / 1e6:.3f} s (summed "
               f"{summed / 1e6:.3f} s) of the {span / 1e6:.3f} s from the first one's start to "
               f"the last one's end ({100 * busy / max(span, 1):.0f}%)")
  return out


def hlo_op_names(hlo_text: str) -> tuple[dict[str, str], set[str]]:
  """`op_name` of every instruction of an optimised HLO module, and which ones inherited it.

  XLA:CPU's YNNPACK fusions, and some dots and copies its passes create, carry no metadata.
  Such an instruction takes the `op_name` of its first operand that has one (its own or
  inherited), so its time counts where its inputs were computed rather than nowhere: on a
  `hope` step at L=2048 these were about half of the busy time. One pass suffices: the text
  lists every computation's instructions after their operands.
  """
  op_names, inherited = {}, set()
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if not m:
      continue
    name, rest = m.groups()
    meta = re.search(r'op_name="([^"]+)"', rest)
    if meta:
      op_names[name] = meta.group(1)
      continue
    operands = re.findall(r"%([\w.\-]+)", rest.split("calls=")[0])
    src = next((op_names[i] for i in operands if i in op_names), None)
    if src is not None:
      op_names[name] = src
      inherited.add(name)
  return op_names, inherited


def summarise(events: list[dict], hlo_text: str, top: int) -> str:
  """Markdown tables of busy time by (pass, part) and of the costliest operations.

  On an accelerator the device's kernels are counted (a kernel names its HLO operation, or
  gives it in `args.hlo_op`) and the host's launch events are left out.
  """
  op_names, inherited = hlo_op_names(hlo_text)
  pids = _device_pids(events)
  if pids is not None:
    events = [e for e in events if e.get("pid") in pids]
  by_part: collections.Counter = collections.Counter()
  by_op: collections.Counter = collections.Counter()
  # Executions of the operations (on a device: kernels), by part and by kind.
  part_runs: collections.Counter = collections.Counter()
  op_runs: collections.Counter = collections.Counter()
  unmatched: collections.Counter = collections.Counter()
  by_category: collections.Counter = collections.Counter()
  category_runs: collections.Counter = collections.Counter()
  inherited_us = 0.0
  for e, us in exclusive_times(events):
    name = _hlo_name(e, op_names)
    if name is None:  # Executor bookkeeping, Python frames, waits; on a device, see below.
      unmatched[e["name"]] += us
      continue
    kind, part = classify(op_names[name])
    op = (re.sub(r"[._]\d+$", "", name), kind, part)
    by_part[(kind, part)] += us
    by_op[op] += us
    work = category(name, op_names[name])
    by_category[work] += us
    category_runs[work] += 1
    inherited_us += us if name in inherited else 0.0
    part_runs[(kind, part)] += 1
    op_runs[op] += 1
  total = sum(by_part.values())
  if not total:
    names = sorted({e["name"] for e in events if e.get("ph") == "X"})[:20]
    return f"no operation of hlo.txt found among {len(events)} trace events; some names: {names}"
  where = "the device's kernels" if pids is not None else "the compute threads"
  # On a GPU each operation run is a kernel of at least ~2 us, so the count bounds the step.
  out = [f"busy time of {where}: {total / 1e6:.2f} s in {sum(part_runs.values()):,} operation "
         f"runs ({inherited_us / 1e6:.2f} s of it in operations without an op_name of their "
         "own, attributed through their operands)", ""]
  if pids is not None:  # On a device every event is a kernel: say what was not attributed.
    out += _device_lines(events) + [""]
    out += [f"kernels not matched to an HLO operation: {sum(unmatched.values()) / 1e6:.2f} s; "
            "the largest: " + ", ".join(f"{n} ({us / 1e6:.3f} s)"
                                        for n, us in unmatched.most_common(5)), ""]
  out += ["| pass | part | busy (s) | share | runs |", "|---|---|---|---|---|"]
  out += [f"| {k} | {p} | {us / 1e6:.2f} | {100 * us / total:.1f}% | {part_runs[(k, p)]:,} |"
          for (k, p), us in by_part.most_common()]
  out += ["", "| kind of work | busy (s) | share | runs |", "|---|---|---|---|"]
  out += [f"| {c} | {us / 1e6:.2f} | {100 * us / total:.1f}% | {category_runs[c]:,} |"
          for c, us in by_category.most_common()]
  out += ["", "| operation kind | pass | part | busy (s) | share | runs |",
          "|---|---|---|---|---|---|"]
  out += [f"| {n} | {k} | {p} | {us / 1e6:.2f} | {100 * us / total:.1f}% | {op_runs[(n, k, p)]:,} |"
          for (n, k, p), us in by_op.most_common(top)]
  return "\n".join(out)


def summarise_dir(out: str, top: int) -> str:
  """The tables of a trace directory written by this script (the trace JAX writes beside its
  xplane, `*.trace.json.gz`, and `hlo.txt`); needs only the standard library."""
  traces = glob.glob(os.path.join(out, "plugins", "profile", "*", "*.trace.json.gz"))
  if not traces:
    raise SystemExit(f"--summarise: no plugins/profile/*/*.trace.json.gz under {out}")
  trace = max(traces, key=os.path.getmtime)  # The newest, when --out was used before.
  with gzip.open(trace, "rt") as f:
    events = json.load(f)["traceEvents"]
  with open(os.path.join(out, "hlo.txt")) as f:
    return summarise(events, f.read(), top)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--summarise", default=None, help="print the tables of this trace directory")
  ap.add_argument("--model", default="hope", help="a preset of benchmarks/train_mfu.py")
  ap.add_argument("--set", action="append", default=[], help="model override key=value")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--out", default=None, help="trace directory (default: a temporary one)")
  ap.add_argument("--top", type=int, default=15)
  args = ap.parse_args()
  if args.summarise:
    print(summarise_dir(args.summarise, args.top))
    return

  import jax
  import numpy as np

  from benchmarks.train_mfu import _parse_set, model_config, train_setup
  from hope_jax.train.sharding import resolve_schedule
  from hope_jax.train.step import make_train_step

  # One device, as the train loop would pick the Titans scans' unroll for it.
  cfg = resolve_schedule(model_config(args.model, _parse_set(args.set)), jax.devices()[:1])
  model_def, tx, state = train_setup(cfg)
  step = jax.jit(make_train_step(model_def, tx), donate_argnums=0)
  batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.length + 1),
                                            np.int32)
  compiled = step.lower(state, batch).compile()  # Its HLO names the traced operations.
  state, metrics = compiled(state, batch)  # Warm-up.
  jax.block_until_ready(metrics)
  out = args.out or tempfile.mkdtemp(prefix="hope_jax_profile_")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "hlo.txt"), "w") as f:
    f.write(compiled.as_text())
  start = time.perf_counter()
  with jax.profiler.trace(out):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  print(f"{args.model}: one step {time.perf_counter() - start:.2f} s (traced); trace in {out}")
  print(summarise_dir(out, args.top))


if __name__ == "__main__":
  main()
