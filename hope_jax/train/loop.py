"""The training loop: data, jitted steps, evaluation, logging, checkpoints.

The host dispatches step n+1 before it reads step n's metrics, so the device
never waits on Python. `num_steps` is the step the run ends at: rerunning the
same command (with `training.resume_from=latest`) after a crash finishes the job.
Checkpoints are saved asynchronously every `save_every` steps, at the end and on
Ctrl-C or SIGTERM; `close()` in `finally` never returns before a pending save is committed.

On several devices or processes the state and batches are laid out by
`hope_jax.train.sharding.Placement` (`training.mesh`), and only process 0 logs
and writes metrics; with one device the step is the plain jitted function.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_dict

from hope_jax import diagnostics, processes
from hope_jax.checkpoint import CheckpointManager
from hope_jax.config import ConfigError, validate_run_config
from hope_jax.data import load_corpus
from hope_jax.data.sampler import BatchSampler, eval_batches
from hope_jax.data.tokenizers import VOCAB_FILE, CharTokenizer, vocabulary_mismatch
from hope_jax.train import distributed, host_devices, hugepages, programs
from hope_jax.train.metrics import MetricWriter, Progress, format_duration, log_line
from hope_jax.train.optimizer import learning_rate_schedule
from hope_jax.train.sharding import Placement, sharded_fraction
from hope_jax.train.state import ModelDef, param_count, seed_keys
from hope_jax.train.step import LN2

BITS_UNIT = {"byte": "bits/byte", "char": "bits/char"}


DEFAULT_MESH = {"data": -1, "fsdp": 1, "fsdp_min_size": 4096}  # Configs without `training.mesh`.


class _NoWriter:
  """Processes other than 0 write no metrics."""

  def write(self, step, metrics):
    pass

  def close(self):
    pass


def evaluate(eval_step, params, val_tokens: np.ndarray, t: Any, seq_len: int,
             placement: Placement) -> dict[str, float]:
  """Mean validation loss over `t.eval_batches` fixed batches."""
  losses = [eval_step(params, placement.put_batch(lambda a, z, b=b: b[a:z], b.shape))
            for b in eval_batches(val_tokens, t.batch_size, seq_len, t.eval_batches)]
  loss = float(np.mean(jax.device_get(losses)))
  return {"eval/loss": loss, "eval/bits_per_token": loss / LN2,
          "eval/perplexity": math.exp(min(loss, 50.0))}


class _StopRequest:
  """SIGINT (Ctrl-C) or SIGTERM asks the loop to stop between steps and save.

  A KeyboardInterrupt raised inside a jitted step whose input was donated would leave no
  valid state to save, so the first signal only sets a flag the loop checks between steps.
  SIGTERM is what schedulers (SLURM, Kubernetes, `timeout`) send before they kill a job, so
  a preempted run keeps every finished step. A second Ctrl-C raises at once; a second
  SIGTERM ends the process at once (its default action).

  With several processes every one must stop at the same step, or the one saving waits in
  a collective the others never join. There JAX's preemption service (on by default with
  `jax.distributed`) catches SIGTERM in any process and names one check for all
  (`multihost_utils.reached_preemption_sync_point`), and Ctrl-C is passed on to it as a
  SIGTERM to this process. JAX's handler keeps catching SIGTERM, so only SIGKILL or a second
  Ctrl-C (which then ends this process at once, as a kill would) stops such a run sooner.
  """

  def __init__(self, shared: bool = False):
    self.signum: int | None = None
    self._shared = shared
    self._checks = 0  # Ids for the preemption service: every process counts the same.
    self._previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
      # When shared, SIGTERM stays with the preemption service's own handler.
      signals = (signal.SIGINT,) if shared else (signal.SIGINT, signal.SIGTERM)
      self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def should_stop(self, step: int) -> bool:
    """Whether to stop before `step`'s update: the same answer in every process."""
    if not self._shared:
      return self.signum is not None
    # Counted from 1 in this run, as the service's own count starts at 0 in each process:
    # whatever id a notice names is then still ahead, even in a run resumed at a late step.
    self._checks += 1
    if not multihost_utils.reached_preemption_sync_point(self._checks):
      return False
    logging.warning("Stop request (SIGTERM or Ctrl-C in a process of this job): every "
                    "process stops at step %d and saves.", step)
    self.signum = self.signum or signal.SIGTERM
    return True

  def _handle(self, signum, frame):
    del frame
    self.signum = self.signum or signum  # The first signal sets the exit status.
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: stopping after this step (press again to abort at once).")
      if self._shared:  # Raising in one process would leave it saving alone, stuck.
        signal.signal(signum, lambda *_: os._exit(128 + signal.SIGINT))
        os.kill(os.getpid(), signal.SIGTERM)
      else:
        signal.signal(signum, signal.default_int_handler)
    else:
      logging.warning("%s: stopping after this step and saving (send it again to end at once).",
                      signal.Signals(signum).name)
      signal.signal(signum, signal.SIG_DFL)

  def __enter__(self) -> "_StopRequest":
    return self

  def __exit__(self, *exc) -> None:  # The handlers that were there before come back.
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}


