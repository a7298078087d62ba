"""`CheckpointManager`: what the train loop uses to resume, save and shut down safely.

Orbax's commit (an atomic rename of `checkpoint_step_<N>.orbax-checkpoint-tmp`) is
the source of truth. The external manifest is written only after the commit, so a
process killed mid-save leaves no manifest and no committed step; the temporary
directory is removed at the next start. A process killed between commit and
manifest leaves a committed step whose manifest is rebuilt, at the next start, from
the copy saved inside the step.

Multi-process runs (`jax.distributed`): every process calls every method (saves
and restores are collective; each process writes and reads its own shards), while
process 0 alone holds the directory lock, cleans up, writes the JSON items and
the manifest (after Orbax's commit) and prunes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import zlib
from typing import Any

import jax
from absl import logging

from hope_jax import processes
from hope_jax.checkpoint import manifest as mf
from hope_jax.checkpoint import store
from hope_jax.checkpoint.manifest import CheckpointError, ConfigMismatchError

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; a second process is not detected.
  fcntl = None

LOCK_NAME = ".lock"
UNREADABLE_DIR = "unreadable"


class CheckpointManager:
  """Periodic async saves, start-up reconcile and listing, resume, and retention.

  Args:
    config: the full run config (sections model/training/data). Reads
      `training.{checkpoint_dir, save_every, resume_from, keep_last, keep_best,
      keep_best_mode, num_steps}`.

  Raises:
    CheckpointError: the directory cannot be created, or another process holds it.
  """

  def __init__(self, config: Any):
    t = config.training
    self.config = config
    self.directory = str(t.checkpoint_dir)
    self.save_every = int(t.save_every)
    self.num_steps = int(t.num_steps)
    self.resume_from = t.get("resume_from")
    if isinstance(self.resume_from, str) and self.resume_from.strip().lower() in ("", "none"):
      self.resume_from = None  # `--config.training.resume_from=None` arrives as a string.
    self.keep_best = t.get("keep_best")
    keep_last, mode = t.get("keep_last"), t.get("keep_best_mode", "min")
    if self.save_every < 1:
      raise CheckpointError(f"training.save_every must be >= 1, got {self.save_every}")
    if keep_last is not None and int(keep_last) < 1:
      raise CheckpointError(f"training.keep_last must be >= 1 or None, got {keep_last}")
    if mode not in ("min", "max"):
      raise CheckpointError(f"training.keep_best_mode must be 'min' or 'max', got {mode!r}")
    self._abs = os.path.abspath(self.directory)
    try:
      os.makedirs(self._abs, exist_ok=True)
    except OSError as e:
      raise CheckpointError(f'Cannot create checkpoint_dir "{self.directory}": {e}') from None
    self._primary = store.is_primary()
    if self.keep_best and keep_last is None and self._primary:
      # Orbax keeps the best ones on top of the newest keep_last: without it, every one.
      logging.warning("training.keep_best=%r deletes nothing without training.keep_last: every "
                      "checkpoint is kept (set keep_last=N to keep the newest N and the best)",
                      self.keep_best)
    self._lock_fd, error = None, None
    self._pending: dict[str, Any] | None = None
    self._closed = False
    if self._primary:
      try:
        self._lock_fd = self._acquire_lock()
      except CheckpointError as e:
        error = e
    # Process 0 locks and cleans the directory; every process stops if it could not (alone,
    # it would leave the others waiting in their first collective).
    processes.raise_if_any_failed(
        error, f'checkpoint_dir "{self.directory}" could not be locked by process {{failed}} '
        "(its log gives the reason)", CheckpointError)
    try:
      self._mngr = store.make_manager(self._abs, keep_last=keep_last, keep_best=self.keep_best,
                                      keep_best_mode=mode)
      if self._primary:
        try:
          self._reconcile()
        except Exception as e:  # Alone, process 0 would leave the others waiting below.
          error = CheckpointError(f'Cannot clean up checkpoint_dir "{self.directory}" (left '
                                  f"over by an interrupted save): {store.reason(e)}")
      # Also the barrier after which the others list the directory: only once it is clean.
      processes.raise_if_any_failed(
          error, f'checkpoint_dir "{self.directory}" could not be cleaned up by process '
          "{failed} (its log gives the reason)", CheckpointError)
      if not self._primary:
        self._mngr.reload()
    except BaseException:
      self._release_lock()
      raise
    entries = mf.scan(self._abs)
    valid = [e for e in entries if e.valid]
    logging.info('Found %d existing checkpoint(s) in "%s"', len(entries), self.directory)
    if valid:
      logging.info("Latest checkpoint at step: %d", valid[-1].step)
    for e in entries:
      if not e.valid:
        logging.warning("Unreadable checkpoint %s: %s", e.manifest_path, e.reason)

  # ------------------------------------------------------------ lock / reconcile

  def _acquire_lock(self) -> int | None:
    if fcntl is None:
      return None
    path = os.path.join(self._abs, LOCK_NAME)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise CheckpointError(f'checkpoint_dir "{self.directory}": cannot open its lock file '
                            f"{LOCK_NAME}: {e.strerror or e}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
      os.close(fd)
      raise CheckpointError(
          f'checkpoint_dir "{self.directory}" is in use by another training process '
          f"({holder}). Two runs cannot share a checkpoint directory: wait for it to finish "
          "or set a different training.checkpoint_dir.") from None
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
      os.close(fd)
      raise CheckpointError(f'checkpoint_dir "{self.directory}": cannot write its lock file '
                            f"{LOCK_NAME}: {e.strerror or e}") from None
    return fd

  def _release_lock(self) -> None:
    if self._lock_fd is not None:
      os.close(self._lock_fd)  # Closing drops the flock; the kernel also drops it on kill -9.
      self._lock_fd = None

  def _reconcile(self) -> None:
    """Removes leftovers of interrupted saves; rebuilds manifests lost after a commit.

    Safe because this process holds the directory lock: nobody else is writing.
    Orbax's own `cleanup_tmp_directories` runs in a background thread that a quick
    close() can cut short, so it is done here, synchronously.
    """
    for name in os.listdir(self._abs):
      path = os.path.join(self._abs, name)
      if ".json.tmp." in name:
        os.remove(path)
      elif name.startswith(mf.PAYLOAD_PREFIX) and ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(path, ignore_errors=True)
        logging.info("Removed %s, left by an interrupted save", name)
    self._mngr.reload()
    have = {e.step for e in mf.scan(self._abs)}
    for step in self._mngr.all_steps():
      if step in have:
        continue
      payload = os.path.join(self._abs, mf.payload_name(step))
      try:
        inner = store.read_json_item(payload, "manifest")
        mf.atomic_write_json(os.path.join(self._abs, mf.manifest_name(step, inner["timestamp"])),
                             inner)
        logging.info("Rebuilt the missing manifest of step %d from its payload", step)
      except Exception as e:  # An unreadable payload stays unlisted; say so.
        logging.warning("Checkpoint payload %s has no manifest and no readable copy of one (%s)",
                        payload, e)

  def _prune_manifests(self) -> None:
    """Deletes manifests whose own payload Orbax has removed (retention).

    Only after a save of this process: at start-up a manifest without payload is
    reported (and skipped by "latest") rather than silently deleted.
    """
    steps = set(self._mngr.all_steps())
    for e in mf.scan(self._abs):
      payload = os.path.join(self._abs, mf.payload_name(e.step))
      if e.step not in steps and not os.path.exists(payload) and os.path.exists(
          e.manifest_path) and _names_own_payload(e.manifest_path, e.step):
        os.remove(e.manifest_path)

  # ---------------------------------------------------------------- resume

  def restore_for_training(self, abstract_state: Any):
    """Restores the checkpoint chosen by `training.resume_from`, or None to start fresh.

    Args:
      abstract_state: the train state's structure (`jax.eval_shape` of the init):
        `{"params", "opt_state", "step", "rng"}` of ShapeDtypeStructs.

    Returns:
      `(state, loader_state, manifest)` or None.

    Raises:
      CheckpointError: unreadable checkpoint, model config mismatch, or a
        checkpoint_dir that already holds checkpoints this run would overwrite.
    """
    entries = mf.scan(self._abs)
    steps = sorted(self._mngr.all_steps())
    # Every process must try the same checkpoints in the same order (each attempt is a
    # collective): a host whose view of the folder lags would otherwise go its own way.
    seen = sorted(set(steps) | {e.step for e in entries})
    if len(set(processes.gather_codes(zlib.crc32(repr(seen).encode()) & 0x7FFFFFFF))) > 1:
      raise CheckpointError(
          f'checkpoint_dir "{self.directory}": the processes list different checkpoints in it '
          f"(this one: steps {seen}); it must be a folder that every host sees alike")
    if self.resume_from is None:
      if steps or entries:
        raise CheckpointError(
            f'checkpoint_dir "{self.directory}" already holds {max(len(steps), len(entries))} '
            f"checkpoint(s) (latest step {max(steps + [e.step for e in entries])}) and "
            "training.resume_from is None. Set training.resume_from=latest to continue that "
            "run, or choose a new training.checkpoint_dir.")
      return None
    if self.resume_from == "latest":
      result = self._restore_latest(entries, abstract_state)
      if result is None:
        logging.info('No checkpoint in "%s" yet; starting from step 0 (%d steps to go)',
                     self.directory, self.num_steps)
        return None
    else:
      result = self._restore(str(self.resume_from), abstract_state)
    state, loader_state, manifest = result
    step = manifest["step"]
    newer = [s for s in self._mngr.all_steps() if s > step]
    if newer:
      raise CheckpointError(
          f'checkpoint_dir "{self.directory}" holds checkpoints newer than the resume point '
          f"(step {step}): steps {newer}. Continuing would mix two runs; resume from the latest "
          "one, delete those, or set a different training.checkpoint_dir.")
    logging.info("Resumed from step %d", step)
    remaining = max(self.num_steps - step, 0)
    logging.info("%d step(s) remain: training ends at step %d (training.num_steps)", remaining,
                 self.num_steps)
    return state, loader_state, manifest

  def _restore_latest(self, entries, abstract_state):
    # A committed payload whose manifest could not be rebuilt (`_reconcile` warned) counts as
    # a broken checkpoint: skipped, and set aside once an older one loads; were it left out,
    # "latest" would resume from an older step and then refuse over the newer payload, or
    # start afresh beside it when it is the only one.
    listed = {e.step for e in entries}
    orphans = [mf.CheckpointInfo(
        step, 0, os.path.join(self._abs, mf.payload_name(step)), False,
        "a saved payload without a manifest or a readable copy of one")
        for step in self._mngr.all_steps() if step not in listed]
    entries = sorted(entries + orphans, key=lambda c: (c.step, c.timestamp))
    broken = []
    for e in reversed(entries):
      try:
        restored = self._restore(e.manifest_path, abstract_state,
                                 unreadable=None if e.valid else e.reason)
      except ConfigMismatchError:
        raise
      except CheckpointError as err:
        logging.warning("Skipping unreadable checkpoint (trying an older one): %s", err)
        broken.append(e)
        continue
      # Only once an older one has loaded: the newer broken ones are set aside so their
      # steps can be saved again. With none readable nothing moves, so a rerun fails the same
      # way instead of finding an empty directory and silently starting fresh (and an I/O
      # error that passes leaves every checkpoint where it was).
      for b in broken:
        self._set_aside(b)
      return restored
    if entries:
      raise CheckpointError(
          f'Failed to load checkpoint: "{self.directory}": none of its {len(entries)} '
          "checkpoint(s) is readable (warnings above give each reason); nothing was moved. "
          "Repair or remove them, or set a different training.checkpoint_dir to start fresh")
    return None

  def _set_aside(self, entry: mf.CheckpointInfo) -> None:
    """Moves a broken checkpoint to `unreadable/` so that its step can be saved again."""
    dest = os.path.join(self._abs, UNREADABLE_DIR)
    payload = os.path.join(self._abs, mf.payload_name(entry.step))
    error = None
    if self._primary:
      try:
        os.makedirs(dest, exist_ok=True)
        # (An entry for a payload without a manifest names the payload twice.)
        for path in dict.fromkeys((entry.manifest_path, payload)):
          if os.path.exists(path) and os.path.dirname(os.path.abspath(path)) == self._abs:
            # The same step may break again after it was saved anew: never move into (or
            # over) what an earlier move left there.
            target, n = os.path.join(dest, os.path.basename(path)), 1
            while os.path.exists(target):
              target, n = os.path.join(dest, f"{os.path.basename(path)}.{n}"), n + 1
            shutil.move(path, target)
      except OSError as e:
        error = CheckpointError(f"Cannot move the unreadable checkpoint of step {entry.step} "
                                f'to "{dest}" (it would block saving that step again): {e}')
    processes.raise_if_any_failed(
        error, f"The unreadable checkpoint of step {entry.step} could not be moved aside by "
        "process {failed} (its log gives the reason)", CheckpointError)
    self._mngr.reload()
    logging.warning("Moved the unreadable checkpoint of step %d to %s", entry.step, dest)

  def _restore(self, path: str, abstract_state: Any, unreadable: str | None = None):
    """Restores one checkpoint: every process reaches the same outcome.

    Each process reads its own files and shards, so a read can fail on some processes only
    (a damaged shard, a host whose view of the folder lags); the processes agree on the
    worst outcome before the checksums' collectives, and act on it together.

    Args:
      path: the manifest.
      abstract_state: as in `restore_for_training`.
      unreadable: the reason this process's listing already found the manifest unreadable.

    Raises:
      ConfigMismatchError: the model config differs (on any process).
      CheckpointError: the checkpoint is unreadable (on any process).
    """
    error, local = None, None
    try:
      if unreadable is not None:
        raise mf.load_error(path, unreadable)
      shown = (os.path.join(self.directory, os.path.basename(path))
               if os.path.dirname(os.path.abspath(path)) == self._abs else path)
      logging.info('Resuming training from checkpoint: "%s"', shown)
      manifest, payload = mf.read_manifest(path)
      mf.check_model_config(manifest["config"], self.config, path)
      train_target = {k: abstract_state[k] for k in ("opt_state", "step", "rng")}
      out = store.read_items(payload, path, abstract_state["params"], train_target, True)
      store.check_inner_manifest(out["manifest"], manifest, path)
      local = manifest, out
    except CheckpointError as e:
      error = e
    except Exception as e:  # Anything else this process alone hit: unreadable all the same.
      error = mf.load_error(path, store.reason(e))
    codes = processes.gather_codes(
        0 if error is None else 2 if isinstance(error, ConfigMismatchError) else 1)
    worst = max(codes)
    where = ", ".join(str(i) for i, c in enumerate(codes) if c == worst)
    if worst == 2:
      raise error if isinstance(error, ConfigMismatchError) else ConfigMismatchError(
          f"{path}: process(es) {where} found its model config different from this run's "
          "(their logs name the keys)")
    if worst == 1:
      raise error if error is not None else mf.load_error(
          path, f"process(es) {where} could not read it (their logs give the reason)")
    manifest, out = local
    store.verify_items(out, path, require_all=True)  # The same verdict on every process.
    state = {"params": out["params"], **out["train"]}
    if int(state["step"]) != manifest["step"]:
      raise mf.load_error(path, f"payload holds step {int(state['step'])}, the manifest says "
                          f"{manifest['step']}")
    return state, out["loader"], manifest

  # ------------------------------------------------------------------ save

  def should_save(self, step: int) -> bool:
    """True at every `save_every` steps and at `num_steps`; also finishes committed saves."""
    self.poll()
    return step > 0 and (step % self.save_every == 0 or step == self.num_steps)

  def poll(self) -> None:
    """Writes the manifest of an async save that has committed (cheap when none is)."""
    if self._pending is not None and not self._mngr.is_saving_in_progress():
      self._flush()

  def save(self, step: int, state: Any, loader_state: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Starts an async save of `state` at `step`; returns once the arrays are copied.

    The state may be modified (or donated) after this returns. Returns False when
    nothing was saved (not a save step and not `force`, or the step already exists).

    Raises:
      CheckpointError: this save, or the previous async one, failed (the message
        names the directory and the reason; earlier checkpoints stay loadable).
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    self._flush()
    if step in self._mngr.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving it again", step)
      return False
    metrics = {k: float(v) for k, v in jax.device_get(dict(metrics or {})).items()}
    manifest = {
        "step": step,
        "timestamp": int(time.time()),
        "model_file": mf.payload_name(step),
        "config": mf.canonical(self.config),
        "format": mf.FORMAT,
        "versions": store.versions(),
        "num_params": store.count_params(state["params"]),
        "metrics": metrics,
        "rng_impl": store.key_impl_name(state["rng"]),
    }
    try:
      sums = store.checksums(state)
      train = {"opt_state": state["opt_state"], "step": state["step"], "rng": state["rng"]}
      self._mngr.save(step, args=store.save_args(state["params"], train, sums, loader_state,
                                                 manifest),
                      metrics=metrics if self.keep_best else None, force=True)
    except Exception as e:
      raise self._save_error(step, e) from e
    self._pending = manifest
    return True

  def _save_error(self, step: int, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f'Failed to save checkpoint for step {step} in "{self.directory}": {store.reason(e)}. '
        "Earlier checkpoints are unaffected.")

  def _flush(self) -> None:
    """Waits for the pending save, then writes its manifest (after Orbax's commit)."""
    pending, self._pending = self._pending, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise self._save_error(pending["step"] if pending else -1, e) from e
    if pending is None or not self._primary:
      return  # Only process 0 writes the manifest (Orbax's primary, which renames on commit).
    if pending["step"] not in self._mngr.all_steps():
      raise CheckpointError(f'Failed to save checkpoint for step {pending["step"]} in '
                            f'"{self.directory}": the save did not commit')
    mf.atomic_write_json(
        os.path.join(self._abs, mf.manifest_name(pending["step"], pending["timestamp"])), pending)
    self._prune_manifests()

  def wait(self) -> None:
    """Blocks until the last save is committed and its manifest written."""
    self._flush()

  def close(self) -> None:
    """Finishes any pending save, then releases the directory. Safe to call twice.

    Raises:
      CheckpointError: the pending save failed.
    """
    if self._closed:
      return
    self._closed = True
    try:
      self._flush()
    finally:
      try:
        self._mngr.close()
      except Exception as e:  # Already reported by _flush, or a shutdown detail.
        logging.warning("Closing the Orbax checkpoint manager: %s", store.reason(e))
      self._release_lock()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def latest_step(self) -> int | None:
    steps = self._mngr.all_steps()
    return max(steps) if steps else None

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())


def _names_own_payload(path: str, step: int) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f).get("model_file") == mf.payload_name(step)
  except (OSError, ValueError, AttributeError):
    return False
