"""HOPE, Titans-LMM and Transformer++: trains each on the default corpus and on MQAR, one table.

Run (from the repository root; the full setting takes under an hour on 2 CPU cores,
see docs/results.md):
  python benchmarks/compare.py [--tiny] [--models=hope,titans_lmm,transformer_pp]
      [--datasets=default,mqar] [--steps=N] [--workdir=DIR] [--output=table.md]
      [--json=results.json]

The configs are experiments/compare/{hope,titans_lmm,transformer_pp}.py, equal in
parameters and training tokens (experiments/compare/__init__.py).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time

from absl import flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hope_jax.config import ConfigError  # noqa: E402

PROG = "benchmarks/compare.py"
MODELS = ("hope", "titans_lmm", "transformer_pp")
DATASETS = ("default", "mqar")
NAMES = {"hope": "HOPE", "titans_lmm": "Titans-LMM", "transformer_pp": "Transformer++"}

F = flags.FLAGS
flags.DEFINE_boolean("tiny", False, "Seconds-fast setting for tests (numbers mean nothing).")
flags.DEFINE_list("models", list(MODELS), f"Subset of {MODELS}.")
flags.DEFINE_list("datasets", list(DATASETS), f"Subset of {DATASETS}.")
flags.DEFINE_integer("steps", None, "Override training.num_steps of every run (same for all).")
flags.DEFINE_string("workdir", None, "Checkpoints and logs (default: a temporary directory).")
flags.DEFINE_string("output", None, "Also write the markdown table to this file.")
flags.DEFINE_string("json", None, "Also write the raw results as JSON to this file.")


def run_one(cfg, workdir: str, max_windows: int | None = None) -> dict:
  """Trains one config and scores the final parameters on its validation split."""
  from hope_jax.data import load_corpus
  from hope_jax.train import evaluation
  from hope_jax.train.loop import train
  from hope_jax.train.state import param_count

  cfg.training.checkpoint_dir = workdir
  cfg.training.log_dir = os.path.join(workdir, "logs")
  summary = train(cfg)
  params = summary["state"]["params"]
  corpus = load_corpus(cfg.data, cfg.model.vocab_size)
  metrics = evaluation.score(summary["model_def"], params, corpus, cfg.data.seq_len,
                             batch_size=16, max_windows=max_windows)
  t = cfg.training
  return {"params": param_count(params), "hidden_size": cfg.model.hidden_size,
          "train_tokens": int(t.num_steps * t.batch_size * cfg.data.seq_len),
          "train_seconds": round(summary["elapsed_s"], 1), "metrics": metrics,
          "data": corpus.description}


def table(results: dict) -> str:
  """Models as rows; default-corpus bits/byte and MQAR loss/accuracy side by side."""
  head = ["model", "params", "hidden", "train tokens / data set", "default: val bits/byte",
          "MQAR: val bits/token", "MQAR: answer accuracy", "MQAR: all answers right",
          "train time (s)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for model, runs in results.items():
    d, m = runs.get("default", {}), runs.get("mqar", {})
    any_run = d or m
    dm, mm = d.get("metrics", {}), m.get("metrics", {})

    def fmt(metrics, key, pct=False):
      if key not in metrics:
        return "-"
      return f"{100 * metrics[key]:.1f}%" if pct else f"{metrics[key]:.3f}"

    seconds = sum(r.get("train_seconds", 0.0) for r in runs.values())
    lines.append("| " + " | ".join([
        NAMES[model], f"{any_run['params']:,}", str(any_run["hidden_size"]),
        f"{any_run['train_tokens']:,}", fmt(dm, "eval/bits_per_byte"),
        fmt(mm, "eval/bits_per_token"), fmt(mm, "task/accuracy", True),
        fmt(mm, "task/exact_match", True), f"{seconds:.0f}"]) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  from experiments import compare as common

  if len(argv) > 1:
    raise ConfigError(f"unexpected argument(s): {' '.join(argv[1:])}")
  for name, chosen, allowed in (("models", F.models, MODELS), ("datasets", F.datasets, DATASETS)):
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
      raise ConfigError(f"--{name}: {bad or 'nothing'} is not a subset of {allowed}")
  workdir = F.workdir or tempfile.mkdtemp(prefix="hope_jax_compare_")
  results: dict[str, dict] = {}
  t0 = time.perf_counter()
  for model in F.models:
    cfg = importlib.import_module(f"experiments.compare.{model}").get_config(tiny=F.tiny)
    if F.steps is not None:
      if F.steps < 1:
        raise ConfigError(f"--steps must be positive, got {F.steps}")
      cfg.training.num_steps = F.steps
      cfg.training.warmup_steps = min(cfg.training.warmup_steps, F.steps)
    results[model] = {}
    for dataset in F.datasets:
      run_cfg = common.with_task(cfg, F.tiny) if dataset == "mqar" else cfg
      logging.info("compare: %s on %s", NAMES[model], dataset)
      results[model][dataset] = run_one(run_cfg, os.path.join(workdir, model, dataset),
                                        max_windows=16 if F.tiny else None)
  text = table(results)
  setting = "tiny (smoke test; numbers mean nothing)" if F.tiny else "full"
  print(f"Comparison, {setting} setting, {time.perf_counter() - t0:.0f} s in all:")
  print(text)
  if F.output:
    with open(F.output, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  if F.json:
    with open(F.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  from hope_jax import cli

  cli.run(main, prog=PROG, config_flag=None)
