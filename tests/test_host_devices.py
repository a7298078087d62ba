"""training.cpu_devices: how many XLA devices the CPU is split into (hope_jax/train/host_devices.py).

The README's main job (tests/test_docs_commands.py) checks that a fresh CLI process takes
the default split; here the rule, and what a process in which JAX already runs does.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from ml_collections import config_dict

from hope_jax.config import ConfigError
from hope_jax.train import host_devices
from tests.conftest import REPO

DATA = {"data": -1, "fsdp": 1}


@pytest.mark.parametrize("mesh,batch,cores,expected", [
    (DATA, 8, 2, 2),  # The 2-core development machine and the base config.
    (DATA, 8, 1, 1),
    (DATA, 3, 2, 1),  # 2 does not divide 3.
    (DATA, 8, 16, 8),  # Never more devices than sequences.
    (DATA, 8, 6, 4),  # The largest divisor of 8 that fits 6 cores.
    (DATA, 12, 5, 4),
    ({"data": -1, "fsdp": 2}, 8, 4, 4),  # fsdp=2 times data=2.
    ({"data": -1, "fsdp": 2}, 8, 2, 2),  # The fixed axis alone already fills the cores.
    ({"data": 2, "fsdp": 1}, 8, 16, 2),  # Both axes fixed: exactly the mesh's size.
    ({"data": 8, "fsdp": 1}, 8, 2, 8),  # ... even above the core count.
    ({"data": 1, "fsdp": 1}, 8, 2, 1),
    ({"data": 2.0, "fsdp": -1}, 8, 2, 1),  # Bad values: left to the mesh's own error.
    ({"data": "2", "fsdp": -1}, 8, 2, 1),
    ({"data": -1, "fsdp": None}, 8, 2, 1),
])
def test_auto_count(mesh, batch, cores, expected):
  assert host_devices.auto_count(mesh, batch, cores) == expected
  if all(isinstance(v, int) for v in mesh.values()):
    assert host_devices.auto_count(config_dict.ConfigDict(mesh), batch, cores) == expected


def _training(**kw):
  return config_dict.ConfigDict({"batch_size": 8, **kw})


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_bad_values_name_the_key(value):
  with pytest.raises(ConfigError, match=r"training\.cpu_devices must be a positive integer"):
    host_devices.requested(_training(cpu_devices=value))


def test_a_config_without_the_key_means_auto():
  assert host_devices.requested(_training()) == host_devices.AUTO
  assert host_devices.requested(_training(cpu_devices=None)) == host_devices.AUTO


def test_auto_leaves_a_multi_process_run_alone():
  assert host_devices.configure(_training(), DATA, True) is None


def test_an_explicit_count_jax_can_no_longer_take_is_refused():
  have = len(jax.devices("cpu"))  # JAX now runs in this process (with conftest's count).
  assert host_devices.configure(_training(cpu_devices=have), DATA, False) == have
  with pytest.raises(ConfigError, match=rf"training\.cpu_devices={have + 1}, but JAX already "
                                        rf"runs in this process with {have} CPU device"):
    host_devices.configure(_training(cpu_devices=have + 1), DATA, False)
  assert len(jax.devices("cpu")) == have


# Each case runs in a fresh process: JAX fixes its CPU device count when it first runs.
_PROBE = """
import json, os, sys
import jax
from hope_jax.train import host_devices
case = json.loads(sys.argv[1])
if case.get("config_update"):
  jax.config.update("jax_num_cpu_devices", case["config_update"])
runs = []
for batch in case["batches"]:
  from ml_collections import config_dict
  t = config_dict.ConfigDict({"batch_size": batch, "cpu_devices": case.get("cpu_devices", -1)})
  got = host_devices.configure(t, {"data": -1, "fsdp": 1}, case.get("multi", False))
  runs.append([got, len(jax.devices("cpu"))])
print(json.dumps(runs))
"""


def _probe(case, env_extra=None):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(env_extra or {}))
  proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(case)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_in_fresh_processes():
  cores = host_devices.usable_cores()
  n8 = host_devices.auto_count(DATA, 8, cores)
  # The first run splits; a later one with another batch uses what its batch wants of them.
  assert _probe({"batches": [8, 3]}) == [[n8, n8], [host_devices.auto_count(DATA, 3, n8), n8]]
  # Chosen elsewhere: left alone (None: the mesh takes all of JAX's devices).
  assert _probe({"batches": [8]}, {"JAX_NUM_CPU_DEVICES": "3"}) == [[None, 3]]
  assert _probe({"batches": [8]},
                {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == [[None, 3]]
  assert _probe({"batches": [8], "config_update": 3}) == [[None, 3]]
  # An explicit count wins over the environment.
  assert _probe({"batches": [8], "cpu_devices": 3}, {"JAX_NUM_CPU_DEVICES": "5"}) == [[3, 3]]
