"""The jitted init, train and eval steps of a run, kept for later runs of the same program.

A `train()` builds its optimizer and step functions anew, and `jax.jit` caches compiled
programs per function object, so a second `train()` in the same process (a notebook's
resume, a rerun with more steps or another seed) used to lower and compile every step
again: half a minute for a small `hope` on a 2-core CPU, without a persistent compilation
cache, and the init ~9 s more for a fresh run. `steps()` returns the jitted functions of an
earlier run when the new one would trace the same program: the same model config, the same
values of every `training` field the optimizer reads, and the same devices and mesh. The
seed is not in the key: the init takes it as traced keys (`state.init_from_keys`).

The optimizer's fields are not listed by hand: `steps()` builds the optimizer through a
view of the `training` section that records every field it reads, and those fields with
their values are the key. A field the optimizer starts reading is in the key by
construction, so a changed value can never reuse a step compiled with the old one. The view
refuses reads once the optimizer is built (a schedule reading `training` lazily would
escape the key) and any access other than attributes and `get`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple

import jax
import optax

from hope_jax.train.optimizer import make_optimizer
from hope_jax.train.sharding import Placement
from hope_jax.train.state import ModelDef, init_from_keys, make_init_fn
from hope_jax.train.step import make_eval_step, make_train_step

# Compiled steps hold their executables; a sweep in a notebook keeps only the latest few.
MAX_KEPT = 4
_KEPT: collections.OrderedDict = collections.OrderedDict()


class Steps(NamedTuple):
  """What `steps()` returns."""

  tx: optax.GradientTransformation
  abstract: Any  # The train state's shapes and dtypes (`jax.eval_shape` of its init).
  init: Callable  # (*state.seed_keys(seed)) -> a fresh state in the placement's layout.
  train: Callable  # (state, batch) -> (state, metrics), the state donated.
  eval: Callable  # (params, batch) -> loss.
  reused: bool  # True: compiled (or traced) by an earlier run of this process.


class _Reads:
  """`training` as the optimizer sees it, recording each field it reads until `done`."""

  def __init__(self, section: Any):
    self._section = section
    self.read: dict[str, Any] = {}
    self.done = False

  def _record(self, name: str, value: Any) -> Any:
    if self.done:
      raise RuntimeError(f"training.{name} was read after the optimizer was built, so the "
                         "kept steps' key (hope_jax/train/programs.py) cannot hold it")
    self.read[name] = value
    return value

  def __getattr__(self, name: str) -> Any:
    return self._record(name, getattr(self._section, name))

  def get(self, name: str, default: Any = None) -> Any:
    return self._record(name, self._section.get(name, default))


def optimizer_with_key(t: Any, model_def: ModelDef) -> tuple[optax.GradientTransformation, tuple]:
  """The run's optimizer and the fields of `t` it was built from, as a hashable key."""
  reads = _Reads(t)
  tx = make_optimizer(reads, model_def.abstract_params(), model_def.cfg)
  reads.done = True
  return tx, tuple(sorted((k, repr(v)) for k, v in reads.read.items()))


def steps(model_def: ModelDef, t: Any, placement: Placement) -> Steps:
  """The jitted init, train and eval steps for this model, `training` section and placement.

  Reuses those of an earlier call with the same program (module docstring), else jits new
  ones and keeps them (the latest `MAX_KEPT`).
  """
  tx, optimizer_key = optimizer_with_key(t, model_def)
  key = (model_def, optimizer_key, placement.key())
  if key in _KEPT:
    _KEPT.move_to_end(key)
    return _KEPT[key]._replace(reused=True)
  abstract = jax.eval_shape(make_init_fn(model_def, tx, 0))  # Shapes only: no seed in them.
  init = placement.jit_init(functools.partial(init_from_keys, model_def, tx), abstract)
  made = Steps(tx, abstract, init,
               placement.jit_train_step(make_train_step(model_def, tx), abstract),
               placement.jit_eval_step(make_eval_step(model_def), abstract["params"]), False)
  _KEPT[key] = made
  while len(_KEPT) > MAX_KEPT:
    _KEPT.popitem(last=False)
  return made


def clear() -> None:
  """Forgets every kept step (their compiled programs are freed with them)."""
  _KEPT.clear()
