"""Score every checkpoint of a run on its validation split and pick the best.

Run:
  python -m hope_jax.evaluate --checkpoint_dir=checkpoints/run1            # all (--all)
  python -m hope_jax.evaluate --checkpoint=checkpoints/run1/checkpoint_step_500_ts_1234567894.json
  python -m hope_jax.evaluate --checkpoint_dir=DIR --write_manifest --output=scores.json
  python -m hope_jax.evaluate --checkpoint_dir=DIR --data.passkey_depth=0.1   # other data

Prints a table (the best row marked `*`) and then the same as one line of JSON
(or writes the JSON to `--output`). Each checkpoint is scored with the data
settings it was trained with; `--data.KEY=VALUE` (or `--config.data.KEY=VALUE`)
overrides them, e.g. to test a passkey model at another depth. With
`--write_manifest` the scores are merged into each manifest's `metrics` field
(under the same names as the training loop's: `eval/loss`, ...) plus an
`evaluation` field saying on what data they were measured.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any

from absl import flags

from hope_jax.config import ConfigError

PROG = "hope_jax.evaluate"
F = flags.FLAGS
_DATA_PREFIXES = ("--data.", "--config.data.")


def split_data_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Removes `--data.K=V` / `--config.data.K=V` from argv; returns (rest, {K: V})."""
  rest, overrides = [], {}
  for arg in argv:
    prefix = next((p for p in _DATA_PREFIXES if arg.startswith(p)), None)
    if prefix is None:
      rest.append(arg)
      continue
    if "=" not in arg:
      raise ConfigError(f"{arg}: data overrides are written --data.KEY=VALUE")
    key, value = arg[len(prefix):].split("=", 1)
    overrides[key] = value
  return rest, overrides


def _parse_value(key: str, text: str, current: Any) -> Any:
  if not isinstance(text, str):  # A Python caller's value, e.g. {"seq_len": 16}.
    return text
  low = text.strip().lower()
  if low in ("none", "null"):
    return None
  if isinstance(current, bool) or (current is None and low in ("true", "false")):
    if low not in ("true", "false", "1", "0"):
      raise ConfigError(f"bad value for data.{key}: {text!r} (expected true or false)")
    return low in ("true", "1")
  kinds = [type(current)] if isinstance(current, (int, float)) else [int, float]
  if current is not None and not isinstance(current, (int, float)):
    return text
  for kind in kinds:
    try:
      return kind(text)
    except ValueError:
      continue
  if current is None:
    return text
  raise ConfigError(f"bad value for data.{key}: {text!r} (expected {type(current).__name__})")


def data_config(saved_data: Any, overrides: dict[str, str]):
  """The checkpoint's data section, task keys filled with defaults, then the overrides."""
  from ml_collections import config_dict

  from hope_jax.data.tasks import TASK_DEFAULTS

  data = dict(saved_data.to_dict() if hasattr(saved_data, "to_dict") else saved_data)
  for key, value in TASK_DEFAULTS.items():
    data.setdefault(key, value)
  for key, text in overrides.items():
    if key not in data:
      close = [k for k in data if k.split("_")[0] == key.split("_")[0]]
      hint = f" (did you mean 'data.{close[0]}'?)" if close else ""
      raise ConfigError(f"unknown data key 'data.{key}'{hint}")
    data[key] = _parse_value(key, text, data[key])
  return config_dict.ConfigDict(data)


@functools.lru_cache(maxsize=4)
def _score_program(model_cfg: Any) -> tuple[Any, Any]:
  """(model_def, jitted score step) of a model config, kept across calls in one process.

  A notebook that scores the checkpoints of a run again (or a later run's of the same model)
  then reuses the compiled program instead of tracing and compiling it anew.
  """
  import jax

  from hope_jax.train import evaluation
  from hope_jax.train.state import ModelDef

  model_def = ModelDef(model_cfg)
  return model_def, jax.jit(evaluation.make_score_step(model_def))


