"""Sharded and multi-process training on CPU host devices, each run in a subprocess.

One reference run on 1 device; one worker process with 8 host devices runs data
parallel, FSDP and a 2 x 4 mesh; a checkpoint saved on 8 devices is resumed on 1
and on 4; two processes join through `jax.distributed` on a loopback port.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hope_jax import checkpoint as ck
from hope_jax.config import AUTO_UNROLL, ConfigError, ModelConfig
from hope_jax.train import distributed
from hope_jax.train.sharding import Placement, partition_spec, resolve_mesh_shape, resolve_schedule
from tests.conftest import REPO, run_cli

STEPS = 8
# Flags shared by every run: the same batches, schedule and checkpoints everywhere.
COMMON = {"training.lr_schedule": "constant", "training.eval_every": 1000,
          "training.log_every": 1, "training.save_every": 4, "training.batch_size": 8,
          "training.resume_from": "latest", "training.mesh.fsdp_min_size": 0,
          "training.progress_bar": False}
TOL = 1e-5  # float32 losses of differently partitioned sums.


def devices_env(n: int) -> dict:
  return {"JAX_NUM_CPU_DEVICES": str(n)}  # Over conftest's 1; XLA_FLAGS stay as they are.


def cli_args(directory, steps, **overrides) -> list[str]:
  flags = dict(COMMON, **{"training.checkpoint_dir": str(directory),
                          "training.num_steps": steps}, **overrides)
  return ["-m", "hope_jax.train", "--config=experiments/tiny.py",
          *[f"--config.{k}={v}" for k, v in flags.items()]]


def train_cli(directory, steps, devices=1, **overrides):
  proc = run_cli(cli_args(directory, steps, **overrides), env=devices_env(devices), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def losses(directory) -> dict[int, float]:
  rows = [json.loads(l) for l in open(os.path.join(directory, "logs", "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def assert_losses_close(got: dict, want: dict, steps) -> None:
  a = np.array([got[s] for s in steps])
  b = np.array([want[s] for s in steps])
  np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


# Every subprocess of this module shares one XLA compilation cache.
pytestmark = pytest.mark.usefixtures("xla_compile_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """8 steps on one device: the losses every layout must reproduce."""
  d = tmp_path_factory.mktemp("ref")
  train_cli(d, STEPS)
  return d


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
  """One process with 8 host devices: data parallel, FSDP (4 steps, copied, resumed), 2 x 4."""
  root = tmp_path_factory.mktemp("eight")
  dirs = {k: root / k for k in ("dp", "fsdp", "hybrid", "to1", "to4")}
  mesh = lambda data, fsdp: {"training.mesh.data": data, "training.mesh.fsdp": fsdp}
  runs = [
      {"dir": str(dirs["dp"]), "set": {**COMMON, **mesh(8, 1), "training.num_steps": STEPS}},
      {"dir": str(dirs["fsdp"]), "set": {**COMMON, **mesh(1, 8), "training.num_steps": 4},
       "copy_to": [str(dirs["to1"]), str(dirs["to4"])]},
      {"dir": str(dirs["fsdp"]), "set": {**COMMON, **mesh(1, 8), "training.num_steps": STEPS}},
      {"dir": str(dirs["hybrid"]), "set": {**COMMON, **mesh(2, -1), "training.num_steps": STEPS}},
  ]
  # 24 sequences, 3 per device: no model dimension is a multiple of 3, so a batch-carrying
  # array among the step's collectives would show.
  compiled = [{**COMMON, **mesh(2, 4), "training.batch_size": 24},
              {**COMMON, **mesh(2, 4), "training.batch_size": 24, "model.block": "hope"}]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **devices_env(8))
  spec = {"runs": runs, "collectives": compiled, "bad_override": True}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "dist_worker.py"),
                         json.dumps(spec)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
  return dirs, dict(zip(("dp", "fsdp4", "fsdp", "hybrid", "comm", "comm_hope", "bad_override"),
                         result, strict=True))


def test_data_parallel_fsdp_and_2x4_mesh_match_one_device(reference, eight):
  dirs, result = eight
  want = losses(reference)
  assert sorted(want) == list(range(1, STEPS + 1))
  for name in ("dp", "fsdp", "hybrid"):
    assert result[name]["devices"] == 8 and result[name]["step"] == STEPS
    assert_losses_close(losses(dirs[name]), want, range(1, STEPS + 1))


def test_parameters_and_adam_moments_are_sharded_over_fsdp(eight):
  _, result = eight
  for name, fsdp in (("fsdp", 8), ("hybrid", 4), ("dp", 1)):
    state = result[name]["state"]
    params = {k: v for k, v in state.items() if k.startswith("params/")}
    assert len(params) > 5
    for path, leaf in params.items():
      shape, shard = leaf["shape"], leaf["shard_shape"]
      if len(shape) >= 2 and fsdp > 1:  # fsdp_min_size=0: every matrix is split.
        assert "fsdp" in leaf["spec"], (name, path, leaf)
        assert np.prod(shard) * fsdp == np.prod(shape), (name, path, leaf)
        for moment in ("mu", "nu"):  # Adam's moments share their parameter's layout.
          twin = [v for k, v in state.items() if k.endswith(f"/{moment}/{path[7:]}")]
          assert len(twin) == 1 and twin[0]["shard_shape"] == shard, (path, moment)
      else:
        assert shard == shape, (name, path, leaf)  # Vectors and data parallel: whole.
    assert state["step"]["shard_shape"] == []


@pytest.mark.parametrize("compiled", ["comm", "comm_hope"])
def test_a_step_communicates_only_parameters_gradients_and_scalars(eight, compiled):
  """No activation (nor per-sequence fast state) crosses devices: each keeps its sequences.

  Every communicated array has the size of a parameter, of one of its 4 fsdp shards,
  or is a scalar, and none has a dimension that is a multiple of the 3 sequences per device.
  """
  comm = eight[1][compiled]
  sizes = {int(np.prod(s)) // k for s in comm["param_shapes"] for k in (1, 4)} | {1}
  ops = {c["op"] for c in comm["collectives"]}
  assert "all-gather" in ops and ops & {"all-reduce", "reduce-scatter"}, ops
  for c in comm["collectives"]:
    for shape in c["shapes"]:
      assert int(np.prod(shape)) in sizes and not any(n % 3 == 0 for n in shape), c


def test_a_hope_step_reduces_its_gradients_once_after_the_backward_pass(eight):
  """Every collective of a sharded `hope` step runs once per step, none inside a loop.

  The gradients of parameters that the model's scans close over accumulate inside those
  scans' backward loops; reduced there, every chunk would wait for every other device.
  """
  comm = eight[1]["comm_hope"]
  assert comm["collectives"]
  inside = [c for c in comm["collectives"] if not c["entry"]]
  assert not inside, inside


def test_a_parameter_split_over_data_is_refused_by_the_gradient_reduction(eight):
  message = eight[1]["bad_override"]
  assert "names more than the fsdp axis" in message and "'data'" in message, message


def test_checkpoint_saved_on_8_devices_continues_on_1_and_on_4(reference, eight):
  dirs, _ = eight
  assert [e.step for e in ck.list_checkpoints(str(dirs["to1"]))] == [4]
  on8 = losses(dirs["fsdp"])
  for key, devices, mesh in (("to1", 1, {}), ("to4", 4, {"training.mesh.data": 1,
                                                         "training.mesh.fsdp": -1})):
    proc = train_cli(dirs[key], STEPS, devices=devices, **mesh)
    assert "Resumed from step 4" in proc.stderr
    got = losses(dirs[key])
    assert_losses_close(got, on8, range(1, STEPS + 1))  # 1-4 copied, 5-8 trained here.
    assert_losses_close(got, losses(reference), range(5, STEPS + 1))
  # The step-4 payload written by 8 devices reads back bit-exactly on this one device
  # (restore verifies every array's checksum), equal to the 4-device run's own copy.
  a = ck.restore(ck.list_checkpoints(str(dirs["to1"]))[0].manifest_path, with_opt_state=True)
  b = ck.restore(ck.list_checkpoints(str(dirs["to4"]))[0].manifest_path, with_opt_state=True)
  assert a.step == b.step == 4
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)),
                                          a.params, b.params)))


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(d, steps: int, stderr, **overrides) -> list[subprocess.Popen]:
  """The CLI in two processes joined on a loopback port, 2 devices each, a 2 x 2 mesh.

  `d` is the checkpoint_dir of both, or a list of one per process (hosts with local disks).
  """
  dirs = d if isinstance(d, list) else [d, d]
  port = _free_port()
  overrides = {"training.mesh.data": 2, "training.mesh.fsdp": 2, **overrides}
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), **devices_env(2))
    procs.append(subprocess.Popen(
        [sys.executable, *cli_args(dirs[pid], steps, **overrides)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True))
  return procs


def _run_two_processes(d, steps: int, timeout: int = 120, **overrides) -> tuple[list, list[str]]:
  """Both processes to the end, or killed after `timeout` s: (return codes, outputs)."""
  procs = _start_two_processes(d, steps, stderr=subprocess.STDOUT, **overrides)
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate()[0] for p in procs]
    pytest.fail("the processes did not finish; their output:\n" +
                "\n".join(o[-3000:] for o in outs))
  return [p.returncode for p in procs], outs


def test_two_processes_train_and_save_a_checkpoint_one_process_restores(tmp_path, reference):
  d = tmp_path / "two"
  procs = _start_two_processes(d, 4, stderr=subprocess.PIPE)
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "Process 0 of 2; 2 local / 4 global devices" in outs[0][1]
  assert "step 4/4" in outs[0][1] and "step 4/4" not in outs[1][1]  # Process 0 logs.
  assert_losses_close(losses(d), losses(reference), range(1, 5))
  rows = open(d / "logs" / "metrics.jsonl").read().splitlines()
  assert sum('"train/loss"' in r for r in rows) == 4  # Written once, not once per process.
  listed = ck.list_checkpoints(str(d))
  assert [e.step for e in listed] == [4] and all(e.valid for e in listed)
  got = ck.restore_latest(str(d), with_opt_state=True)  # This process: one device.
  ref = ck.restore(ck.list_checkpoints(str(reference))[0].manifest_path, with_opt_state=True)
  assert got.step == ref.step == 4
  for x, y in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params), strict=True):
    # Adam moved each weight by ~1e-2 per step; the layouts differ by summation order only.
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=TOL)


def test_a_shard_only_one_process_cannot_read_is_skipped_by_both(tmp_path, reference):
  """FSDP over both processes: each reads its own shards. Damage only process 1's shards.

  Both must skip that checkpoint together and resume from the older one. Before, process 1
  alone went back a step: its checksum collectives met process 0's of the newer step, it
  declared the good older checkpoint corrupt, and process 0 waited for it forever.
  """
  d = tmp_path / "shard"
  fsdp = {"training.mesh.data": 1, "training.mesh.fsdp": 4, "training.save_every": 2}
  codes, outs = _run_two_processes(d, 4, **fsdp)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  damaged = list((d / "checkpoint_step_4" / "params" / "ocdbt.process_1").rglob("d/*"))
  assert damaged
  for f in damaged:
    data = bytearray(f.read_bytes())
    data[::7] = bytes(b ^ 0x5A for b in data[::7])
    f.write_bytes(bytes(data))
  codes, outs = _run_two_processes(d, 6, **fsdp)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  # Process 0 read its shards: it learns of process 1's failure rather than finding one.
  assert re.search(r"Skipping unreadable checkpoint .*: Failed to load checkpoint: \S*"
                   r"checkpoint_step_4_ts_\d+\.json: process\(es\) 1 could not read it",
                   outs[0]), outs[0][-3000:]
  assert "Encountered error while reading" in outs[1], outs[1][-3000:]
  for out in outs:
    assert "Moved the unreadable checkpoint of step 4" in out
  assert "Resumed from step 2" in outs[0]
  listed = ck.list_checkpoints(str(d))
  assert [e.step for e in listed] == [2, 4, 6] and all(e.valid for e in listed)
  assert (d / "unreadable" / "checkpoint_step_4").is_dir()
  assert_losses_close(losses(d), losses(reference), range(1, 7))


@pytest.mark.parametrize("case", ["locked", "log_dir"])
def test_what_process_0_alone_cannot_do_stops_both_processes(tmp_path, case):
  """Process 0 alone locks the checkpoint folder and writes the logs; when it cannot, process 1
  must stop too (it waited in its next collective, then died of a Gloo timeout 30 s later)."""
  import fcntl

  from hope_jax.checkpoint.manager import LOCK_NAME

  d = tmp_path / "run"
  d.mkdir()
  (tmp_path / "a_file").write_text("")
  overrides = {"training.log_dir": str(tmp_path / "a_file" / "logs")} if case == "log_dir" else {}
  with open(d / LOCK_NAME, "w") as lock:
    if case == "locked":
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # As another run holding it would.
    codes, outs = _run_two_processes(d, 2, **overrides)
  assert codes == [2, 2], outs[0][-3000:] + outs[1][-3000:]
  errors = [[l for l in out.splitlines() if l.startswith("hope_jax.train: error: ")]
            for out in outs]
  want = {"locked": ("is in use by another training process", "could not be locked by process 0"),
          "log_dir": ("training.log_dir: cannot write the logs", "process 0 cannot write the logs")}
  for out, found, message in zip(outs, errors, want[case], strict=True):
    assert len(found) == 1 and message in found[0], out[-3000:]


def test_processes_that_list_different_checkpoints_stop_before_restoring(tmp_path):
  # As on hosts whose checkpoint_dir is a local disk each: the same path, other contents.
  # Each restore attempt is a collective, so a process going its own way would hang the rest.
  dirs = [tmp_path / "host0", tmp_path / "host1"]
  for d in dirs:
    d.mkdir()
  (dirs[0] / "checkpoint_step_5_ts_1.json").write_text("{}")  # Listed (broken) on host 0.
  codes, outs = _run_two_processes(dirs, 2)
  assert codes == [2, 2], outs[0][-3000:] + outs[1][-3000:]
  for pid, out in enumerate(outs):
    (error,) = [l for l in out.splitlines() if l.startswith("hope_jax.train: error: ")]
    assert "the processes list different checkpoints in it" in error, out[-3000:]
    assert f"(this one: steps {[5] if pid == 0 else []})" in error
    assert "every host sees alike" in error and "Traceback" not in out


def _two_processes_with_sigterm(d, watch: int, when: str) -> list[str]:
  """Trains in two processes; SIGTERM to process 1 once process `watch` prints `when`."""
  procs = _start_two_processes(d, 100000, stderr=subprocess.STDOUT)
  seen = ["", ""]
  try:
    for line in procs[watch].stdout:
      seen[watch] += line
      if when in line:
        break
    procs[1].send_signal(signal.SIGTERM)
    outs = [seen[i] + p.communicate(timeout=120)[0] for i, p in enumerate(procs)]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:] + outs[1][-3000:]
  return outs


def test_sigterm_to_one_process_stops_every_process_at_one_step_and_saves(tmp_path):
  """A preemption notice in one process: all stop at the step JAX's service names, and save.

  Stopping on its own, the signalled process would wait in the save's collective while
  the other one waits in the next step's. The second run gets the notice while it starts,
  resumed from that step, before its first check of the notice.
  """
  d = tmp_path / "stop"
  steps = []
  for watch, when in ((0, "step 3/"), (1, "Process 1 of 2")):
    outs = _two_processes_with_sigterm(d, watch, when)
    stops = [re.search(r"every process stops at step (\d+)", o) for o in outs]
    assert all(stops), outs[0][-3000:] + outs[1][-3000:]
    steps.append(int(stops[0].group(1)))
    assert steps[-1] == int(stops[1].group(1))
    listed = ck.list_checkpoints(str(d))
    assert listed[-1].step == steps[-1] and all(e.valid for e in listed)  # save_every=4 too.
  # The resumed run stops at once or a step or two later (how soon the notice spreads).
  assert steps[0] >= 3 and steps[0] <= steps[1] <= steps[0] + 10


def test_bfloat16_compute_trains_with_float32_params(tmp_path):
  d = tmp_path / "bf16"
  train_cli(d, STEPS, **{"model.dtype": "bfloat16"})
  got = losses(d)
  assert all(np.isfinite(list(got.values())))
  assert got[STEPS] < got[1] - 0.2  # It learns.
  restored = ck.restore_latest(str(d), with_opt_state=True)
  assert {x.dtype for x in jax.tree.leaves(restored.params)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_step_computes_in_bf16_and_keeps_loss_and_grads_in_float32(tiny_config):
  import optax

  from hope_jax.config import ModelConfig
  from hope_jax.train.state import ModelDef, init_train_state
  from hope_jax.train.step import make_train_step

  cfg = tiny_config
  cfg.model.dtype = "bfloat16"
  model_def = ModelDef(ModelConfig.from_config(cfg.model))
  tx = optax.adam(1e-3)
  state = jax.eval_shape(lambda: init_train_state(model_def, tx, 0))
  batch = jax.ShapeDtypeStruct((2, 9), jnp.int32)
  jaxpr = jax.make_jaxpr(make_train_step(model_def, tx))(state, batch)
  dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert any(all(v.aval.dtype == jnp.bfloat16 for v in e.invars) for e in dots)
  new_state, metrics = jax.eval_shape(make_train_step(model_def, tx), state, batch)
  assert metrics["loss"].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state["params"]))


@pytest.mark.parametrize("block", ["titans_lmm", "hope", "hope_attention"])
def test_bfloat16_keeps_the_inner_memory_state_in_float32(tiny_config, block):
  """Every floating value carried through the model's scans (memories, fast weights) is f32."""
  import optax

  from hope_jax.config import ModelConfig
  from hope_jax.train.state import ModelDef, init_train_state
  from hope_jax.train.step import make_train_step

  cfg = tiny_config
  cfg.model.block, cfg.model.dtype = block, "bfloat16"
  try:
    model_def = ModelDef(ModelConfig.from_config(cfg.model))
  except ImportError as e:  # Before the Titans/CMS modules are merged.
    pytest.skip(f"block {block!r} is not available yet: {e}")
  tx = optax.adam(1e-3)
  state = jax.eval_shape(lambda: init_train_state(model_def, tx, 0))
  jaxpr = jax.make_jaxpr(make_train_step(model_def, tx))(
      state, jax.ShapeDtypeStruct((2, cfg.data.seq_len + 1), jnp.int32))
  carried = [v.aval.dtype for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "scan"
             for v in e.invars[e.params["num_consts"]:][:e.params["num_carry"]]
             if jnp.issubdtype(v.aval.dtype, jnp.floating)]
  assert carried and set(carried) == {jnp.dtype(jnp.float32)}, set(carried)
  dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert any(all(v.aval.dtype == jnp.bfloat16 for v in e.invars) for e in dots)


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in _subjaxprs(e.params):
      yield from _eqns(sub)


