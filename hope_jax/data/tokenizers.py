"""Tokenizers: byte-level (vocab 256) and character vocabularies (`vocab.json`).

A character vocabulary covers any Unicode script; ids 0 and 1 are PAD and UNK.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable, Protocol

import numpy as np

from hope_jax.config import ConfigError

PAD, UNK = "<pad>", "<unk>"
VOCAB_FORMAT = "hope_jax.char_vocab.v1"
# A run's character vocabulary, kept in its checkpoint folder (hope_jax.train.loop).
VOCAB_FILE = "vocab.json"


class Tokenizer(Protocol):
  vocab_size: int
  name: str

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def fingerprint(self) -> str: ...  # Names the vocabulary; checkpoints record it.


def vocabulary_mismatch(tok: Tokenizer, loader_state: dict | None, run_dir: str,
                        flag: str) -> str | None:
  """Why `tok` is not the vocabulary a checkpoint recorded (`loader_state`), or None.

  Checkpoints record `tokenizer_fingerprint` (hope_jax.train.loop). A character vocabulary
  counted from data that changed since gives other ids at the same size; the message
  points at the run's own `vocab.json` in `run_dir`, to pass as `flag`, when it is there.
  """
  saved = (loader_state or {}).get("tokenizer_fingerprint")
  if saved is None or saved == tok.fingerprint():
    return None
  kept = os.path.join(run_dir, VOCAB_FILE)
  hint = f"; pass {flag}={kept} to keep the run's ids" if os.path.isfile(kept) else ""
  return (f"the data's {tok.name} vocabulary (fingerprint {tok.fingerprint()}) is not the one "
          f"the checkpoint was trained with (fingerprint {saved}): its ids would mean other "
          f"tokens{hint}")


class ByteTokenizer:
  """UTF-8 bytes as tokens; decode replaces invalid sequences."""

  vocab_size = 256
  name = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

  def fingerprint(self) -> str:
    return "byte"


class CharTokenizer:
  """A character vocabulary with PAD (id 0) and UNK (id 1)."""

  name = "char"

  def __init__(self, chars: Iterable[str]):
    self.itos = [PAD, UNK] + [c for c in chars if c not in (PAD, UNK)]
    self.stoi = {c: i for i, c in enumerate(self.itos)}
    self.vocab_size = len(self.itos)

  @classmethod
  def build(cls, texts: Iterable[str], min_count: int = 1) -> "CharTokenizer":
    """Builds a vocabulary of every character seen (most frequent first).

    `texts` may be any iterable of strings, e.g. streamed chunks of a large file.
    """
    counts: Counter[str] = Counter()
    for text in texts:
      counts.update(text)
    return cls.from_counts(counts, min_count)

  @classmethod
  def from_counts(cls, counts: Counter, min_count: int = 1) -> "CharTokenizer":
    """The vocabulary of characters counted at least `min_count` times."""
    chars = sorted((c for c, n in counts.items() if n >= min_count),
                   key=lambda c: (-counts[c], c))
    return cls(chars)

  def _lookup_table(self) -> np.ndarray:
    """Code point -> id for every single-character token (UNK elsewhere)."""
    if getattr(self, "_table", None) is None:
      chars = [c for c in self.itos[2:] if len(c) == 1]
      table = np.full(max((ord(c) for c in chars), default=0) + 1, 1, dtype=np.int32)
      for c in chars:
        table[ord(c)] = self.stoi[c]
      self._table = table
    return self._table

  def encode(self, text: str) -> np.ndarray:
    """Vectorized: UTF-32 code points index a lookup table (see encode_reference)."""
    table = self._lookup_table()
    cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
    inside = cps < len(table)
    return np.where(inside, table[np.where(inside, cps, 0)], 1).astype(np.int32)

  def encode_reference(self, text: str) -> np.ndarray:
    """The plain per-character twin of `encode`."""
    unk = 1
    return np.fromiter((self.stoi.get(c, unk) for c in text), dtype=np.int32, count=len(text))

  def fingerprint(self) -> str:
    """A short hash of the vocabulary (names caches of encoded corpora)."""
    import hashlib

    return hashlib.sha256("\x00".join(self.itos).encode("utf-8", "surrogatepass")).hexdigest()[:16]

  def decode(self, ids: Iterable[int]) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i == 0:
        continue
      out.append(self.itos[i] if 0 <= i < self.vocab_size and i != 1 else "\ufffd")
    return "".join(out)

  def save(self, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"format": VOCAB_FORMAT, "pad_token": PAD, "unk_token": UNK,
                 "vocab_size": self.vocab_size, "tokens": self.itos}, f, ensure_ascii=False)

  @classmethod
  def load(cls, path: str) -> "CharTokenizer":
    """Loads a `vocab.json`; raises ConfigError naming the file if it is not one."""
    if not os.path.isfile(path):
      raise ConfigError(f"data.tokenizer_path: no such file: {path}")
    try:
      with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConfigError(f"data.tokenizer_path: {path} is not a vocabulary file ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != VOCAB_FORMAT or not isinstance(
        obj.get("tokens"), list) or obj["tokens"][:2] != [PAD, UNK] or not all(
            isinstance(t, str) and t for t in obj["tokens"]) or len(set(obj["tokens"])) != len(
                obj["tokens"]):
      raise ConfigError(
          f"data.tokenizer_path: {path} is not a hope_jax vocabulary "
          f"(expected JSON with format={VOCAB_FORMAT!r} and a 'tokens' list of distinct strings "
          "starting with PAD, UNK)")
    return cls(obj["tokens"][2:])
