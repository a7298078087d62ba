"""The JSON manifest: naming, reading, writing, config comparison (no Orbax here).

A save at step 500 at unix time 1234567894 in `checkpoint_dir` is

  checkpoint_step_500_ts_1234567894.json   # this manifest (the user-facing index)
  checkpoint_step_500/                     # the Orbax payload it names in `model_file`

The manifest has the four documented fields (`step`, `timestamp`, `model_file`,
`config`) plus extras (`format`, `versions`, `num_params`, `rng_impl`, `metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

from absl import logging

from hope_jax.config import SCHEDULE_KEYS, ConfigError, ModelConfig, model_section

FORMAT = "hope_jax.checkpoint/1"
REQUIRED = ("step", "timestamp", "model_file", "config")
MANIFEST_RE = re.compile(r"^checkpoint_step_(\d+)_ts_(\d+)\.json$")
PAYLOAD_PREFIX = "checkpoint_step"  # Orbax step directories are `checkpoint_step_<step>`.


class CheckpointError(ConfigError):
  """A checkpoint cannot be saved, read or used; the message names the path and the reason.

  A subclass of `ConfigError` so that the train CLI reports it the same way: the
  message on stderr and exit status 2, never a library traceback.
  """


class ConfigMismatchError(CheckpointError):
  """The checkpoint's model settings differ from the current config."""


def load_error(path: str, reason: str) -> CheckpointError:
  return CheckpointError(f"Failed to load checkpoint: {path}: {reason}")


def manifest_name(step: int, timestamp: int) -> str:
  return f"checkpoint_step_{step}_ts_{timestamp}.json"


def payload_name(step: int) -> str:
  return f"{PAYLOAD_PREFIX}_{step}"


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """One manifest found in a checkpoint directory.

  Attributes:
    step: the training step it was saved at (from the file name).
    timestamp: unix seconds (from the file name).
    manifest_path: path of the JSON manifest.
    valid: whether the manifest parses, has every field and names an existing payload
      (a cheap check: array contents are verified only when restored).
    reason: why it is not valid ("" when it is).
  """

  step: int
  timestamp: int
  manifest_path: str
  valid: bool
  reason: str = ""


def canonical(obj: Any) -> Any:
  """JSON-canonical form of a config (ConfigDict/dict): tuples become lists, keys sorted."""
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  return json.loads(json.dumps(obj, sort_keys=True))


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                prefix: str = "") -> list[tuple[str, Any, Any]]:
  """Every differing key between two canonical configs as `(key, saved, current)`."""
  out = []
  for key in sorted(set(saved) | set(current)):
    path = f"{prefix}{key}"
    a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_diff(a, b, path + ".")
    elif a != b:
      out.append((path, a, b))
  return out


