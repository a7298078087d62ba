"""Text generation from a trained checkpoint.

Run:
  python -m hope_jax.sample --checkpoint_dir=DIR --prompt="def " --max_new_tokens=200 \
      --temperature=0.8 --seed=0 [--top_k=40] [--top_p=0.95]

The prompt goes through `model.prefill`, then `model.decode_step` generates token by token
with the recurrent state of spec §5. The continuation goes to stdout; tokens/s to stderr.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
  prompt_BL = jnp.asarray(prompt_BL, jnp.int32)
  b, l = prompt_BL.shape
  graphdef, state = nnx.split(model)
  run = _runner(graphdef, b, l, max_new_tokens, float(temperature), int(top_k), float(top_p),
                max_len or l + max_new_tokens)
  key = jax.random.key(seed)
  if "compiled" not in run:  # Shapes are fixed per runner, so one compile serves every call.
    run["compiled"] = run["jit"].lower(state, prompt_BL, key).compile()
  compiled = run["compiled"]
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

  return {"jit": run}


def _tokenizer(config, checkpoint_dir: str, tokenizer_path: str | None):
  from hope_jax.data.tokenizers import ByteTokenizer, CharTokenizer

  kind = config.data.tokenizer if "data" in config else "byte"
  if kind == "byte":
    return ByteTokenizer()
  path = tokenizer_path or config.data.get("tokenizer_path") or os.path.join(
      checkpoint_dir, "vocab.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"the run uses data.tokenizer='char' but its vocabulary {path!r} does not exist; "
        "pass --tokenizer_path=vocab.json")
  return CharTokenizer.load(path)


def load_model(checkpoint_dir: str):
  """Builds the run's model from the newest checkpoint in `checkpoint_dir`."""
  import hope_jax
  from hope_jax.checkpoint import restore_latest

  restored = restore_latest(checkpoint_dir)
  model = hope_jax.build_model(restored.config.model)
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, restored.params)
  return nnx.merge(graphdef, state), restored.config


def main(argv) -> None:
  del argv
  from absl import flags

  f = flags.FLAGS
  try:
    model, config = load_model(f.checkpoint_dir)
    tok = _tokenizer(config, f.checkpoint_dir, f.tokenizer_path)
  except (FileNotFoundError, ValueError, KeyError) as err:  # CheckpointError is a ValueError.
    print(f"hope_jax.sample: error: {err}", file=sys.stderr)
    sys.exit(2)
  prompt = np.asarray(tok.encode(f.prompt), np.int32)[None]
  if prompt.shape[1] == 0:
    print("hope_jax.sample: error: --prompt must not be empty", file=sys.stderr)
    sys.exit(2)
  kw = dict(temperature=f.temperature, seed=f.seed, top_k=f.top_k, top_p=f.top_p)
  new, secs = generate(model, prompt, f.max_new_tokens, timed=True, **kw)
  print(tok.decode(new[0].tolist()))
  print(f"{f.max_new_tokens} tokens in {secs:.2f} s ({f.max_new_tokens / secs:.1f} tokens/s, "
        f"prompt of {prompt.shape[1]} tokens included, compilation excluded)", file=sys.stderr)


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("checkpoint_dir", None, "Directory holding the run's checkpoints.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
  flags.DEFINE_string("tokenizer_path", None, "vocab.json for character-level runs.")
  flags.mark_flag_as_required("checkpoint_dir")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
