"""Typed, frozen model configuration and boundary validation.

The experiment files (`experiments/*.py`) hold `ml_collections.ConfigDict`s;
the model code never sees them. `ModelConfig.from_config(config.model)` turns
the `model` section into a frozen dataclass and checks every field, raising
`ConfigError` with the offending key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from typing import Any, Mapping

import numpy as np

BLOCKS = ("transformer_pp", "hope", "hope_attention", "titans_lmm")


class ConfigError(ValueError):
  """A bad configuration value; the message names the key and what is wanted."""


def _is_count(value) -> bool:
  """An int >= 0 (not a bool, which is an int to Python)."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_integer(value) -> bool:
  """A Python or numpy integer, not a bool (which is an int to Python)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def token_batch(tokens_BL: Any, name: str, vocab_size: int | None = None) -> np.ndarray:
  """`tokens_BL` as int32 `[B, L]` token ids, or ValueError naming `name` and what is wrong.

  The ids must be integers, the length at least 1 and, given `vocab_size`, every id in
  [0, vocab_size): the embedding gives ids outside it NaN, which sampling turns into token 0.
  """
  tokens_BL = np.asarray(tokens_BL)
  if tokens_BL.ndim != 2 or tokens_BL.shape[1] == 0 or not np.issubdtype(tokens_BL.dtype,
                                                                          np.integer):
    raise ValueError(f"{name} must be [batch, length] token ids (integers, length >= 1), got "
                     f"shape {tokens_BL.shape} of {tokens_BL.dtype}")
  if vocab_size is not None and (tokens_BL.min() < 0 or tokens_BL.max() >= vocab_size):
    bad = int(tokens_BL.min()) if tokens_BL.min() < 0 else int(tokens_BL.max())
    raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary "
                     f"[0, {vocab_size})")
  return tokens_BL.astype(np.int32)


AUTO_UNROLL = -1  # `inner_scan_unroll` chosen for the devices (`train.sharding.resolve_schedule`).

# Model settings that choose how a step is computed, not what it computes: each alternative is
# tested equal to the default (equivalence tests), none changes the parameters' or the
# optimizer state's structure. They may change across a resume (docs/checkpoints.md), e.g. to
# trade memory for time on another machine. `scan_layers` is one: it stacks the blocks'
# variables only inside the traced step, and the parameters keep their per-layer layout.
SCHEDULE_KEYS = ("impl", "remat", "inner_scan_unroll", "scan_layers", "lm_grad_fused",
                 "lm_grad_remat_every")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a HOPE-family language model (see docs/configuration.md).

  Field names follow the original tool where it had one (`hidden_size`,
  `num_layers`, `num_heads`, `vocab_size`); the rest follow
  `hope-spec.md` §9. A value of 0 for a width means "derive the default".
  """

  # Skeleton.
  block: str = "hope"  # "hope" | "hope_attention" | "titans_lmm" | "transformer_pp"
  vocab_size: int = 256  # Must match the tokenizer (256 for bytes).
  hidden_size: int = 256  # D, the model width.
  num_layers: int = 4  # Number of blocks.
  num_heads: int = 4  # H; hidden_size must be divisible by it (head_dim = D / H).
  tie_embeddings: bool = True  # Logits use the token embedding matrix.
  dtype: str = "float32"  # Compute dtype of the outer (static) matmuls.
  param_dtype: str = "float32"  # Storage dtype of the outer parameters.
  ffn_hidden: int = 0  # SwiGLU width; 0 -> 8D/3 rounded up to 64.
  rope_theta: float = 10000.0  # RoPE base of the attention blocks.

  # Self-modifying Titans sublayer (spec §2).
  mem_hidden_proj: int = 0  # E_p per head; 0 -> head_dim.
  mem_hidden_mem: int = 0  # E_m per head; 0 -> 4 * head_dim.
  chunk_other: int = 16  # C_o: chunk of the k/v/eta/alpha(/q) memories.
  chunk_mem: int = 64  # C_m: chunk of the main memory.
  adaptive_q: bool = False  # Also generate q with an in-context memory (Table 6 row 1).
  frozen_memories: tuple[str, ...] = ()  # Memories never updated in context ("w/o inner-k/v/q").
  memory_target: str = "self"  # "self" | "v"
  memory_input: str = "proj"  # "proj" | "identity"
  # Init std of W_in, the memory-input projection (unused with memory_input="identity"). On
  # text the spec's 0.02 lets the self-modifying memories run away at D=512 and 1024
  # (docs/architecture.md); `python -m hope_jax.check_init` shows it for a config.
  memory_input_std: float = 0.02
  conv_position: str = "pre_memory"  # "pre_memory" | "post_memory"
  conv_width: int = 4  # Causal depthwise conv window on the memory-input and q streams.
  dgd_precond: str = "input_layer"  # "input_layer" | "per_layer" | "none"
  momentum: bool = True  # Momentum S of the inner updates (False: "w/o momentum").
  use_alpha: bool = True  # Retention alpha (False: alpha = 1, "w/o weight decay").
  eta_max: float = 0.1  # Inner learning rates eta lie in (0, eta_max).
  alpha_min: float = 0.1  # Retention alpha lies in (alpha_min, 1); eta_max <= alpha_min.
  inner_grad_clip: float = 1.0  # Per-token clip of the inner gradients.
  read_mode: str = "chunk_start"  # "chunk_start" | "dual"
  selfmod_meta_grad: str = "full"  # "full" | "first_order"
  impl: str = "chunked"  # "chunked" | "reference"
  remat: bool = True  # jax.checkpoint around the inner-loop scan bodies.
  # Chunks per loop iteration of the Titans chunk scans (0: all). -1: training picks 0 on an
  # accelerator or a CPU run as one XLA device, 1 with several host devices; elsewhere 1.
  inner_scan_unroll: int = -1
  scan_layers: bool = False  # lax.scan over the blocks: one block compiled, not N (deep models).
  static_projections: bool = False  # Titans-LMM: k/v/eta/alpha from linear maps.

  # Continuum Memory System (spec §3).
  cms_chunks: tuple[int, ...] = (64, 256, 1024, 4096)  # C_1 < ... < C_K: update period of each level.
  cms_hidden: int = 0  # Total SwiGLU width over levels; 0 -> 8D/3 rounded to 64.
  cms_signal: str = "lm_grad"  # "lm_grad" | "static"
  cms_mode: str = "in_context"  # "in_context" | "outer_freq"
  cms_variant: str = "sequential"  # "sequential" | "nested" | "independent"
  # Stop-gradient writes, straight-through to the meta-init. The only value: spec §3.3's "full"
  # (second order through the LM gradient, which the spec does not recommend) is not implemented.
  cms_meta_grad: str = "first_order"
  cms_lr: float = 1e-4  # Learning rate of the in-context CMS writes.
  lm_grad_fused: bool = True  # lm_grad: one forward per chunk serves the loss and the write.
  lm_grad_remat_every: int = 0  # lm_grad: keep the chunk scan's carry every R chunks, recompute between (0 or 1: off).
  cms_grad_clip: float = 1.0  # Frobenius clip of each level's summed chunk gradient.
  # Every sequence owns its CMS fast weights. The only value: spec §3.3's "batch_shared" (one
  # copy written with the batch's summed gradient, which leaks across samples) is not implemented.
  cms_state_scope: str = "per_sequence"
  cms_ablate: str = "none"  # "none" | "single_static" | "static_chain"
  cms_order: str = "fast_first"  # "fast_first" | "slow_first"

  # ---------------------------------------------------------------- derived

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def ffn_width(self) -> int:
    return self.ffn_hidden or _round_up(8 * self.hidden_size // 3, 64)

  @property
  def cms_width(self) -> int:
    return self.cms_hidden or _round_up(8 * self.hidden_size // 3, 64)

  @property
  def e_proj(self) -> int:
    return self.mem_hidden_proj or self.head_dim

  @property
  def uses_static_projections(self) -> bool:
    """Titans-LMM: k/v/eta/alpha from static linear maps (block "titans_lmm" implies it)."""
    return self.static_projections or self.block == "titans_lmm"

  @property
  def e_mem(self) -> int:
    return self.mem_hidden_mem or 4 * self.head_dim

  # ------------------------------------------------------------ conversion

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any] | Any) -> "ModelConfig":
    """Builds and validates a `ModelConfig` from the `model` config section.

    Args:
      model_cfg: a ConfigDict, FrozenConfigDict or plain mapping.

    Raises:
      ConfigError: unknown key, wrong type or impossible combination.
    """
    raw = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
      if key not in fields:
        raise ConfigError(f"unknown config key 'model.{key}'{_did_you_mean(key, fields)}")
      kwargs[key] = _coerce(f"model.{key}", value, fields[key].default)
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self) -> None:
    """Raises `ConfigError` for impossible combinations."""
    _choice("model.block", self.block, BLOCKS)
    for key, options in (
        ("memory_target", ("self", "v")),
        ("memory_input", ("proj", "identity")),
        ("conv_position", ("pre_memory", "post_memory")),
        ("dgd_precond", ("input_layer", "per_layer", "none")),
        ("read_mode", ("chunk_start", "dual")),
        ("selfmod_meta_grad", ("full", "first_order")),
        ("impl", ("chunked", "reference")),
        ("cms_signal", ("lm_grad", "static")),
        ("cms_mode", ("in_context", "outer_freq")),
        ("cms_variant", ("sequential", "nested", "independent")),
        ("cms_meta_grad", ("first_order",)),
        ("cms_state_scope", ("per_sequence",)),
        ("cms_ablate", ("none", "single_static", "static_chain")),
        ("cms_order", ("fast_first", "slow_first")),
        ("dtype", ("float32", "bfloat16")),
        ("param_dtype", ("float32", "bfloat16")),
    ):
      _choice(f"model.{key}", getattr(self, key), options)
    if not _is_count(self.lm_grad_remat_every):
      raise ConfigError(
          f"model.lm_grad_remat_every must be an int >= 0 (0 or 1 keeps every chunk), got "
          f"{self.lm_grad_remat_every!r}")
    if not (_is_count(self.inner_scan_unroll) or self.inner_scan_unroll == AUTO_UNROLL):
      raise ConfigError(
          f"model.inner_scan_unroll must be an int >= 0 (0 unrolls the whole chunk scan) or -1 "
          f"(chosen for the devices), got {self.inner_scan_unroll!r}")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "chunk_other",
                "chunk_mem", "conv_width"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
    for key in ("ffn_hidden", "cms_hidden", "mem_hidden_proj", "mem_hidden_mem"):
      if not _is_count(getattr(self, key)):
        raise ConfigError(
            f"model.{key} must be an int >= 0 (0 picks the default width), got "
            f"{getattr(self, key)!r}")
    for key in ("memory_input_std", "eta_max", "rope_theta", "cms_lr"):
      value = getattr(self, key)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not 0 < value < math.inf):
        raise ConfigError(f"model.{key} must be a positive number, got {value!r}")
    for key in ("inner_grad_clip", "cms_grad_clip"):
      if not 0 <= getattr(self, key) < math.inf:
        raise ConfigError(
            f"model.{key} must be a number >= 0 (0: no clip), got {getattr(self, key)!r}")
    if self.hidden_size % self.num_heads:
      raise ConfigError(
          f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
          f"({self.num_heads})")
    if self.memory_input == "identity" and self.num_heads != 1:
      raise ConfigError("model.memory_input='identity' requires model.num_heads=1")
    big, small = max(self.chunk_other, self.chunk_mem), min(self.chunk_other, self.chunk_mem)
    if big % small:
      raise ConfigError(
          f"model.chunk_mem ({self.chunk_mem}) and model.chunk_other ({self.chunk_other}) "
          "must divide one another")
    if self.eta_max > self.alpha_min:
      raise ConfigError(
          f"model.eta_max ({self.eta_max}) must not exceed model.alpha_min ({self.alpha_min}): "
          "the DGD factor alpha - eta would go negative")
    if not 0.0 < self.alpha_min <= 1.0:
      raise ConfigError(f"model.alpha_min must be in (0, 1], got {self.alpha_min}")
    bad = set(self.frozen_memories) - {"k", "v", "q", "eta", "alpha"}
    if bad:
      raise ConfigError(
          f"model.frozen_memories has unknown memories {sorted(bad)}; "
          "expected a subset of ('k', 'v', 'q', 'eta', 'alpha')")
    if "q" in self.frozen_memories and not self.adaptive_q:
      raise ConfigError("model.frozen_memories contains 'q' but model.adaptive_q is False")
    if self.uses_static_projections and (self.adaptive_q or self.frozen_memories):
      raise ConfigError(
          "model.static_projections (or block='titans_lmm') has no projection memories: "
          f"model.adaptive_q must be False and model.frozen_memories empty, got "
          f"adaptive_q={self.adaptive_q}, frozen_memories={self.frozen_memories}")
    if self.block in ("hope", "hope_attention"):
      chunks = self.cms_chunks
      if not chunks or any(c < 1 for c in chunks):
        raise ConfigError(f"model.cms_chunks must be positive integers, got {chunks}")
      if list(chunks) != sorted(set(chunks)):
        raise ConfigError(f"model.cms_chunks must be strictly increasing, got {chunks}")
      if any(c % chunks[0] for c in chunks):
        raise ConfigError(
            f"model.cms_chunks {chunks} must all be multiples of the first (fastest) level")
      if self.cms_variant == "nested" and any(b % a for a, b in zip(chunks, chunks[1:], strict=False)):
        raise ConfigError(
            f"model.cms_variant='nested' needs each of model.cms_chunks {chunks} to divide the "
            "next (a level restarts at the next level's boundaries)")
      if self.block == "hope" and chunks[0] % big:
        raise ConfigError(
            f"model.cms_chunks[0] ({chunks[0]}) must be a multiple of model.chunk_other "
            f"({self.chunk_other}) and model.chunk_mem ({self.chunk_mem})")


