"""training.cpu_devices: how many XLA devices the CPU is split into (hope_jax/train/host_devices.py).

A fresh process taking the default is checked by tests/test_docs_commands.py (the README's
main job logs the split); here the rule and the already-running case.
"""

import jax
import pytest
from ml_collections import config_dict

from hope_jax.config import ConfigError
from hope_jax.train import host_devices

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
    ({"data": 1, "fsdp": 1}, 8, 2, 1),
])
def test_auto_count(mesh, batch, cores, expected):
  assert host_devices.auto_count(mesh, batch, cores) == expected
  assert host_devices.auto_count(config_dict.ConfigDict(mesh), batch, cores) == expected


def _training(**kw):
  return config_dict.ConfigDict({"batch_size": 8, **kw})


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_bad_values_name_the_key(value):
  with pytest.raises(ConfigError, match=r"training\.cpu_devices must be a positive integer"):
    host_devices.requested(_training(cpu_devices=value))


def test_a_config_without_the_key_means_auto():
  assert host_devices.requested(_training()) == host_devices.AUTO


def test_once_jax_runs_auto_keeps_its_devices_and_an_explicit_other_count_is_refused():
  have = len(jax.devices("cpu"))  # JAX now runs in this process.
  assert host_devices.configure(_training(cpu_devices=-1), DATA, False) is None
  assert host_devices.configure(_training(cpu_devices=have), DATA, False) == have  # No change.
  with pytest.raises(ConfigError, match=rf"training\.cpu_devices={have + 1}, but JAX already "
                                        rf"runs in this process with {have} CPU device"):
    host_devices.configure(_training(cpu_devices=have + 1), DATA, False)
  assert len(jax.devices("cpu")) == have
