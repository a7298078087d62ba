"""`data.data_type='text'`: a text file or a folder of .txt files, any size.

Small corpora are encoded in memory. From `data.memmap_min_mb` on, the files
are streamed in chunks through the tokenizer into a token cache
(`<cache_dir>/text-<key>-<fingerprint>.tokens.bin`, memory-mapped), so a
corpus of several GB trains in little RAM; the key hashes the files' names,
sizes and mtimes and the fingerprint the vocabulary, so an edited corpus is
re-encoded (the old cache stays until deleted). A character vocabulary built
from a large corpus is cached beside it (`text-<key>.vocab.json`). Every cache
file is written under a name unique to its writer and renamed into place, so
concurrent runs building the same cache do not collide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Any

import numpy as np

from hope_jax.config import ConfigError
from hope_jax.data import token_store
from hope_jax.data.corpus import Corpus, _tokenizer_for, check_vocab, split, text_files
from hope_jax.data.readers.text import iter_text_chunks, read_text_file
from hope_jax.data.tokenizers import CharTokenizer

CACHE_FORMAT = "hope_jax.text_tokens.v1"
FILE_SEPARATOR = "\n\n"  # Appended after every file.


def _opt(cfg: Any, key: str, default):
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def cache_dir_for(data_path: str, cache_dir: str | None) -> str:
  if cache_dir:
    return cache_dir
  folder = data_path if os.path.isdir(data_path) else (os.path.dirname(data_path) or ".")
  return os.path.join(folder, ".hope_jax_cache")


def files_key(files: list[str]) -> str:
  """Hash of the files' absolute paths, sizes and modification times."""
  sig = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]
  return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:16]


def encode_files_to_memmap(files: list[str], tok, path: str, chunk_bytes: int = 1 << 24
                           ) -> np.ndarray:
  """Streams `files` through `tok` into `path` and memory-maps the result.

  Chunks of `chunk_bytes` keep memory bounded: at most one decoded chunk and
  its ids are in RAM at a time. Character and byte tokenizers map each
  character (byte) independently, so chunk boundaries do not change the ids.
  """
  sep = tok.encode(FILE_SEPARATOR)
  with token_store.TokenWriter(path, tok.vocab_size) as out:
    for p in files:
      for chunk in iter_text_chunks(p, chunk_bytes):
        out.write(tok.encode(chunk))
      out.write(sep)
    count = out.count
  dtype = token_store.dtype_for(tok.vocab_size).name
  token_store.write_json(path[: -len(".tokens.bin")] + ".json", {
      "format": CACHE_FORMAT, "num_tokens": count, "dtype": dtype,
      "files": [os.path.abspath(p) for p in files]})
  return token_store.open_tokens(path, dtype, count)


def ensure_writable(cache: str) -> None:
  """Creates `cache` and checks that files can be created in it.

  Called before a long counting or encoding pass, so that a read-only data
  folder fails at once with the setting to change, not with a traceback later.
  A probe file is the only test that holds for root, ACLs and read-only mounts.

  Raises:
    ConfigError: naming `data.cache_dir`.
  """
  try:
    os.makedirs(cache, exist_ok=True)
    probe = token_store.temp_path(os.path.join(cache, "write-probe"))
    with open(probe, "xb"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"data.cache_dir: cannot write to {cache} ({e.strerror or e}); set "
                      "--config.data.cache_dir to a writable folder") from None


def _open_cached(stem: str) -> np.ndarray | None:
  """The ids of the cache entry `stem`; None if it is absent or unusable.

  A cache is derived data: a record cut short, edited, or from another version,
  or a token file that does not match it, is stale (a warning names the file),
  and the caller encodes the corpus again.
  """
  record, tokens = stem + ".json", stem + ".tokens.bin"
  if not (os.path.isfile(record) and os.path.isfile(tokens)):
    return None
  try:
    with open(record, encoding="utf-8") as f:
      rec = json.load(f)
    if not isinstance(rec, dict) or rec.get("format") != CACHE_FORMAT:
      raise ValueError(f"expected a JSON object with format {CACHE_FORMAT!r}")
    for key in ("dtype", "num_tokens"):
      if key not in rec:
        raise ValueError(f"missing key {key!r}")
    return token_store.open_tokens(tokens, rec["dtype"], rec["num_tokens"])
  except (OSError, ValueError) as e:  # ValueError covers JSON, UTF-8 and ConfigError.
    logging.warning("token cache %s is unusable (%s); encoding the corpus again", record, e)
    return None


