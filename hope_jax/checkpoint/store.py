"""Everything that touches Orbax: the step payload, its items, checksums and restore.

A payload directory (`checkpoint_step_<step>/`, committed atomically by Orbax) holds
five items:

  params     StandardSave  the model parameters (pure nested dict, `nnx.to_pure_dict`)
  train      StandardSave  {"opt_state", "step", "rng"}
  checksums  JsonSave      one uint32 per array, computed on device before the save
  loader     JsonSave      the data loader position
  manifest   JsonSave      the manifest dict, atomic with the weights

Checksums exist because Orbax has no end-to-end check: a flipped bit inside an
incompressible (e.g. random-float) zstd block restores silently to a wrong value.
"""

from __future__ import annotations

import functools
import logging as py_logging
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocm

from hope_jax import processes
from hope_jax.checkpoint.manifest import (
    PAYLOAD_PREFIX,
    CheckpointError,
    ConfigMismatchError,
    canonical,
    load_error,
)


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's own INFO chatter (dozens of lines per save) unless --v>=1; keeps warnings.

  Orbax's warnings and errors keep their first line but lose their tracebacks (unless
  --v>=1): a failed save logged one from each of its background threads, about 500 lines
  around the one-line "Failed to save checkpoint" that names the cause. asyncio's reports of
  Orbax's unretrieved task exceptions (one per array, when a loaded machine exits before
  Orbax's tasks are collected) are dropped unless --v>=1.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if "Waiting for previous save to complete" in str(record.msg):
      return False  # The manager waits on purpose (to write the manifest after the commit).
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname or (
        record.name == "asyncio" and "orbax" in str(record.exc_info and record.exc_info[2]
                                                    and _frames(record.exc_info[2])))
    if logging.get_verbosity() >= 1:
      return True
    if record.levelno < py_logging.WARNING:
      return not from_orbax
    if from_orbax and record.name == "asyncio":
      # "Task exception was never retrieved", one per array of a failed save, logged when the
      # interpreter collects Orbax's tasks: the "Failed to save" error already names the cause.
      return False
    if from_orbax and (record.exc_info or "\n" in record.getMessage()):
      record.msg, record.args = record.getMessage().splitlines()[0][:500], None
      record.exc_info = record.exc_text = None
    return True


def _frames(tb) -> str:
  """The file names of a traceback's frames (to tell Orbax's asyncio leftovers)."""
  names = []
  while tb is not None:
    names.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return " ".join(names)


# asyncio's "exception was never retrieved" for Orbax's failed writes comes through its own
# logger, which the absl logger's filters never see.
for _logger in (logging.get_absl_logger(), py_logging.getLogger("asyncio")):
  if not any(isinstance(f, _QuietOrbax) for f in _logger.filters):
    _logger.addFilter(_QuietOrbax())

ARRAY_ITEMS = ("params", "train")
JSON_ITEMS = ("checksums", "loader", "manifest")
ITEMS = ARRAY_ITEMS + JSON_ITEMS


def make_manager(directory: str, *, keep_last: int | None, keep_best: str | None,
                 keep_best_mode: str) -> ocp.CheckpointManager:
  """An async Orbax manager whose retention never deletes the newest checkpoint.

  `best_fn` + `max_to_keep` would keep the N best and may delete the newest (the
  Orbax trap), so retention is a preservation policy: the newest `keep_last`
  always, plus the single best by `keep_best` when asked.
  """
  best_fn, policy = None, None
  if keep_best:
    worst = float("inf") if keep_best_mode == "min" else float("-inf")
    best_fn = functools.partial(_metric, keep_best, worst)
  if keep_last is not None:
    policies = [ocm.LatestN(n=max(int(keep_last), 1))]
    if best_fn is not None:
      # BestN sorts ascending and keeps the tail: reverse=True keeps the smallest.
      policies.append(ocm.BestN(get_metric_fn=best_fn, reverse=keep_best_mode == "min", n=1,
                                keep_checkpoints_without_metrics=False))
    policy = ocm.AnyPreservationPolicy(policies)
  options = ocp.CheckpointManagerOptions(
      step_name_format=ocp.step.standard_name_format(step_prefix=PAYLOAD_PREFIX),
      enable_async_checkpointing=True,
      cleanup_tmp_directories=False,  # Done synchronously by the manager's reconcile.
      save_root_metadata=False,
      preservation_policy=policy,
      best_fn=best_fn,
      best_mode=keep_best_mode,
  )
  return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)