def evaluate_checkpoints(entries: list[Any], overrides: dict[str, str], batch_size: int,
                         max_windows: int | None) -> tuple[list[dict], list[str]]:
  """Scores each `CheckpointInfo`; unreadable ones become rows with an `error`.

  Raises:
    ValueError: a bad `batch_size` or `max_windows`, or an entry that is no CheckpointInfo.
  """

  from hope_jax import checkpoint
  from hope_jax.config import ModelConfig, validate_data_config
  from hope_jax.data import load_corpus
  from hope_jax.data.tokenizers import vocabulary_mismatch
  from hope_jax.train import evaluation

  evaluation.check_batching(batch_size, max_windows)
  for entry in entries:
    if not isinstance(entry, checkpoint.CheckpointInfo):
      raise ValueError(f"entries must be CheckpointInfo (from hope_jax.checkpoint."
                       f"list_checkpoints), got {type(entry).__name__} {entry!r}")
  corpora: dict[str, Any] = {}
  rows, descriptions = [], []
  for entry in entries:
    row = {"step": entry.step, "timestamp": entry.timestamp,
           "manifest": os.path.basename(entry.manifest_path), "path": entry.manifest_path}
    rows.append(row)
    if not entry.valid:
      row["error"] = entry.reason
      continue
    try:
      restored = checkpoint.restore(entry.manifest_path)
    except checkpoint.CheckpointError as e:
      row["error"] = str(e)
      continue
    model_cfg = ModelConfig.from_config(restored.config.model)
    data = data_config(restored.config.data, overrides)
    validate_data_config(data)  # The overrides as training would take them.
    data_key = json.dumps([data.to_dict(), model_cfg.vocab_size], sort_keys=True, default=str)
    if data_key not in corpora:
      corpora[data_key] = load_corpus(data, model_cfg.vocab_size)
      descriptions.append(corpora[data_key].description)
    mismatch = vocabulary_mismatch(corpora[data_key].tokenizer, restored.loader_state,
                                   os.path.dirname(restored.manifest_path), "--data.tokenizer_path")
    if mismatch:
      row["error"] = mismatch
      continue
    model_def, step_fn = _score_program(model_cfg)
    t0 = time.perf_counter()
    row["metrics"] = evaluation.score(model_def, restored.params, corpora[data_key],
                                      int(data.seq_len), batch_size, max_windows, step_fn)
    row["data"] = corpora[data_key].description
    row["seconds"] = round(time.perf_counter() - t0, 3)
  return rows, descriptions