def _round_up(x: int, m: int) -> int:
  return max(m, -(-x // m) * m)


def _did_you_mean(key: str, options) -> str:
  close = difflib.get_close_matches(key, list(options), n=1)
  return f" (did you mean '{close[0]}'?)" if close else ""


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
  if value not in options:
    raise ConfigError(f"{key}={value!r} is not one of {options}")


def _coerce(key: str, value: Any, default: Any) -> Any:
  """Checks `value` against the type of `default`; lists become tuples."""
  if isinstance(default, bool):
    if not isinstance(value, bool):
      raise ConfigError(f"{key} must be a bool, got {value!r}")
    return value
  if isinstance(default, int):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key} must be an int, got {value!r}")
    return value
  if isinstance(default, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)
  if isinstance(default, str):
    if not isinstance(value, str):
      raise ConfigError(f"{key} must be a string, got {value!r}")
    return value
  if isinstance(default, tuple):
    if isinstance(value, str):
      value = tuple(v.strip() for v in value.split(",") if v.strip())
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key} must be a tuple, got {value!r}")
    if default and all(isinstance(d, int) for d in default):
      try:
        return tuple(int(v) for v in value)
      except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a tuple of ints, got {value!r}") from None
    return tuple(value)
  return value


DATA_TYPES = ("default", "random", "text", "books", "mqar", "passkey")
# What the train loop's evaluations report and its checkpoints record: the names
# `training.keep_best` can rank checkpoints by (`hope_jax.train.loop.evaluate`).
LOOP_EVAL_METRICS = ("eval/loss", "eval/bits_per_token", "eval/perplexity")