def is_primary() -> bool:
  """True on the process that writes manifests and JSON items (process 0, Orbax's primary)."""
  return jax.process_index() == 0


def _metric(name: str, worst: float, metrics: Any) -> float:
  value = (metrics or {}).get(name)
  return worst if value is None else float(value)


def save_args(params, train, checksums, loader_state, manifest) -> ocp.args.Composite:
  return ocp.args.Composite(
      params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
      checksums=ocp.args.JsonSave(checksums), loader=ocp.args.JsonSave(loader_state),
      manifest=ocp.args.JsonSave(manifest))


# ------------------------------------------------------------------ checksums

def _path_str(path) -> str:
  """A key path as "params/layers/0/w": the same for int and "0" keys, tuples and lists."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Position-weighted uint32 sum of the raw bits: any single flipped bit changes it."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    size = x.dtype.itemsize
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    words = jax.lax.bitcast_convert_type(x, word).reshape(-1).astype(jnp.uint32)
  # Odd weights: a change of 2^k in one word changes the sum mod 2^32.
  weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any) -> dict[str, int]:
  """`{"params/layers/0/w": uint32, ...}` for every array leaf (blocks until computed)."""
  sums = jax.device_get(_checksum_tree(tree))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {_path_str(p): int(v) for p, v in flat}


def verify_checksums(tree: Any, expected: dict[str, int], *, require_all: bool,
                     path: str) -> None:
  """Raises a load error naming the first array whose checksum differs."""
  actual = checksums(tree)
  for key, value in actual.items():
    if key in expected and expected[key] != value:
      raise load_error(path, f"array '{key}' is corrupt (checksum mismatch)")
    if key not in expected and require_all:
      raise load_error(path, f"array '{key}' has no recorded checksum")


# -------------------------------------------------------------------- restore

def with_shardings(abstract: Any) -> Any:
  """ShapeDtypeStructs with explicit shardings for this process (Orbax needs them).

  Arrays without a sharding go to this process's first device: `jax.devices()[0]` belongs to
  process 0, and other processes cannot place arrays there.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fix(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or device)

  return jax.tree.map(fix, abstract)


