"""Export a trained model's forward pass as a serialized `jax.export` artifact (StableHLO).

Run:
  python -m hope_jax.export --checkpoint_dir=checkpoints/run1 --output=model.jax_export

The artifact holds the compiled-to-StableHLO function `tokens[B, L] int32 ->
logits[B, L, V] float32` with the weights inside it as constants, and its input
signature (batch symbolic unless `--batch_size` is given). Anything with JAX can
run it, without `hope_jax`, Flax or the model code:

  from hope_jax.export import load_exported   # or: jax.export.deserialize(...).call
  forward = load_exported("model.jax_export")
  logits_BLV = forward(tokens_BL)

A JSON sidecar (`<output>.json`) records where it came from. See docs/export.md
for why this format rather than ONNX.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from hope_jax.config import ConfigError

FORMAT = "hope_jax.export/1"


def export_forward(model_def: Any, params: Any, seq_len: int | None, batch_size: int | None = None,
                   platforms: Sequence[str] | None = None) -> jax_export.Exported:
  """Traces `tokens -> logits` with `params` baked in and exports it.

  Args:
    model_def: a `hope_jax.train.state.ModelDef`.
    params: its pure-dict parameters (become constants of the artifact).
    seq_len: the fixed sequence length, or None for a symbolic length (works
      for models whose shapes do not depend on the length in Python).
    batch_size: a fixed batch size, or None for a symbolic batch.
    platforms: lowering targets, e.g. ("cpu", "cuda"); None: the current backend.

  Raises:
    ConfigError: the model cannot be exported with these shapes (the reason is kept).
  """
  params = jax.tree.map(jnp.asarray, params)

  def forward(tokens_BL):
    return model_def.apply(params, tokens_BL).astype(jnp.float32)

  dims = ("b" if batch_size is None else str(int(batch_size)),
          "l" if seq_len is None else str(int(seq_len)))
  spec = jax.ShapeDtypeStruct(jax_export.symbolic_shape(", ".join(dims)), jnp.int32)
  try:
    return jax_export.export(jax.jit(forward), platforms=platforms)(spec)
  except Exception as e:  # Shape polymorphism or lowering errors from deep inside JAX.
    first = " ".join(str(e).split())[:300]
    raise ConfigError(f"cannot export the forward pass for input int32[{', '.join(dims)}]: "
                      f"{type(e).__name__}: {first}") from e


def signature(exported: jax_export.Exported) -> dict[str, Any]:
  """Input and output shapes as strings, e.g. {"tokens": "int32[b,32]", ...}."""
  return {"tokens": str(exported.in_avals[0]), "logits": str(exported.out_avals[0]),
          "platforms": list(exported.platforms)}


def save_exported(exported: jax_export.Exported, path: str, metadata: dict | None = None) -> None:
  """Writes the serialized artifact to `path` and a JSON sidecar to `path + '.json'`."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path, "wb") as f:
    f.write(exported.serialize())
  meta = {"format": FORMAT, "jax": jax.__version__, **signature(exported), **(metadata or {})}
  with open(path + ".json", "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write("\n")


class ExportedForward:
  """A deserialized forward pass: `forward(tokens_BL) -> logits_BLV` (no model code needed)."""

  def __init__(self, exported: jax_export.Exported):
    self.exported = exported
    self.in_aval, self.out_aval = exported.in_avals[0], exported.out_avals[0]

  def __call__(self, tokens_BL) -> jax.Array:
    tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
    want = self.in_aval.shape
    ok = tokens_BL.ndim == len(want) and all(
        not isinstance(w, int) or w == n for w, n in zip(want, tokens_BL.shape, strict=True))
    if not ok:
      raise ValueError(f"tokens of shape {tuple(tokens_BL.shape)} do not fit the exported "
                       f"signature int32{list(map(str, want))}")
    return self.exported.call(tokens_BL)


def load_exported(path: str) -> ExportedForward:
  """Reads an artifact written by `save_exported` (or `python -m hope_jax.export`).

  Raises:
    ConfigError: missing file, or a file that is not a serialized `jax.export` artifact.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ConfigError(f"cannot read exported model {path}: {e.strerror or e}") from None
  try:
    return ExportedForward(jax_export.deserialize(bytearray(data)))
  except Exception as e:  # flatbuffers raises assorted errors on foreign bytes.
    raise ConfigError(f"{path} is not a serialized jax.export artifact "
                      f"({type(e).__name__})") from None


# ------------------------------------------------------------------------------ CLI


def check_flags(F: Any) -> None:
  """Rejects impossible flags before anything is read or exported (ConfigError)."""
  if not F.checkpoint_dir and not F.checkpoint:
    raise ConfigError("--checkpoint_dir (newest checkpoint) or --checkpoint (a manifest) is "
                      "required")
  if not F.output:
    raise ConfigError("--output is required (where to write the artifact)")
  from hope_jax.cli import check_output_file

  check_output_file("--output", F.output)
  if os.path.isdir(F.output + ".json"):
    raise ConfigError(f"--output: {F.output}.json, where the artifact's JSON sidecar goes, is a "
                      "folder; give another --output")
  # 0 would count as "unset" in a truthiness test; None is the only "unset".
  for name in ("batch_size", "seq_len"):
    value = getattr(F, name)
    if value is not None and value < 1:
      raise ConfigError(f"--{name} must be at least 1 when given, got {value}")
  if F.dynamic_length and F.seq_len is not None:
    raise ConfigError("--seq_len and --dynamic_length exclude each other")


def main(argv: list[str]) -> None:
  from absl import flags

  from hope_jax.config import ModelConfig
  from hope_jax.train.state import ModelDef

  F = flags.FLAGS
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument(s): {' '.join(argv[1:])}")
  check_flags(F)
  from hope_jax import checkpoint

  restored = (checkpoint.restore(F.checkpoint) if F.checkpoint else
              checkpoint.restore_latest(F.checkpoint_dir))
  model_cfg = ModelConfig.from_config(restored.config.model)
  seq_len = (None if F.dynamic_length else
             int(restored.config.data.seq_len if F.seq_len is None else F.seq_len))
  platforms = [p for p in F.platforms.split(",") if p] if F.platforms else None
  exported = export_forward(ModelDef(model_cfg), restored.params, seq_len, F.batch_size,
                            platforms)
  save_exported(exported, F.output, {
      "step": restored.step, "manifest": os.path.basename(restored.manifest_path),
      "model": restored.config.model.to_dict()})
  check = np.zeros((1 if F.batch_size is None else F.batch_size,
                    8 if seq_len is None else seq_len), np.int32)
  if jax.default_backend() in exported.platforms:
    load_exported(F.output)(check)  # Fail here, not in the user's hands.
  print(f"Exported step {restored.step} ({restored.manifest_path}) to {F.output}: "
        f"{signature(exported)['tokens']} -> {signature(exported)['logits']} "
        f"on {', '.join(exported.platforms)} ({os.path.getsize(F.output):,} bytes)")


def define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("checkpoint_dir", None, "Checkpoint directory (its newest valid checkpoint).")
  flags.DEFINE_string("checkpoint", None, "A manifest path (overrides --checkpoint_dir).")
  flags.DEFINE_string("output", None, "Where to write the serialized artifact.")
  flags.DEFINE_integer("seq_len", None, "Fixed input length (default: the run's data.seq_len).")
  flags.DEFINE_boolean("dynamic_length", False, "Make the length symbolic too.")
  flags.DEFINE_integer("batch_size", None, "Fixed batch size (default: symbolic).")
  flags.DEFINE_string("platforms", None, "Comma-separated lowering targets, e.g. cpu,cuda "
                      "(default: the current backend).")


if __name__ == "__main__":
  from hope_jax import cli

  define_flags()
  cli.run(main, prog="hope_jax.export", config_flag=None)
