"""Renders docs/configuration.md from `experiments/base.py` and `ModelConfig`.

Descriptions are the comments beside (or just above) each key in the source, so
the page cannot drift from the code; a test compares it with this output.

  python -m hope_jax.configdoc > docs/configuration.md
"""

from __future__ import annotations

import inspect
import json
import re
import sys

from hope_jax import config as config_module

_BASE_ASSIGN = re.compile(r"^\s*(?:cfg\.)?(model|training|data|t|d|m)\.([\w.]+)\s*=\s*[^=].*?(?:#\s*(.*))?$")
_FIELD = re.compile(r"^\s+(\w+):\s*[^=]+=\s*.*?(?:#\s*(.*))?$")
_SECTION_ALIAS = {"t": "training", "d": "data", "m": "model"}


def _comments(lines: list[str], pattern: re.Pattern, key_of) -> dict[str, str]:
  """Maps keys to their trailing comment or the comment block right above them."""
  out: dict[str, str] = {}
  above: list[str] = []
  for line in lines:
    stripped = line.strip()
    if stripped.startswith("#"):
      above.append(stripped.lstrip("# ").rstrip())
      continue
    m = pattern.match(line)
    if m:
      key, trailing = key_of(m)
      text = trailing or " ".join(above)
      if text and key not in out:
        out[key] = text.strip()
    above = []
  return out


def descriptions() -> dict[str, str]:
  from experiments import base

  model_src = inspect.getsource(config_module.ModelConfig).splitlines()
  docs = {f"model.{k}": v for k, v in _comments(
      model_src, _FIELD, lambda m: (m.group(1), m.group(2))).items()}
  base_src = inspect.getsource(base).splitlines()
  for key, text in _comments(
      base_src, _BASE_ASSIGN,
      lambda m: (f"{_SECTION_ALIAS.get(m.group(1), m.group(1))}.{m.group(2)}", m.group(3))).items():
    docs.setdefault(key, text)
  return docs


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def render() -> str:
  from experiments import base

  cfg = base.get_config().to_dict()
  docs = descriptions()
  parts = [
      "# Configuration\n",
      "Every key of `experiments/base.py` with its default there and its meaning. Override any "
      "of them on the command line, e.g. `--config.training.num_steps=50`. This page is generated "
      "by `python -m hope_jax.configdoc > docs/configuration.md` (a test checks it is current). "
      "Model keys may not change when a run resumes, except the schedule settings marked so "
      "(how the step is computed, not what).\n",
  ]
  for section in ("model", "training", "data"):
    parts.append(f"\n## `{section}`\n\n| key | default | meaning |\n| --- | --- | --- |")
    for key, value in _flatten(cfg[section]).items():
      full = f"{section}.{key}"
      default = json.dumps(list(value) if isinstance(value, tuple) else value)
      meaning = docs.get(full, "").replace("|", "\\|")
      if section == "model" and key in config_module.SCHEDULE_KEYS:
        meaning = meaning.rstrip(".") + ". May change on resume (docs/checkpoints.md)."
      parts.append(f"| `{full}` | `{default}` | {meaning} |")
  extra = sorted(set(cfg) - {"model", "training", "data"})
  for section in extra:
    parts.append(f"\n## `{section}`\n\n| key | default | meaning |\n| --- | --- | --- |")
    for key, value in _flatten(cfg[section] if isinstance(cfg[section], dict) else {"": cfg[section]}).items():
      parts.append(f"| `{section}.{key}` | `{json.dumps(value)}` | {docs.get(f'{section}.{key}', '')} |")
  return "\n".join(parts) + "\n"


def undocumented() -> list[str]:
  from experiments import base

  cfg = base.get_config().to_dict()
  docs = descriptions()
  return [f"{s}.{k}" for s in cfg if isinstance(cfg[s], dict) for k in _flatten(cfg[s])
          if f"{s}.{k}" not in docs]


if __name__ == "__main__":
  sys.stdout.write(render())
