"""Text generation from a trained checkpoint.

Run:
  python -m hope_jax.sample --checkpoint_dir=DIR --prompt="def " --max_new_tokens=200 \
      --temperature=0.8 --seed=0 [--top_k=40] [--top_p=0.95]

The prompt goes through `model.prefill`, then `model.decode_step` generates token by token
with the recurrent state of spec §5. The continuation goes to stdout; tokens/s to stderr.
`--checkpoint_dir` may also name one manifest (`checkpoint_step_<N>_ts_<T>.json`).

The text is encoded with the tokenizer the run's data used (bytes, the character
vocabulary training keeps beside the checkpoints, or the data's own, e.g. a books
folder's vocab.json); `--tokenizer_path=vocab.json` overrides it, e.g. when the
data folder is not on this machine (see `run_tokenizer`).
"""

from __future__ import annotations

import functools
import numbers
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hope_jax.config import ConfigError, is_integer, token_batch
from hope_jax.model.attention import Attention


def filter_logits(logits_BV, top_k: int = 0, top_p: float = 1.0):
  """Masks (to -inf) everything outside the top-k and the top-p nucleus."""
  logits_BV = logits_BV.astype(jnp.float32)
  if top_k and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    keep_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
    keep_BV = keep_BV.at[:, 0].set(True)  # Even where rounding leaves the top token's mass at 0.
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_token(key, logits_BV, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """One token per row; temperature 0 is greedy."""
  if temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def generate(model, prompt_BL, max_new_tokens: int, *, temperature: float = 0.8, seed: int = 0,
             top_k: int = 0, top_p: float = 1.0, max_len: int | None = None,
             timed: bool = False):
  """Continues `prompt_BL`; returns the new tokens `[B, max_new_tokens]` (numpy).

  The whole loop is one jitted `lax.scan`, and the result is a pure function of
  (model, prompt, settings, seed). With `timed=True` returns (tokens, seconds), the
  seconds covering prefill + generation after compilation.
  """
  check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, min_new_tokens=0, exc=ValueError)
  prompt_BL = jnp.asarray(token_batch(prompt_BL, "generate: prompt_BL", model.cfg.vocab_size))
  b, l = prompt_BL.shape
  if max_len is not None and max_len < l + max_new_tokens and any(
      isinstance(b.mixer, Attention) for b in model.blocks):
    raise ValueError(f"max_len={max_len} is shorter than the prompt ({l}) plus max_new_tokens "
                     f"({max_new_tokens}): an attention block's cache would overflow")
  graphdef, state = nnx.split(model)
  run = _runner(graphdef, b, l, max_new_tokens, float(temperature), int(top_k), float(top_p),
                max_len or l + max_new_tokens)
  key = jax.random.key(seed)
  # One compile per layout of the state: the same structure may come with other dtypes or
  # devices (a model cast to bfloat16, or moved), which a program compiled for one refuses.
  layout = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(state))
  compiled = run["compiled"].get(layout)
  if compiled is None:
    compiled = run["compiled"][layout] = run["jit"].lower(state, prompt_BL, key).compile()
  start = time.perf_counter()
  toks_BN = np.asarray(compiled(state, prompt_BL, key))
  secs = time.perf_counter() - start
  return (toks_BN, secs) if timed else toks_BN


@functools.lru_cache(maxsize=8)
def _runner(graphdef, b: int, l: int, max_new_tokens: int, temperature: float, top_k: int,
            top_p: float, max_len: int):
  """The jitted prefill + sampling loop for one model structure and one set of settings."""

  @jax.jit
  def run(state, prompt_BL, key):
    m = nnx.merge(graphdef, state)
    logits_BV, cache = m.prefill(prompt_BL, m.init_cache(b, max_len=max_len))

    def body(carry, key_t):
      logits_BV, cache = carry
      tok_B = sample_token(key_t, logits_BV, temperature, top_k, top_p)
      logits_BV, cache = m.decode_step(tok_B, cache)
      return (logits_BV, cache), tok_B

    keys = jax.random.split(key, max_new_tokens)
    _, toks_NB = jax.lax.scan(body, (logits_BV, cache), keys)
    return toks_NB.swapaxes(0, 1)

  return {"jit": run, "compiled": {}}


