"""Token corpora behind `data.data_type`, each split into train and validation.

Every loader returns a `Corpus`: two 1-D integer arrays (a `np.memmap` for
large corpora) and the tokenizer that made them. The split is deterministic:
the last `val_fraction` of the token stream is held out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from hope_jax.config import ConfigError
from hope_jax.data import tasks
from hope_jax.data.readers.text import is_binary_file, read_text_file  # noqa: F401  (re-export)
from hope_jax.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer

RANDOM_CORPUS_TOKENS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray  # [N_train] token ids
  val: np.ndarray  # [N_val] token ids
  tokenizer: Tokenizer
  description: str
  # Memory tasks (`hope_jax.data.tasks`): the streams are whole examples of
  # `seq_len + 1` tokens, so windows must start at multiples of that (`aligned`),
  # and `val_answers` marks the answer tokens of `val` (True) for accuracy.
  aligned: bool = False
  val_answers: np.ndarray | None = None


def split(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Holds out the tail of `tokens`; both parts keep at least one window."""
  window = seq_len + 1  # Inputs and their next tokens.
  n = len(tokens)
  n_val = max(int(n * val_fraction), window)
  if n - n_val < window:
    raise ConfigError(
        f"data: the corpus has {n} tokens, too few for data.seq_len={seq_len} with "
        f"data.val_fraction={val_fraction} (need at least {min_tokens(val_fraction, seq_len)})")
  return tokens[: n - n_val], tokens[n - n_val:]


def min_tokens(val_fraction: float, seq_len: int) -> int:
  """The fewest tokens that `split` accepts: a window for each part."""
  window = seq_len + 1
  # n - max(int(n * f), window) >= window, and n - int(n * f) never decreases
  # as n grows: start below the real-number bound and step up past rounding.
  n = max(2 * window, int((window - 1) / (1.0 - val_fraction)))
  while n - max(int(n * val_fraction), window) < window:
    n += 1
  return n


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


BOOKS_FORMAT = "hope_jax.books.v1"  # metadata.json's format tag of a preprocessed corpus.


def is_book_corpus_folder(folder: str) -> bool:
  """Whether `folder` was written by `preprocess_books` (its metadata.json has BOOKS_FORMAT)."""
  try:
    with open(os.path.join(folder, "metadata.json"), encoding="utf-8") as f:
      return json.load(f).get("format") == BOOKS_FORMAT
  except (OSError, UnicodeDecodeError, ValueError, AttributeError):
    return False


def text_files(path: str) -> list[str]:
  """The `.txt` files at `path` (a file, or a folder searched recursively).

  Symlinked folders are followed (each real folder once, so a link cycle
  ends). Broken links, unreadable files and binary files (NUL characters, as
  for TXT books) are skipped with a warning.

  Raises:
    ConfigError: `path` is missing, is a binary file, or holds no usable .txt file.
  """
  if not os.path.exists(path):
    raise ConfigError(f"data.data_path: no such file or directory: {path}")
  if os.path.isfile(path):
    if is_binary_file(path):
      raise ConfigError(f"data.data_path: {path} is not a text file (binary data)")
    return [path]
  found, skipped, seen = [], [], set()
  for root, dirs, names in os.walk(path, followlinks=True):
    st = os.stat(root)
    if (st.st_dev, st.st_ino) in seen:  # Reached again through a symlink.
      dirs[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    if root != path and is_book_corpus_folder(root):
      # A preprocess_books output: its text/*.txt are copies of books read elsewhere.
      logging.warning("skipped folder %s: a preprocessed book corpus (metadata.json format %s)",
                      root, BOOKS_FORMAT)
      dirs[:] = []
      continue
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in names:
      if not name.lower().endswith(".txt") or name.startswith("."):
        continue
      file = os.path.join(root, name)
      try:
        reason = ("broken link or not a regular file" if not os.path.isfile(file)
                  else "not a text file (binary data)" if is_binary_file(file) else None)
      except OSError as e:
        reason = f"unreadable ({e.strerror or e})"
      if reason:
        logging.warning("skipped %s: %s", file, reason)
        skipped.append(f"{os.path.relpath(file, path)}: {reason}")
      else:
        found.append(file)
  if not found:
    raise ConfigError(f"data.data_path: no .txt files in {path}"
                      + (f" (skipped: {'; '.join(skipped[:5])})" if skipped else ""))
  return sorted(found)


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
  elif kind in tasks.TASKS:
    return load_task_corpus(data_cfg, vocab_size)
  elif kind == "books":
    from hope_jax.data import books  # Heavy optional readers, imported on demand.

    return books.load_books_corpus(data_cfg, vocab_size)
  else:
    raise ConfigError(
        f"data.data_type={kind!r} is not one of ('default', 'random', 'text', 'books', "
        f"{', '.join(repr(t) for t in tasks.TASKS)})")
  check_vocab(tok, vocab_size)
  train, val = split(np.asarray(tokens, dtype=np.int32), data_cfg.val_fraction, data_cfg.seq_len)
  return Corpus(train=train, val=val, tokenizer=tok, description=desc)


def load_task_corpus(data_cfg: Any, vocab_size: int) -> Corpus:
  """A memory task as a corpus of whole examples (see `hope_jax.data.tasks`)."""
  train = tasks.task_examples(data_cfg, vocab_size, "train")
  val = tasks.task_examples(data_cfg, vocab_size, "val")
  tok = ByteTokenizer() if vocab_size == 256 else _RandomTokenizer(vocab_size)
  kind = data_cfg.data_type
  if kind == "mqar":
    desc = (f"MQAR: {data_cfg.mqar_pairs} pairs, "
            f"{data_cfg.mqar_queries or data_cfg.mqar_pairs} queries, gap {int(val.depth_N[0])}")
  else:
    depth = "random" if data_cfg.passkey_depth is None else data_cfg.passkey_depth
    desc = f"passkey: {data_cfg.passkey_digits} digits at depth {depth} in {data_cfg.seq_len + 1}"
  desc += (f" ({len(train.tokens_NW)} train / {len(val.tokens_NW)} validation examples, "
           f"seed {data_cfg.task_seed})")
  return Corpus(train=train.tokens_NW.reshape(-1), val=val.tokens_NW.reshape(-1), tokenizer=tok,
                description=desc, aligned=True, val_answers=val.answers_NW.reshape(-1))


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

  def fingerprint(self) -> str:
    return f"random{self.vocab_size}"