def _shared_stop() -> bool:
  """Whether JAX's preemption service runs here, so stop requests go through it.

  That depends on `jax_enable_preemption_service` as it was when `jax.distributed` was
  initialised; JAX has no public way to ask, so this reads its state where it can.
  """
  if jax.process_count() == 1 or not jax.distributed.is_initialized():
    return False
  try:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):  # Another JAX: the option's current value.
    return bool(jax.config.jax_enable_preemption_service)


def train(config: Any) -> dict[str, Any]:
  """Runs (or resumes) the job described by `config`; returns a summary dict.

  The summary holds `step` (where the run ended), `losses` [(step, loss)], `eval` (the
  latest validation metrics, {} if none ran) and `eval_step` (the step they measured: not
  `step` when a stop skipped the final evaluation), `interrupted`, `stop_signal`,
  `elapsed_s`, the final `state` and the `model_def`.

  On a CPU the first call may set JAX's CPU device count for the whole process
  (`training.cpu_devices`, hope_jax/train/host_devices.py). A later call in the same process
  with the same model config, optimizer settings and devices (a notebook's resume, a rerun
  with another seed) reuses the compiled init, train and eval steps
  (hope_jax/train/programs.py).

  Raises:
    ConfigError: bad configuration or data, before anything is compiled.
    FloatingPointError: the training loss is not finite (after writing that step's metrics).
  """
  if isinstance(config, Mapping) and not isinstance(config, config_dict.ConfigDict):
    config = config_dict.ConfigDict(config)  # E.g. `cfg.to_dict()`, edited as a plain dict.
  model_cfg = validate_run_config(config)
  t = config.training
  mesh_cfg = t.get("mesh") or DEFAULT_MESH
  # Both before anything touches a device.
  multi_process = distributed.launch_settings(t) is not None or jax.distributed.is_initialized()
  cpu_devices = host_devices.configure(t, mesh_cfg, multi_process)
  distributed.initialize(t)
  if not distributed.is_primary():
    logging.set_verbosity(logging.WARNING)
  if jax.default_backend() != "cpu" or jax.process_count() > 1:
    cpu_devices = None
  # A later run in a process an earlier one split may use fewer of its CPU devices.
  devices = jax.devices()[:cpu_devices] if cpu_devices else None
  placement = Placement(mesh_cfg, int(t.batch_size), devices)
  corpus = load_corpus(config.data, model_cfg.vocab_size)
  # Before any compile, each a one-line error: the metrics folder (a default one lies in the
  # checkpoint folder, whose own check names it), the checkpoint directory lock and listing.
  # Process 0 alone writes the logs; the others stop with it when it cannot (alone, it
  # would leave them waiting in their next collective).
  if t.log_dir:
    _check_log_dir_on_process_0(t.log_dir)
  ckpt = CheckpointManager(config)
  if not t.log_dir:
    try:
      _check_log_dir_on_process_0(os.path.join(t.checkpoint_dir, "logs"))
    except ConfigError:
      ckpt.close()
      raise
  if cpu_devices and cpu_devices > 1:  # Logged after every input check.
    logging.info("CPU split into %d XLA device(s) (training.cpu_devices=%s)", cpu_devices,
                 host_devices.requested(t))
  if jax.default_backend() == "cpu" and hugepages.active():
    logging.info("glibc.malloc.hugetlb=1: large buffers ask for transparent huge pages "
                 "(kernel mode %s; the training CLI restarts with it, %s=0 turns that off)",
                 hugepages.thp_mode(), hugepages.OFF_SWITCH)
  try:
    return _train(config, model_cfg, corpus, ckpt, placement)
  finally:
    ckpt.close()  # Waits for a pending async save; raises if it failed.