def _target_from_metadata(metadata_tree: Any) -> Any:
  """An abstract target from what the payload says it holds ("0" keys become 0)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def build(node):
    if isinstance(node, dict):
      return {(int(k) if isinstance(k, str) and k.isdigit() else k): build(v)
              for k, v in node.items()}
    if isinstance(node, (list, tuple)):
      return [build(v) for v in node]
    if node is None:
      return None
    return jax.ShapeDtypeStruct(tuple(node.shape), node.dtype, sharding=device)

  return build(metadata_tree)


def _checkpointer() -> ocp.Checkpointer:
  """A reader for this process alone: its restore waits for no other process.

  Orbax's restore ends in a barrier of all processes, which a process whose read failed
  never reaches; `read_payload` agrees on the outcome itself instead.
  """
  handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
  handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
  me = jax.process_index()
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers),
                          multiprocessing_options=ocp.options.MultiprocessingOptions(
                              primary_host=me, active_processes={me}))


def _check_target(params_target: Any, saved_tree: Any, manifest_path: str) -> None:
  """Raises ConfigMismatchError when the target's parameters are not the checkpoint's.

  Orbax would fail on the first differing array with advice about `strict=False`, and a
  caller's wrong target would read as a damaged checkpoint (skipped by `restore_latest`).
  """
  def shapes(tree, leaf):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]
    return {_path_str(p): (tuple(x.shape), str(x.dtype)) for p, x in flat if x is not None}

  want = shapes(params_target, None)
  have = shapes(saved_tree, lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  for key in sorted(set(want) | set(have)):
    if want.get(key) != have.get(key):
      show = lambda v: "absent" if v is None else f"{v[1]}{list(v[0])}"
      raise ConfigMismatchError(
          f"{manifest_path}: parameter '{key}' is {show(have.get(key))} in the checkpoint and "
          f"{show(want.get(key))} in the target: the abstract_state (or model config) "
          "describes another model")


def read_items(payload_dir: str, manifest_path: str, params_target: Any, train_target: Any,
               with_train: bool) -> dict[str, Any]:
  """`read_payload`'s part that touches only this process's files and devices (no checksums).

  Raises:
    CheckpointError: "Failed to load checkpoint: <manifest_path>: <reason>".
  """
  if payload_dir.endswith(".orbax-checkpoint-tmp") or ".orbax-checkpoint-tmp" in payload_dir:
    raise load_error(manifest_path, "payload was never committed (interrupted save)")
  for name in ITEMS:
    if not os.path.isdir(os.path.join(payload_dir, name)):
      raise load_error(manifest_path, f"payload item '{name}' is missing in {payload_dir}")
  ckptr = _checkpointer()
  try:
    meta = ckptr.metadata(payload_dir).item_metadata
    for name in ARRAY_ITEMS[:1 + with_train]:
      try:
        tree = meta[name].tree
      except (KeyError, TypeError, AttributeError):
        tree = None
      if tree is None:
        raise load_error(manifest_path, f"payload item '{name}' has no readable metadata")
    if params_target is None:
      params_target = _target_from_metadata(meta["params"].tree)
    else:
      _check_target(params_target, meta["params"].tree, manifest_path)
    if with_train and train_target is None:
      train_target = _target_from_metadata(meta["train"].tree)
    args = {"params": ocp.args.StandardRestore(with_shardings(params_target)),
            "checksums": ocp.args.JsonRestore(), "loader": ocp.args.JsonRestore(),
            "manifest": ocp.args.JsonRestore()}
    if with_train:
      args["train"] = ocp.args.StandardRestore(with_shardings(train_target))
    restored = ckptr.restore(payload_dir, args=ocp.args.Composite(**args))
    out = {name: restored[name] for name in args}
    jax.block_until_ready([out["params"], out.get("train")])
  except CheckpointError:  # Ours, already naming the manifest (or a mismatched target).
    raise
  except Exception as e:  # Orbax/TensorStore raise many types; the message names the cause.
    raise load_error(manifest_path, reason(e)) from e
  finally:
    ckptr.close()
  out.setdefault("train", None)
  return out


def read_payload(payload_dir: str, manifest_path: str, *, params_target: Any = None,
                 train_target: Any = None, with_train: bool = True) -> dict[str, Any]:
  """Restores a payload and checks it against its checksums.

  Args:
    payload_dir: the committed Orbax step directory.
    manifest_path: named in error messages.
    params_target, train_target: abstract trees (ShapeDtypeStruct) to restore into; None
      reads the structure from the payload's own metadata.
    with_train: also restore the optimizer state, step and RNG.

  Returns:
    `{"params", "train" (or None), "loader", "manifest"}`.

  Raises:
    CheckpointError: "Failed to load checkpoint: <manifest_path>: <reason>".
  """
  exact = params_target is not None and (train_target is not None or not with_train)
  targets = [params_target, train_target if with_train else None]
  error, out = None, None
  try:
    out = read_items(payload_dir, manifest_path, params_target, train_target, with_train)
  except CheckpointError as e:
    error = e
  except Exception as e:  # E.g. closing the reader: this process's failure all the same.
    error = load_error(manifest_path, reason(e))
  # Targets on this process's devices (none given, or one process) make the read this
  # process's own business; sharded over several, every process must reject it together.
  if spans_processes(targets):
    processes.raise_if_any_failed(
        error, f"Failed to load checkpoint: {manifest_path}: process(es) {{failed}} could not "
        "read their part of the payload (their logs give the reason)", CheckpointError)
  elif error is not None:
    raise error
  verify_items(out, manifest_path, require_all=exact)
  return out


def spans_processes(tree: Any) -> bool:
  """Whether any abstract array of `tree` is sharded over devices of other processes too."""
  return any(not x.sharding.is_fully_addressable for x in jax.tree.leaves(tree)
             if getattr(x, "sharding", None) is not None)


def verify_items(out: dict[str, Any], manifest_path: str, *, require_all: bool) -> None:
  """Checks what `read_items` returned against its checksums (a collective when sharded).

  Every process computes the same global checksums from the same JSON item, so all of them
  reach the same verdict.
  """
  if not isinstance(out["checksums"], dict):
    raise load_error(manifest_path, "payload item 'checksums' is unreadable")
  tree = {"params": out["params"]}
  if out["train"] is not None:
    tree.update(out["train"])
  verify_checksums(tree, out["checksums"], require_all=require_all, path=manifest_path)


def _drop_stale_io_errors() -> None:
  """Keeps the array reads and writes that fail beside the one reported from printing tracebacks.

  When one array of a payload cannot be read (or written: a full disk), Orbax's other
  array operations fail too: their coroutines are left unawaited, and TensorStore completes
  the I/O still in flight on its own threads after Orbax's event loop has closed. Each then
  reached `sys.unraisablehook` ("Exception ignored in <coroutine ...>" with a TensorStore
  spec dump, or "Event loop is closed"), hundreds of lines or none by timing, around the
  one-line error that already names the cause. The hook drops exactly those two kinds for
  the process; installed at import, since the late ones come at no predictable time.
  """
  if getattr(sys.unraisablehook, "_hope_jax_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    stale_read = "_read_array_index_and_device_put" in repr(unraisable.object)
    closed_loop = (unraisable.object is None and isinstance(value, RuntimeError)
                   and str(value) == "Event loop is closed")
    if not (stale_read or closed_loop):
      previous(unraisable)

  hook._hope_jax_filter = True
  sys.unraisablehook = hook


_drop_stale_io_errors()


# Orbax's own pointer to the full spec: a bound-method repr of the TensorStore, hundreds of
# characters that name no cause (the cause is the chained TensorStore error).
_TENSORSTORE_SPEC = re.compile(r" See full TensorStore details: <bound method .*?\}\)>\.?")


def reason(e: BaseException) -> str:
  """The most specific message in an exception chain, on one line."""
  parts = []
  while e is not None and len(parts) < 3:
    text = _TENSORSTORE_SPEC.sub("", " ".join(str(e).split()))
    if len(text) > 500:  # Keep the start (what) and the end (the OS/TensorStore cause).
      text = f"{text[:200]} ... {text[-300:]}"
    parts.append(f"{type(e).__name__}: {text}")
    e = e.__cause__
  return " <- ".join(parts)


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def key_impl_name(rng: Any) -> str | None:
  """The impl of a typed key (to rewrap its data on restore); None for a raw uint32 key.

  `jax.random.key_impl` answers the default impl for a raw key too, which made `restore`
  return a raw key typed.
  """
  if not jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
    return None
  return str(jax.random.key_impl(rng))



def read_json_item(payload_dir: str, name: str) -> Any:
  """One JSON item of a payload (e.g. the manifest copy saved with the weights)."""
  ckptr = _checkpointer()
  try:
    restored = ckptr.restore(payload_dir, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
    return restored[name]
  finally:
    ckptr.close()


def check_inner_manifest(inner: Any, manifest: dict, path: str) -> None:
  """The manifest copy inside the payload must agree with the external one."""
  if not isinstance(inner, dict):
    raise load_error(path, "payload item 'manifest' is unreadable")
  for key in ("step", "config"):
    if canonical(inner.get(key)) != canonical(manifest[key]):
      raise load_error(path, f"manifest field '{key}' does not match the copy saved in the "
                       f"payload ({manifest['model_file']}): the payload belongs to another "
                       "checkpoint")


def versions() -> dict[str, str]:
  """Library versions recorded in every manifest (the on-disk format follows Orbax's)."""
  import flax
  import optax

  import hope_jax

  return {"hope_jax": hope_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax_checkpoint": ocp.__version__}
