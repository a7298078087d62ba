"""Where the train state and the batches live: one device, or a `data` x `fsdp` mesh.

Every partition decision is made here, from parameter paths and shapes only, so
that the model code never needs to know about meshes:

* the batch is split over both mesh axes (`data` and `fsdp`);
* a parameter (and its Adam moments, which have its shape) is sharded over
  `fsdp` along its largest axis that `fsdp` divides, when it is at least 2-D and
  has at least `training.mesh.fsdp_min_size` elements; smaller ones, scalars,
  the step counter and the RNG key are replicated;
* inside the train step every device differentiates the loss of its own sequences with
  the whole parameters (gathered whole at the step's start: FSDP shards the stored
  parameters and optimizer state, not the forward and backward passes), so every activation,
  and the per-sequence fast state of the Titans/CMS memories that the forward pass builds
  from the batch, keeps the batch's sharding: each device runs the in-context updates of
  its own sequences. The gradients are averaged once, after the backward pass
  (`Placement.value_and_grad`).

The compiler (jit with explicit in/out shardings) inserts the all-gathers of the
parameters and the scalar reductions of the gradient's global norm; the one written
reduction is the gradients' all-reduce over `data` and reduce-scatter over `fsdp` (with the
loss's all-reduce).

With one device and one process (`Placement.single`) no mesh is made: the state is
committed to that device (fresh or restored alike) and the train step is the plain
`jax.jit(step, donate_argnums=0)` it always was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hope_jax.config import AUTO_UNROLL, ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # The batch (and everything batch-leading) is split over both.

# Path overrides, checked before the shape rule: (regex on "params/a/b/c", spec).
# Empty by default; an entry like (r"embed$", P("fsdp", None)) pins one layout. A spec may
# name only "fsdp", on one axis (`Placement.value_and_grad` reduce-scatters into it).
OVERRIDES: list[tuple[str, P]] = []


def resolve_mesh_shape(mesh_cfg: Any, num_devices: int, batch_size: int) -> tuple[int, int]:
  """`(data, fsdp)` from `training.mesh`, with -1 meaning "all remaining devices".

  Raises:
    ConfigError: a bad size, a product other than the device count, or a batch that
      the mesh does not divide.
  """
  sizes = {}
  for axis in AXES:
    value = mesh_cfg.get(axis, 1) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, axis)
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ConfigError(f"training.mesh.{axis} must be a positive integer or -1 (the rest), "
                        f"got {value!r}")
    sizes[axis] = value
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ConfigError("only one of training.mesh.data / training.mesh.fsdp may be -1")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"training.mesh: {num_devices} device(s) cannot be split into "
          f"{' x '.join(f'{a}={v}' for a, v in sizes.items() if v != -1)} x "
          f"{free[0]}=-1; the fixed sizes must divide the device count")
    sizes[free[0]] = num_devices // fixed
  data, fsdp = sizes["data"], sizes["fsdp"]
  if data * fsdp != num_devices:
    raise ConfigError(
        f"training.mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but "
        f"{num_devices} are available; make the product equal the device count (or use -1)")
  if batch_size % (data * fsdp):
    raise ConfigError(
        f"training.batch_size ({batch_size}) must be divisible by the {data * fsdp} devices "
        f"of training.mesh (data={data} x fsdp={fsdp})")
  return data, fsdp


def make_mesh(data: int, fsdp: int, devices=None) -> Mesh:
  """A `("data", "fsdp")` mesh over all (global) devices, in the platform's good order.

  The axes are `Auto`: shardings propagate through the model by the compiler, so
  the model code stays sharding-free.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def path_str(path) -> str:
  """A key path as "params/blocks/0/mixer/q/kernel" (ints and strings alike)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def partition_spec(path: str, shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """THE partition rule of the train state (parameters, optimizer moments, counters).

  Args:
    path: the leaf's key path, e.g. "params/embed" or "opt_state/1/0/mu/embed".
    shape: the leaf's global shape.
    fsdp: size of the `fsdp` mesh axis.
    min_size: leaves with fewer elements stay replicated (gathering them costs more
      than storing them).

  Returns:
    `P(...)` sharding the largest `fsdp`-divisible axis over "fsdp", or `P()`.
  """
  for pattern, spec in OVERRIDES:
    if re.search(pattern, path):
      return spec
  if fsdp == 1 or len(shape) < 2 or math.prod(shape) < max(min_size, 1):
    return P()
  candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], -i))  # Largest; the first on ties.
  return P(*(("fsdp" if i == axis else None) for i in range(len(shape))))


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
  """A tree of `NamedSharding`s matching `abstract_state` (same structure)."""
  fsdp = mesh.shape["fsdp"]

  def leaf(path, x):
    return NamedSharding(mesh, partition_spec(path_str(path), tuple(x.shape), fsdp, min_size))

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`: a restore target for the current mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


class Placement:
  """The train state's and the batches' device placement for one run.

  Args:
    mesh_cfg: the `training.mesh` section (`data`, `fsdp`, `fsdp_min_size`).
    batch_size: the global batch size.
    devices: defaults to every device of every process.

  Raises:
    ConfigError: the mesh does not fit the devices or the batch.
  """

  def __init__(self, mesh_cfg: Any, batch_size: int, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    self.data, self.fsdp = resolve_mesh_shape(mesh_cfg, len(devices), batch_size)
    min_size = mesh_cfg.get("fsdp_min_size", 0) if hasattr(mesh_cfg, "get") else 0
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
      raise ConfigError(f"training.mesh.fsdp_min_size must be a non-negative integer, "
                        f"got {min_size!r}")
    self.min_size = min_size
    self.batch_size = batch_size
    self.single = len(devices) == 1 and jax.process_count() == 1
    self.mesh = None if self.single else make_mesh(self.data, self.fsdp, devices)
    # One device: a fresh and a restored state are both committed to it. An uncommitted
    # fresh state lowers the steps to other programs than a restored one, so a resumed run
    # compiled every step anew, even from a persistent compilation cache that held them.
    self.device = jax.sharding.SingleDeviceSharding(devices[0]) if self.single else None
    self._devices = tuple(devices)

  def resolve_schedule(self, model_cfg):
    """`resolve_schedule` for these devices."""
    return resolve_schedule(model_cfg, self._devices)

  def key(self) -> tuple:
    """Equal for placements that lay the same state out on the same devices."""
    return (self.single, self.data, self.fsdp, self.min_size, tuple(OVERRIDES),
            jax.process_count(), tuple((d.platform, d.id) for d in self._devices))

  def describe(self) -> str:
    if self.single:
      return f"1 device ({jax.devices()[0].platform})"
    return (f"{self.data * self.fsdp} {jax.devices()[0].platform} devices in "
            f"{jax.process_count()} process(es): mesh data={self.data} x fsdp={self.fsdp}")

  # --------------------------------------------------------------- state

  def shardings(self, abstract_state: Any) -> Any:
    if self.single:
      return jax.tree.map(lambda _: self.device, abstract_state)
    return state_shardings(abstract_state, self.mesh, self.min_size)

  def restore_target(self, abstract_state: Any) -> Any:
    """The abstract state with this run's shardings (Orbax restores into them)."""
    return with_shardings(abstract_state, self.shardings(abstract_state))

  def init_state(self, init_fn: Callable[[], Any]) -> Any:
    """A fresh state, created directly in its shards (never whole on one device)."""
    return self.jit_init(init_fn, None if self.single else jax.eval_shape(init_fn))()

  def jit_init(self, init_fn: Callable[..., Any], abstract_state: Any) -> Callable[..., Any]:
    """`init_fn(*args) -> state` jitted to create the state directly in its shards.

    `abstract_state` (its shapes) lays out the shards; one device needs none. Its
    arguments (the seed's keys, `hope_jax.train.state.init_from_keys`) are traced, so one
    compiled init serves every seed.
    """
    if not self.single:
      return jax.jit(init_fn, out_shardings=self.shardings(abstract_state))
    init = jax.jit(init_fn, out_shardings=self.device)

    def call(*args):
      with threefry_gpu_kernel():  # Traced and compiled inside: that is when it counts.
        return init(*args)

    return call

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(BATCH_AXES))

  # ---------------------------------------------------------------- steps

  def jit_train_step(self, train_step: Callable, abstract_state: Any) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, jitted with the state donated."""
    if self.single:
      return jax.jit(train_step, donate_argnums=0)
    shard = self.shardings(abstract_state)
    value_and_grad = functools.partial(self.value_and_grad,
                                       abstract_params=abstract_state["params"])

    def step(state, batch):
      return train_step(state, batch, value_and_grad=value_and_grad)

    return jax.jit(step, in_shardings=(shard, self.batch_sharding()),
                   out_shardings=(shard, self.replicated()), donate_argnums=0)

  def jit_eval_step(self, eval_step: Callable, abstract_params: Any) -> Callable:
    """`eval_step(params, batch) -> loss`."""
    if self.single:
      return jax.jit(eval_step)
    shard = self.shardings({"params": abstract_params})["params"]
    gather = self._gather_fn(abstract_params)
    return jax.jit(lambda p, b: eval_step(gather(p), b),
                   in_shardings=(shard, self.batch_sharding()), out_shardings=self.replicated())

  def value_and_grad(self, loss_fn: Callable, abstract_params: Any) -> Callable:
    """`jax.value_and_grad(loss_fn)` for a batch split over the mesh, one reduction per step.

    Each device differentiates `loss_fn` on its own rows with the whole parameters (`shard_map`
    over both batch axes; jit gathers FSDP-sharded parameters at its boundary), and the
    per-device losses and gradients are then averaged once, after the backward pass. Left to
    the SPMD partitioner, that reduction landed where each gradient accumulates, inside the
    model's scans (docs/performance.md, "The gradient's all-reduce inside the scans").

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, a mean over the batch rows of a model that
        treats rows independently, so the mean of equal shards' means is the batch's.
      abstract_params: the parameters' shapes (their layout comes from `shardings`).

    Returns:
      `fn(params, batch) -> (loss, grads)`: the loss replicated; each gradient averaged over
      `data` (all-reduce) and, where its parameter is split over `fsdp`, reduce-scattered into
      that parameter's shards.
    """
    specs = jax.tree.map(lambda s: s.spec, self.shardings({"params": abstract_params})["params"])
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
      if any(entry not in (None, "fsdp") for entry in spec):
        raise ValueError(f"parameter spec {spec} names more than the fsdp axis; the gradient "
                         "reduction handles P(..., 'fsdp', ...) and P() only (OVERRIDES)")

    def reduce(g, spec):
      if "fsdp" not in spec:
        return jax.lax.pmean(g, BATCH_AXES)
      g = jax.lax.psum_scatter(jax.lax.pmean(g, "data"), "fsdp",
                               scatter_dimension=list(spec).index("fsdp"), tiled=True)
      return g / self.fsdp

    def local(params, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      return jax.lax.pmean(loss, BATCH_AXES), jax.tree.map(reduce, grads, specs)

    # check_vma=False: the model's scans start carries from the parameters (the same on every
    # device) that then vary per device, which the check rejects; the reduction is the above.
    return jax.shard_map(local, mesh=self.mesh, in_specs=(P(), P(BATCH_AXES)),
                         out_specs=(P(), specs), check_vma=False)

  def _gather_fn(self, abstract_params: Any) -> Callable[[Any], Any]:
    """Marks every parameter as wanted whole on each device for the eval step's forward pass.

    The compiler turns this into one all-gather per parameter, placed next to its use.
    With all weights whole, the batch sharding of the input propagates unchanged through
    the model. (The train step gathers them at the boundary of `value_and_grad`.)
    """
    whole = jax.tree.map(lambda _: self.replicated(), abstract_params)
    return lambda params: jax.lax.with_sharding_constraint(params, whole)

  # -------------------------------------------------------------- batches

  def put_batch(self, rows_fn: Callable[[int, int], np.ndarray], shape: tuple[int, ...]):
    """A global batch array built from this process's rows only.

    Args:
      rows_fn: `rows_fn(start, stop)` returns rows `[start, stop)` of the global batch.
      shape: the global batch shape `[B, ...]`.
    """
    if self.single:
      return rows_fn(0, shape[0])

    def local(index):
      rows = index[0]
      return rows_fn(rows.start or 0, shape[0] if rows.stop is None else rows.stop)

    return jax.make_array_from_callback(shape, self.batch_sharding(), local)


def sharded_fraction(state: Any) -> tuple[int, int]:
  """(number of parameter leaves split over more than one device, number of leaves)."""
  leaves = jax.tree.leaves(state["params"] if "params" in state else state)
  split = [x for x in leaves if hasattr(x, "sharding") and not x.sharding.is_fully_replicated]
  return len(split), len(leaves)


@contextlib.contextmanager
def threefry_gpu_kernel():
  """JAX's threefry random bits lowered to one GPU kernel while inside, then as before.

  By default every initialiser's threefry rounds are unrolled into the program, and XLA:GPU
  took over 45 s to compile a 4-layer D=1024 `hope` init that way (over 120 s at 12
  layers) against 6.2 s (18.6 s) with the kernel, for the same numbers (the parameters'
  checksum matches the CPU's jitted init; `benchmarks/init_time.py`, docs/performance.md).
  The option does nothing on other backends. `Placement.jit_init` uses it on one device
  only: on a mesh, XLA would have to run such an opaque kernel whole on every device and
  then slice its output, which has not been measured here.
  """
  option = "jax_threefry_gpu_kernel_lowering"
  previous = getattr(jax.config, option)
  jax.config.update(option, True)
  try:
    yield
  finally:
    jax.config.update(option, previous)


def resolve_schedule(model_cfg, devices):
  """`model_cfg` with `inner_scan_unroll=-1` made 0 (unrolled) or 1 (a loop) for `devices`.

  Unrolled Titans chunk scans measured 11-13% faster on a CPU run as one XLA device
  (L=2048 and 8192, one or two sequences) and 3% on an H100, but 8-12% slower on a CPU
  split into host devices, one per core (docs/performance.md, session 39): a loop there,
  unrolled elsewhere. Any other value is the user's and is kept.
  """
  if model_cfg.inner_scan_unroll != AUTO_UNROLL:
    return model_cfg
  local = [d for d in devices if d.process_index == jax.process_index()]
  host_split = all(d.platform == "cpu" for d in local) and len(local) > 1
  return dataclasses.replace(model_cfg, inner_scan_unroll=1 if host_split else 0)