def _check_log_dir_on_process_0(log_dir: str) -> None:
  """`_check_log_dir` on process 0; every process raises ConfigError if it fails there."""
  error = None
  if distributed.is_primary():
    try:
      _check_log_dir(log_dir)
    except ConfigError as e:
      error = e
  processes.raise_if_any_failed(error, f"training.log_dir: process {{failed}} cannot write the "
                                f"logs to {log_dir!r} (its log gives the reason)")


def _check_log_dir(log_dir: str) -> None:
  """Creates the metrics folder, or raises ConfigError naming `training.log_dir`."""
  try:
    os.makedirs(log_dir, exist_ok=True)
    open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8").close()
  except OSError as e:
    raise ConfigError(f"training.log_dir: cannot write the logs to {log_dir!r}: "
                      f"{e.strerror or e}") from None


def _run_vocabulary(corpus: Any, t: Any, loader_state: dict | None, primary: bool) -> dict:
  """Ties the run's token ids to its checkpoints; returns what the loader state records.

  A character vocabulary counted from the data at start-up orders its ids by frequency, so
  the same folder after an edit (or a preprocessed folder made again) can give other ids
  for the same characters, at the same vocabulary size: a resumed run would go on training
  on ids that mean other characters, silently. So every checkpoint's loader state records
  the tokenizer's fingerprint, a resume whose data gives another one stops, and a
  character vocabulary is kept as `vocab.json` in the checkpoint folder, which
  `hope_jax.sample` and `data.tokenizer_path` can use to get the run's ids back.
  """
  tok = corpus.tokenizer
  mismatch = vocabulary_mismatch(tok, loader_state, t.checkpoint_dir,
                                 "--config.data.tokenizer_path")
  if mismatch:
    raise ConfigError(f"data: {mismatch}, or start the run in another training.checkpoint_dir")
  if loader_state and loader_state.get("num_tokens") not in (None, len(corpus.train)):
    logging.warning("The training split has %d tokens; the checkpoint's had %d: the data "
                    "changed, and the batch order goes on over the new tokens",
                    len(corpus.train), loader_state["num_tokens"])
  path = os.path.join(t.checkpoint_dir, VOCAB_FILE)
  if primary and isinstance(tok, CharTokenizer) and not os.path.isfile(path):
    tmp = f"{path}.{os.getpid()}.partial"
    tok.save(tmp)
    os.replace(tmp, path)
  return {"tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint()}


def _train(config: Any, model_cfg: Any, corpus: Any, ckpt: CheckpointManager,
           placement: Placement) -> dict[str, Any]:
  t, d = config.training, config.data
  unit = BITS_UNIT.get(getattr(corpus.tokenizer, "name", ""), "bits/token")
  logging.info("Data: %s | %d train / %d validation tokens", corpus.description,
               len(corpus.train), len(corpus.val))

  resolved = placement.resolve_schedule(model_cfg)
  if resolved.inner_scan_unroll != model_cfg.inner_scan_unroll:
    logging.info("model.inner_scan_unroll=-1: %s for this device layout",
                 "0 (unrolled)" if resolved.inner_scan_unroll == 0 else "1 (a loop)")
  model_def = ModelDef(resolved, seed=t.seed)
  # A later run of the same program in this process reuses the compiled steps.
  steps = programs.steps(model_def, t, placement)
  abstract = steps.abstract
  # The restore target carries this run's shardings, so a checkpoint saved on another
  # device count or mesh is read straight into the current layout.
  restored = ckpt.restore_for_training(placement.restore_target(abstract))
  # The optimizer is rebuilt from the current config, so a changed learning rate or
  # schedule takes effect from the resumed step; only its counters come from the state.
  vocab_record = _run_vocabulary(corpus, t, restored[1] if restored else None,
                                 distributed.is_primary())
  state = restored[0] if restored else steps.init(*seed_keys(t.seed))
  start_step, end_step = int(state["step"]), int(t.num_steps)
  logging.info("Model: block=%s, %s parameters | %d steps to go (%d -> %d)", model_cfg.block,
               f"{param_count(state['params']):,}", max(end_step - start_step, 0), start_step,
               end_step)
  if not placement.single:
    split, total = sharded_fraction(state)
    logging.info("Devices: %s | %d of %d parameter arrays sharded over fsdp",
                 placement.describe(), split, total)

  sampler = BatchSampler(corpus.train, t.batch_size, d.seq_len, t.seed, aligned=corpus.aligned)
  train_step, eval_step = steps.train, steps.eval
  if steps.reused:
    logging.info("Init, train and eval steps: those of an earlier run in this process (the "
                 "same model, optimizer settings and devices), each compiled on its first use")
  batch_shape = (int(t.batch_size), d.seq_len + 1)
  schedule = learning_rate_schedule(t)
  float(schedule(start_step))  # Its first call compiles (~0.3 s): not in a logged rate.
  primary = distributed.is_primary()
  writer = (MetricWriter(t.log_dir or os.path.join(t.checkpoint_dir, "logs"),
                         start_step=start_step) if primary else _NoWriter())
  progress = Progress(start_step, end_step, t.batch_size * d.seq_len,
                      t.progress_bar and primary)

  losses: list[tuple[int, float]] = []
  last_eval: dict[str, float] = {}
  last_eval_step = None  # The step `last_eval` measured.
  interrupted = False
  window: list[float] = []

  def record(step: int, metrics: dict) -> None:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    losses.append((step, m["loss"]))
    window.append(m["loss"])
    row = {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"]}
    first = step == start_step + 1
    if first:  # The rate from here on leaves the compile out, this step's log line included.
      progress.restart(step)
      logging.info("First step done in %s (%s)%s", format_duration(time.perf_counter() - t0),
                   "the train step compiled by an earlier run in this process" if steps.reused
                   else "compiling the train step included",
                   "" if start_step == 0 or steps.reused or jax.config.jax_compilation_cache_dir else
                   "; a resume reads the compiled steps from JAX's persistent compilation "
                   "cache when JAX_COMPILATION_CACHE_DIR is set (docs/checkpoints.md)")
    if step % t.log_every == 0 or step == end_step:
      # The first step of a process has no rate: its time is the compile's.
      tok_s, eta = (None, None) if first else progress.rate(step)
      mean = float(np.mean(window))
      window.clear()
      lr = float(schedule(step - 1))
      row.update({"train/loss_avg": mean, "train/learning_rate": lr})
      if tok_s is not None:
        row["train/tokens_per_s"] = tok_s
      log_line(step, end_step, mean, mean / LN2, lr, tok_s, eta, unit)
    writer.write(step, row)
    # A non-finite gradient makes this step's update, and so its checkpoint, non-finite too:
    # stop before it is saved (`save` records a step's metrics first).
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      what = (f"training loss is {m['loss']}" if not math.isfinite(m["loss"]) else
              f"the gradient norm is {m['grad_norm']} (training loss {m['loss']:.4f})")
      where = ("no checkpoint was saved yet, so a rerun starts afresh" if ckpt.latest_step is None
               else f"a rerun resumes from the last checkpoint, step {ckpt.latest_step}")
      raise FloatingPointError(
          f"{what} at step {step}: lower training.learning_rate or training.grad_clip, or look "
          f"for bad data ({where})")
    progress.tick(step, {"loss": f"{m['loss']:.3f}"})

  # The replay that measures it is not written for several processes' global arrays.
  check_health = bool(t.health) and jax.process_count() == 1
  warned_runaway = False  # Warned once per run; every health line still shows the drifts.

  def log_health(step: int) -> None:
    """Runs after the step's save, and not once a stop is asked for: it may compile."""
    nonlocal check_health, warned_runaway
    if not check_health or stop.signum is not None:
      return
    try:
      with progress.paused():  # On the first validation window.
        health = diagnostics.health(model_def.bind(state["params"]),
                                    diagnostics.health_window(corpus.val, d.seq_len))
    except Exception as e:  # A diagnostic must never cost the run: warn, and stop measuring.
      check_health = False
      logging.warning("health metrics failed at step %d and are off for this run: %r", step, e)
      return
    if health:
      writer.write(step, health)
      logging.info("health at step %d | %s", step, diagnostics.format_health(health))
      runaway = diagnostics.runaway_layers(health)
      if runaway and not warned_runaway:
        warned_runaway = True
        logging.warning(
            "health at step %d: the self-modifying memories of layer(s) %s ran away (W1 drift "
            "%s, over %g). Training goes on; see docs/architecture.md, \"Runaway fast "
            "weights\", and check an init with `python -m hope_jax.check_init`", step,
            ", ".join(map(str, runaway)), ", ".join(f"{v:.4g}" for v in runaway.values()),
            diagnostics.RUNAWAY_DRIFT)

  # The last step's (step, metrics), recorded once the next step is dispatched, so that
  # reading them back does not stall the device.
  pending = None

  def flush() -> None:
    """Records the pending step's metrics; raises if its loss or gradient is non-finite."""
    nonlocal pending
    if pending is not None:
      last, pending = pending, None
      record(*last)

  def save(step: int, metrics: dict | None = None, force: bool = False) -> None:
    # Every save, the one of a stop signal included, checks its step's metrics first: a
    # diverged step stops the run instead of becoming the checkpoint a rerun resumes from.
    flush()
    # Donating `state` into the next step is safe once save() returns: Orbax then
    # holds host copies (on CPU, numpy views that make JAX skip the donation).
    ckpt.save(step, state, {**sampler.state(step), **vocab_record}, metrics=metrics,
              force=force)

  t0 = time.perf_counter()
  # The signal handlers stay until the final checkpoint is written: a signal during the
  # final eval only sets the flag, so the finished run is still saved.
  # The metrics writer closes however the run ends: a failed run in a notebook left its
  # TensorBoard file open and two writer threads running, per call.
  with _StopRequest(_shared_stop()) as stop, contextlib.closing(writer):
    try:
      for s in range(start_step, end_step):
        if stop.should_stop(s):  # A signal lands here, between steps, never in a donated one.
          raise KeyboardInterrupt
        # Each process reads only the rows its devices hold.
        batch = placement.put_batch(lambda a, z, s=s: sampler.rows(s, a, z), batch_shape)
        state, metrics = train_step(state, batch)
        flush()
        pending = (s + 1, metrics)
        evaluate_now = (s + 1) % t.eval_every == 0 and s + 1 < end_step
        if evaluate_now:
          flush()
          with progress.paused():
            last_eval = evaluate(eval_step, state["params"], corpus.val, t, d.seq_len, placement)
          last_eval_step = s + 1
          writer.write(s + 1, last_eval)
          logging.info("eval at step %d | loss %.4f | %s %.4f", s + 1, last_eval["eval/loss"],
                       unit, last_eval["eval/bits_per_token"])
        if ckpt.should_save(s + 1) and s + 1 < end_step:  # The last one follows the final eval.
          jax.block_until_ready(state)  # The step's own time counts; the save's does not.
          with progress.paused():
            save(s + 1, last_eval if (s + 1) % t.eval_every == 0 else None)
        if evaluate_now:
          log_health(s + 1)
      flush()
    except KeyboardInterrupt:
      interrupted = True
      if any(x.is_deleted() for x in jax.tree.leaves(state)):  # Interrupted inside a donated step.
        logging.warning("Interrupted mid-step; %s.", "no checkpoint was saved yet"
                        if ckpt.latest_step is None else
                        f"the last checkpoint is step {ckpt.latest_step}")
      else:
        logging.warning("Interrupted at step %d; saving a checkpoint and stopping cleanly.",
                        int(state["step"]))
        step_now = int(state["step"])
        # A signal during an evaluation stops the run after it: the checkpoint keeps its metrics.
        save(step_now, last_eval if last_eval_step == step_now else None, force=True)
    finally:
      progress.close()

    state_alive = not any(x.is_deleted() for x in jax.tree.leaves(state))
    final_step = int(state["step"]) if state_alive else int(ckpt.latest_step or start_step)
    if not interrupted and stop.should_stop(final_step):  # Save before a long final eval.
      interrupted = True
      save(final_step, force=True)
      logging.warning("Stopped after the last step: saved step %d without its final "
                      "evaluation (python -m hope_jax.evaluate --checkpoint_dir=%s "
                      "--write_manifest adds it).", final_step, t.checkpoint_dir)
    if not interrupted and final_step > start_step:
      last_eval = evaluate(eval_step, state["params"], corpus.val, t, d.seq_len, placement)
      last_eval_step = final_step
      writer.write(final_step, last_eval)
      logging.info("final eval at step %d | loss %.4f | %s %.4f", final_step,
                   last_eval["eval/loss"], unit, last_eval["eval/bits_per_token"])
    if not interrupted:
      save(final_step, last_eval, force=True)  # Skipped when that step is already saved.
      log_health(final_step)
    ckpt.wait()  # The last save is committed before a second signal can end the process.
  elapsed = time.perf_counter() - t0
  logging.info("Done: step %d in %s", final_step, format_duration(elapsed))
  return {"step": final_step, "losses": losses, "eval": last_eval, "eval_step": last_eval_step,
          "interrupted": interrupted,
          "stop_signal": stop.signum, "elapsed_s": elapsed, "state": state,
          "model_def": model_def}
