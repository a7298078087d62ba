"""Subprocess helper for the distributed tests: several training runs in one process.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/dist_worker.py SPEC_JSON

SPEC_JSON is `{"runs": [{"dir": str, "set": {"training.mesh.fsdp": 8, ...},
"copy_to": [dirs]}]}`; each run trains `experiments/tiny.py` with the overrides
(through `hope_jax.train.loop.train`, the code the CLI runs), then copies its
checkpoint directory to `copy_to`. The last stdout line is `RESULT <json>`: per
run, the device count and each state leaf's sharding (spec, shard shape).
"""

import json
import shutil
import sys

import jax

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


def main(spec: dict) -> None:
  results = []
  for run in spec["runs"]:
    summary = train(make_config(run["dir"], run.get("set", {})))
    results.append({"devices": jax.device_count(), "step": summary["step"],
                    "state": describe(summary["state"])})
    for dest in run.get("copy_to", []):
      shutil.copytree(run["dir"], dest)
  print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
