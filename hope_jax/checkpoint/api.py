"""Reading checkpoints from notebooks and evaluation scripts (no locking, read-only)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging
from ml_collections import config_dict

from hope_jax.checkpoint import manifest as mf
from hope_jax.checkpoint import store
from hope_jax.checkpoint.manifest import CheckpointError, CheckpointInfo


@dataclasses.dataclass
class Restored:
  """A checkpoint read back.

  Attributes:
    step: the training step it was saved at.
    config: the full run config it was saved with (ConfigDict; tuples read back as lists).
    params: the parameters, a pure nested dict (as `nnx.to_pure_dict`).
    opt_state: the optimizer state when asked for (else None). Without an
      `abstract_state` its containers are plain dicts/lists, not optax's named tuples.
    rng: the training RNG key (None unless the optimizer state was asked for).
    loader_state: the data loader position.
    manifest: the manifest dict; `manifest_path`: where it was read from.
  """

  step: int
  config: config_dict.ConfigDict
  params: Any
  opt_state: Any
  rng: Any
  loader_state: dict
  manifest: dict
  manifest_path: str


def _path(value: Any, what: str) -> str:
  """`value` as a str path; a TypeError naming the argument for None, a number and the like."""
  try:
    return os.fspath(value)
  except TypeError:
    raise TypeError(f"{what} must be a path (str or os.PathLike), not "
                    f"{type(value).__name__}: {value!r}") from None


def list_checkpoints(directory: str) -> list[CheckpointInfo]:
  """Checkpoints in `directory`, oldest first: `.step`, `.timestamp`, `.manifest_path`, `.valid`.

  Validity is a cheap check (manifest parses, fields present, payload exists); array
  contents are checked against their checksums by `restore`.
  """
  return mf.scan(_path(directory, "list_checkpoints: directory"))


def restore(manifest_path: str, config: Any = None, *, with_opt_state: bool = False,
            abstract_state: Any = None) -> Restored:
  """Reads one checkpoint by its manifest path.

  Args:
    manifest_path: `.../checkpoint_step_<N>_ts_<T>.json`.
    config: when given (a full config or ConfigDict with a `model` section), the
      checkpoint's model settings must equal its `model` section, except the schedule
      settings (`hope_jax.config.SCHEDULE_KEYS`), which are logged when they differ.
    with_opt_state: also read the optimizer state and RNG.
    abstract_state: the train state's structure (ShapeDtypeStructs) to restore into,
      which gives optax's exact types back; implies `with_opt_state`.

  Raises:
    CheckpointError: "Failed to load checkpoint: <path>: <reason>", or a model config
      mismatch naming every differing key.
  """
  manifest_path = _path(manifest_path, "restore: manifest_path")  # `Restored` holds a str.
  manifest, payload = mf.read_manifest(manifest_path)
  if config is not None:
    mf.check_model_config(manifest["config"], config, manifest_path)
  params_target = train_target = None
  if abstract_state is not None:
    with_opt_state = True
    params_target = abstract_state["params"]
    train_target = {k: abstract_state[k] for k in ("opt_state", "step", "rng")}
  out = store.read_payload(payload, manifest_path, params_target=params_target,
                           train_target=train_target, with_train=with_opt_state)
  store.check_inner_manifest(out["manifest"], manifest, manifest_path)
  opt_state = rng = None
  if out["train"] is not None:
    opt_state, rng = out["train"]["opt_state"], out["train"]["rng"]
    impl = manifest.get("rng_impl")
    if impl and not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng, impl=impl)
  return Restored(step=manifest["step"], config=config_dict.ConfigDict(manifest["config"]),
                  params=out["params"], opt_state=opt_state, rng=rng,
                  loader_state=out["loader"], manifest=manifest, manifest_path=manifest_path)


def restore_latest(directory: str, config: Any = None, **kwargs) -> Restored:
  """The newest readable checkpoint in `directory`; broken newer ones are skipped with a warning.

  A model config mismatch is not skipped: it raises.
  """
  directory = _path(directory, "restore_latest: directory")
  entries = mf.scan(directory)
  newest = None  # Why the newest one failed: said in the error, not only in a warning.
  for e in reversed(entries):
    if not e.valid:
      logging.warning("Skipping unreadable checkpoint: Failed to load checkpoint: %s: %s",
                      e.manifest_path, e.reason)
      newest = newest or f"{e.manifest_path}: {e.reason}"
      continue
    try:
      return restore(e.manifest_path, config, **kwargs)
    except mf.ConfigMismatchError:
      raise
    except CheckpointError as err:
      logging.warning("Skipping unreadable checkpoint: %s", err)
      newest = newest or str(err).removeprefix("Failed to load checkpoint: ")
  reason = (f"none of its {len(entries)} checkpoint(s) is readable; the newest: {newest}"
            + (" (warnings give the others)" if len(entries) > 1 else "") if entries else
            "no checkpoint found" if os.path.isdir(directory) else
            "is a file, not a checkpoint directory (restore() takes a manifest)"
            if os.path.isfile(directory) else "directory does not exist")
  raise CheckpointError(f"Failed to load checkpoint: {directory}: {reason}")


def load_model(path: str):
  """A ready `LanguageModel` from a checkpoint directory (newest readable) or a manifest.

  Example:
    model = hope_jax.checkpoint.load_model("checkpoints/run1")
    logits_BLV = model(tokens_BL)
  """
  from flax import nnx

  import hope_jax

  path = _path(path, "load_model: path")
  restored = restore(path) if os.path.isfile(path) else restore_latest(path)
  model = hope_jax.build_model(restored.config.model)
  state = nnx.state(model)
  try:
    nnx.replace_by_pure_dict(state, restored.params)
  except (ValueError, KeyError) as e:
    raise mf.load_error(restored.manifest_path,
                        f"parameters do not fit the model built from its config ({e})") from None
  nnx.update(model, state)
  return model
