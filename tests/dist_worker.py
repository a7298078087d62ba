"""Subprocess helper for the distributed tests: several training runs in one process.

  JAX_NUM_CPU_DEVICES=8 python tests/dist_worker.py SPEC_JSON

SPEC_JSON is `{"runs": [{"dir": str, "set": {"training.mesh.fsdp": 8, ...},
"copy_to": [dirs]}], "collectives": [{"training.mesh.fsdp": 4, ...}]}`; each run
trains `experiments/tiny.py` with the overrides (through `hope_jax.train.loop.train`,
the code the CLI runs), then copies its checkpoint directory to `copy_to`. Each
"collectives" entry compiles that config's train step and lists what it communicates,
and whether from the program's entry computation (not from a loop or other sub-computation).
With `"bad_override": true` it also reports the error of a gradient reduction asked for a
parameter split over `data`.
The last stdout line is `RESULT <json>`: per run, the device count and each state
leaf's sharding (spec, shard shape); per compiled step, the collectives' shapes.
"""

import json
import re
import shutil
import sys

import jax
import jax.numpy as jnp

from experiments import tiny
from hope_jax.train.loop import train
from hope_jax.train.sharding import path_str


def make_config(directory: str, overrides: dict):
  cfg = tiny.get_config()
  cfg.training.checkpoint_dir = directory
  cfg.training.progress_bar = False
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def describe(tree) -> dict:
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[path_str(path)] = {"spec": str(getattr(x.sharding, "spec", None)),
                           "shape": list(x.shape),
                           "shard_shape": list(x.addressable_shards[0].data.shape),
                           "dtype": str(x.dtype)}
  return out


COLLECTIVE = re.compile(
    r"=\s*(?P<out>.*?)\s(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute|collective-broadcast)(-start)?\(")
SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def collectives(overrides: dict) -> dict:
  """Every collective of the compiled (partitioned) train step: its shapes, and `entry`, whether
  it is in the program's entry computation (not in a loop body or other sub-computation)."""
  from hope_jax.config import ModelConfig
  from hope_jax.train.optimizer import make_optimizer
  from hope_jax.train.sharding import Placement, with_shardings
  from hope_jax.train.state import ModelDef, make_init_fn
  from hope_jax.train.step import make_train_step

  cfg = make_config("unused", overrides)
  t = cfg.training
  model_def, tx = ModelDef(ModelConfig.from_config(cfg.model)), make_optimizer(t)
  abstract = jax.eval_shape(make_init_fn(model_def, tx, 0))
  placement = Placement(t.mesh, t.batch_size)
  step = placement.jit_train_step(make_train_step(model_def, tx), abstract)
  batch = jax.ShapeDtypeStruct((t.batch_size, cfg.data.seq_len + 1), jnp.int32,
                               sharding=placement.batch_sharding())
  hlo = step.lower(with_shardings(abstract, placement.shardings(abstract)),
                   batch).compile().as_text()
  found, computation = [], None
  for line in hlo.splitlines():
    if line and not line[0].isspace():  # A computation's header: "ENTRY %main ..." or "%body ...".
      computation = line.split()[0]
    m = COLLECTIVE.search(line)
    if m:
      shapes = [[int(n) for n in g.split(",") if n] for g in SHAPE.findall(m.group("out"))]
      found.append({"op": m.group("op"), "shapes": shapes, "entry": computation == "ENTRY"})
  return {"collectives": found,
          "param_shapes": sorted({tuple(x.shape) for x in jax.tree.leaves(abstract["params"])})}


def main(spec: dict) -> None:
  results = []
  for run in spec["runs"]:
    summary = train(make_config(run["dir"], run.get("set", {})))
    results.append({"devices": jax.device_count(), "step": summary["step"],
                    "state": describe(summary["state"])})
    for dest in run.get("copy_to", []):
      shutil.copytree(run["dir"], dest)
  for overrides in spec.get("collectives", []):
    results.append(collectives(overrides))
  if spec.get("bad_override"):
    results.append(bad_override_error())
  print("RESULT " + json.dumps(results), flush=True)


def bad_override_error() -> str:
  """The error of a gradient reduction asked for a parameter split over `data` (`OVERRIDES`)."""
  from jax.sharding import PartitionSpec as P

  from hope_jax.train import sharding

  params = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
  placement = sharding.Placement({"data": 2, "fsdp": 4}, 8)
  sharding.OVERRIDES.append((r"params/w$", P("data", None)))
  try:
    placement.value_and_grad(lambda p, b: jnp.sum(p["w"]), params)
  except ValueError as e:
    return str(e)
  finally:
    sharding.OVERRIDES.pop()
  return ""


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
