"""How many XLA devices the CPU is split into for training (`training.cpu_devices`).

One XLA:CPU device keeps a 2-core machine only partly busy on HOPE: its inner loops are
chains of small operations, and XLA parallelises within an operation, not across them.
Exposing the cores as several CPU devices lets the data-parallel mesh (`training.mesh`)
run one slice of the batch per device side by side: 1.19-1.27x the tokens/s of one
device for every block, measured on the 2-core development machine (docs/distributed.md).

`training.cpu_devices`:
  -1 (default): one device per core, as many as divide the batch (and fit the mesh).
     Left alone where the count was already chosen: `JAX_NUM_CPU_DEVICES` or
     `jax.config.update("jax_num_cpu_devices", n)`, `XLA_FLAGS` with
     `--xla_force_host_platform_device_count`, a multi-process run, `JAX_PLATFORMS`
     without "cpu", or JAX already running in this process (a notebook that used JAX
     first). A later `train` call in a process this module already split uses as many
     of those devices as its own batch and mesh want.
  N >= 1: exactly N CPU devices (1 is JAX's own default); overrides the above.

JAX fixes its CPU device count when it first runs, for the whole process.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax

from hope_jax.config import ConfigError

AUTO = -1
_XLA_FLAG = "xla_force_host_platform_device_count"
_split_by_auto = False  # Whether this process' CPU count was set by AUTO (see `configure`).


def requested(t: Any) -> int:
  """The validated `training.cpu_devices` (AUTO when the config has no such key or None).

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
  """The device count AUTO asks for.

  Args:
    mesh_cfg: `training.mesh` (a mapping or an object with `data` and `fsdp`).
    batch_size: the global batch.
    cores: the cores this process may use.

  Returns:
    With both mesh axes fixed, their product (even above `cores`: the mesh asks for it).
    Otherwise the fixed axis' size times the largest d with fixed * d <= cores that
    divides batch / fixed (at least 1), so the -1 axis splits the batch evenly. 1 for
    mesh values the mesh's own checks will reject.
  """
  get = (lambda k: mesh_cfg.get(k, 1)) if hasattr(mesh_cfg, "get") else (
      lambda k: getattr(mesh_cfg, k, 1))
  sizes = [get("data"), get("fsdp")]
  if any(isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1) for s in sizes):
    return 1  # `resolve_mesh_shape` names the bad key.
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 not in sizes or batch_size % fixed:
    return fixed
  per_fixed = batch_size // fixed
  best = max((d for d in range(1, cores // fixed + 1) if per_fixed % d == 0), default=1)
  return fixed * best


def usable_cores() -> int:
  """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 1
  try:  # cgroup v2, e.g. `docker --cpus=2` on a larger host.
    with open("/sys/fs/cgroup/cpu.max") as f:
      quota, period = f.read().split()[:2]
    if quota != "max":
      cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
  except (OSError, ValueError):
    pass
  return cores


def _chosen_elsewhere() -> bool:
  """Whether the CPU device count or the platforms were already chosen outside this module."""
  if jax.config.jax_num_cpu_devices != -1 and not _split_by_auto:  # Env var or config update.
    return True
  if _XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
    return True
  platforms = jax.config.jax_platforms
  return bool(platforms) and "cpu" not in platforms.split(",")


def configure(t: Any, mesh_cfg: Any, multi_process: bool) -> int | None:
  """Sets JAX's CPU device count for this run; call it before anything touches a device.

  Args:
    t: the `training` config section.
    mesh_cfg: `training.mesh` (or the default mesh).
    multi_process: whether this process is one of several (AUTO then leaves JAX alone).

  Returns:
    How many of the CPU devices the run's mesh should use (the first ones), or None for
    all of JAX's devices.

  Raises:
    ConfigError: a bad value, or an explicit count JAX can no longer take because it already
      runs in this process with another.
  """
  global _split_by_auto
  want = requested(t)
  if want == AUTO:
    if multi_process or _chosen_elsewhere():
      return None
    n = auto_count(mesh_cfg, int(t.batch_size), usable_cores())
  else:
    n = want
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # JAX already runs in this process; its devices stay as they are.
    try:
      have = len(jax.devices("cpu"))
    except RuntimeError:  # No CPU backend (JAX_PLATFORMS without "cpu"): nothing to split.
      return None
    if want == AUTO:
      # Split by an earlier run here (or JAX's one device): use what this run's batch wants.
      n = auto_count(mesh_cfg, int(t.batch_size), have)
      return n if n <= have else None
    if have != want:
      raise ConfigError(
          f"training.cpu_devices={want}, but JAX already runs in this process with {have} "
          f"CPU device(s); set it before the first JAX operation (a fresh process or "
          f"notebook kernel), or use {have} or -1") from None
    return want
  _split_by_auto = want == AUTO
  return n