def format_table(rows: list[dict], best: int | None) -> str:
  """A markdown table: one row per checkpoint, `*` on the best."""
  names = [k for k in ("eval/loss", "eval/bits_per_byte", "eval/bits_per_char",
                       "eval/bits_per_token", "eval/perplexity", "task/accuracy",
                       "task/exact_match") if any(k in r.get("metrics", {}) for r in rows)]
  if "eval/bits_per_byte" in names or "eval/bits_per_char" in names:
    names.remove("eval/bits_per_token")
  head = ["best", "step", *[n.split("/")[1] for n in names], "manifest"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for i, r in enumerate(rows):
    m = r.get("metrics", {})
    cells = [f"{m[n]:.4f}" if n in m else "" for n in names]
    if "error" in r:
      cells = ["unreadable"] + [""] * (len(names) - 1) if names else []
    note = r["manifest"] + (f" ({r['error']})" if "error" in r else "")
    lines.append("| " + " | ".join(["*" if i == best else "", str(r["step"]), *cells, note]) + " |")
  return "\n".join(lines)


def write_manifest_scores(row: dict, description: str) -> None:
  """Merges `row['metrics']` into the manifest's `metrics` (atomically)."""
  from hope_jax.checkpoint import manifest as mf

  with open(row["path"], encoding="utf-8") as f:
    manifest = json.load(f)
  metrics = dict(manifest.get("metrics") or {})
  metrics.update(row["metrics"])
  manifest["metrics"] = metrics
  manifest["evaluation"] = {"data": description, "timestamp": int(time.time()),
                            "by": PROG, "metrics": sorted(row["metrics"])}
  mf.atomic_write_json(row["path"], manifest)


def check_flags(f: Any) -> None:
  """Rejects impossible flags before any checkpoint is read (ConfigError)."""
  if f.all and f.checkpoint:
    raise ConfigError("--all and --checkpoint exclude each other")
  if f.mode not in ("min", "max"):
    raise ConfigError(f"--mode must be 'min' or 'max', got {f.mode!r}")
  if f.batch_size < 1:
    raise ConfigError(f"--batch_size must be positive, got {f.batch_size}")
  if f.max_windows is not None and f.max_windows < 1:
    raise ConfigError(f"--max_windows must be at least 1 (or left out to score every window), "
                      f"got {f.max_windows}")
  if f.checkpoint and not os.path.isfile(f.checkpoint):
    raise ConfigError(f"--checkpoint: no such manifest: {f.checkpoint}")
  if not f.checkpoint and not f.checkpoint_dir:
    raise ConfigError("--checkpoint_dir (or --checkpoint=MANIFEST) is required")
  if not f.checkpoint and not os.path.isdir(f.checkpoint_dir):
    raise ConfigError(f"--checkpoint_dir: no such directory: {f.checkpoint_dir}")
  if f.output:
    from hope_jax.cli import check_output_file

    check_output_file("--output", f.output)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument(s): {' '.join(argv[1:])}")
  check_flags(F)

  from hope_jax import checkpoint
  from hope_jax.train import evaluation

  if F.checkpoint:
    infos = [e for e in checkpoint.list_checkpoints(os.path.dirname(F.checkpoint) or ".")
             if os.path.samefile(e.manifest_path, F.checkpoint)]
    if not infos:
      raise ConfigError(f"--checkpoint: {F.checkpoint} is not named "
                        "checkpoint_step_<N>_ts_<T>.json")
  else:
    infos = checkpoint.list_checkpoints(F.checkpoint_dir)
    if not infos:
      raise ConfigError(f"no checkpoint (checkpoint_step_*_ts_*.json) in {F.checkpoint_dir}")

  rows, descriptions = evaluate_checkpoints(infos, OVERRIDES, F.batch_size, F.max_windows)
  scored = [r.get("metrics", {}) for r in rows]
  if not any(scored):
    raise ConfigError("no checkpoint could be scored: " +
                      "; ".join(f"{r['manifest']}: {r.get('error')}" for r in rows))
  best = evaluation.best_index(scored, F.metric, F.mode)
  if best is None:
    have = sorted({k for m in scored for k in m})
    raise ConfigError(f"--metric={F.metric!r} was not measured; available: {', '.join(have)}")
  if F.write_manifest:
    for r in rows:
      if "metrics" in r:
        write_manifest_scores(r, r["data"])
  report = {"metric": F.metric, "mode": F.mode, "best": _public(rows[best]),
            "checkpoints": [_public(r) for r in rows], "data": descriptions}
  print(f"Scored {sum(1 for m in scored if m)} of {len(rows)} checkpoint(s) on "
        f"{'; '.join(descriptions)}; best by {F.metric} ({F.mode}): step {rows[best]['step']}")
  print(format_table(rows, best))
  text = json.dumps(report, sort_keys=True, allow_nan=True)
  if F.output:
    with open(F.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")
    print(f"JSON written to {F.output}")
  else:
    print(text)


def _public(row: dict) -> dict:
  out = {k: v for k, v in row.items() if k != "path"}
  if "metrics" in out:
    out["metrics"] = {k: (v if math.isfinite(v) else None) for k, v in out["metrics"].items()}
  return out


OVERRIDES: dict[str, str] = {}


def define_flags() -> None:
  flags.DEFINE_string("checkpoint_dir", None, "Directory whose checkpoints are scored.")
  flags.DEFINE_boolean("all", False, "Score every checkpoint in --checkpoint_dir (the default).")
  flags.DEFINE_string("checkpoint", None, "Score only this manifest.")
  flags.DEFINE_boolean("write_manifest", False, "Merge the scores into each manifest's metrics.")
  flags.DEFINE_string("output", None, "Write the JSON report here instead of stdout.")
  flags.DEFINE_string("metric", "eval/loss", "Metric that picks the best checkpoint.")
  flags.DEFINE_string("mode", "min", "'min' or 'max' (use max for task/accuracy).")
  flags.DEFINE_integer("batch_size", 16, "Validation windows per device call.")
  flags.DEFINE_integer("max_windows", None, "Score only the first N validation windows.")


if __name__ == "__main__":
  from hope_jax import cli

  define_flags()
  try:
    sys.argv, parsed = split_data_overrides(sys.argv)
  except ConfigError as e:
    cli.fail(str(e), PROG)
  OVERRIDES.update(parsed)
  cli.run(main, prog=PROG, config_flag=None)