def _raw_books(data_path: str) -> bool:
  """True when `data_path` is certainly raw books, not a preprocessed folder (as in books.py)."""
  from hope_jax.data.books import is_preprocessed

  folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path) or "."
  return os.path.exists(data_path) and not is_preprocessed(folder)


def _load_vocab(path: str, what: str, vocab_size: int):
  from hope_jax.data.tokenizers import CharTokenizer

  try:
    tok = CharTokenizer.load(path)
  except ConfigError as e:
    raise ConfigError(str(e).replace("data.tokenizer_path", what, 1)) from None
  if tok.vocab_size != vocab_size:
    raise ConfigError(f"{what}: {path} has {tok.vocab_size} tokens but the run's "
                      f"model.vocab_size is {vocab_size}: not the run's vocabulary")
  return tok


def run_tokenizer(config, tokenizer_path: str | None = None, *, run_dir: str | None = None,
                  loader_state: dict | None = None):
  """The tokenizer the run's data was encoded with, picked as the data loader picks it.

  In order: `tokenizer_path`; bytes when the run says so; the character
  vocabulary training keeps beside the checkpoints (`run_dir/vocab.json`); else
  the data itself, through `load_corpus` where only the data knows (a preprocessed
  books folder brings its own vocab.json whatever `data.tokenizer` says; a
  character vocabulary without a file was counted from the data at start-up).

  Args:
    config: the run's config, as saved with its checkpoint.
    tokenizer_path: a vocab.json that overrides the choice for any run, e.g. when
      its data is not on this machine.
    run_dir: the checkpoint folder.
    loader_state: the checkpoint's loader state; a `tokenizer_fingerprint` recorded
      there must match the vocabulary found.

  Raises:
    ConfigError: the vocabulary cannot be found (naming the path and the flag to
      pass), or it is not the run's (size or fingerprint).
  """
  from hope_jax.data import load_corpus
  from hope_jax.data.corpus import _tokenizer_for
  from hope_jax.data.tokenizers import VOCAB_FILE, ByteTokenizer

  data, vocab_size = config.data, int(config.model.vocab_size)
  want = (loader_state or {}).get("tokenizer_fingerprint")
  kept = os.path.join(run_dir, VOCAB_FILE) if run_dir else None
  needs_data = ((data.tokenizer == "char" and not data.tokenizer_path)
                or (data.data_type == "books" and not _raw_books(data.data_path or "")))
  if tokenizer_path:
    tok, source = _load_vocab(tokenizer_path, "--tokenizer_path", vocab_size), tokenizer_path
  elif want == "byte" or (want is None and data.tokenizer == "byte" and not needs_data):
    return ByteTokenizer()
  elif kept and os.path.isfile(kept):
    tok, source = _load_vocab(kept, "the run's vocabulary", vocab_size), kept
  else:
    try:
      tok = load_corpus(data, vocab_size).tokenizer if needs_data else _tokenizer_for(data)
    except ConfigError as e:  # Its message names the missing path.
      raise ConfigError(f"cannot find the run's vocabulary: {e}; pass "
                        "--tokenizer_path=VOCAB_JSON (e.g. the data folder's vocab.json)") from None
    source = f"the vocabulary of data.data_path={data.data_path}"
  got = tok.fingerprint()
  if want is not None and got != want:
    raise ConfigError(f"{source} is not the vocabulary the run was trained with (fingerprint "
                      f"{got}, the checkpoint's {want}): its ids mean other tokens; pass "
                      "--tokenizer_path=VOCAB_JSON with the run's own")
  return tok