def _subjaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr
      elif hasattr(x, "eqns"):
        yield x


# ------------------------------------------------------- pure rules (no devices)

def test_mesh_sizes_resolve_and_bad_ones_name_the_key():
  assert resolve_mesh_shape({"data": -1, "fsdp": 1}, 8, 16) == (8, 1)
  assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8, 16) == (2, 4)
  assert resolve_mesh_shape({"data": -1, "fsdp": 1}, 1, 3) == (1, 1)
  for mesh, n, batch, words in (
      ({"data": 3, "fsdp": 1}, 8, 24, "data=3 x fsdp=1 = 3 devices, but 8 are available"),
      ({"data": 3, "fsdp": -1}, 8, 24, "fixed sizes must divide the device count"),
      ({"data": -1, "fsdp": -1}, 8, 8, "only one of"),
      ({"data": 0, "fsdp": 1}, 8, 8, "training.mesh.data must be a positive integer or -1"),
      ({"data": -1, "fsdp": 1}, 8, 12, "training.batch_size (12) must be divisible by the 8"),
  ):
    with pytest.raises(ConfigError, match=None) as e:
      resolve_mesh_shape(mesh, n, batch)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_titans_scans_unroll_unless_the_cpu_is_split_into_host_devices():
  # inner_scan_unroll=-1 (the default) is resolved for the devices a run trains on: unrolled
  # on one CPU device or an accelerator, a loop on host devices that share the cores
  # (docs/performance.md, session 39); a value the user set is kept.
  cfg = ModelConfig()
  assert cfg.inner_scan_unroll == AUTO_UNROLL
  dev = lambda platform, process=0: types.SimpleNamespace(platform=platform, process_index=process)
  one = jax.devices()[:1]
  assert resolve_schedule(cfg, one).inner_scan_unroll == 0
  assert Placement({"data": -1, "fsdp": 1}, 2, one).resolve_schedule(cfg).inner_scan_unroll == 0
  assert resolve_schedule(cfg, [dev("cpu"), dev("cpu")]).inner_scan_unroll == 1
  assert resolve_schedule(cfg, [dev("gpu"), dev("gpu")]).inner_scan_unroll == 0
  # One CPU device in each of several processes: nothing shares its cores.
  assert resolve_schedule(cfg, [dev("cpu", 0), dev("cpu", 1)]).inner_scan_unroll == 0
  for kept in (0, 1, 4):
    mine = dataclasses.replace(cfg, inner_scan_unroll=kept)
    assert resolve_schedule(mine, one) is mine
    assert resolve_schedule(mine, [dev("cpu"), dev("cpu")]) is mine


