"""How many XLA devices the CPU is split into for training (`training.cpu_devices`).

One XLA:CPU device keeps a 2-core machine only partly busy on HOPE: its inner loops are
chains of small operations, and XLA parallelises within an operation, not across them.
Exposing the cores as several CPU devices lets the data-parallel mesh (`training.mesh`)
run one slice of the batch per device side by side: 1.19-1.27x the tokens/s of one
device for every block, measured on the 2-core development machine (docs/performance.md).

`training.cpu_devices`:
  -1 (default): one device per core, as many as divide the batch (and fit the mesh);
     left alone where the environment already chose (`JAX_NUM_CPU_DEVICES`, or
     `XLA_FLAGS` with `--xla_force_host_platform_device_count`), in a multi-process
     run, or where JAX was already running in this process (a notebook that used JAX
     first).
  N >= 1: exactly N CPU devices (1 is JAX's own default).

It only matters where the CPU is the device JAX computes on; on a GPU or TPU host the
extra CPU devices are unused.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax

from hope_jax.config import ConfigError

AUTO = -1
_XLA_FLAG = "xla_force_host_platform_device_count"


def requested(t: Any) -> int:
  """The validated `training.cpu_devices` (AUTO when the config has no such key).

  Raises:
    ConfigError: anything but a positive integer or -1.
  """
  value = t.get("cpu_devices", AUTO) if hasattr(t, "get") else AUTO
  if value is None:
    return AUTO
  if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != AUTO):
    raise ConfigError(f"training.cpu_devices must be a positive integer or -1 (one per core "
                      f"that divides the batch), got {value!r}")
  return value


def auto_count(mesh_cfg: Any, batch_size: int, cores: int) -> int:
  """Devices for AUTO: the mesh's fixed size times the most cores that split the batch.

  A mesh with both axes fixed gets exactly its size. Otherwise the fixed axis' size is
  multiplied by the largest d with fixed * d <= cores that divides batch / fixed (at
  least 1), so `training.mesh`'s -1 axis takes the rest and the batch splits evenly.
  """
  get = (lambda k: mesh_cfg.get(k, 1)) if hasattr(mesh_cfg, "get") else (
      lambda k: getattr(mesh_cfg, k, 1))
  sizes = [get("data"), get("fsdp")]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 not in sizes or fixed < 1 or batch_size % fixed:
    return max(fixed, 1)  # The mesh's own checks explain any misfit.
  per_fixed = batch_size // fixed
  best = max((d for d in range(1, cores // fixed + 1) if per_fixed % d == 0), default=1)
  return fixed * best


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _environment_chose() -> bool:
  return bool(os.environ.get("JAX_NUM_CPU_DEVICES", "").strip()) or (
      _XLA_FLAG in os.environ.get("XLA_FLAGS", ""))


def configure(t: Any, mesh_cfg: Any, multi_process: bool) -> int | None:
  """Sets JAX's CPU device count for this run; must run before anything touches a device.

  Args:
    t: the `training` config section.
    mesh_cfg: `training.mesh` (or the default mesh).
    multi_process: whether this process is one of several (AUTO then leaves JAX alone).

  Returns:
    The count set, or None where it was left to JAX.

  Raises:
    ConfigError: a bad value, or an explicit count JAX can no longer take because it was
      already running in this process with another.
  """
  want = requested(t)
  if want == AUTO:
    if multi_process or _environment_chose():
      return None
    want_n = auto_count(mesh_cfg, int(t.batch_size), _cores())
  else:
    want_n = want
  try:
    jax.config.update("jax_num_cpu_devices", want_n)
  except RuntimeError:  # JAX already runs in this process; its devices stay as they are.
    have = len(jax.devices("cpu"))
    if want != AUTO and have != want:
      raise ConfigError(
          f"training.cpu_devices={want}, but JAX already runs in this process with {have} "
          f"CPU device(s); set it before the first JAX operation (a fresh process or "
          f"notebook kernel), or use {have} or -1") from None
    return None
  return want_n