def check_model_config(saved_config: Mapping[str, Any], current_config: Any, path: str) -> None:
  """Raises CheckpointError naming every `model.*` key whose value differs (but schedule keys).

  A key the checkpoint lacks (written before the key existed) matches when the current value
  is the key's default: new model keys are added with defaults that keep the old behaviour.
  The schedule keys (`hope_jax.config.SCHEDULE_KEYS`: how the step is computed, not what) may
  differ: they are logged.
  """
  saved = canonical(saved_config.get("model", {}))
  current = canonical(model_section(current_config))
  defaults = canonical(ModelConfig().to_dict())
  for key, value in current.items():
    if key not in saved and key in defaults and value == defaults[key]:
      saved[key] = value
  diff = config_diff(saved, current, "model.")
  schedule = [d for d in diff if d[0].removeprefix("model.") in SCHEDULE_KEYS]
  diff = [d for d in diff if d not in schedule]
  describe = lambda ds: "; ".join(f"{k}: checkpoint={json.dumps(a)} current={json.dumps(b)}"
                                  for k, a, b in ds)
  if diff:
    raise ConfigMismatchError(
        f"Checkpoint model config doesn't match current config ({path}): {describe(diff)}. "
        "Model settings cannot change on resume: use the checkpoint's model settings, or start "
        "a new run in a new training.checkpoint_dir.")
  if schedule:
    logging.info("Model schedule settings differ from the checkpoint's (they change how the "
                 "step is computed, not the model, so the run resumes): %s", describe(schedule))


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes JSON so that a crash leaves either the old file, the new file, or no file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def read_manifest(path: str) -> tuple[dict[str, Any], str]:
  """Parses and checks a manifest; returns it and the absolute payload directory.

  Raises:
    CheckpointError: "Failed to load checkpoint: <path>: <reason>" for a missing or
      unreadable file, bad JSON, missing or mistyped fields, a `model_file` that leaves
      the manifest's directory, or a missing payload.
  """
  if os.path.isdir(path):
    raise load_error(path, "is a directory, not a manifest (restore_latest() and load_model() "
                     "take a run's checkpoint directory)")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise load_error(path, "manifest file does not exist") from None
  except (OSError, UnicodeDecodeError) as e:
    raise load_error(path, f"cannot read manifest ({e})") from None
  try:
    manifest = json.loads(text)
  except json.JSONDecodeError as e:
    raise load_error(path, f"manifest is not valid JSON ({e})") from None
  if not isinstance(manifest, dict):
    raise load_error(path, "manifest is not a JSON object")
  missing = [k for k in REQUIRED if k not in manifest]
  if missing:
    raise load_error(path, f"manifest is missing field(s) {', '.join(missing)}")
  for key, kind in (("step", int), ("timestamp", int), ("model_file", str), ("config", dict)):
    value = manifest[key]
    if not isinstance(value, kind) or isinstance(value, bool):
      raise load_error(path, f"manifest field '{key}' should be {kind.__name__}, got {value!r}")
  if "model" not in manifest["config"]:
    raise load_error(path, "manifest field 'config' has no 'model' section")
  if not isinstance(manifest["config"]["model"], dict):
    raise load_error(path, f"manifest field 'config.model' should be an object, got "
                     f"{manifest['config']['model']!r}")
  return manifest, resolve_payload(path, manifest["model_file"])


def resolve_payload(manifest_path: str, model_file: str) -> str:
  """The payload directory named by `model_file`, which must stay inside the manifest's dir."""
  root = os.path.realpath(os.path.dirname(os.path.abspath(manifest_path)))
  if not model_file or os.path.isabs(model_file):
    raise load_error(manifest_path, f"model_file {model_file!r} must be a relative path")
  target = os.path.realpath(os.path.join(root, model_file))
  if os.path.commonpath([root, target]) != root or target == root:
    raise load_error(manifest_path,
                     f"model_file {model_file!r} points outside the checkpoint directory")
  if not os.path.isdir(target):
    raise load_error(manifest_path, f"payload {model_file!r} does not exist")
  return target


def scan(directory: str) -> list[CheckpointInfo]:
  """Manifests in `directory`, oldest step first, each checked cheaply for validity."""
  if not os.path.isdir(directory):
    return []
  found = []
  for name in os.listdir(directory):
    m = MANIFEST_RE.match(name)
    if not m:
      continue
    path = os.path.join(directory, name)
    try:
      manifest, _ = read_manifest(path)
      ok, reason = True, ""
      if manifest["step"] != int(m.group(1)):
        ok, reason = False, f"manifest step {manifest['step']} does not match its file name"
      elif manifest["timestamp"] != int(m.group(2)):
        ok, reason = False, (f"manifest timestamp {manifest['timestamp']} does not match its "
                             "file name")
    except CheckpointError as e:
      ok, reason = False, str(e).split(": ", 2)[-1]
    found.append(CheckpointInfo(int(m.group(1)), int(m.group(2)), path, ok, reason))
  return sorted(found, key=lambda c: (c.step, c.timestamp))