def cached_tokens(files: list[str], tok, cache: str) -> np.ndarray:
  """The memory-mapped ids of `files`, encoding them when no usable cache holds them."""
  stem = os.path.join(cache, f"text-{files_key(files)}-{tok.fingerprint()}")
  tokens = _open_cached(stem)
  if tokens is not None:
    return tokens
  ensure_writable(cache)
  others = [n for n in os.listdir(cache) if n.startswith("text-") and n.endswith(".tokens.bin")]
  if others:  # Each edit of a corpus leaves a full-size cache behind; say where.
    logging.info("%s holds %d other token cache(s); delete stale ones to free space",
                 cache, len(others))
  logging.info("encoding %d text file(s) into %s.tokens.bin", len(files), stem)
  return encode_files_to_memmap(files, tok, stem + ".tokens.bin")


def _streamed_char_vocab(files: list[str], cache: str) -> CharTokenizer:
  """A character vocabulary counted chunk by chunk (cached per corpus)."""
  path = os.path.join(cache, f"text-{files_key(files)}.vocab.json")
  if os.path.isfile(path):
    try:
      return CharTokenizer.load(path)
    except ConfigError as e:  # A damaged cache, not the user's data.tokenizer_path: rebuild it.
      logging.warning("%s; counting the corpus's characters again",
                      str(e).removeprefix("data.tokenizer_path: "))
  ensure_writable(cache)  # Before the counting pass, which may take minutes.
  counts = Counter(FILE_SEPARATOR)
  for p in files:
    for chunk in iter_text_chunks(p):
      counts.update(chunk)
  tok = CharTokenizer.from_counts(counts)
  tmp = token_store.temp_path(path)
  try:
    tok.save(tmp)
    token_store.publish(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info("built a %d-token character vocabulary: %s", tok.vocab_size, path)
  return tok


def load_text_corpus(data_cfg: Any, vocab_size: int) -> Corpus:
  """Loads `data.data_path` (file or folder of .txt), memory-mapped when large."""
  path = data_cfg.data_path
  if not path:
    raise ConfigError("data.data_path is required for data.data_type='text'")
  files = text_files(path)
  total = sum(os.path.getsize(p) for p in files)
  large = total >= float(_opt(data_cfg, "memmap_min_mb", 64.0)) * (1 << 20)
  cache = cache_dir_for(path, _opt(data_cfg, "cache_dir", None))
  if large and data_cfg.tokenizer == "char" and not data_cfg.tokenizer_path:
    tok = _streamed_char_vocab(files, cache)
    texts = None
  elif large:
    tok, texts = _tokenizer_for(data_cfg), None
  else:
    texts = [read_text_file(p) for p in files]
    tok = _tokenizer_for(data_cfg, texts + [FILE_SEPARATOR])
  check_vocab(tok, vocab_size)  # Before the (possibly long) encoding pass.
  if large:
    tokens = cached_tokens(files, tok, cache)
    desc = f"{len(files)} text file(s) from {path}, {total / 2**20:.0f} MiB, memory-mapped"
  else:
    sep = tok.encode(FILE_SEPARATOR)
    tokens = np.concatenate([part for t in texts for part in (tok.encode(t), sep)])
    tokens = tokens.astype(token_store.dtype_for(tok.vocab_size))
    desc = f"{len(files)} text file(s) from {path}"
  train, val = split(tokens, data_cfg.val_fraction, data_cfg.seq_len)
  return Corpus(train=train, val=val, tokenizer=tok, description=desc)