def test_partition_rule_shards_the_largest_divisible_axis_of_matrices():
  assert partition_spec("params/embed", (256, 32), 8, 0) == jax.sharding.PartitionSpec("fsdp",
                                                                                       None)
  assert partition_spec("params/w", (32, 96), 8, 0) == jax.sharding.PartitionSpec(None, "fsdp")
  assert partition_spec("params/w", (30, 96), 4, 0) == jax.sharding.PartitionSpec(None, "fsdp")
  assert partition_spec("params/w", (30, 90), 4, 0) == jax.sharding.PartitionSpec()  # None divides.
  assert partition_spec("params/scale", (256,), 8, 0) == jax.sharding.PartitionSpec()
  assert partition_spec("params/w", (32, 32), 8, 4096) == jax.sharding.PartitionSpec()  # Small.
  assert partition_spec("params/w", (64, 64), 1, 0) == jax.sharding.PartitionSpec()


def test_launch_settings_from_config_or_environment(monkeypatch, tiny_config):
  t = tiny_config.training
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.launch_settings(t) is None  # The default: one process.
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.launch_settings(t) == {"coordinator_address": "10.0.0.1:1234",
                                            "num_processes": 4, "process_id": 3}
  t.process_id = 1  # The config wins over the environment.
  assert distributed.launch_settings(t)["process_id"] == 1
  t.process_id = 7
  with pytest.raises(ConfigError, match=r"training.process_id must be in \[0, 4\), got 7"):
    distributed.launch_settings(t)
  monkeypatch.delenv("JAX_PROCESS_ID")
  t.process_id = None
  with pytest.raises(ConfigError, match="needs training.process_id"):
    distributed.launch_settings(t)
  t.distributed = "off"
  assert distributed.launch_settings(t) is None
  # Any host jax.distributed takes (IPv6 with a zone, a gRPC target) with a port after it.
  t.distributed, t.process_id = "auto", 0
  for good in ("[fe80::1%eth0]:1234", "dns:///head-node:1234", "head-node:1234"):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", good)
    assert distributed.launch_settings(t)["coordinator_address"] == good
  for bad in ("head-node", "head-node:", "head-node:port"):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", bad)
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS must be host:port"):
      distributed.launch_settings(t)


