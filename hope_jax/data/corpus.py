"""Token corpora behind `data.data_type`, each split into train and validation.

Every loader returns a `Corpus`: two 1-D integer arrays (a `np.memmap` for
large corpora) and the tokenizer that made them. The split is deterministic:
the last `val_fraction` of the token stream is held out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from hope_jax.config import ConfigError
from hope_jax.data.readers.text import read_text_file  # noqa: F401  (re-exported)
from hope_jax.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer

RANDOM_CORPUS_TOKENS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray  # [N_train] token ids
  val: np.ndarray  # [N_val] token ids
  tokenizer: Tokenizer
  description: str


def split(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Holds out the tail of `tokens`; both parts keep at least one window."""
  n = len(tokens)
  n_val = max(int(n * val_fraction), seq_len + 1)
  if n - n_val < seq_len + 1:
    raise ConfigError(
        f"data: the corpus has {n} tokens, too few for data.seq_len={seq_len} with "
        f"data.val_fraction={val_fraction} (need at least {2 * (seq_len + 1)})")
  return tokens[: n - n_val], tokens[n - n_val:]


def default_text() -> str:
  """The Python documentation topics that ship with CPython (~465 KB)."""
  from pydoc_data import topics  # Part of the standard library.

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _tokenizer_for(data_cfg: Any, texts_for_vocab=None) -> Tokenizer:
  if data_cfg.tokenizer == "byte":
    return ByteTokenizer()
  if data_cfg.tokenizer == "char":
    if data_cfg.tokenizer_path:
      return CharTokenizer.load(data_cfg.tokenizer_path)
    if texts_for_vocab is None:
      raise ConfigError("data.tokenizer='char' needs data.tokenizer_path (a vocab.json)")
    return CharTokenizer.build(texts_for_vocab)
  raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r} is not one of ('byte', 'char')")


def text_files(path: str) -> list[str]:
  """The `.txt` files at `path` (a file, or a folder searched recursively)."""
  if not os.path.exists(path):
    raise ConfigError(f"data.data_path: no such file or directory: {path}")
  if os.path.isfile(path):
    return [path]
  found = sorted(
      os.path.join(root, name) for root, _, names in os.walk(path)
      if not any(part.startswith(".") for part in os.path.relpath(root, path).split(os.sep)
                 if part != ".")
      for name in names if name.lower().endswith(".txt") and not name.startswith("."))
  if not found:
    raise ConfigError(f"data.data_path: no .txt files in {path}")
  return found


def load_corpus(data_cfg: Any, vocab_size: int) -> Corpus:
  """Loads the corpus named by `data_cfg.data_type` and checks the vocabulary size.

  Raises:
    ConfigError: unknown data type, missing path, or a vocabulary that does not
      match `model.vocab_size`.
  """
  kind = data_cfg.data_type
  if kind == "default":
    tok = _tokenizer_for(data_cfg, [default_text()])
    text = default_text()
    tokens, desc = tok.encode(text), "default corpus (pydoc_data.topics)"
  elif kind == "random":
    rng = np.random.default_rng(1234)
    tok = ByteTokenizer() if vocab_size == 256 else _RandomTokenizer(vocab_size)
    tokens = rng.integers(0, vocab_size, RANDOM_CORPUS_TOKENS, dtype=np.int32)
    desc = f"random tokens (vocab {vocab_size})"
  elif kind == "text":
    from hope_jax.data import text_corpus

    return text_corpus.load_text_corpus(data_cfg, vocab_size)
  elif kind == "books":
    from hope_jax.data import books  # Heavy optional readers, imported on demand.

    return books.load_books_corpus(data_cfg, vocab_size)
  else:
    raise ConfigError(
        f"data.data_type={kind!r} is not one of ('default', 'random', 'text', 'books')")
  check_vocab(tok, vocab_size)
  train, val = split(np.asarray(tokens, dtype=np.int32), data_cfg.val_fraction, data_cfg.seq_len)
  return Corpus(train=train, val=val, tokenizer=tok, description=desc)


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
  """The original guide's "vocab size mismatch", with both numbers and the fix."""
  if tok.vocab_size != vocab_size:
    raise ConfigError(
        f"vocab size mismatch: the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
        f"{vocab_size}; set --config.model.vocab_size={tok.vocab_size}")


class _RandomTokenizer:
  name = "random"

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) % self.vocab_size

  def decode(self, ids) -> str:
    return " ".join(str(int(i)) for i in ids)