def encode_prompt(tok, prompt: str, vocab_size: int) -> np.ndarray:
  """The prompt as ids `[1, L]`; raises ConfigError if empty or outside the model's vocabulary."""
  ids_1L = np.asarray(tok.encode(prompt), np.int32)[None]
  if ids_1L.shape[1] == 0:
    raise ConfigError("--prompt must not be empty")
  if ids_1L.max() >= vocab_size:
    raise ConfigError(f"--prompt encodes to token id {int(ids_1L.max())}, but model.vocab_size is "
                      f"{vocab_size}: the {getattr(tok, 'name', '?')} tokenizer does not fit this "
                      "model; pass --tokenizer_path=VOCAB_JSON")
  return ids_1L


def check_settings(*, max_new_tokens, temperature, top_k, top_p, seed, min_new_tokens: int = 1,
                   prefix: str = "", exc: type[Exception] = ConfigError) -> None:
  """Raises `exc` naming the first impossible sampling setting (`prefix`: "--" for flags)."""
  number = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)
  if not is_integer(max_new_tokens) or max_new_tokens < min_new_tokens:
    raise exc(f"{prefix}max_new_tokens must be an integer >= {min_new_tokens}, got "
              f"{max_new_tokens!r}")
  if not is_integer(top_k) or top_k < 0:
    raise exc(f"{prefix}top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")
  if not number(top_p) or not 0.0 < top_p <= 1.0:  # Also rejects nan.
    raise exc(f"{prefix}top_p must be in (0, 1] (1 turns it off), got {top_p!r}")
  if not number(temperature) or not 0.0 <= temperature < float("inf"):
    raise exc(f"{prefix}temperature must be a finite number >= 0 (0 is greedy), got "
              f"{temperature!r}")
  if not is_integer(seed):
    raise exc(f"{prefix}seed must be an integer, got {seed!r}")


def check_flags(f) -> None:
  """Rejects impossible settings before anything is loaded or compiled (ConfigError)."""
  if not f.checkpoint_dir:
    raise ConfigError("--checkpoint_dir is required (a run's checkpoint directory, or one "
                      "checkpoint_step_*_ts_*.json manifest)")
  if not f.prompt:
    raise ConfigError("--prompt must not be empty")
  check_settings(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k,
                 top_p=f.top_p, seed=f.seed, prefix="--")


def load_model(path: str):
  """The run's model and its `Restored` checkpoint, from a manifest or a directory's newest."""
  import hope_jax
  from hope_jax.checkpoint import restore, restore_latest

  restored = restore(path) if os.path.isfile(path) else restore_latest(path)
  model = hope_jax.build_model(restored.config.model)
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, restored.params)
  return nnx.merge(graphdef, state), restored


def main(argv) -> None:
  from absl import flags

  f = flags.FLAGS
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument(s): {' '.join(argv[1:])}")
  check_flags(f)
  try:
    model, restored = load_model(f.checkpoint_dir)
  except (FileNotFoundError, ValueError, KeyError) as err:  # CheckpointError is a ValueError.
    raise ConfigError(str(err)) from None
  tok = run_tokenizer(restored.config, f.tokenizer_path,
                      run_dir=os.path.dirname(restored.manifest_path),
                      loader_state=restored.loader_state)
  prompt = encode_prompt(tok, f.prompt, int(restored.config.model.vocab_size))
  kw = dict(temperature=f.temperature, seed=f.seed, top_k=f.top_k, top_p=f.top_p)
  new, secs = generate(model, prompt, f.max_new_tokens, timed=True, **kw)
  print(tok.decode(new[0].tolist()))
  print(f"{f.max_new_tokens} tokens in {secs:.2f} s ({f.max_new_tokens / secs:.1f} tokens/s, "
        f"prompt of {prompt.shape[1]} tokens included, compilation excluded)", file=sys.stderr)


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("checkpoint_dir", None, "A run's checkpoint directory (its newest "
                      "readable checkpoint), or one checkpoint manifest .json.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
  flags.DEFINE_string("tokenizer_path", None, "A vocab.json to use instead of the run's own "
                      "(default: vocab.json beside the checkpoints, else the vocabulary of the "
                      "run's data, e.g. a books folder's).")


if __name__ == "__main__":
  from hope_jax import cli

  _define_flags()
  cli.run(main, prog="hope_jax.sample", config_flag=None)