def validate_run_config(cfg: Any) -> ModelConfig:
  """Checks the `training` and `data` sections and builds the ModelConfig.

  Runs before anything is compiled; raises ConfigError naming the key.
  """
  for section in ("model", "training", "data"):
    value = cfg.get(section) if hasattr(cfg, "get") else None
    if not hasattr(value, "get"):
      raise ConfigError(f"the run config has no '{section}' section (a ConfigDict of keys), got "
                        f"{value!r}: start from a copy of experiments/base.py")
  model = ModelConfig.from_config(cfg.model)
  for section, check in (("training", _validate_training), ("data", validate_data_config)):
    try:
      check(cfg[section])
    except (AttributeError, KeyError) as e:  # ml_collections' error for an absent key.
      # Its message may go on with a "Did you mean" line about a similar key (and quotes
      # escaped): the first name in it is the absent one.
      found = re.search(r"[A-Za-z_]\w*", str(e.args[0] if e.args else e))
      key = found.group(0) if found else "?"
      raise ConfigError(f"the run config has no {section}.{key}: start from a copy of "
                        "experiments/base.py, which defines every key") from None
  _check_tokenizer_path(cfg.data)
  return model


def _check_tokenizer_path(d: Any) -> None:
  """A vocabulary file the run would silently not read is an error (ConfigError)."""
  if not d.tokenizer_path or d.get("tokenizer", "byte") != "byte":
    return
  if d.data_type == "books":
    import os

    from hope_jax.data.books import is_preprocessed

    path = d.data_path or ""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if is_preprocessed(folder):
      return  # Checked against the folder's own vocabulary when it is loaded.
  if d.data_type in ("default", "text", "books"):
    raise ConfigError(
        f"data.tokenizer_path={d.tokenizer_path} is set, but data.tokenizer='byte' does not "
        "read it: set --config.data.tokenizer=char to use that vocabulary, or leave "
        "data.tokenizer_path unset")
  raise ConfigError(f"data.tokenizer_path={d.tokenizer_path} is set, but "
                    f"data.data_type={d.data_type!r} reads no vocabulary file: leave it unset")


