"""Multi-process start-up on JAX's own runtime (`jax.distributed`).

A run is multi-process when it is given a coordinator, from the config

  --config.training.coordinator_address=host0:1234
  --config.training.num_processes=4 --config.training.process_id=$RANK

or from the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`; the config wins), or with `training.distributed="on"`, which
lets JAX detect the cluster itself (Cloud TPU slices, SLURM, Open MPI, ...).
Every process then runs the same command; process 0 alone logs and writes files.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
from absl import logging

from hope_jax.config import ConfigError

MODES = ("auto", "on", "off")
# What jax.distributed takes: a port after the last colon, and anything before it (a name, an
# IPv4 address, a bracketed IPv6 one, a gRPC target such as dns:///host) as the host.
_HOST_PORT = re.compile(r"\S+:[0-9]{1,5}")


def _int_setting(t: Any, key: str, env: str) -> int | None:
  value = t.get(key) if hasattr(t, "get") else None
  source = f"training.{key}"
  if value is None and os.environ.get(env, "").strip():
    value, source = os.environ[env].strip(), env
  if value is None:
    return None
  try:
    if isinstance(value, bool):
      raise ValueError
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{source} must be an integer, got {value!r}") from None


def launch_settings(t: Any) -> dict[str, Any] | None:
  """The `jax.distributed.initialize` arguments this run asks for, or None (one process).

  Raises:
    ConfigError: a bad mode, count or id.
  """
  mode = t.get("distributed", "auto") if hasattr(t, "get") else "auto"
  if mode not in MODES:
    raise ConfigError(f"training.distributed={mode!r} is not one of {MODES}")
  address = (t.get("coordinator_address") if hasattr(t, "get") else None) or os.environ.get(
      "JAX_COORDINATOR_ADDRESS") or None
  num = _int_setting(t, "num_processes", "JAX_NUM_PROCESSES")
  pid = _int_setting(t, "process_id", "JAX_PROCESS_ID")
  if mode == "off" or (mode == "auto" and address is None and num is None):
    return None
  if address is not None and not _HOST_PORT.fullmatch(str(address)):
    source = ("training.coordinator_address" if hasattr(t, "get") and t.get("coordinator_address")
              else "JAX_COORDINATOR_ADDRESS")
    raise ConfigError(f"{source} must be host:port (e.g. 10.0.0.1:1234), got {address!r}")
  if num is not None and num < 1:
    raise ConfigError(f"training.num_processes must be >= 1, got {num}")
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ConfigError(f"training.process_id must be in [0, {num}), got {pid}")
  if mode == "auto" and (address is None or num is None or pid is None):
    missing = [k for k, v in (("coordinator_address", address), ("num_processes", num),
                              ("process_id", pid)) if v is None]
    raise ConfigError(
        f"a multi-process launch needs training.{', training.'.join(missing)} (or the "
        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); set "
        "training.distributed='on' to let JAX detect the cluster instead")
  return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def initialize(t: Any) -> bool:
  """Joins the job's processes when configured; returns whether this is a multi-process run.

  Must run before anything touches a JAX device (the train loop calls it first).

  Raises:
    ConfigError: bad settings, or a coordinator that cannot be reached.
  """
  settings = launch_settings(t)
  if settings is None:
    return jax.process_count() > 1 if jax.distributed.is_initialized() else False
  if not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize(**settings)
    except (RuntimeError, ValueError) as e:
      args = ", ".join(f"{k}={v!r}" for k, v in settings.items() if v is not None)
      why = " ".join(str(e).split())[:400]
      raise ConfigError(f"jax.distributed.initialize({args}) failed: {why}") from None
  logging.info("Process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on process 0, the one that logs, writes metrics and checkpoint manifests."""
  return jax.process_index() == 0