def test_cli_reports_a_mesh_that_does_not_fit_in_one_line(tmp_path):
  proc = run_cli(cli_args(tmp_path / "x", 2, **{"training.mesh.data": 3}), env=devices_env(8))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "hope_jax.train: error: training.mesh: data=3 x fsdp=1 = 3 devices, but 8 are "
      "available; make the product equal the device count (or use -1)")


def test_one_device_init_lowers_threefry_to_a_kernel_only_while_it_is_traced():
  """The option that speeds up a GPU's init compile is on while tracing, then as it was."""
  option = "jax_threefry_gpu_kernel_lowering"
  seen = []

  def init_fn():
    seen.append(getattr(jax.config, option))
    return {"w": jax.random.normal(jax.random.key(0), (4, 4)), "step": jnp.zeros((), jnp.int32)}

  placement = Placement({"data": -1, "fsdp": 1}, 8, jax.devices()[:1])
  before = getattr(jax.config, option)
  state = placement.init_state(init_fn)
  assert seen == [True] and getattr(jax.config, option) == before
  np.testing.assert_array_equal(state["w"], jax.jit(init_fn)()["w"])

  def failing():
    raise ValueError("bad init")

  with pytest.raises(ValueError, match="bad init"):
    placement.init_state(failing)
  assert getattr(jax.config, option) == before