def _validate_training(t: Any) -> None:
  for key in ("batch_size", "log_every", "eval_every", "eval_batches", "save_every"):
    if int(t[key]) < 1:
      raise ConfigError(f"training.{key} must be a positive integer, got {t[key]}")
  if t.num_steps < 0:
    raise ConfigError(f"training.num_steps must be >= 0, got {t.num_steps}")
  if not 0 < t.learning_rate < math.inf:
    raise ConfigError(f"training.learning_rate must be a positive number, got {t.learning_rate}")
  _choice("training.lr_schedule", t.lr_schedule, ("cosine", "constant"))
  _choice("training.keep_best_mode", t.keep_best_mode, ("min", "max"))
  if t.keep_last is not None and t.keep_last < 1:
    raise ConfigError(f"training.keep_last must be a positive integer or None, got {t.keep_last}")
  if t.keep_best is not None and t.keep_best not in LOOP_EVAL_METRICS:
    raise ConfigError(
        f"training.keep_best={t.keep_best!r} is not a metric the train loop records; expected "
        f"one of {LOOP_EVAL_METRICS}{_did_you_mean(t.keep_best, LOOP_EVAL_METRICS)}")
  if t.seed < 0:
    raise ConfigError(f"training.seed must be >= 0, got {t.seed}")
  if t.warmup_steps < 0:
    raise ConfigError(f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
  for key in ("b1", "b2"):
    if not 0 <= t[key] < 1:
      raise ConfigError(f"training.{key} must be in [0, 1), got {t[key]}")
  if not 0 < t.grad_clip < math.inf:
    raise ConfigError(f"training.grad_clip must be a positive number, got {t.grad_clip}")
  if not 0 <= t.weight_decay < math.inf:
    raise ConfigError(f"training.weight_decay must be >= 0, got {t.weight_decay}")
  if not 0 <= t.min_lr_ratio <= 1:
    raise ConfigError(f"training.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")


def validate_data_config(d: Any) -> None:
  """Checks the `data` section (also `hope_jax.evaluate`'s, after its overrides).

  Raises:
    ConfigError: naming the key and what is wanted.
  """
  import os

  _choice("data.data_type", d.data_type, DATA_TYPES)
  if d.seq_len < 2:
    raise ConfigError(f"data.seq_len must be at least 2, got {d.seq_len}")
  if not 0.0 < d.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
  if not 0 <= d.get("memmap_min_mb", 0.0) < math.inf:  # Absent from older runs' configs.
    raise ConfigError(f"data.memmap_min_mb must be >= 0, got {d.memmap_min_mb}")
  if d.data_type in ("text", "books"):
    if not d.data_path:
      raise ConfigError(f"data.data_path is required for data.data_type={d.data_type!r}")
    if not os.path.exists(d.data_path):
      raise ConfigError(f"data.data_path: no such file or directory: {d.data_path}")
  if d.tokenizer_path:
    if not os.path.isfile(d.tokenizer_path):
      raise ConfigError(f"data.tokenizer_path: no such file: {d.tokenizer_path}")
  seed = d.get("task_seed", 0)  # Absent from configs saved before the tasks existed.
  if not is_integer(seed) or seed < 0:
    raise ConfigError(f"data.task_seed must be an integer >= 0, got {seed!r}")
  depth = d.get("passkey_depth")
  if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float))):
    raise ConfigError(f"data.passkey_depth must be a number in [0, 1] or None, got {depth!r}")


def model_section(config: Any) -> Any:
  """The `model` section of a whole run config, or `config` itself when it is one.

  Takes what `hope_jax.build_model` takes: a run config (ConfigDict or dict) with a `model`
  section, that section alone, or a `ModelConfig`.
  """
  if isinstance(config, ModelConfig):
    return config.to_dict()
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a run config, its model section or a ModelConfig, got "
                    f"{type(config).__name__}")
  if "model" in config:
    return config["model"]
  unknown = sorted(set(config) - set(ModelConfig().to_dict()))
  if not unknown:  # The model section alone (keys it leaves out take their defaults).
    return config
  raise TypeError(f"config must be a run config, its model section or a ModelConfig; this "
                  f"mapping has no 'model' section and keys that are not model keys: "
                  f"{', '.join(map(str, unknown[:8]))}")
