"""Do a config's fresh self-modifying memories run away on its data? One table, before training.

Run:
  python -m hope_jax.check_init --config=experiments/gpu_d1024.py
  python -m hope_jax.check_init --config=experiments/gpu_d1024.py --stds=0.02,0.01,0.005
  options: --data=validation|random  --tokens=N  --seed=N  and --config.x.y=... overrides

For each W_in init std (`--stds`, default: the config's `model.memory_input_std`) it builds the
config's model fresh and replays it over the first validation window of the config's data (the
window the train loop's health line reads) or over uniformly random token ids, then prints the
spec's health metrics per layer (`hope_jax.diagnostics.health`) as a markdown table. A layer
whose W1 drift passes `diagnostics.RUNAWAY_DRIFT` (10) is marked "runs away": calm memories
stay within about the norm of their initial W1 (~0.8). Random tokens hide runaways that text
shows (at D=512 the spec's init, and at D=1024 half of it, stay calm on random bytes and run
away on text: docs/architecture.md, "Runaway fast weights"), so the validation window is the
default.
The fresh parameters come from `hope_jax.build_model(config, seed)`, not the train loop's
jitted init, so they are a sample of the same init rather than a run's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from hope_jax.config import ConfigError


def tokens_for(config: Any, data: str, length: int | None, seed: int = 0) -> np.ndarray:
  """`[1, length]` token ids: the first validation window of `config.data`, or random ids."""
  from hope_jax.config import ModelConfig, model_section

  length = int(config.data.seq_len if length is None else length)
  if length < 1:
    raise ConfigError(f"--tokens must be at least 1, got {length}")
  vocab = ModelConfig.from_config(model_section(config)).vocab_size
  if data == "random":
    return np.random.default_rng(seed).integers(0, vocab, (1, length)).astype(np.int32)
  from hope_jax import diagnostics
  from hope_jax.data import load_corpus

  val = load_corpus(config.data, vocab).val
  if len(val) < length + 1:  # A window holds its inputs and the next token.
    raise ConfigError(f"--tokens must be at most {len(val) - 1} (the validation split holds "
                      f"{len(val)} tokens), got {length}")
  return diagnostics.health_window(val, length)


def check(config: Any, stds: Sequence[float], tokens_BL: np.ndarray,
          seed: int = 0) -> list[dict[str, Any]]:
  """One row per (std, self-modifying layer): its health metrics, `runaway` and `tokens`.

  `config` (a run config or its model section) is left as it was. `tokens` is the number of
  tokens replayed: the longest prefix of `tokens_BL` that fills whole chunks.

  Raises:
    ConfigError: the model has no self-modifying memory, or `tokens_BL` fills no chunk.
  """
  import hope_jax
  from hope_jax import diagnostics
  from hope_jax.config import ModelConfig, model_section

  base = ModelConfig.from_config(model_section(config))
  rows = []
  for std in stds:
    model = hope_jax.build_model(dataclasses.replace(base, memory_input_std=float(std)), seed)
    chunk, length = diagnostics.replay_chunk(model), tokens_BL.shape[1]
    if length < chunk:
      raise ConfigError(f"{length} token(s) fill no chunk of the replay: give at least {chunk} "
                        "(--tokens)")
    metrics = diagnostics.health(model, tokens_BL)  # {} for a model without such memories.
    if not metrics:
      raise ConfigError(f"model.block={base.block!r} has no self-modifying memory to check")
    runaway = diagnostics.runaway_layers(metrics)
    for j, m in diagnostics.by_layer(metrics).items():
      rows.append({"memory_input_std": float(std), "layer": j, **m, "runaway": j in runaway,
                   "tokens": length // chunk * chunk})
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """`check`'s rows as a markdown table."""
  lines = ["| memory_input_std | layer | W1 drift | W2 drift | eta mean (max) | alpha min | |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    alpha = f"{r['alpha_min']:.3g}" if "alpha_min" in r else "-"
    lines.append(f"| {r['memory_input_std']:g} | {r['layer']} | {r['drift_w1']:.4g} | "
                 f"{r['drift_w2']:.4g} | {r['eta_mean']:.3g} ({r['eta_max']:.3g}) | {alpha} | "
                 f"{'runs away' if r['runaway'] else 'calm'} |")
  return "\n".join(lines)


def parse_stds(text: str | None, default: float) -> list[float]:
  """`--stds`: comma-separated positive numbers; None or empty gives [default]."""
  if not text:
    return [float(default)]
  try:
    stds = [float(s) for s in text.split(",")]
  except ValueError:
    raise ConfigError(f"--stds must be comma-separated numbers, got {text!r}") from None
  if not all(0 < s < float("inf") for s in stds):
    raise ConfigError(f"--stds must be positive numbers, got {text!r}")
  return stds


def check_flags(config: Any, stds: str | None, seed: int) -> list[float]:
  """The stds to check, from `--stds`; ConfigError for a bad `--stds` or `--seed`."""
  if seed < 0:
    raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
  if stds and config.model.memory_input == "identity":
    raise ConfigError("--stds sets the init of W_in, which model.memory_input='identity' "
                      "does not have")
  return parse_stds(stds, config.model.memory_input_std)


def main(argv: list[str]) -> None:
  from absl import flags

  F = flags.FLAGS
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument(s): {' '.join(argv[1:])}")
  config = F.config
  stds = check_flags(config, F.stds, F.seed)
  tokens_BL = tokens_for(config, F.data, F.tokens, F.seed)
  rows = check(config, stds, tokens_BL, F.seed)
  print(f"{config.model.block}, D={config.model.hidden_size}, {config.model.num_layers} "
        f"layer(s), {rows[0]['tokens']} {F.data} tokens, parameter seed {F.seed}")
  print(table(rows))


def define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).")
  flags.DEFINE_string("stds", None, "Comma-separated W_in init stds to compare "
                      "(default: the config's model.memory_input_std).")
  flags.DEFINE_enum("data", "validation", ["validation", "random"],
                    "Replay the first validation window of the config's data, or random ids.")
  flags.DEFINE_integer("tokens", None, "Tokens to replay (default: the config's data.seq_len).")
  flags.DEFINE_integer("seed", 0, "Seed of the fresh parameters (and of --data=random).")


if __name__ == "__main__":
  from hope_jax import cli

  define_flags()
  cli.run(main, prog="hope_jax.check_init")
